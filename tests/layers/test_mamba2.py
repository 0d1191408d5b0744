"""Mamba2: full forward == chunk-by-chunk == token-by-token with state; gradients; causality; segments; sharding."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from memarch import sharding
from memarch.layers.mamba2 import Mamba2, Mamba2State

# d_inner = 32 -> 4 heads of 8 in 2 groups; chunk 4 divides none of the call lengths below.
FIELDS = dict(d_model=16, d_state=8, head_dim=8, num_groups=2, chunk_size=4)


@functools.cache
def _setup():
  """One layer, its params, a jitted apply (shared, so equal shapes compile once) and 13 tokens."""
  layer = Mamba2(**FIELDS)
  x = jax.random.normal(jax.random.key(0), (2, 13, layer.d_model))
  params = jax.jit(layer.init)(jax.random.key(1), x)
  return layer, jax.jit(layer.apply), params, x


def _chunks(apply, params, x, bounds, segment_ids=None):
  state, ys = Mamba2(**FIELDS).init_state(x.shape[0]), []  # explicit: every call then shares one jit trace
  for lo, hi in bounds:
    seg = None if segment_ids is None else segment_ids[:, lo:hi]
    y, state = apply(params, x[:, lo:hi], segment_ids=seg, state=state)
    ys.append(y)
  return jnp.concatenate(ys, 1), state


def _assert_states_close(a, b, atol=1e-5):
  jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, atol=atol, rtol=1e-5), a, b)


def test_full_equals_token_by_token_and_chunks():
  # Given a layer and a sequence of 13 tokens
  _, apply, params, x = _setup()
  # When run as one call, token by token, and in uneven chunks with the carried state
  y_full, s_full = apply(params, x)
  y_tok, s_tok = _chunks(apply, params, x, [(t, t + 1) for t in range(13)])
  y_chk, s_chk = _chunks(apply, params, x, [(0, 5), (5, 6), (6, 13)])
  # Then outputs and final states agree, and the token recurrence (LINEAR) gives the same as the chunked form
  np.testing.assert_allclose(y_tok, y_full, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(y_chk, y_full, atol=1e-5, rtol=1e-5)
  _assert_states_close(s_tok, s_full)
  _assert_states_close(s_chk, s_full)
  y_lin, s_lin = jax.jit(Mamba2(**FIELDS, scan_type="linear").apply)(params, x)
  np.testing.assert_allclose(y_lin, y_full, atol=1e-5, rtol=1e-5)
  _assert_states_close(s_lin, s_full)
  assert isinstance(s_full, Mamba2State) and s_full.ssm.shape == (2, 4, 8, 8)


def test_gradients_full_equal_chunked_with_state():
  layer, _, params, x = _setup()

  def loss_full(p, x):
    y, s = layer.apply(p, x)
    return jnp.sum(y ** 2) + jnp.sum(s.ssm ** 2)

  def loss_chunks(p, x):
    y1, s = layer.apply(p, x[:, :6])
    y2, s = layer.apply(p, x[:, 6:], state=s)  # 6 + 7 tokens: chunk 4 divides neither
    return jnp.sum(y1 ** 2) + jnp.sum(y2 ** 2) + jnp.sum(s.ssm ** 2)

  g1 = jax.jit(jax.grad(loss_full, argnums=(0, 1)))(params, x)
  g2 = jax.jit(jax.grad(loss_chunks, argnums=(0, 1)))(params, x)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4), g1, g2)
  assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(g1))


def test_causality():
  # The Jacobian of output t with respect to inputs after t is zero (and not zero at t itself).
  _, apply, params, x = _setup()
  jac = jax.jit(jax.jacfwd(lambda z: apply(params, z)[0][0]))(x[:1])  # [t, d, b, t', d]
  for t in range(13):
    np.testing.assert_array_equal(jac[t, :, :, t + 1:], 0.0)
    assert np.abs(np.asarray(jac[t, :, 0, t])).max() > 0.0


def test_segment_ids_isolate_documents():
  # Given two documents packed in one row, and the same row streamed in calls split at and inside documents
  _, apply, params, x = _setup()
  seg = jnp.array([[1] * 5 + [2] * 8] * 2)
  y_packed, s_packed = apply(params, x, segment_ids=seg)
  y_stream, s_stream = _chunks(apply, params, x, [(0, 5), (5, 13)], segment_ids=seg)
  # Then each document's output equals running it alone, and streaming resets at a call's first token too
  alone = lambda z: apply(params, z, segment_ids=jnp.ones(z.shape[:2], jnp.int32),
                          state=Mamba2(**FIELDS).init_state(2))
  y_a, _ = alone(x[:, :5])
  y_b, s_b = alone(x[:, 5:])
  np.testing.assert_allclose(y_packed[:, :5], y_a, atol=1e-5)
  np.testing.assert_allclose(y_packed[:, 5:], y_b, atol=1e-4)
  np.testing.assert_allclose(y_stream, y_packed, atol=1e-5)
  np.testing.assert_allclose(s_packed.ssm, s_b.ssm, atol=1e-5)
  _assert_states_close(s_stream, s_packed)


def test_partition_specs_on_a_2x2x2_mesh():
  # Given the (data=2, fsdp=2, tensor=2) mesh of 8 simulated devices and the default rules
  mesh = sharding.make_mesh([("data", 2), ("fsdp", 2), ("tensor", 2)])
  rules = sharding.rules_for_mesh(sharding.DEFAULT_RULES, mesh)
  layer = Mamba2(**FIELDS)
  x = jnp.zeros((4, 8, 16))
  mesh_shardings = sharding.param_shardings(layer, x, mesh=mesh, rules=rules)
  flat = sharding.flat_specs(mesh_shardings)
  # Then every parameter has its expected spec: d_inner and heads tensor-parallel, d_model over fsdp
  expected = {
      "in_zx": P("fsdp", None, "tensor"), "in_bc": P("fsdp", None, None), "in_dt": P("fsdp", "tensor"),
      "A_log": P("tensor"), "dt_bias": P("tensor"), "D": P("tensor"), "norm_scale": P("tensor"),
      "out": P("tensor", "fsdp"), "conv/kernel": P(None, "fsdp"), "conv/bias": P("fsdp"),
  }
  assert flat == expected
  # When initialising directly into those shardings, the arrays land sharded as specified
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    params = jax.jit(lambda k: nn.meta.unbox(layer.init(k, x)["params"]),
                     out_shardings=mesh_shardings)(jax.random.key(0))
  assert params["in_zx"].sharding.spec == P("fsdp", None, "tensor")


def test_bf16_activations_keep_fp32_params_and_state():
  _, apply, params, x = _setup()
  y_ref, s_ref = apply(params, x)
  y, s = jax.jit(Mamba2(**FIELDS, dtype="bfloat16").apply)(params, x.astype(jnp.bfloat16))
  assert y.dtype == jnp.bfloat16
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(nn.meta.unbox(params)))
  assert s.ssm.dtype == jnp.float32 and s.conv.inputs.dtype == jnp.float32
  np.testing.assert_allclose(y.astype(jnp.float32), y_ref, atol=1e-1, rtol=1e-1)
  np.testing.assert_allclose(s.ssm, s_ref.ssm, atol=1e-1, rtol=1e-1)


def test_init_values_state_size_and_bad_fields():
  _, _, params, _ = _setup()
  p = nn.meta.unbox(params)["params"]
  a = np.exp(np.asarray(p["A_log"]))
  dt = np.asarray(jax.nn.softplus(p["dt_bias"]))
  assert (a >= 1).all() and (a <= 16).all() and (dt >= 1e-4).all() and (dt <= 0.1 + 1e-6).all()
  np.testing.assert_array_equal(p["D"], 1.0)
  # Unbound: state of 4 heads x 8 x 8 plus 3 conv taps of d_inner + 2 G N = 32 + 32 channels
  state = Mamba2(**FIELDS).init_state(3)
  assert state.ssm.shape == (3, 4, 8, 8) and state.conv.inputs.shape == (3, 3, 64)
  assert Mamba2(**FIELDS).state_size() == 4 * 8 * 8 + 3 * 64
  assert Mamba2(d_model=32).dims() == (64, 1, 64, 64 + 256)
  with pytest.raises(ValueError, match="head_dim"):
    Mamba2(d_model=16, head_dim=5).init_state(1)
  with pytest.raises(ValueError, match="num_groups"):
    Mamba2(**{**FIELDS, "num_groups": 3}).init_state(1)
  with pytest.raises(ValueError, match="d_model"):
    Mamba2().state_size()


def test_registry_reads_mixer_options():
  # Given LM configs with and without Mamba-2 options (imported here: the registry is the LM's)
  from memarch.models import mixers
  from memarch.models.lm import LMConfig
  spec = mixers.get_mixer_spec("mamba2")
  cfg = LMConfig.from_preset(None, vocab_size=11, d_model=32, mixers=("mamba2",),
                             mixer_options={"mamba2": {"d_state": 16, "head_dim": 16}})
  # When building the mixer, Then the options reach it and the state and FLOPs follow from them
  m = spec.build(cfg, 0, parent=None)
  assert (m.d_model, m.d_state, m.head_dim) == (32, 16, 16)
  assert m.state_size() == 4 * 16 * 16 + 3 * (64 + 32)
  assert spec.extra_flops(cfg, 64) > 0
  spec.validate(cfg, 64)
  bad = LMConfig.from_preset(None, vocab_size=11, d_model=32, mixers=("mamba2",),
                             mixer_options={"mamba2": {"head_dim": 24}})
  with pytest.raises(ValueError, match="mixer_options"):
    spec.validate(bad, 64)
  typo = LMConfig.from_preset(None, vocab_size=11, d_model=32, mixers=("mamba2",),
                              mixer_options={"mamba2": {"dstate": 16}})
  with pytest.raises(ValueError, match="unknown option"):
    spec.build(typo, 0, parent=None)
