"""Opening what a finished stage left in its workdir.

The only module through which one stage reads another: the stage runners in
this package never import each other, they open their inputs here. Each
opener checks what it opens (the file is there, it was made for this
dataset) and says which stage to run when it is not.

  dataset / split          the dataset of any stage's config
  sasrec_scorer            a SASRec run's best-valid model (the preference
                           reward, the collaborative item table)
  sids_dir / load_sids     a sids run's `SemanticIds`
  sft_run / sft_decoder    an SFT run's data (vocabulary, SIDs, prompts) and
                           its best-valid decoder
  upstream_dir             the default place of an input stage: `../<stage>`
"""

from __future__ import annotations

import json
import os
import pathlib
from typing import Any

from flax import nnx
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from taiji_jax import data as data_lib
from taiji_jax import sharding
from taiji_jax.models import sasrec
from taiji_jax.quantize import semantic_ids as sid_lib
from taiji_jax.sidlm import rows as sid_rows
from taiji_jax.sidlm import task
from taiji_jax.text import pretrained_vocab
from taiji_jax.text import sid_tokens
from taiji_jax.train import checkpointing
from taiji_jax.train import optimizer
from taiji_jax.train import workdir as workdir_lib


def upstream_dir(configured: str | None, workdir: os.PathLike | str,
                 stage: str) -> pathlib.Path:
  """`configured` if set, else the sibling `<workdir>/../<stage>`."""
  if configured:
    return pathlib.Path(configured)
  return pathlib.Path(workdir).absolute().parent / stage


def dataset(config: ml_collections.ConfigDict) -> data_lib.Dataset:
  """The dataset of a stage config's `dataset` section."""
  kwargs = dict(config.dataset.get("kwargs", {}) or {})
  return data_lib.load_dataset(
      config.dataset.name, root=config.dataset.root or None, **kwargs)


def split(config: ml_collections.ConfigDict, length: int):
  """(dataset, its leave-one-out split with histories of `length`)."""
  ds = dataset(config)
  return ds, ds.split_leave_one_out(length)


# --- SASRec ---------------------------------------------------------------


def sasrec_model_config(config: ml_collections.ConfigDict,
                        num_items: int) -> sasrec.SASRecConfig:
  return sasrec.SASRecConfig(
      num_items=num_items, max_len=config.max_len, **config.model.to_dict())


def sasrec_scorer(workdir: os.PathLike | str):
  """A trained SASRec with its best-valid parameters, and its config.

  Returns:
    (model, config): call `sasrec.score(model, histories, items)`.
  """
  workdir = pathlib.Path(workdir)
  config = ml_collections.ConfigDict(workdir_lib.read_config(workdir))
  model_cfg = sasrec_model_config(config, dataset(config).num_items)
  model = nnx.eval_shape(
      lambda: sasrec.SASRec(model_cfg, rngs=nnx.Rngs(params=0)))
  graphdef, abstract_params = nnx.split(model, nnx.Param)
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  # The checkpoint holds the whole train state: restore its structure.
  tx = optimizer.from_config(config, 1)
  abstract_state = jax.eval_shape(
      lambda p: {
          "params": p,
          "opt_state": tx.init(p),
          "step": jnp.zeros((), jnp.int32)
      }, abstract_params)
  abstract = checkpointing.abstract_like(
      {
          "state": abstract_state,
          "best_params": abstract_params
      }, {
          "state": jax.tree.map(lambda _: device, abstract_state),
          "best_params": jax.tree.map(lambda _: device, abstract_params)
      })
  ckpt = checkpointing.Checkpoints(workdir / "checkpoints")
  try:
    restored, _ = ckpt.restore(abstract)
  finally:
    ckpt.close()
  return nnx.merge(graphdef, restored["best_params"]), config


def checked_sasrec(path: pathlib.Path, dataset_name: str, num_items: int,
                   needed_by: str):
  """`sasrec_scorer(path)`, refused unless trained on this dataset.

  Raises:
    FileNotFoundError: no SASRec run in `path` (says to run the stage).
    ValueError: it was trained on another dataset (names both).
  """
  if not (path / "config.json").is_file():
    raise FileNotFoundError(
        f"{needed_by} needs a trained SASRec in {path} (no config.json); run "
        "the sasrec stage or set the config's sasrec_workdir.")
  model, config = sasrec_scorer(path)
  if config.dataset.name != dataset_name or model.cfg.num_items != num_items:
    raise ValueError(f"{path}: SASRec was trained on "
                     f"{config.dataset.name!r} with {model.cfg.num_items} "
                     f"items; {needed_by} needs {dataset_name!r} with "
                     f"{num_items}.")
  return model, config


# --- SIDs -----------------------------------------------------------------


def sids_dir(config: ml_collections.ConfigDict,
             workdir: os.PathLike | str) -> pathlib.Path:
  """Where an SFT config reads its SIDs: `config.sids_workdir` or `../sids`."""
  return upstream_dir(config.sids_workdir, workdir, "sids")


def load_sids(config: ml_collections.ConfigDict, workdir: os.PathLike | str,
              ds) -> sid_lib.SemanticIds:
  """The sids stage's `SemanticIds`, checked against the dataset."""
  path = sids_dir(config, workdir)
  if not (path / sid_lib.FILE_NAME).is_file():
    raise FileNotFoundError(
        f"no {sid_lib.FILE_NAME} in {path}: run the sids stage first "
        f"(experiments/build_sids.py --workdir {path}) or set "
        "--config.sids_workdir.")
  return sid_lib.SemanticIds.load(path, ds.item_raw_ids)


# --- SFT ------------------------------------------------------------------


def task_data(config: ml_collections.ConfigDict,
              workdir: os.PathLike | str,
              vocab: sid_tokens.SidTokens,
              ds=None,
              sids: sid_lib.SemanticIds | None = None) -> task.Data:
  """The SID-LM `task.Data` of an SFT config with a given vocabulary (the
  dataset and SIDs are loaded unless given)."""
  ds = dataset(config) if ds is None else ds
  split_ = ds.split_leave_one_out(config.max_items)
  sids = load_sids(config, workdir, ds) if sids is None else sids
  vocab.check_compatible(sids)
  users = np.arange(1, ds.num_users + 1)
  return task.Data(
      ds, split_, sids, vocab, vocab.item_token_table(sids),
      sid_rows.user_prefixes(ds, vocab, users, config.max_prefix),
      task.history_titles(config, ds, vocab))


def sft_run(workdir: os.PathLike | str
           ) -> tuple[ml_collections.ConfigDict, task.Data]:
  """(config, `task.Data`) of a finished SFT run, its saved vocabulary.

  Nothing is written into `workdir`: a later stage (RL) reads the SFT run
  exactly as it was trained.
  """
  workdir = pathlib.Path(workdir)
  config = ml_collections.ConfigDict(workdir_lib.read_config(workdir))
  if not (workdir / "vocab").is_dir():
    raise FileNotFoundError(f"{workdir}: no vocab/ (is it an SFT workdir? "
                            "train it first).")
  return config, task_data(config, workdir,
                           pretrained_vocab.load_vocab(workdir / "vocab"))


def sft_best_params(source: os.PathLike | str, setup: task.Setup,
                    config: ml_collections.ConfigDict) -> Any:
  """The best-valid parameters of the SFT run in `source`, on this mesh.

  Raises:
    FileNotFoundError: `source` holds no finished SFT checkpoint.
    ValueError: its model or vocabulary settings differ from `config`'s
      (names the differing fields).
  """
  source = pathlib.Path(source)
  src_config = workdir_lib.read_config(source)
  here = json.loads(config.to_json_best_effort())
  for key in ("model", "vocab", "max_prefix", "max_items"):
    if src_config.get(key) != here.get(key):
      raise ValueError(f"init_from {source}: its {key!r} differs from this "
                       f"run's: {src_config.get(key)} vs "
                       f"{here.get(key)}.")
  ckpt = checkpointing.Checkpoints(source / "checkpoints")
  try:
    if ckpt.latest_step() is None:
      raise FileNotFoundError(f"init_from {source}: no checkpoint in "
                              f"{source / 'checkpoints'}; train it first.")
    abstract = checkpointing.abstract_like(
        {
            "state": setup.state,
            "best_params": setup.state["params"]
        }, {
            "state": setup.state_shardings,
            "best_params": setup.state_shardings["params"]
        })
    restored, _ = ckpt.restore(abstract)
  finally:
    ckpt.close()
  return restored["best_params"]


def sft_decoder(workdir: os.PathLike | str, data: task.Data):
  """(decoder with the best-valid parameters, `task.Setup`) of a finished
  SFT run.

  The run's own config.json says the model and mesh; `data` must hold the
  same vocabulary (checked through the parameter shapes on restore).
  """
  config = ml_collections.ConfigDict(workdir_lib.read_config(workdir))
  mesh = sharding.make_mesh(config.mesh.to_dict())
  model_cfg = task.model_config(config, data.vocab.size)
  # Any positive schedule length: only the state structure matters here.
  setup = task.build(config, model_cfg, config.train.warmup_steps + 2, mesh,
                     data.sids, data.vocab)
  params = sft_best_params(workdir, setup, config)
  return nnx.merge(setup.graphdef, params), setup
