"""Mamba-2 SSD: the chunked form and the step form equal the token recurrence (outputs, final state, gradients)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from memarch.ops.ssd import ssd, ssd_chunked, ssd_naive, ssd_step


def _inputs(t, heads=4, head_dim=3, groups=2, d_state=5, b=2, seed=0):
  ks = jax.random.split(jax.random.key(seed), 6)
  x = jax.random.normal(ks[0], (b, t, heads, head_dim))
  dt = jax.nn.softplus(jax.random.normal(ks[1], (b, t, heads)) - 1.0)
  a = -jnp.exp(jax.random.uniform(ks[2], (heads,), minval=-1.0, maxval=1.5))
  bm = jax.random.normal(ks[3], (b, t, groups, d_state))
  cm = jax.random.normal(ks[4], (b, t, groups, d_state))
  h0 = jax.random.normal(ks[5], (b, heads, head_dim, d_state))
  return x, dt, a, bm, cm, h0


def _resets(t):
  return jnp.zeros((2, t), bool).at[0, 5].set(True).at[1, 16].set(True).at[1, 17].set(True).at[1, t - 1].set(True)


def loop_reference(x, dt, a, bm, cm, h0, reset):
  """The recurrence in a float64 numpy loop."""
  x, dt, a, bm, cm, h = (np.asarray(z, np.float64) for z in (x, dt, a, bm, cm, h0))
  k = x.shape[2] // bm.shape[2]
  bm, cm = np.repeat(bm, k, axis=2), np.repeat(cm, k, axis=2)
  ys = []
  for t in range(x.shape[1]):
    decay = np.exp(dt[:, t] * a) * (1.0 - np.asarray(reset)[:, t, None])
    h = decay[..., None, None] * h + (dt[:, t, :, None] * x[:, t])[..., None] * bm[:, t, :, None, :]
    ys.append(np.einsum("bhpn,bhn->bhp", h, cm[:, t]))
  return np.stack(ys, 1), h


@jax.jit
def _steps(x, dt, a, bm, cm, h0, reset):
  ys, h = [], h0
  for t in range(x.shape[1]):
    y, h = ssd_step(x[:, t], dt[:, t], a, bm[:, t], cm[:, t], h, reset=reset[:, t])
    ys.append(y)
  return jnp.stack(ys, 1), h


def test_naive_matches_float64_loop():
  # Given inputs with an initial state and resets, When running the lax.scan oracle
  x, dt, a, bm, cm, h0 = _inputs(20)
  reset = _resets(20)
  y, h = jax.jit(ssd_naive)(x, dt, a, bm, cm, h0, reset=reset)
  # Then it equals a float64 loop
  y_ref, h_ref = loop_reference(x, dt, a, bm, cm, h0, reset)
  np.testing.assert_allclose(y, y_ref, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(h, h_ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("chunk,groups,with_h0,with_reset", [
    (8, 2, True, True), (16, 1, True, True), (16, 2, False, False), (1, 2, True, False), (64, 1, False, True)])
def test_chunked_and_step_match_naive(chunk, groups, with_h0, with_reset):
  # Given T = 37 (no chunk divides it), optionally an initial state and document resets
  x, dt, a, bm, cm, h0 = _inputs(37, groups=groups)
  h0 = h0 if with_h0 else None
  reset = _resets(37) if with_reset else None
  # When running the three forms
  y_ref, h_ref = jax.jit(ssd_naive)(x, dt, a, bm, cm, h0, reset=reset)
  y, h = jax.jit(ssd_chunked, static_argnames="chunk_size")(x, dt, a, bm, cm, h0, reset=reset, chunk_size=chunk)
  # Then outputs and final states agree
  np.testing.assert_allclose(y, y_ref, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(h, h_ref, atol=1e-5, rtol=1e-5)
  if chunk == 8:
    z = jnp.zeros_like(h_ref)
    y_s, h_s = _steps(x, dt, a, bm, cm, z if h0 is None else h0,
                      jnp.zeros((2, 37), bool) if reset is None else reset)
    np.testing.assert_allclose(y_s, y_ref, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(h_s, h_ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("chunk", [8, 16])
def test_gradients_match_naive(chunk):
  # Given a loss on outputs and final state, with an initial state, resets and 2 groups
  x, dt, a, bm, cm, h0 = _inputs(37)
  reset = _resets(37)
  w_y = jax.random.normal(jax.random.key(7), x.shape)
  w_h = jax.random.normal(jax.random.key(8), h0.shape)

  def loss(fn, *args):
    y, h = fn(*args, reset=reset)
    return jnp.sum(y * w_y) + jnp.sum(h * w_h)

  grad = lambda fn: jax.jit(jax.grad(lambda *args: loss(fn, *args), argnums=tuple(range(6))))
  # When differentiating w.r.t. x, dt, A, B, C and h0
  g_ref = grad(ssd_naive)(x, dt, a, bm, cm, h0)
  g = grad(lambda *z, reset: ssd_chunked(*z, reset=reset, chunk_size=chunk))(x, dt, a, bm, cm, h0)
  # Then every gradient agrees
  for name, gr, gc in zip(["x", "dt", "A", "B", "C", "h0"], g_ref, g):
    np.testing.assert_allclose(gc, gr, atol=1e-4, rtol=1e-4, err_msg=name)


def test_resets_equal_running_documents_separately():
  # Given one row packing documents [0, 9), [9, 30), [30, 37) and an initial state for the first
  x, dt, a, bm, cm, h0 = _inputs(37)
  reset = jnp.zeros((2, 37), bool).at[:, 9].set(True).at[:, 30].set(True)
  y, h = jax.jit(ssd_chunked, static_argnames="chunk_size")(x, dt, a, bm, cm, h0, reset=reset, chunk_size=8)
  # When each document is run alone (the later ones from a zero state)
  run = jax.jit(ssd_chunked, static_argnames="chunk_size")
  parts = [run(x[:, :9], dt[:, :9], a, bm[:, :9], cm[:, :9], h0, chunk_size=8)]
  for lo, hi in [(9, 30), (30, 37)]:
    parts.append(run(x[:, lo:hi], dt[:, lo:hi], a, bm[:, lo:hi], cm[:, lo:hi], chunk_size=8))
  # Then the packed outputs and final state equal the separate runs
  np.testing.assert_allclose(y, jnp.concatenate([p[0] for p in parts], 1), atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(h, parts[-1][1], atol=1e-5, rtol=1e-5)


def test_dispatch_step_path_and_bad_shapes():
  x, dt, a, bm, cm, h0 = _inputs(5)
  y_ref, h_ref = jax.jit(ssd_naive)(x, dt, a, bm, cm, h0)
  for kind in ("auto", "linear", "chunked"):
    y, h = jax.jit(lambda *z: ssd(*z, scan_type=kind, chunk_size=2))(x, dt, a, bm, cm, h0)
    np.testing.assert_allclose(y, y_ref, atol=1e-5)
    np.testing.assert_allclose(h, h_ref, atol=1e-5)
  one = lambda z: z[:, :1]
  y1, h1 = jax.jit(ssd)(one(x), one(dt), a, one(bm), one(cm))  # t == 1: the step form from zeros
  y1_ref, h1_ref = jax.jit(ssd_naive)(one(x), one(dt), a, one(bm), one(cm))
  np.testing.assert_allclose(y1, y1_ref, atol=1e-6)
  np.testing.assert_allclose(h1, h1_ref, atol=1e-6)
  with pytest.raises(ValueError, match="not implemented"):
    ssd(x, dt, a, bm, cm, scan_type="associative")
  with pytest.raises(ValueError, match="groups"):
    ssd_naive(x, dt, a, bm[:, :, :1].repeat(3, 2), cm[:, :, :1].repeat(3, 2))
  with pytest.raises(ValueError, match="h0"):
    ssd_chunked(x, dt, a, bm, cm, h0[:, :2])


def test_bf16_inputs_keep_a_float32_state():
  x, dt, a, bm, cm, h0 = _inputs(21)
  bf = lambda z: z.astype(jnp.bfloat16)
  y, h = jax.jit(lambda *z: ssd_chunked(*z, chunk_size=8))(bf(x), dt, a, bf(bm), bf(cm), h0)
  assert y.dtype == jnp.bfloat16 and h.dtype == jnp.float32
  y_ref, _ = jax.jit(ssd_naive)(x, dt, a, bm, cm, h0)
  np.testing.assert_allclose(y.astype(jnp.float32), y_ref, atol=1e-1, rtol=5e-2)
