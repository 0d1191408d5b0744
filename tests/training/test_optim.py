"""The optimizer: schedule, weight-decay mask and per-group learning-rate multipliers."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
import pytest

from memarch.training import optim


def _params():
  return {"embedding": jnp.ones((8, 4)), "final_norm": {"scale": jnp.ones(4)},
          "block_0": {"mixer": {"q": jnp.ones((4, 2, 2)), "q_bias": jnp.ones((2, 2))},
                      "mlp_norm": {"scale": jnp.ones(4)}, "gate": {"kernel": jnp.ones((4, 4)), "bias": jnp.ones(4)}},
          "stacked": {"LayerNorm_0": {"scale": jnp.ones((2, 4))}}}


def _cfg(**kw):
  base = dict(name="adamw", lr=1e-2, b1=0.9, b2=0.99, eps=1e-8, wd=0.1, warmup_steps=2, min_lr_ratio=0.1, clip=1.0,
              lr_multipliers=[], wd_exclude=[])
  return mlc.ConfigDict({**base, **kw})


def test_decay_mask_excludes_norms_biases_and_stacked_scales():
  mask = optim.decay_mask(_params())
  assert mask["embedding"] and mask["block_0"]["mixer"]["q"] and mask["block_0"]["gate"]["kernel"]
  assert not mask["final_norm"]["scale"] and not mask["block_0"]["mlp_norm"]["scale"]
  assert not mask["block_0"]["gate"]["bias"] and not mask["block_0"]["mixer"]["q_bias"]
  assert not mask["stacked"]["LayerNorm_0"]["scale"]
  assert not optim.decay_mask(_params(), ["^embedding$"])["embedding"]


def test_lr_multipliers_first_match_wins():
  mults = optim.lr_multipliers(_params(), [(r"gate/", 10.0), (r"block_0", 0.5)])
  assert mults["block_0"]["gate"]["kernel"] == 10.0 and mults["block_0"]["mixer"]["q"] == 0.5
  assert mults["embedding"] == 1.0


def test_multiplier_scales_the_whole_update():
  # Given the same gradients, with and without a x3 multiplier on the gate;
  params = _params()
  grads = jax.tree.map(lambda p: 0.1 * jnp.arange(p.size, dtype=jnp.float32).reshape(p.shape), params)
  updates = {}
  for rules in ([], [("gate", 3.0)]):
    tx, _ = optim.make_optimizer(_cfg(lr_multipliers=rules), total_steps=10)
    updates[len(rules)], _ = tx.update(grads, tx.init(params), params)
  # Then the gate's update (weight decay included) is 3x, every other update unchanged.
  np.testing.assert_allclose(updates[1]["block_0"]["gate"]["kernel"], 3 * updates[0]["block_0"]["gate"]["kernel"],
                             rtol=1e-6)
  np.testing.assert_array_equal(updates[1]["embedding"], updates[0]["embedding"])


def test_schedule_warmup_then_cosine_to_min():
  sched = optim.make_schedule(_cfg(), total_steps=10)
  np.testing.assert_allclose([sched(0), sched(2), sched(10)], [0.0, 1e-2, 1e-3], rtol=1e-6)
  assert sched(5) < sched(2)



def test_lr_drop_switches_once_and_stays():
  # Given the drop at loss 1.0 by a factor 0.25, and the updates of the plain optimizer;
  params = _params()
  grads = jax.tree.map(lambda p: 0.1 * jnp.arange(p.size, dtype=jnp.float32).reshape(p.shape), params)
  plain, _ = optim.make_optimizer(_cfg(), total_steps=10)
  tx, _ = optim.make_optimizer(_cfg(lr_drop_below_loss=1.0, lr_drop_factor=0.25), total_steps=10)
  ref_state, state = plain.init(params), tx.init(params)
  scales = []
  # When losses 3, 2, 0.5 (below), then 4 (above again) arrive;
  for loss in (3.0, 2.0, 0.5, 4.0):
    ref, ref_state = plain.update(grads, ref_state, params)
    upd, state = tx.update(grads, state, params, value=jnp.float32(loss))
    scales.append(float(optim.lr_scale(state)))
    np.testing.assert_allclose(upd["embedding"], scales[-1] * ref["embedding"], rtol=1e-6)
  # Then the updates are the plain ones until the loss is first below 1, and a quarter of them from then on.
  assert scales == [1.0, 1.0, 0.25, 0.25]


def test_lr_drop_needs_the_loss():
  tx, _ = optim.make_optimizer(_cfg(lr_drop_below_loss=1.0), total_steps=10)
  params = _params()
  with pytest.raises(ValueError, match="needs the loss, as value=loss"):
    tx.update(params, tx.init(params), params)


def test_no_drop_state_without_the_option():
  params = _params()
  tx, _ = optim.make_optimizer(_cfg(), total_steps=10)
  assert float(optim.lr_scale(tx.init(params))) == 1.0
  assert not [s for s in jax.tree.leaves(tx.init(params), is_leaf=lambda x: isinstance(x, optim.LossDropState))
              if isinstance(s, optim.LossDropState)]
