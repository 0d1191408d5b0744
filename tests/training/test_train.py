"""End-to-end tests of train.py on 8 simulated CPU devices (CONVENTIONS.md C14)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from absl import logging

import helpers_training as ht
import train


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
