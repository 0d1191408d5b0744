"""B'MOJO-F with ``sequence_axis`` set equals the unsharded layer (spec ``bmojo.md`` §3, §5.5, §8 item 6).

On 8 simulated CPU devices: the Mamba-2 inside runs with the conv halo and the SSM state pass, and the read gets
its ``W − 1`` in-context / ``2W − 1`` fading halos and the document-offset prefix; outputs, the final state and the
parameter gradients must be the unsharded ones, with documents spanning shards and a carried state.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from memarch.layers.bmojo import BMojo, BMojoF

AUTO = jax.sharding.AxisType.Auto


def _close_leaves(got, want, tol):
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, atol=tol, rtol=tol, err_msg=jax.tree_util.keystr(path))


def _layer(**kw):
  return BMojoF(num_heads=2, window=5, num_kv_heads=1, d_model=8, d_state=4, expand=2, ssm_head_dim=4,
                ssm_chunk_size=3, **kw)


@pytest.mark.slow
def test_sharded_bmojo_f_matches_unsharded():
  # Given B'MOJO-F (W = 5: the 9-token fading halo spans three shards of 4), its sequence-sharded twin on a
  # (data 2, sequence 4) mesh... with 16 tokens per row, documents spanning shards and a carried state
  mesh = jax.make_mesh((2, 4), ("data", "sequence"), axis_types=(AUTO, AUTO))
  t = 16
  x = jax.random.normal(jax.random.key(0), (2, t, 8))
  seg = np.zeros((2, t), np.int32)
  seg[1, 3:] = 1
  seg[1, 12:] = 2  # starts on the last shard's first token
  seg = jnp.asarray(seg)
  ref, par = _layer(), _layer(sequence_axis="sequence")
  params = jax.jit(lambda u: ref.init(jax.random.key(1), u, segment_ids=seg))(x)["params"]
  _, state = jax.jit(lambda p, u: ref.apply({"params": p}, u, segment_ids=jnp.asarray([[0] * 6, [4] * 6])))(
      params, jax.random.normal(jax.random.key(2), (2, 6, 8)))
  w_out = jnp.cos(jnp.arange(x.size, dtype=jnp.float32)).reshape(x.shape)

  def run(layer):
    def loss(params, x):
      y, new = layer.apply({"params": params}, x, segment_ids=seg, state=state)
      return jnp.sum(y * w_out) + jnp.sum(new.memory.fading.k) + jnp.sum(new.ssm.ssm), (y, new)
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))

  (l_ref, (y_ref, s_ref)), g_ref = run(ref)(params, x)
  with jax.set_mesh(mesh):
    sh = NamedSharding(mesh, P("data", "sequence"))
    # When running the sharded layer
    (l_par, (y, s)), g_par = run(par)(params, jax.device_put(x, sh))
  # Then outputs, every leaf of the new state and the gradients (parameters and x) are the unsharded ones
  np.testing.assert_allclose(y, y_ref, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(l_par, l_ref, rtol=1e-5)
  _close_leaves(s, s_ref, 1e-5)
  _close_leaves(g_par, g_ref, 2e-5)


@pytest.mark.slow
@pytest.mark.parametrize("bound,innovation,memory_size", [("fifo", "ssm_residual", 4), ("top_m", "key_novelty", 3)])
def test_sharded_bmojo_with_a_store_matches_unsharded(bound, innovation, memory_size):
  # Given full B'MOJO (FIFO: SSM-residual innovation with its auxiliary loss, a store of 2 chunks; top_m: key
  # novelty, the 3 best entries of the document), a selector bias, chunks of C = 6 tokens straddling the 4-token
  # shards, a carried state and documents spanning shards
  mesh = jax.make_mesh((8,), ("sequence",), axis_types=(AUTO,))
  t = 32
  layer = BMojo(num_heads=2, window=3, num_kv_heads=1, d_model=8, d_state=4, ssm_head_dim=4, ssm_chunk_size=4,
                chunk_size=6, k_sel=2, memory_size=memory_size, selector_bias=True, bound=bound,
                innovation=innovation)
  x = jax.random.normal(jax.random.key(0), (2, t, 8))
  seg = np.full((2, t), 1, np.int32)
  seg[1, 10:] = 2
  seg[1, 20:] = 3
  seg = jnp.asarray(seg)
  params = jax.jit(lambda u: layer.init(jax.random.key(1), u, segment_ids=seg))(x)["params"]
  params = jax.tree.map(lambda z: z + 0.3, params)  # non-zero selector bias
  _, state = jax.jit(lambda p, u: layer.apply({"params": p}, u, segment_ids=jnp.asarray([[1] * 9, [0] * 9])))(
      params, jax.random.normal(jax.random.key(2), (2, 9, 8)))
  assert int((state.memory.store.positions >= 0).sum()) > 0
  w_out = jnp.cos(jnp.arange(x.size, dtype=jnp.float32)).reshape(x.shape)

  def run(layer):
    def loss(params, x):
      y, new = layer.apply({"params": params}, x, segment_ids=seg, state=state)
      return jnp.sum(y * w_out) + jnp.sum(new.memory.store.v), (y, new)
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))

  (l_ref, (y_ref, s_ref)), g_ref = run(layer)(params, x)
  with jax.set_mesh(mesh):
    # When the store in front of each shard is folded from the stores the preceding shards write
    (l_par, (y, s)), g_par = run(layer.clone(sequence_axis="sequence"))(params, x)
  # Then outputs, the state (store, candidates, windows, SSM) and all gradients (the selector bias's, and with the
  # SSM residual the probe's through L_aux) are the unsharded ones
  np.testing.assert_allclose(y, y_ref, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(l_par, l_ref, rtol=1e-5)
  _close_leaves(s, s_ref, 1e-5)
  _close_leaves(g_par, g_ref, 2e-5)
