"""The one training loop (`train/fit.py`), on a model small enough to reason
about: selection, early stopping, the non-finite guard, the checkpoint
schedule and resume from any step. The trainers' own tests (SASRec, SFT, RL)
only check that they are wired to it."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from taiji_jax.data import pipeline
from taiji_jax.train import checkpointing
from taiji_jax.train import fit as fit_lib
from taiji_jax.train import metric_writer

STEPS_PER_EPOCH = 3


class Crash(RuntimeError):
  pass


def _batches(num_steps, seed=0):
  """Seeded per-epoch permutations of 12 numbers, 4 per step."""
  values = np.arange(12, dtype=np.float32)

  def plan(epoch):
    order = np.random.default_rng([seed, epoch]).permutation(12)
    return order.reshape(STEPS_PER_EPOCH, 4)

  return iter(
      pipeline.step_batches(num_steps, STEPS_PER_EPOCH, plan,
                            lambda idx: {"x": values[idx]}).to_iter_dataset())


def _step(crash_at=None):

  @jax.jit
  def step(state, x):
    w = state["params"]["w"] + 0.1 * (x.mean() - 5.0) + 0.05
    return ({
        "params": {
            "w": w
        },
        "step": state["step"] + 1
    }, {
        "loss": (w - 1.0)**2,
        "x_mean": x.mean()
    })

  def train_step(state, batch, i):
    if i == crash_at:
      raise Crash(f"crash before step {i}")
    return step(state, jnp.asarray(batch["x"]))

  return train_step


def _evaluate(params):
  # Peaks where w is 0.3, then gets worse: selection and early stopping.
  w = float(params["w"])
  return {"ndcg@10": 1.0 - abs(w - 0.3), "w": w}


def _run(workdir, schedule, crash_at=None, evaluate=_evaluate):
  state0 = {"params": {"w": jnp.zeros(())}, "step": jnp.zeros((), jnp.int32)}
  shardings = jax.tree.map(lambda x: x.sharding, state0)
  ckpt = checkpointing.Checkpoints(workdir / "checkpoints")
  state, best, meta, _ = fit_lib.resume(ckpt, state0, state0["params"],
                                        shardings, fit_lib.initial_meta())
  writer = metric_writer.MetricWriter(workdir, resume_step=meta["step"])
  try:
    return fit_lib.fit(
        state,
        best,
        meta,
        train_step=_step(crash_at),
        batches=_batches(schedule.num_steps),
        schedule=schedule,
        checkpoints=ckpt,
        writer=writer,
        copy_params=lambda p: jax.tree.map(jnp.copy, p),
        evaluate=evaluate,
        progress_bar=False)
  finally:
    ckpt.close()


def _records(workdir):
  return [
      json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()
  ]


SCHEDULE = fit_lib.Schedule(
    num_steps=30,
    log_every=STEPS_PER_EPOCH,
    eval_every=STEPS_PER_EPOCH,
    checkpoint_every=2 * STEPS_PER_EPOCH,
    patience=3,
    steps_per_epoch=STEPS_PER_EPOCH)


def test_selects_the_best_evaluation_and_stops_after_patience(tmp_path):
  out = _run(tmp_path, SCHEDULE)
  records = _records(tmp_path)
  valid = [r["valid/ndcg@10"] for r in records]
  best = int(np.argmax(valid))
  # Stopped `patience` evaluations after the best one, before num_steps.
  assert len(records) == best + 1 + SCHEDULE.patience < 10
  assert out.meta["done"] and out.meta["bad_evals"] == SCHEDULE.patience
  assert out.meta["best_step"] == records[best]["step"]
  assert out.meta["best"] == valid[best] == out.meta["best_valid"]["ndcg@10"]
  assert float(out.best_params["w"]) == pytest.approx(
      records[best]["valid/w"])
  # One record per epoch: the window's mean metrics, the epoch number.
  assert [r["epoch"] for r in records] == list(range(1, len(records) + 1))
  assert all(r["step"] == STEPS_PER_EPOCH * r["epoch"] for r in records)
  np.testing.assert_allclose([r["train/x_mean"] for r in records], 5.5)


def test_a_run_crashed_at_any_step_resumes_to_the_same_result(tmp_path):
  straight = _run(tmp_path / "straight", SCHEDULE)
  for crash_at in (4, 6, 7, 11):  # mid-epoch, at/after a checkpoint
    workdir = tmp_path / f"crash{crash_at}"
    with pytest.raises(Crash):
      _run(workdir, SCHEDULE, crash_at=crash_at)
    saved = checkpointing.Checkpoints(workdir / "checkpoints")
    assert saved.latest_step() == crash_at // 6 * 6 or (
        saved.latest_step() is None and crash_at < 6)
    saved.close()
    resumed = _run(workdir, SCHEDULE)
    assert resumed.meta == straight.meta
    assert float(resumed.state["params"]["w"]) == float(
        straight.state["params"]["w"])
    assert float(resumed.best_params["w"]) == float(
        straight.best_params["w"])
    strip = lambda rs: [{
        k: v for k, v in r.items() if "seconds" not in k and k != "time"
    } for r in rs]
    assert strip(_records(workdir)) == strip(_records(tmp_path / "straight"))


def test_a_finished_run_is_not_trained_again(tmp_path):
  first = _run(tmp_path, SCHEDULE)
  again = _run(tmp_path, SCHEDULE, crash_at=0)  # any step would crash
  assert again.meta == first.meta


def test_without_evaluation_the_final_parameters_are_the_result(tmp_path):
  schedule = fit_lib.Schedule(num_steps=7, checkpoint_every=3)
  out = _run(tmp_path, schedule, evaluate=None)
  assert out.meta["best_step"] == 7 and out.meta["done"]
  assert float(out.best_params["w"]) == float(out.state["params"]["w"])
  records = _records(tmp_path)
  assert [r["step"] for r in records] == list(range(1, 8))
  assert not any("valid/ndcg@10" in r for r in records)
  saved = checkpointing.Checkpoints(tmp_path / "checkpoints", max_to_keep=5)
  assert saved.latest_step() == 7
  saved.close()


def test_a_non_finite_loss_stops_the_run_naming_the_step(tmp_path):

  def nan_eval(params):
    return {"ndcg@10": 0.0}

  schedule = fit_lib.Schedule(num_steps=6, log_every=3, eval_every=3)
  state = {"params": {"w": jnp.array(jnp.nan)}, "step": jnp.zeros((), jnp.int32)}
  ckpt = checkpointing.Checkpoints(tmp_path / "checkpoints")
  with pytest.raises(FloatingPointError, match="up to step 3"):
    fit_lib.fit(
        state,
        state["params"],
        fit_lib.initial_meta(),
        train_step=_step(),
        batches=_batches(6),
        schedule=schedule,
        checkpoints=ckpt,
        writer=metric_writer.MetricWriter(tmp_path),
        copy_params=lambda p: p,
        evaluate=nan_eval,
        progress_bar=False)
  ckpt.close()
  assert not (tmp_path / "checkpoints" / "3").exists()


@pytest.mark.parametrize("fields", [
    dict(num_steps=0),
    dict(num_steps=10, log_every=0),
    dict(num_steps=10, eval_every=-1),
    dict(num_steps=10, checkpoint_every=-2),
])
def test_schedules_that_cannot_be_kept_are_refused(fields):
  with pytest.raises(ValueError, match="Schedule"):
    fit_lib.Schedule(**fields)


def test_records_close_at_log_evaluation_and_checkpoint_steps():
  """An epoch need not be a multiple of the log interval: records close
  every log_every steps and also wherever the loop evaluates or saves."""
  schedule = fit_lib.Schedule(
      num_steps=10, log_every=3, eval_every=4, checkpoint_every=5)
  assert [s for s in range(1, 11) if schedule.records(s)] == [
      3, 4, 5, 6, 8, 9, 10]


def test_step_batches_resume_from_the_iterator_state():
  it = _batches(12)
  first = [next(it)["x"] for _ in range(5)]
  state = it.get_state()
  rest = [next(it)["x"] for _ in range(7)]
  again = _batches(12)
  again.set_state(state)
  np.testing.assert_array_equal(
      np.stack([next(again)["x"] for _ in range(7)]), np.stack(rest))
  # Each epoch (3 steps) covers every value once, in a new order.
  epochs = np.stack(first[:3]).ravel(), np.stack(rest[1:4]).ravel()
  for e in epochs:
    assert sorted(e.tolist()) == list(range(12))
  assert not np.array_equal(*epochs)
