"""Checkpoints are verified on restore: a flipped byte, a truncated or an
emptied file in the newest step gives the previous step (the damaged one
set aside), never altered values; no intact step is a clear error."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from taiji_jax.train import checkpointing


def _state(v):
  return {"w": jnp.full((64, 32), v, jnp.float32), "step": jnp.int32(v)}


def _abstract():
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                      _state(0.0))


def _saved(tmp_path):
  ckpt = checkpointing.Checkpoints(tmp_path / "ckpt")
  ckpt.save(1, _state(1.0), {"step": 1})
  ckpt.save(2, _state(2.0), {"step": 2})
  return ckpt


def _data_files(ckpt, step):
  d = ckpt.directory / str(step)
  files = [p for p in d.rglob("*") if p.is_file() and p.stat().st_size > 64]
  assert files
  return files


def _flip(path, offset):
  b = bytearray(path.read_bytes())
  b[offset % len(b)] ^= 0xFF
  path.write_bytes(bytes(b))


@pytest.mark.parametrize("damage", ["flip", "truncate", "empty", "delete"])
def test_a_damaged_latest_step_falls_back_to_the_intact_one(tmp_path, damage):
  ckpt = _saved(tmp_path)
  assert ckpt.verify(1) is None and ckpt.verify(2) is None
  target = max(_data_files(ckpt, 2), key=lambda p: p.stat().st_size)
  if damage == "flip":
    _flip(target, target.stat().st_size // 2)
  elif damage == "truncate":
    target.write_bytes(target.read_bytes()[:target.stat().st_size // 2])
  elif damage == "empty":
    target.write_bytes(b"")
  else:
    target.unlink()
  assert "differ from their digests" in ckpt.verify(2)
  state, meta = ckpt.restore(_abstract())
  assert meta == {"step": 1}
  np.testing.assert_array_equal(state["w"], 1.0)
  # The damaged step is set aside, so the run can save step 2 again.
  assert ckpt.latest_step() == 1
  assert any((ckpt.directory / "damaged").iterdir())
  ckpt.save(2, _state(2.5), {"step": 2})
  state, _ = ckpt.restore(_abstract())
  np.testing.assert_array_equal(state["w"], 2.5)
  ckpt.close()


def test_every_single_byte_flip_is_caught(tmp_path):
  ckpt = _saved(tmp_path)
  files = _data_files(ckpt, 2)
  for path in files:
    for offset in (0, 7, path.stat().st_size // 3, -1):
      _flip(path, offset)
      assert ckpt.verify(2) is not None, (path, offset)
      _flip(path, offset)  # undo
      assert ckpt.verify(2) is None
  ckpt.close()


def test_no_intact_step_is_an_error_naming_each(tmp_path):
  ckpt = _saved(tmp_path)
  for step in (1, 2):
    _flip(max(_data_files(ckpt, step), key=lambda p: p.stat().st_size), 100)
  with pytest.raises(checkpointing.CheckpointCorrupt, match="step 2: .*step 1:"):
    ckpt.restore(_abstract())
  ckpt.close()


def test_a_step_without_its_digest_is_not_trusted(tmp_path):
  ckpt = _saved(tmp_path)
  (ckpt.directory / checkpointing.DIGESTS / "2.json").unlink()
  assert "missing" in ckpt.verify(2)
  _, meta = ckpt.restore(_abstract())
  assert meta == {"step": 1}
  ckpt.close()


def test_digests_follow_max_to_keep(tmp_path):
  ckpt = _saved(tmp_path)
  ckpt.save(3, _state(3.0), {"step": 3})
  names = sorted(p.name for p in (ckpt.directory /
                                  checkpointing.DIGESTS).iterdir())
  assert names == ["2.json", "3.json"]
  json.loads((ckpt.directory / checkpointing.DIGESTS / "3.json").read_text())
  ckpt.close()
