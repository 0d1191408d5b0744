"""The head at labelled positions only (``labels_per_row``, spec bmojo.md §6.5): same loss, accuracies and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from memarch.models.lm import Model
from memarch.training import step as step_lib
from memarch.training import validate
from tests.training import helpers_training

V, B, T = 32, 4, 12


def _batch(labels_per_row):
  rng = np.random.default_rng(0)
  targets = np.full((B, T), step_lib.IGNORE, np.int32)
  for r in range(B):  # rows with different label counts (<= labels_per_row), one with none
    n = min(r + 1, labels_per_row) if r < B - 1 else 0
    targets[r, np.sort(rng.choice(T, n, replace=False))] = rng.integers(0, V, n)
  return {"inputs": jnp.asarray(rng.integers(0, V, (B, T)), jnp.int32), "targets": jnp.asarray(targets),
          "segment_ids": jnp.ones((B, T), jnp.int32), "positions": jnp.broadcast_to(jnp.arange(T), (B, T))}


def test_gathered_head_gives_the_same_step():
  model = Model(vocab_size=V, variant=None, d_model=16, num_layers=1, num_heads=2, mixers=("sliding_window",),
                window=4)
  batch = _batch(3)
  params = jax.jit(model.init)(jax.random.key(0), batch["inputs"])["params"]
  tx = optax.sgd(0.1)
  state = {"params": params, "opt": tx.init(params), "step": jnp.zeros((), jnp.int32),
           "rng": jax.random.key_data(jax.random.key(0))}
  run = lambda n: jax.jit(lambda s, b: step_lib.train_step(s, b, model=model, tx=tx, schedule=lambda _: 0.1,
                                                           labels_per_row=n))(state, batch)
  (full, m_full), (gathered, m_gathered) = run(None), run(3)
  for key in ("loss", "accuracy", "token_accuracy", "l2_grads"):
    np.testing.assert_allclose(m_gathered[key], m_full[key], rtol=1e-6, err_msg=key)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), gathered["params"],
               full["params"])
  # Too few slots drop labels: the step then differs (so the test above can fail), and the host check says so.
  _, m_short = run(2)
  assert abs(float(m_short["loss"]) - float(m_full["loss"])) > 1e-4
  with pytest.raises(ValueError, match="labels_per_row=2: a training row has 3 labelled targets"):
    step_lib.check_labels_per_row(np.asarray(batch["targets"]), 2)
  step_lib.check_labels_per_row(np.asarray(batch["targets"]), 3)


def test_labelled_positions_come_first_in_order():
  targets = jnp.asarray([[-100, 5, -100, 7], [1, -100, -100, -100]])
  np.testing.assert_array_equal(step_lib.labelled_positions(targets, 2), [[1, 3], [0, 1]])


def test_bad_labels_per_row_is_named(tmp_path):
  config = helpers_training.tiny_config(str(tmp_path))
  assert config.labels_per_row == config.input.num_kv_pairs * 2  # runlocal's 8 pairs >= the tiny task's 4
  validate.validate(config)
  config.labels_per_row = 0
  with pytest.raises(ValueError, match=r"labels_per_row=0 must be a positive int"):
    validate.validate(config)
