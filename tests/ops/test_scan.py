"""Every scan type equals a Python-loop reference of h_t = a_t h_{t-1} + x_t, forward and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from memarch.ops.scan import ScanType, linear_scan, resolve_scan_type, segment_starts


def loop_reference(a, x, h0, reset):
  """Plain Python loop in float64 numpy."""
  a, x, h = np.asarray(a, np.float64), np.asarray(x, np.float64), np.asarray(h0, np.float64)
  out = []
  for t in range(a.shape[1]):
    at = np.where(np.asarray(reset)[:, t, None], 0.0, a[:, t]) if reset is not None else a[:, t]
    h = at * h + x[:, t]
    out.append(h)
  return np.stack(out, 1), h


def _inputs(t, f=3, seed=0):
  k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
  a = jax.random.uniform(k1, (2, t, f), minval=0.5, maxval=1.0)
  x = jax.random.normal(k2, (2, t, f))
  h0 = jax.random.normal(k3, (2, f))
  return a, x, h0


@pytest.mark.parametrize("scan_type", [ScanType.LINEAR, ScanType.ASSOCIATIVE, ScanType.CHUNKED])
@pytest.mark.parametrize("t", [1, 7, 16, 37])
@pytest.mark.parametrize("with_reset", [False, True])
def test_scan_matches_loop_forward(scan_type, t, with_reset):
  # Given random decays, inputs, an initial state and (optionally) document resets
  a, x, h0 = _inputs(t)
  reset = None
  if with_reset:
    reset = jnp.zeros((2, t), bool).at[:, t // 2].set(True).at[0, 0].set(True)
  # When scanning with this implementation (chunk 5 does not divide t)
  hs, h_last = linear_scan(a, x, h0, reset=reset, scan_type=scan_type, chunk_size=5)
  # Then every state and the final state equal the loop
  ref, ref_last = loop_reference(a, x, h0, reset)
  np.testing.assert_allclose(hs, ref, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(h_last, ref_last, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("scan_type", [ScanType.LINEAR, ScanType.ASSOCIATIVE, ScanType.CHUNKED])
def test_scan_gradients_match_loop(scan_type):
  a, x, h0 = _inputs(23)
  w = jax.random.normal(jax.random.key(9), (2, 23, 3))

  def loss(fn, a, x, h0):
    hs, h_last = fn(a, x, h0)
    return jnp.sum(hs * w) + jnp.sum(h_last ** 2)

  def loop(a, x, h0):  # differentiable jnp loop reference
    h, out = h0, []
    for t in range(a.shape[1]):
      h = a[:, t] * h + x[:, t]
      out.append(h)
    return jnp.stack(out, 1), h

  fast = lambda a, x, h0: linear_scan(a, x, h0, scan_type=scan_type, chunk_size=4)
  g_fast = jax.grad(lambda *z: loss(fast, *z), argnums=(0, 1, 2))(a, x, h0)
  g_ref = jax.grad(lambda *z: loss(loop, *z), argnums=(0, 1, 2))(a, x, h0)
  for gf, gr in zip(g_fast, g_ref):
    np.testing.assert_allclose(gf, gr, rtol=1e-5, atol=1e-5)


def test_scan_chunk_by_chunk_equals_full():
  a, x, h0 = _inputs(30)
  full, full_last = linear_scan(a, x, h0, scan_type="chunked", chunk_size=8)
  h, parts = h0, []
  for lo, hi in [(0, 11), (11, 12), (12, 30)]:
    hs, h = linear_scan(a[:, lo:hi], x[:, lo:hi], h, scan_type="linear")
    parts.append(hs)
  np.testing.assert_allclose(jnp.concatenate(parts, 1), full, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(h, full_last, rtol=1e-5, atol=1e-6)


def test_resolve_scan_type_and_segment_starts():
  assert resolve_scan_type("auto", backend="cpu") is ScanType.LINEAR
  assert resolve_scan_type("auto", backend="gpu") is ScanType.ASSOCIATIVE
  assert resolve_scan_type(ScanType.CHUNKED) is ScanType.CHUNKED
  seg = jnp.array([[1, 1, 2, 2, 3]])
  np.testing.assert_array_equal(segment_starts(seg), [[False, False, True, False, True]])
  np.testing.assert_array_equal(segment_starts(seg, previous=jnp.array([0])), [[True, False, True, False, True]])
  with pytest.raises(ValueError, match="same shape"):
    linear_scan(jnp.ones((1, 3, 2)), jnp.ones((1, 3, 1)))
