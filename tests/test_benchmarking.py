"""The benchmarks' shared plumbing (`taiji_jax.benchmarking`)."""

import json
import pathlib

import pytest

from taiji_jax import benchmarking
from taiji_jax import config_lib


def test_parse_mesh():
  assert benchmarking.parse_mesh("data:2,fsdp:4") == {"data": 2, "fsdp": 4}
  assert benchmarking.parse_mesh(" data : -1 , tensor:1, ") == {
      "data": -1,
      "tensor": 1
  }
  assert benchmarking.parse_mesh("") == {}


@pytest.mark.parametrize("text, bad", [("data:2,fsdp", "'fsdp'"),
                                       ("data:two", "'data:two'"),
                                       (":4", "':4'"),
                                       ("data:1,data:2", "'data'")])
def test_parse_mesh_names_the_bad_part(text, bad):
  with pytest.raises(ValueError, match=bad):
    benchmarking.parse_mesh(text)


def test_fields_and_write_result(tmp_path, capsys):
  result = {
      **benchmarking.environment_fields(2),
      **benchmarking.memory_fields()
  }
  assert result["device"].endswith(" x2") and result["platform"] == "cpu"
  assert result["peak_rss_mib"] > 0 and result["device_peak_mib"] is None
  path = benchmarking.write_result(tmp_path / "out", "x", result, "| row |")
  assert path == tmp_path / "out" / "x.json"
  assert json.loads(path.read_text()) == result
  assert capsys.readouterr().out.endswith("}\n| row |\n")


def test_sft_decoder_is_the_config_model_or_a_preset():
  config = config_lib.load_config_file(
      pathlib.Path(__file__).resolve().parents[1] / "configs" / "ml100k_sft.py")
  vocab = benchmarking.sid_vocab_size(config, benchmarking.DEFAULT_CODEBOOKS)
  assert vocab == 8 + 196 + config.vocab.size
  cfg = benchmarking.sft_decoder(config, vocab, overrides={"remat": True})
  assert (cfg.vocab_size, cfg.hidden_size, cfg.remat) == (vocab, 128, True)
  llama = benchmarking.sft_decoder(config, None, "llama_1b", {"num_layers": 1})
  assert (llama.vocab_size, llama.hidden_size, llama.num_layers) == (128_256,
                                                                     2048, 1)
