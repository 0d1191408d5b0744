"""MultiHeadAttention: full forward == chunk-by-chunk == token-by-token with the KV cache; segments; causality."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from memarch.layers.attention import MultiHeadAttention

VARIANTS = {
    "full": dict(num_heads=4, num_kv_heads=2, max_len=32),
    "window": dict(num_heads=2, window=4),
    "persistent": dict(num_heads=2, num_persistent=3, max_len=32),
    "window_persistent": dict(num_heads=2, window=3, num_persistent=2),
    "window_conv": dict(num_heads=2, window=4, conv_width=3, d_model=16),
    # Query blocks smaller than the sequence exercise the blockwise full-sequence form.
    "full_blocks": dict(num_heads=2, max_len=32, block_size=4, num_persistent=1),
    "window_blocks": dict(num_heads=2, window=3, block_size=5),
}


def _setup(fields, t=13, d=16):
  layer = MultiHeadAttention(**fields)
  x = jax.random.normal(jax.random.key(0), (2, t, d))
  params = jax.jit(layer.init)(jax.random.key(1), x)
  return Jitted(layer), params, x


class Jitted:
  """The layer with a jitted ``apply`` (eager token loops are slow); other attributes pass through."""

  def __init__(self, layer):
    self.layer = layer
    self.apply = jax.jit(layer.apply)

  def __getattr__(self, name):
    return getattr(self.layer, name)


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_full_equals_token_by_token_and_chunks(name):
  # Given a layer and a sequence whose length no chunk divides
  layer, params, x = _setup(VARIANTS[name])
  # When run as one call, token by token, and in uneven chunks with the carried state
  y_full, s_full = layer.apply(params, x)
  state, ys = layer.init_state(2, 16), []
  for t in range(x.shape[1]):
    y, state = layer.apply(params, x[:, t:t + 1], state=state)
    ys.append(y)
  y_tok = jnp.concatenate(ys, 1)
  state_c, ys = None, []
  for lo, hi in [(0, 5), (5, 6), (6, 13)]:
    y, state_c = layer.apply(params, x[:, lo:hi], state=state_c)
    ys.append(y)
  # Then outputs and final states agree
  np.testing.assert_allclose(y_tok, y_full, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(jnp.concatenate(ys, 1), y_full, atol=1e-5, rtol=1e-5)
  jax.tree.map(lambda a, b, c: (np.testing.assert_allclose(a, b, atol=1e-5),
                                np.testing.assert_allclose(a, c, atol=1e-5)), s_full, state, state_c)


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_gradients_full_equal_token_by_token(name):
  layer, params, x = _setup(VARIANTS[name], t=6)

  def loss_full(p, x):
    return jnp.sum(layer.apply(p, x)[0] ** 2)

  def loss_steps(p, x):
    state, total = layer.init_state(2, 16), 0.0
    for t in range(x.shape[1]):
      y, state = layer.apply(p, x[:, t:t + 1], state=state)
      total += jnp.sum(y ** 2)
    return total

  g1 = jax.jit(jax.grad(loss_full, argnums=(0, 1)))(params, x)
  g2 = jax.jit(jax.grad(loss_steps, argnums=(0, 1)))(params, x)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4), g1, g2)


def test_sliding_window_state_is_bounded():
  layer, params, x = _setup(VARIANTS["window"], t=40)
  _, state = layer.apply(params, x)
  assert state.k.shape[1] == 3 and layer.state_size(16) == 2 * 3 * 2 * 8
  np.testing.assert_array_equal(state.positions, [[37, 38, 39]] * 2)


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_causality(name):
  # New random inputs from position j on leave every output before j bit-identical and change output j (one
  # compile, reused for every j).
  layer, params, x = _setup(VARIANTS[name], t=7, d=8)
  y, _ = layer.apply(params, x)
  noise = jax.random.normal(jax.random.key(3), x.shape)
  for j in range(7):
    changed, _ = layer.apply(params, x.at[:, j:].set(noise[:, j:]))
    np.testing.assert_array_equal(changed[:, :j], y[:, :j])
    assert np.abs(np.asarray(changed[:, j] - y[:, j])).max() > 0.0


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_segment_ids_isolate_documents(name):
  # Given two documents packed in one row
  layer, params, x = _setup(VARIANTS[name], t=12)
  seg = jnp.array([[1] * 5 + [2] * 7] * 2)
  y_packed, _ = layer.apply(params, x, segment_ids=seg)
  # Then each document's output equals running it alone
  y_a, _ = layer.apply(params, x[:, :5])
  y_b, _ = layer.apply(params, x[:, 5:])
  np.testing.assert_allclose(y_packed[:, :5], y_a, atol=1e-5)
  np.testing.assert_allclose(y_packed[:, 5:], y_b, atol=1e-4)


def test_cache_overflow_and_bad_fields():
  layer, params, x = _setup(dict(num_heads=2, max_len=8), t=8)
  with pytest.raises(ValueError, match="max_len=8"):
    layer.apply(params, jnp.concatenate([x, x], axis=1))
  with pytest.raises(ValueError, match="num_kv_heads"):
    MultiHeadAttention(num_heads=3, num_kv_heads=2, head_dim=4).init_state(1)
  with pytest.raises(ValueError, match="head_dim"):
    MultiHeadAttention(num_heads=2).init_state(1)
