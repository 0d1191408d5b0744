"""The Mamba-2 block with ``sequence_axis`` set equals the unsharded block (spec ``bmojo.md`` §5.5, §8 item 6).

On 8 simulated CPU devices: the sequence is split over a ``sequence`` mesh axis; the conv's ``conv_width - 1`` token
halo and the SSM state pass must reproduce the unsharded outputs, final state and parameter gradients, with
documents that span shards, a document starting on a shard's first token, and a carried initial state.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from memarch.layers.mamba2 import Mamba2

AUTO = jax.sharding.AxisType.Auto


def _mesh(shape):
  names = ("data", "sequence") if len(shape) == 2 else ("sequence",)
  return jax.make_mesh(shape, names, axis_types=(AUTO,) * len(shape))


def _layer(**kw):
  return Mamba2(d_model=8, d_state=4, expand=2, head_dim=4, num_groups=2, conv_width=4, chunk_size=3, **kw)


def _segments(t, local):
  """Row 0: one document over every shard. Row 1: a document spanning shards 0-2 that ends inside shard 2, one
  starting exactly on a shard's first token, then a short one (shorter than the conv window) inside a shard."""
  s1 = np.zeros(t, np.int32)
  s1[2 * local + 1:] = 1
  s1[3 * local:] = 2
  s1[3 * local + 2:] = 3
  return jnp.asarray(np.stack([np.zeros(t, np.int32), s1]))


def _run(layer, params, x, seg, state):
  def loss(params, x, ssm, conv_inputs):
    st = state._replace(ssm=ssm, conv=state.conv._replace(inputs=conv_inputs))
    y, new = layer.apply({"params": params}, x, segment_ids=seg, state=st)
    w = jnp.cos(jnp.arange(y.size, dtype=jnp.float32)).reshape(y.shape)
    return jnp.sum(y * w) + jnp.sum(new.ssm * 0.3) + jnp.sum(new.conv.inputs * 0.7), (y, new)
  return jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True)(params, x, state.ssm, state.conv.inputs)


@pytest.mark.parametrize("shape,t,with_state", [((8,), 32, True),
                                                  pytest.param((2, 4), 24, False, marks=pytest.mark.slow)])
def test_sharded_mamba2_matches_unsharded(shape, t, with_state):
  # Given a Mamba-2 block, its sequence-sharded twin, documents spanning shards and (optionally) a carried state
  mesh = _mesh(shape)
  local = t // mesh.shape["sequence"]
  x = jax.random.normal(jax.random.key(0), (2, t, 8))
  seg = _segments(t, local)
  ref, par = _layer(), _layer(sequence_axis="sequence")
  params = jax.jit(ref.init)(jax.random.key(1), x, segment_ids=seg)["params"]
  state = ref.init_state(2)
  if with_state:  # a state from a previous call ending in document 0 (row 0) / 5 (row 1: a reset at token 0)
    _, state = jax.jit(lambda p, u: ref.apply({"params": p}, u, segment_ids=jnp.asarray([[0] * 5, [5] * 5])))(
        params, jax.random.normal(jax.random.key(2), (2, 5, 8)))
  (l_ref, (y_ref, s_ref)), g_ref = jax.jit(lambda *a: _run(ref, *a))(params, x, seg, state)
  with jax.set_mesh(mesh):
    batch = "data" if len(shape) == 2 else None
    xs = jax.device_put(x, NamedSharding(mesh, P(batch, "sequence")))
    segs = jax.device_put(seg, NamedSharding(mesh, P(batch, "sequence")))
    # When running the sharded block (conv halo + SSD state pass inside a shard_map over "sequence")
    (l_par, (y, s)), g_par = jax.jit(lambda *a: _run(par, *a))(params, xs, segs, state)
  # Then outputs, the final state and the gradients w.r.t. every parameter, x and the state are the unsharded ones
  np.testing.assert_allclose(y, y_ref, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(l_par, l_ref, rtol=1e-5)
  for a, b_ in zip(jax.tree.leaves(s), jax.tree.leaves(s_ref)):
    np.testing.assert_allclose(a, b_, atol=1e-5, rtol=1e-5)
  flat_par = jax.tree_util.tree_leaves_with_path(g_par)
  for (path, gp), gr in zip(flat_par, jax.tree.leaves(g_ref)):
    np.testing.assert_allclose(gp, gr, atol=2e-5, rtol=2e-5, err_msg=jax.tree_util.keystr(path))


def test_sharded_mamba2_init_has_the_same_params_and_step_form_is_unsharded():
  # Given the sharded block initialised under a mesh
  x = jax.random.normal(jax.random.key(0), (2, 16, 8))
  with jax.set_mesh(_mesh((8,))):
    p_par = jax.eval_shape(lambda u: _layer(sequence_axis="sequence").init(jax.random.key(1), u), x)["params"]
  p_ref = jax.eval_shape(lambda u: _layer().init(jax.random.key(1), u), x)["params"]
  # Then the parameter tree (names, shapes, dtypes and logical axes) is the unsharded one
  assert jax.tree.structure(p_par) == jax.tree.structure(p_ref)
  for a, b_ in zip(jax.tree.leaves(p_par), jax.tree.leaves(p_ref)):
    assert (a.shape, a.dtype) == (b_.shape, b_.dtype)

  # And a t == 1 call (decoding) runs the unsharded step form, without a mesh
  @jax.jit
  def step(u):
    p = _layer().init(jax.random.key(1), u)
    return _layer(sequence_axis="sequence").apply(p, u)[0], _layer().apply(p, u)[0]
  y1, y_ref = step(x[:, :1])
  np.testing.assert_allclose(y1, y_ref, atol=1e-6)


def test_sharded_mamba2_bad_input():
  x = jnp.zeros((2, 12, 8))
  params = jax.eval_shape(lambda: _layer().init(jax.random.key(1), x))
  apply = lambda axis, u: jax.eval_shape(lambda p: _layer(sequence_axis=axis).apply(p, u), params)
  with jax.set_mesh(_mesh((8,))):
    with pytest.raises(ValueError, match="t=12 is not divisible by the 8 shards of mesh axis 'sequence'"):
      apply("sequence", x)
    with pytest.raises(ValueError, match="axis_name='seq' is not an axis"):
      apply("seq", x[:, :8])
  with pytest.raises(ValueError, match="needs a mesh"):
    apply("sequence", x[:, :8])
