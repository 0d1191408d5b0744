"""Attention ops against naive per-query softmax loops."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from memarch.ops import attention as ops


def naive_attention(q, k, v, visible, prefix_k=None, prefix_v=None):
  """Per (batch, query, head) loop in float64: softmax over the visible keys (and the whole prefix)."""
  q, k, v = (np.asarray(z, np.float64) for z in (q, k, v))
  b, t, h, e = q.shape
  kh = k.shape[2]
  out = np.zeros((b, t, h, v.shape[-1]))
  for bi in range(b):
    for ti in range(t):
      for hi in range(h):
        g = hi // (h // kh)
        keys = [k[bi, s, g] for s in range(k.shape[1]) if visible(bi, ti, s)]
        vals = [v[bi, s, g] for s in range(k.shape[1]) if visible(bi, ti, s)]
        if prefix_k is not None:
          keys = list(np.asarray(prefix_k, np.float64)[:, g]) + keys
          vals = list(np.asarray(prefix_v, np.float64)[:, g]) + vals
        if not keys:
          continue
        logits = np.array([q[bi, ti, hi] @ kk for kk in keys]) / np.sqrt(e)
        p = np.exp(logits - logits.max())
        out[bi, ti, hi] = (p / p.sum()) @ np.array(vals)
  return out


def _qkv(t=11, s=None, h=4, kh=2, e=8, seed=0):
  s = t if s is None else s
  k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
  return (jax.random.normal(k1, (2, t, h, e)), jax.random.normal(k2, (2, s, kh, e)),
          jax.random.normal(k3, (2, s, kh, e)))


@pytest.mark.parametrize("window", [None, 1, 3, 20])
def test_sliding_window_equals_naive_masked_softmax(window):
  q, k, v = _qkv()
  pos = jnp.broadcast_to(jnp.arange(11), (2, 11))
  mask = ops.attention_mask(pos, pos, window=window)
  out = ops.dot_product_attention(q, k, v, mask)
  ref = naive_attention(q, k, v, lambda b, i, j: j <= i and (window is None or i - j < window))
  np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)


def test_segments_prefix_and_empty_slots():
  # Given two packed documents, two empty cache slots (position -1) and a 3-vector persistent prefix
  q, k, v = _qkv(t=9, s=9)
  seg = jnp.array([[1] * 4 + [2] * 5, [1] * 9])
  kpos = jnp.broadcast_to(jnp.arange(9), (2, 9)).at[:, :2].set(-1)
  qpos = jnp.broadcast_to(jnp.arange(9), (2, 9))
  pk, pv = jax.random.normal(jax.random.key(5), (2, 3, 2, 8))
  mask = ops.attention_mask(qpos, kpos, seg, seg, window=4)
  out = ops.dot_product_attention(q, k, v, mask, prefix_k=pk, prefix_v=pv)
  segn, kposn = np.asarray(seg), np.asarray(kpos)
  visible = lambda b, i, j: (kposn[b, j] >= 0 and j <= i and i - j < 4 and segn[b, i] == segn[b, j])
  np.testing.assert_allclose(out, naive_attention(q, k, v, visible, pk, pv), rtol=1e-5, atol=1e-5)


def test_fully_masked_query_gives_zeros():
  q, k, v = _qkv(t=3)
  mask = jnp.zeros((2, 3, 3), bool)
  np.testing.assert_array_equal(ops.dot_product_attention(q, k, v, mask), 0.0)


def test_rope_is_relative():
  x = jax.random.normal(jax.random.key(0), (1, 2, 1, 16))
  p0 = jnp.array([[3, 7]])
  p1 = p0 + 100
  r0, r1 = ops.rope(x, p0), ops.rope(x, p1)
  np.testing.assert_allclose(r0[0, 0, 0] @ r0[0, 1, 0], r1[0, 0, 0] @ r1[0, 1, 0], rtol=1e-4)
  with pytest.raises(ValueError, match="even"):
    ops.rope(jnp.ones((1, 1, 1, 3)), jnp.zeros((1, 1), jnp.int32))


def test_bad_head_counts_raise():
  q, k, v = _qkv(h=3, kh=2)
  with pytest.raises(ValueError, match="not a multiple"):
    ops.dot_product_attention(q, k, v, jnp.ones((2, 11, 11), bool))


@pytest.mark.parametrize("window", [None, 5, 40])
def test_blockwise_equals_dense_forward_and_gradients(window):
  # Given 45 tokens in blocks of 16 (not a divisor), two documents and a persistent prefix
  q, k, v = _qkv(t=45)
  pos = jnp.broadcast_to(jnp.arange(45) + 7, (2, 45))
  seg = jnp.array([[1] * 20 + [2] * 25, [3] * 45])
  pk, pv = jax.random.normal(jax.random.key(5), (2, 3, 2, 8))
  pq = jax.random.normal(jax.random.key(6), q.shape)

  def dense(q, k, v):
    mask = ops.attention_mask(pos, pos, seg, seg, window=window)
    return ops.dot_product_attention(q, k, v, mask, prefix_k=pk, prefix_v=pv, prefix_q=pq)

  def blocks(q, k, v):
    return ops.blockwise_causal_attention(q, k, v, pos, seg, window=window, prefix_k=pk, prefix_v=pv,
                                          prefix_q=pq, block_size=16)

  # Then outputs and gradients agree
  np.testing.assert_allclose(jax.jit(blocks)(q, k, v), jax.jit(dense)(q, k, v), rtol=1e-5, atol=1e-6)
  loss = lambda f: jax.jit(jax.grad(lambda *z: jnp.sum(jnp.sin(f(*z))), argnums=(0, 1, 2)))(q, k, v)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), loss(blocks), loss(dense))
