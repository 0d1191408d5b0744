"""RMSNorm, SwiGLU and the causal depthwise convolution against direct formulas."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from memarch.layers.common import CausalConv1D, RMSNorm, SwiGLU


def test_rmsnorm_formula_and_bf16():
  x = jax.random.normal(jax.random.key(0), (2, 3, 8)) * 3
  norm = RMSNorm()
  params = norm.init(jax.random.key(1), x)
  params = jax.tree.map(lambda p: p + 0.5, params)
  ref = x / np.sqrt(np.mean(np.square(x), -1, keepdims=True) + 1e-6) * 1.5
  np.testing.assert_allclose(norm.apply(params, x), ref, rtol=1e-5, atol=1e-5)
  y16 = RMSNorm(dtype="bfloat16").apply(params, x)
  assert y16.dtype == jnp.bfloat16
  assert jax.tree.leaves(params)[0].dtype == jnp.float32


def test_swiglu_formula():
  x = jax.random.normal(jax.random.key(0), (2, 3, 8))
  mlp = SwiGLU(hidden=16)
  params = mlp.init(jax.random.key(1), x)
  w_in, w_out = params["params"]["w_in"].unbox(), params["params"]["w_out"].unbox()
  ref = (jax.nn.silu(x @ w_in[:, 0]) * (x @ w_in[:, 1])) @ w_out
  np.testing.assert_allclose(mlp.apply(params, x), ref, rtol=1e-5, atol=1e-5)


def naive_conv(x, w, bias, seg):
  b, t, d = x.shape
  k = w.shape[0]
  y = np.zeros((b, t, d)) + bias
  for bi in range(b):
    for ti in range(t):
      for j in range(k):  # tap j looks j steps back; kernel row k-1-j
        s = ti - j
        if s >= 0 and seg[bi, s] == seg[bi, ti]:
          y[bi, ti] += w[k - 1 - j] * x[bi, s]
  return y


@pytest.mark.parametrize("width", [1, 4])
def test_conv_naive_full_step_and_segments(width):
  x = jax.random.normal(jax.random.key(0), (2, 11, 6))
  seg = jnp.array([[1] * 4 + [2] * 7, [5] * 11])
  conv = CausalConv1D(width=width)
  params = conv.init(jax.random.key(1), x)
  params = jax.tree.map(lambda p: p + 0.1, params)
  y, state = conv.apply(params, x, segment_ids=seg)
  w, bias = params["params"]["kernel"].unbox(), params["params"]["bias"].unbox()
  np.testing.assert_allclose(y, naive_conv(np.asarray(x), np.asarray(w), np.asarray(bias), np.asarray(seg)),
                             rtol=1e-5, atol=1e-5)
  st, ys = conv.init_state(2, 6), []
  for t in range(11):
    yt, st = conv.apply(params, x[:, t:t + 1], segment_ids=seg[:, t:t + 1], state=st)
    ys.append(yt)
  np.testing.assert_allclose(jnp.concatenate(ys, 1), y, rtol=1e-5, atol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), state, st)


def test_conv_prefix_precedes_every_document():
  # Given a prefix of width - 1 inputs: each document (and the sequence start) reads it as its own past.
  width, d = 4, 3
  x = jax.random.normal(jax.random.key(0), (1, 9, d))
  prefix = jax.random.normal(jax.random.key(2), (width - 1, d))
  seg = jnp.array([[1] * 5 + [2] * 4])
  conv = CausalConv1D(width=width)
  params = jax.tree.map(lambda p: p + 0.1, conv.init(jax.random.key(1), x))
  y, _ = conv.apply(params, x, segment_ids=seg, prefix=prefix)
  # Then it equals the plain conv over [prefix || document] per document, the prefix outputs dropped.
  for lo, hi in ((0, 5), (5, 9)):
    want, _ = conv.apply(params, jnp.concatenate([prefix[None], x[:, lo:hi]], axis=1))
    np.testing.assert_allclose(y[:, lo:hi], want[:, width - 1:], rtol=1e-5, atol=1e-5)
  # And token by token from the empty state.
  st, ys = conv.init_state(1, d), []
  for t in range(9):
    yt, st = conv.apply(params, x[:, t:t + 1], segment_ids=seg[:, t:t + 1], state=st, prefix=prefix)
    ys.append(yt)
  np.testing.assert_allclose(jnp.concatenate(ys, 1), y, rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="prefix"):
    conv.apply(params, x, prefix=prefix[1:])
