"""The anchor-then-co-train recipe (hmem spec A2): `config.init_from` seeds a memory model with an anchor's params."""

import jax
import numpy as np
import pytest

import train
from configs.facts import anchor, hmem
from memarch.training import checkpoint, state as state_lib


def test_hmem_run_starts_from_the_anchor_checkpoint(tmp_path, monkeypatch):
  # Given an anchor trained for two steps (and checkpointed) in a workdir named relative to the current
  # directory, as the README's commands name theirs (orbax itself takes absolute paths only).
  monkeypatch.chdir(tmp_path)
  data = str(tmp_path / "tfds")
  cfg = anchor.get_config("runlocal,steps=2")
  cfg.log_every, cfg.eval_every, cfg.ckpt_every = 1, 2, 2
  cfg.input.data_dir = data
  train.train_and_evaluate(cfg, "workdir/anchor")
  assert (tmp_path / "workdir" / "anchor" / "checkpoints" / "2").is_dir()
  src = checkpoint.load_params("workdir/anchor")
  # When the memory model is created with init_from (zero steps: the state right after the warm start is saved).
  cfg = hmem.get_config("runlocal,steps=1,init_from=workdir/anchor")
  assert cfg.init_from == "workdir/anchor"
  cfg.log_every, cfg.eval_every, cfg.ckpt_every, cfg.total_steps = 1, 1, 1, 1
  cfg.input.data_dir = data
  cfg.optax.lr = 1e-12  # one (negligible) step, so the checkpoint shows the starting params
  train.train_and_evaluate(cfg, "workdir/hmem")
  got = checkpoint.load_params("workdir/hmem")
  # Then every anchor array was copied into the same path, and the bank exists only in the new model.
  flat = lambda t: {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(t)}
  s, g = flat(src), flat(got)
  here = lambda k: k if k in g else k.replace("['mlp']", "['mlp']['anchor']")
  assert all(here(k) in g for k in s) and any("up_1" in k for k in g)
  for k, v in s.items():
    np.testing.assert_allclose(g[here(k)], v, rtol=0, atol=1e-6, err_msg=k)


def test_warm_start_rejects_a_shape_mismatch():
  state = {"params": {"w": np.zeros((2, 3), np.float32)}}
  shardings = {"params": {"w": None}}
  with pytest.raises(ValueError, match="w has shape"):
    state_lib.warm_start(state, {"w": np.zeros((3, 3), np.float32)}, shardings)
  new, copied = state_lib.warm_start(state, {"w": np.ones((2, 3), np.float32), "other": np.ones(1)}, shardings)
  assert copied == ["w"] and float(new["params"]["w"].sum()) == 6.0
