"""The auxiliary frame-reconstruction loss (spec hcam.md §7): off is the old loss, on adds a checked MSE term."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from memarch.models import get_model
from memarch.models.lm import Model
from memarch.training import step as step_lib

F, V, B, T = 6, 8, 3, 9
WEIGHT = 0.5


def _model(**kw) -> Model:
  # The term lives in the LM and the step, whatever the mixer: a cheap one keeps the compiles short.
  return Model(vocab_size=V, input_features=F, variant=None, d_model=16, num_layers=1, num_heads=2,
               mixers=("sliding_window",), window=4, **kw)


def _batch():
  kx, kt = jax.random.split(jax.random.key(0))
  targets = np.full((B, T), step_lib.IGNORE, np.int32)
  targets[:, -1] = np.asarray(jax.random.randint(kt, (B,), 0, V))
  segment_ids = np.ones((B, T), np.int32)
  segment_ids[-1] = 0  # a padding row (its frames are non-zero here, so only the mask keeps them out)
  targets[-1] = step_lib.IGNORE
  return {"inputs": jax.random.normal(kx, (B, T, F)), "targets": jnp.asarray(targets),
          "segment_ids": jnp.asarray(segment_ids), "positions": jnp.zeros((B, T), jnp.int32)}


@functools.cache
def _params():
  """Params of the model without the head, and the same plus the reconstruction head."""
  batch = _batch()
  with_head = nn.meta.unbox(jax.jit(_model(recon_weight=WEIGHT).init)(jax.random.key(1), batch["inputs"]))["params"]
  assert with_head["recon_head"].shape == (16, F) and with_head["recon_bias"].shape == (F,)
  without = {k: v for k, v in with_head.items() if not k.startswith("recon_")}
  return without, with_head


@functools.cache
def _run(recon_weight):
  """:func:`_step` of the model with ``recon_weight`` (None: the field unset) on its params (one compile each)."""
  without, with_head = _params()
  kw = {} if recon_weight is None else {"recon_weight": recon_weight}
  return _step(_model(**kw), with_head if recon_weight else without)


def _step(model, params):
  """One jitted SGD step (lr 0.1); returns its metrics and the gradients, read off the update."""
  tx = optax.sgd(0.1)
  state = {"params": params, "opt": tx.init(params), "step": jnp.int32(0),
           "rng": jax.random.key_data(jax.random.key(0))}
  new_state, metrics = jax.jit(lambda s, b: step_lib.train_step(s, b, model=model, tx=tx, schedule=lambda s: 0.1))(
      state, _batch())
  grads = jax.tree.map(lambda p, q: (p - q) / 0.1, params, new_state["params"])
  return metrics, grads


def test_zero_weight_is_exactly_the_old_loss():
  # Given the feature LM with no recon_weight and with recon_weight=0, on the same params
  without, _ = _params()
  old_metrics, old_grads = _run(None)
  new_metrics, new_grads = _run(0.0)
  # Then metrics and gradients are bitwise the same and no reconstruction metric appears
  assert set(new_metrics) == set(old_metrics) and "recon_loss" not in new_metrics
  for k in old_metrics:
    np.testing.assert_array_equal(new_metrics[k], old_metrics[k], err_msg=k)
  jax.tree.map(np.testing.assert_array_equal, new_grads, old_grads)
  # and the loss is the query-position cross-entropy over the two real rows
  logits, _ = jax.jit(_model().apply)({"params": without}, _batch()["inputs"])
  ce = optax.softmax_cross_entropy_with_integer_labels(logits[:2, -1], _batch()["targets"][:2, -1])
  np.testing.assert_allclose(old_metrics["loss"], ce.mean(), rtol=1e-6)


def test_positive_weight_adds_the_masked_frame_mse_and_trains_the_head():
  # Given the same trunk with a reconstruction head and weight 0.5
  _, with_head = _params()
  model = _model(recon_weight=WEIGHT)
  old_metrics, old_grads = _run(None)
  metrics, grads = _run(WEIGHT)
  # When the reconstruction is recomputed by hand from the final norm's output (real rows only)
  batch = _batch()
  _, inter = jax.jit(functools.partial(model.apply, capture_intermediates=lambda m, _: m.name == "final_norm"))(
      {"params": with_head}, batch["inputs"])
  hidden = inter["intermediates"]["final_norm"]["__call__"][0][:2]  # [2, T, d]
  err = hidden @ with_head["recon_head"] + with_head["recon_bias"] - batch["inputs"][:2]
  recon = jnp.mean(jnp.square(err))
  # Then the metrics are the old cross-entropy, that MSE, and their weighted sum
  np.testing.assert_allclose(metrics["loss"], old_metrics["loss"], rtol=1e-6)
  np.testing.assert_allclose(metrics["recon_loss"], recon, rtol=1e-5)
  np.testing.assert_allclose(metrics["total_loss"], old_metrics["loss"] + WEIGHT * recon, rtol=1e-6)
  # and the head's gradient is the MSE's: d/dW [w mean (h W + b - f)^2] = 2 w h^T err / (N F)
  n = err.shape[0] * err.shape[1] * F
  np.testing.assert_allclose(grads["recon_head"], 2 * WEIGHT * jnp.einsum("btd,btf->df", hidden, err) / n,
                             rtol=1e-4, atol=1e-7)
  np.testing.assert_allclose(grads["recon_bias"], 2 * WEIGHT * err.sum((0, 1)) / n, rtol=1e-4, atol=1e-7)
  # and the term also reaches the trunk (the input embedding's gradient changes)
  assert np.abs(np.asarray(grads["input_proj"] - old_grads["input_proj"])).max() > 1e-6


def test_eval_reports_the_reconstruction_loss():
  _, with_head = _params()
  model = _model(recon_weight=WEIGHT)
  stats = jax.jit(functools.partial(step_lib.eval_step, model=model))({"params": with_head}, _batch())
  metrics, _ = _run(WEIGHT)
  assert float(stats["recon_frames"]) == 2 * T
  np.testing.assert_allclose(step_lib.summarize(stats)["recon_loss"], metrics["recon_loss"], rtol=1e-6)


def test_recon_weight_needs_feature_inputs_and_is_non_negative():
  with pytest.raises(ValueError, match=r"model.recon_weight=0.1 needs feature inputs \(model.input_features\)"):
    get_model("lm", vocab_size=10, recon_weight=0.1)
  with pytest.raises(ValueError, match="model.recon_weight=-1.0 must be >= 0"):
    get_model("lm", vocab_size=10, input_features=4, recon_weight=-1.0)
  assert get_model("lm", vocab_size=10, recon_weight=0.0).config.recon_weight == 0.0


def test_ballet_config_option_is_validated():
  from configs.ballet import hcam  # pylint: disable=g-import-not-at-top
  from memarch.training import validate  # pylint: disable=g-import-not-at-top

  assert hcam.get_config("dancers=8,delay=48").model.recon_weight == 0.0  # off by default
  config = hcam.get_config("runlocal,recon=0.5")
  validate.validate(config)
  config.unlock()
  config.model.input_features = None
  with pytest.raises(ValueError, match=r"model.recon_weight=0.5 needs feature inputs"):
    validate.validate(config)
