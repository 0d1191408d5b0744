"""End-to-end tests of train.py on 8 simulated CPU devices (CONVENTIONS.md C14)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from absl import logging

import helpers_training as ht
import train
from memarch.training import checkpoint


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("tfds"))


@pytest.fixture(scope="module")
def reference(data_dir, tmp_path_factory):
  """An uninterrupted 4-step run on all 8 devices (mesh data=8): (workdir, history)."""
  workdir = str(tmp_path_factory.mktemp("reference"))
  return workdir, train.train_and_evaluate(ht.tiny_config(data_dir), workdir)


def test_reference_run_writes_metrics_and_checkpoints(reference):
  # Given the uninterrupted run; Then it logged every step, evaluated at the end and kept its checkpoints.
  workdir, history = reference
  assert [h["step"] for h in history] == [1, 2, 3, 4]
  assert all(np.isfinite(h["loss"]) for h in history)
  records = ht.read_jsonl(workdir)
  assert {"train/loss", "train/accuracy", "train/token_accuracy", "train/l2_grads", "train/l2_params"} <= set(
      records[0])
  assert {"train/tokens_per_s", "train/mfu"} <= set(records[-2])
  assert any("eval/test/accuracy" in r for r in records)
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2", "4"]
  assert os.listdir(os.path.join(workdir, "tensorboard"))


@pytest.mark.parametrize("mesh", [
    [("data", 4), ("fsdp", 1), ("tensor", 2)],
    [("data", 2), ("fsdp", 4), ("tensor", 1)],
], ids=["data4_tensor2", "data2_fsdp4"])
def test_smoke_sharded_meshes(mesh, data_dir, reference, tmp_path):
  # Given a tensor-parallel or FSDP mesh; When training 2 steps; Then losses match the data-parallel run.
  config = ht.tiny_config(data_dir, mesh=mesh, total_steps=4)
  history = train.train_and_evaluate(config, str(tmp_path), interrupt_at_step=2)
  got, want = ht.losses(history), ht.losses(reference[1])
  np.testing.assert_allclose([got[1], got[2]], [want[1], want[2]], rtol=1e-5)


@pytest.mark.parametrize("mesh", [None, [("data", 4), ("fsdp", 1), ("tensor", 2)]], ids=["same_mesh", "tensor2"])
def test_eval_mode_scores_the_newest_checkpoint_as_the_loop_did(mesh, data_dir, reference):
  # Given the reference run, which scored its last (step-4) checkpoint inside the loop;
  workdir, _ = reference
  want = [r for r in ht.read_jsonl(workdir) if "eval/test/accuracy" in r][-1]
  checkpoints = sorted(os.listdir(os.path.join(workdir, "checkpoints")))
  # When the eval mode scores that workdir on the same task (on the training mesh or a tensor-parallel one);
  got = train.evaluate_checkpoint(ht.tiny_config(data_dir, **({"mesh": mesh} if mesh else {})), workdir)
  # Then it reports step 4 with the loop's numbers, appends them to eval.jsonl and leaves the checkpoints alone.
  assert got["step"] == want["step"] == 4
  evals = {k: v for k, v in want.items() if k.startswith("eval/")}
  assert {"eval/test/accuracy", "eval/test/loss"} <= set(evals)
  assert {k: got[k] for k in evals} == pytest.approx(evals, rel=1e-5)
  with open(os.path.join(workdir, "eval.jsonl"), encoding="utf-8") as f:
    line = json.loads(f.readlines()[-1])
  assert line["step"] == 4 and line["input"]["seq_len"] == 32 and line["eval/test/loss"] == got["eval/test/loss"]
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == checkpoints


def test_eval_mode_takes_the_task_of_its_config(data_dir, reference):
  # Given the reference checkpoint; When scored on a test split of 8 rows (the run's had 32);
  config = ht.tiny_config(data_dir)
  config.input.num_test = 8
  got = train.evaluate_checkpoint(config, reference[0])
  # Then the split holds the 8 new rows.
  assert got["eval/test/examples"] == 8


def test_eval_mode_names_what_does_not_fit(data_dir, reference, tmp_path):
  # A workdir without checkpoints;
  with pytest.raises(ValueError, match="no checkpoint under"):
    train.evaluate_checkpoint(ht.tiny_config(data_dir), str(tmp_path))
  # a wider model (a parameter of another shape);
  wide = ht.tiny_config(data_dir)
  wide.model.d_model = 48
  shapes = r"parameter \S+ has shape \(.*32.*\) in the checkpoint and \(.*48.*\) in the model"
  with pytest.raises(ValueError, match=shapes):
    train.evaluate_checkpoint(wide, reference[0])
  # and a model with an MLP the checkpoint lacks.
  mlp = ht.tiny_config(data_dir)
  mlp.model.mlp = "swiglu"
  with pytest.raises(ValueError, match=r"the checkpoint lacks \d+ of the model's \d+ parameters, e\.g\. \[.*mlp"):
    train.evaluate_checkpoint(mlp, reference[0])


def test_latest_params_reads_only_the_params_to_host(reference):
  # Given the reference run's newest (step-4) checkpoint, restored whole as train.py resumes it;
  workdir, _ = reference
  manager = ocp.CheckpointManager(os.path.join(workdir, "checkpoints"), item_names=("state",),
                                  item_handlers={"state": ocp.StandardCheckpointHandler()})
  whole = manager.restore(4, args=ocp.args.Composite(state=ocp.args.StandardRestore(
      jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), manager.item_metadata(4)["state"]))))["state"]
  manager.close()
  # When only its params are read;
  step, params = checkpoint.latest_params(workdir)
  # Then they are the params of that state, as host numpy arrays.
  assert step == 4
  assert jax.tree.structure(params) == jax.tree.structure(whole["params"])
  for got, want in zip(jax.tree.leaves(params), jax.tree.leaves(whole["params"])):
    assert type(got) is np.ndarray and got.dtype == want.dtype
    np.testing.assert_array_equal(got, np.asarray(want))
  # And the older checkpoint can be read by its step (other params), a missing step is named with those there are.
  assert checkpoint.checkpoint_steps(workdir) == [2, 4]
  step2, params2 = checkpoint.params_at(workdir, step=2)
  assert step2 == 2 and jax.tree.structure(params2) == jax.tree.structure(params)
  assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(params2), jax.tree.leaves(params)))
  with pytest.raises(ValueError, match=r"no checkpoint of step 3 under .* \(steps: \[2, 4\]\)"):
    checkpoint.params_at(workdir, step=3)


def test_kill_and_resume_is_bitwise_identical(data_dir, reference, tmp_path):
  # Given a run stopped (as by SIGTERM) after step 2, which checkpoints there;
  config = ht.tiny_config(data_dir)
  first = train.train_and_evaluate(config, str(tmp_path), interrupt_at_step=2)
  assert [h["step"] for h in first] == [1, 2]
  # When the same command runs again;
  second = train.train_and_evaluate(config, str(tmp_path))
  # Then it resumes at step 3 and every loss equals the uninterrupted run's, to the bit.
  assert [h["step"] for h in second] == [3, 4]
  assert ht.losses(first) | ht.losses(second) == ht.losses(reference[1])


def test_lr_drop_at_a_loss_and_resume(data_dir, reference, tmp_path):
  # Given the reference run, whose step-3 loss is its first below those before it, and a drop threshold between;
  ref = {h["step"]: h for h in reference[1]}
  assert ref[3]["loss"] < min(ref[1]["loss"], ref[2]["loss"])
  config = ht.tiny_config(data_dir)
  config.optax.lr_drop_below_loss = float((min(ref[1]["loss"], ref[2]["loss"]) + ref[3]["loss"]) / 2)
  config.optax.lr_drop_factor = 0.25
  # When it runs straight through, and again stopped after step 3 and resumed with a threshold no loss reaches
  # (so only the switch read back from the checkpoint can keep the lr down);
  full = train.train_and_evaluate(config, str(tmp_path / "full"))
  first = train.train_and_evaluate(config, str(tmp_path / "resumed"), interrupt_at_step=3)
  config.optax.lr_drop_below_loss = 1e-9
  second = train.train_and_evaluate(config, str(tmp_path / "resumed"))
  # Then steps 1-2 step at the schedule's lr, steps 3-4 at a quarter of it, so the step-4 loss moves off the
  # reference; and the resumed run matches to the bit.
  run = {h["step"]: h for h in full}
  assert [run[s]["loss"] for s in (1, 2, 3)] == [ref[s]["loss"] for s in (1, 2, 3)]
  np.testing.assert_allclose([run[s]["lr"] for s in (1, 2, 3, 4)],
                             [ref[1]["lr"], ref[2]["lr"], 0.25 * ref[3]["lr"], 0.25 * ref[4]["lr"]], rtol=1e-6)
  assert run[4]["loss"] != ref[4]["loss"]
  assert ht.losses(first) | ht.losses(second) == ht.losses(full)
  assert [h["lr"] for h in first + second] == [h["lr"] for h in full]


def test_unreadable_newest_checkpoint_falls_back(data_dir, reference, tmp_path, monkeypatch):
  # Given a run that checkpointed at steps 2 and 4, whose step-4 checkpoint is then damaged;
  config = ht.tiny_config(data_dir, total_steps=6, ckpt_every=2)
  full = train.train_and_evaluate(config, str(tmp_path), interrupt_at_step=4)
  state_dir = tmp_path / "checkpoints" / "4" / "state"
  for path in state_dir.rglob("*"):
    if path.is_file():
      path.write_bytes(b"not a checkpoint")
  warnings = []
  monkeypatch.setattr(logging, "warning", lambda msg, *args: warnings.append(msg % args))
  # When it restarts;
  resumed = train.train_and_evaluate(config, str(tmp_path))
  # Then it warns, resumes from step 2 and reproduces steps 3 and 4.
  assert any("unreadable" in w and "step 4" in w for w in warnings), warnings
  assert [h["step"] for h in resumed][:2] == [3, 4]
  assert ht.losses(resumed)[3] == ht.losses(full)[3] and ht.losses(resumed)[4] == ht.losses(full)[4]
  assert (tmp_path / "checkpoints_unreadable" / "4").exists()


def test_nan_stops_with_the_step_window(data_dir, tmp_path):
  # Given a learning rate that overflows the parameters; Then the run stops naming the step window.
  config = ht.tiny_config(data_dir, total_steps=4, log_every=2)
  config.optax.lr, config.optax.clip, config.optax.warmup_steps = 1e38, 0.0, 0
  with pytest.raises(FloatingPointError, match=r"between steps (1 and 2|3 and 4)"):
    train.train_and_evaluate(config, str(tmp_path))


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def test_two_processes_match_one(data_dir, reference, tmp_path):
  # Given 2 processes x 4 CPU devices on localhost (gloo collectives) training the same config;
  port = _free_port()
  worker = os.path.join(os.path.dirname(__file__), "mp_worker.py")
  env = ht.subprocess_env()
  procs = [subprocess.Popen([sys.executable, worker, str(port), "2", str(i), data_dir, str(tmp_path)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
           for i in range(2)]
  outs = []
  try:
    for p in procs:
      outs.append(p.communicate(timeout=240)[0])
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out[-3000:]
  # Then both report the same losses, equal to the 1-process 8-device run's.
  import json  # pylint: disable=g-import-not-at-top
  got = [json.loads(next(line for line in out.splitlines() if line.startswith("LOSSES "))[7:]) for out in outs]
  assert got[0] == got[1]
  want = ht.losses(reference[1])
  np.testing.assert_allclose([got[0][str(s)] for s in sorted(want)], [want[s] for s in sorted(want)], rtol=1e-5)
  assert jax.device_count() == 8


def test_sigterm_checkpoints_and_the_rerun_resumes(data_dir, tmp_path):
  # Given the real command line running a long job in a subprocess;
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  workdir = str(tmp_path / "work")
  flags = ["--config", "configs/mqar/transformer.py:runlocal", "--workdir", workdir,
           "--config.input.seq_len=32", "--config.input.vocab_size=128", "--config.input.num_kv_pairs=4",
           "--config.input.num_train=256", "--config.input.num_test=32", f"--config.input.data_dir={data_dir}",
           "--config.model.vocab_size=128", "--config.model.d_model=32", "--config.model.max_len=128",
           "--config.log_every=1", "--config.eval_every=100000", "--config.ckpt_every=100000"]
  env = ht.subprocess_env()
  proc = subprocess.Popen([sys.executable, "train.py", *flags, "--config.total_steps=100000"], cwd=root, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  try:
    # When it has logged a few steps and receives SIGTERM;
    metrics_path = os.path.join(workdir, "metrics.jsonl")
    deadline = time.time() + 180
    while time.time() < deadline and proc.poll() is None:
      if os.path.exists(metrics_path) and len(ht.read_jsonl(workdir)) >= 3:
        break
      time.sleep(0.5)
    assert proc.poll() is None, proc.communicate()[0][-3000:]
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=120)[0]
  finally:
    if proc.poll() is None:
      proc.kill()
  # Then it exits cleanly with a checkpoint at the step it stopped after,
  assert proc.returncode == 0, out[-3000:]
  saved = sorted(int(s) for s in os.listdir(os.path.join(workdir, "checkpoints")))
  assert saved and saved[-1] >= 3
  # and rerunning the same command resumes from there.
  stop = saved[-1]
  rerun = subprocess.run([sys.executable, "train.py", *flags, f"--config.total_steps={stop + 2}"], cwd=root,
                         env=env, capture_output=True, text=True, timeout=300)
  assert rerun.returncode == 0, rerun.stdout[-2000:] + rerun.stderr[-3000:]
  steps = [r["step"] for r in ht.read_jsonl(workdir) if "train/loss" in r]
  assert steps[-2:] == [stop + 1, stop + 2] and steps.count(stop + 1) == 1
  # And --mode=eval scores the last checkpoint as the run's final evaluation did, without training.
  scored = subprocess.run([sys.executable, "train.py", *flags, "--mode=eval"], cwd=root, env=env,
                          capture_output=True, text=True, timeout=300)
  assert scored.returncode == 0, scored.stdout[-2000:] + scored.stderr[-3000:]
  final = [r for r in ht.read_jsonl(workdir) if "eval/test/accuracy" in r][-1]
  with open(os.path.join(workdir, "eval.jsonl"), encoding="utf-8") as f:
    (line,) = [json.loads(x) for x in f]
  assert line["step"] == final["step"] == stop + 2
  assert line["eval/test/loss"] == pytest.approx(final["eval/test/loss"], rel=1e-5)
  assert [r["step"] for r in ht.read_jsonl(workdir) if "train/loss" in r] == steps
