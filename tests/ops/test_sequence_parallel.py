"""Sequence parallelism on 8 simulated CPU devices: the halo plus the SSM state pass equals the unsharded run.

Spec ``bmojo.md`` §5.5 and §8 item 6: the SSD split over a ``sequence`` mesh axis equals :func:`ssd_chunked` on the
whole sequence (outputs, final state and gradients w.r.t. every input), with an initial state, resets inside shards
and on a shard's first token, a document spanning several shards, and chunk sizes that do not divide a shard.
"""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from memarch.ops import bmojo as bo
from memarch.ops import sequence_parallel as sp
from memarch.ops.ssd import ssd_chunked

AUTO = jax.sharding.AxisType.Auto


def _close_leaves(got, want, tol=1e-5):
  """Leaf-by-leaf closeness of two pytrees, naming the leaf that differs."""
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, atol=tol, rtol=tol, err_msg=jax.tree_util.keystr(path))


def _mesh(shape):
  names = ("data", "sequence") if len(shape) == 2 else ("sequence",)
  return jax.make_mesh(shape, names, axis_types=(AUTO,) * len(shape))


def _inputs(t, heads=4, head_dim=3, groups=2, d_state=5, b=2, seed=0):
  ks = jax.random.split(jax.random.key(seed), 6)
  x = jax.random.normal(ks[0], (b, t, heads, head_dim))
  dt = jax.nn.softplus(jax.random.normal(ks[1], (b, t, heads)) - 1.0)
  a = -jnp.exp(jax.random.uniform(ks[2], (heads,), minval=-1.5, maxval=0.5))
  bm = jax.random.normal(ks[3], (b, t, groups, d_state))
  cm = jax.random.normal(ks[4], (b, t, groups, d_state))
  h0 = jax.random.normal(ks[5], (b, heads, head_dim, d_state))
  return x, dt, a, bm, cm, h0


def _resets(t, local):
  """Row 0: one document over the whole row (spans every shard). Row 1: a reset inside a shard, one on a shard's
  first token, then a document spanning the remaining shards."""
  r = jnp.zeros((2, t), bool)
  return r.at[1, 1].set(True).at[1, local + 2].set(True).at[1, 2 * local].set(True)


def _loss(fn, cot_y, cot_h):
  def loss(x, dt, a, bm, cm, h0, reset):
    y, h = fn(x, dt, a, bm, cm, h0, reset=reset)
    return jnp.sum(y * cot_y) + jnp.sum(h * cot_h)
  return jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4, 5))


@pytest.mark.parametrize("shape,t,chunk", [((8,), 40, 3), pytest.param((2, 4), 36, 4, marks=pytest.mark.slow),
                                             pytest.param((2, 4), 24, 64, marks=pytest.mark.slow)])
def test_ssd_sequence_parallel_matches_unsharded(shape, t, chunk):
  # Given a sequence mesh, T whose shards (T / S tokens) the chunk does not divide, an initial state and resets
  mesh = _mesh(shape)
  shards = mesh.shape["sequence"]
  x, dt, a, bm, cm, h0 = _inputs(t)
  reset = _resets(t, t // shards)
  ref = functools.partial(ssd_chunked, chunk_size=chunk)
  par = functools.partial(sp.ssd_sequence_parallel, axis_name="sequence", chunk_size=chunk)
  y_ref, h_ref = jax.jit(ref)(x, dt, a, bm, cm, h0, reset=reset)
  ks = jax.random.split(jax.random.key(1), 2)
  cot_y, cot_h = jax.random.normal(ks[0], y_ref.shape), jax.random.normal(ks[1], h_ref.shape)
  with jax.set_mesh(mesh):
    batch = "data" if len(shape) == 2 else None
    put = lambda z: jax.device_put(z, NamedSharding(mesh, P(batch, "sequence")))
    xs, dts, bms, cms, rs = map(put, (x, dt, bm, cm, reset))
    # When running the sharded SSD (each shard from zero, all_gather of the shard summaries, fold, correction)
    y, h = jax.jit(par)(xs, dts, a, bms, cms, h0, reset=rs)
    l_par, g_par = jax.jit(_loss(par, cot_y, cot_h))(xs, dts, a, bms, cms, h0, rs)
  l_ref, g_ref = jax.jit(_loss(ref, cot_y, cot_h))(x, dt, a, bm, cm, h0, reset)
  # Then outputs, the final state and the gradients w.r.t. x, dt, A, B, C and h0 equal the unsharded run
  np.testing.assert_allclose(y, y_ref, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(h, h_ref, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(l_par, l_ref, rtol=1e-5)
  for name, gp, gr in zip(("x", "dt", "A", "B", "C", "h0"), g_par, g_ref):
    np.testing.assert_allclose(gp, gr, atol=2e-5, rtol=2e-5, err_msg=name)
  # And the carried state matters here (the test would catch a missing correction)
  y0, _ = jax.jit(ref)(x[:, t // shards:], dt[:, t // shards:], a, bm[:, t // shards:], cm[:, t // shards:],
                       reset=reset[:, t // shards:])
  assert np.abs(np.asarray(y0 - y_ref[:, t // shards:])).max() > 1e-2


def test_ssd_sequence_parallel_linear_local_form_and_no_state():
  # Given no initial state, no resets and the token-recurrence local form
  mesh = _mesh((8,))
  x, dt, a, bm, cm, _ = _inputs(16, groups=1)
  with jax.set_mesh(mesh):
    fn = functools.partial(sp.ssd_sequence_parallel, axis_name="sequence", scan_type="linear")
    y, h = jax.jit(fn)(x, dt, a, bm, cm)
  # Then it equals the unsharded chunked form
  y_ref, h_ref = jax.jit(ssd_chunked)(x, dt, a, bm, cm)
  np.testing.assert_allclose(y, y_ref, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(h, h_ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("n", [0, 1, 3, 6, 9])
def test_halo_equals_the_preceding_tokens(n):
  # Given z sharded 8 ways (4 steps per shard) and a fill standing for the n steps before the sequence
  mesh = _mesh((8,))
  z = jnp.arange(2 * 32 * 3, dtype=jnp.float32).reshape(2, 32, 3)
  fill = -1.0 - jnp.arange(2 * n * 3, dtype=jnp.float32).reshape(2, n, 3)
  local = lambda z, f: sp.halo(z, n, "sequence", f)[:, None]
  fn = jax.shard_map(local, mesh=mesh, in_specs=(P(None, "sequence"), P()), out_specs=P(None, "sequence"))
  # When every shard takes its halo (n > 4 spans several shards)
  got = jax.jit(fn)(z, fill)  # [2, 8, n, 3]
  # Then shard i's halo is steps [4i - n, 4i) of fill ++ z
  full = jnp.concatenate([fill, z], axis=1)
  want = jnp.stack([full[:, 4 * i:4 * i + n] for i in range(8)], axis=1)
  np.testing.assert_array_equal(got, want)
  # And a scalar fill broadcasts
  fn = jax.shard_map(lambda z: sp.halo(z, n, "sequence", -7, axis=1)[:, None], mesh=mesh,
                     in_specs=P(None, "sequence"), out_specs=P(None, "sequence"))
  got = jax.jit(fn)(z)
  np.testing.assert_array_equal(got[:, 0], jnp.full((2, n, 3), -7.0))
  if n:
    np.testing.assert_array_equal(got[:, 1, -1], z[:, 3])


def test_halo_gradient_flows_to_the_previous_shard():
  # Given the loss sum(halo * w) of a 1-step halo
  mesh = _mesh((8,))
  z = jax.random.normal(jax.random.key(0), (1, 16))
  w = jnp.arange(8.0)[None]
  fn = jax.shard_map(lambda z, w: sp.halo(z, 1, "sequence") * w, mesh=mesh,
                     in_specs=(P(None, "sequence"), P(None, "sequence")), out_specs=P(None, "sequence"))
  g = jax.jit(jax.grad(lambda z: jnp.sum(fn(z, w))))(z)
  # Then the gradient lands on the last step of each shard, weighted by the next shard's w
  want = jnp.zeros((1, 16)).at[0, 1:15:2].set(jnp.arange(1.0, 8.0))
  np.testing.assert_array_equal(g, want)


def _collectives(t, b=2, h=4, p=8, n=16):
  shapes = [(b, t, h, p), (b, t, h), (h,), (b, t, 1, n), (b, t, 1, n), (b, h, p, n)]
  args = [jax.ShapeDtypeStruct(s, jnp.float32) for s in shapes]
  with jax.set_mesh(_mesh((8,))):
    fn = jax.jit(functools.partial(sp.ssd_sequence_parallel, axis_name="sequence"))
    hlo = fn.lower(*args).compile().as_text()
  ops = "all-gather|all-reduce|collective-permute|all-to-all|reduce-scatter"
  return sorted(set(re.findall(rf"= (\w+\[[\d,]*\])\S* ({ops})\(", hlo)))


def test_communication_is_independent_of_the_sequence_length():
  # Given the compiled sharded SSD for T = 64 and T = 1024 on 8 shards
  short, long = _collectives(64), _collectives(1024)
  # Then it communicates the same thing: all_gathers of the 8 shard states [8, b, h, p, n] and decays [8, b, h]
  # (plus moving the final state off the last shard); nothing scales with T
  assert short == long, (short, long)
  assert ("f32[8,2,4,8,16]", "all-gather") in short and ("f32[8,2,4]", "all-gather") in short
  sizes = [np.prod([int(d) for d in s[4:-1].split(",")]) for s, _ in short]
  assert max(sizes) <= 8 * 2 * 4 * 8 * 16


def test_bad_input_raises_clear_errors():
  x, dt, a, bm, cm, h0 = _inputs(12)
  with jax.set_mesh(_mesh((8,))):
    with pytest.raises(ValueError, match="t=12 is not divisible by the 8 shards"):
      sp.ssd_sequence_parallel(x, dt, a, bm, cm, axis_name="sequence")
    with pytest.raises(ValueError, match="axis_name='seq' is not an axis of the mesh"):
      sp.ssd_sequence_parallel(x, dt, a, bm, cm, axis_name="seq")
    with pytest.raises(ValueError, match="h0"):
      sp.ssd_sequence_parallel(x[:, :8], dt[:, :8], a, bm[:, :8], cm[:, :8], h0[:1], axis_name="sequence")
  with pytest.raises(ValueError, match="needs a mesh"):
    sp.ssd_sequence_parallel(x, dt, a, bm, cm, axis_name="sequence")
  with pytest.raises(ValueError, match="axis_name='sequence' is not bound"):
    sp.ssd_sequence_sharded(x, dt, a, bm, cm, axis_name="sequence")
  with pytest.raises(ValueError, match="n=-1"):
    sp.halo(x, -1, "sequence")


def _bmojo_inputs(t, b=2, h=4, kv=2, e=4, seed=0):
  ks = jax.random.split(jax.random.key(seed), 6)
  q, qf = (jax.random.normal(kk, (b, t, h, e)) for kk in ks[:2])
  k, v, kf, vf = (jax.random.normal(kk, (b, t, kv, e)) for kk in ks[2:])
  return q, k, v, kf, vf, qf


@pytest.mark.parametrize("window,tied", [pytest.param(3, True, marks=pytest.mark.slow), (6, False)])
def test_bmojo_f_sequence_parallel_matches_unsharded(window, tied):
  # Given B'MOJO-F inputs on 8 shards of 4 tokens (W = 6: the 2W - 1 = 11 fading halo spans three shards), a memory
  # carried from a previous call, and documents spanning shards / starting on a shard's first token
  mesh = _mesh((8,))
  t, b = 32, 2
  q, k, v, kf, vf, qf = _bmojo_inputs(t)
  qf = None if tied else qf
  seg = np.zeros((b, t), np.int32)
  seg[1, 6:] = 1
  seg[1, 16:] = 2   # starts on shard 4's first token
  seg[1, 18:] = 3
  seg = jnp.asarray(seg)
  mem0 = bo.init_memory(b, window=window, chunk_size=window, k_sel=1, memory_size=0, kv_heads=2, head_dim=4)
  p = _bmojo_inputs(7, seed=3)
  _, mem0 = bo.bmojo_attention(p[0], p[1], p[2], p[3], p[4], mem0, window=window,
                               segment_ids=jnp.asarray([[0] * 7, [0] * 3 + [5] * 4]))
  ref = lambda *a: bo.bmojo_attention(*a[:5], a[5], window=window, segment_ids=seg, q_fade=a[6])
  par = lambda *a: sp.bmojo_attention_sequence_parallel(*a[:5], a[5], window=window, segment_ids=seg, q_fade=a[6],
                                                        axis_name="sequence")
  w_out = jax.random.normal(jax.random.key(9), q.shape)

  def loss(fn):
    def f(q, k, v, kf, vf, mk, qf):
      out, mem = fn(q, k, v, kf, vf, mem0._replace(context=mem0.context._replace(k=mk)), qf)
      return jnp.sum(out * w_out) + jnp.sum(mem.fading.v) + jnp.sum(mem.context.k * 0.5), (out, mem)
    return jax.value_and_grad(f, argnums=(0, 1, 2, 3, 4, 5), has_aux=True)

  (l_ref, (o_ref, m_ref)), g_ref = jax.jit(loss(ref))(q, k, v, kf, vf, mem0.context.k, qf)
  with jax.set_mesh(mesh):
    # When each shard builds its memory from halos and the offset prefix, then runs bmojo_attention unchanged
    (l_par, (o_par, m_par)), g_par = jax.jit(loss(par))(q, k, v, kf, vf, mem0.context.k, qf)
  # Then the outputs, the new memory (windows, offset, last segment, length) and the gradients are the unsharded
  np.testing.assert_allclose(o_par, o_ref, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(l_par, l_ref, rtol=1e-5)
  _close_leaves(m_par, m_ref)
  for name, gp, gr in zip(("q", "k", "v", "k_fade", "v_fade", "memory.context.k"), g_par, g_ref):
    np.testing.assert_allclose(gp, gr, atol=1e-5, rtol=1e-5, err_msg=name)
  np.testing.assert_array_equal(m_par.offset, [7 + t, t - 18])


def _bmojo_memory(window, chunk, k_sel, m, seed=3, bound="fifo"):
  """A memory carried from a 7-token call (two documents in row 1), with candidates and store entries."""
  mem = bo.init_memory(2, window=window, chunk_size=chunk, k_sel=k_sel, memory_size=m, kv_heads=2, head_dim=4,
                       bound=bound)
  p = _bmojo_inputs(7, seed=seed)
  sc = jax.random.uniform(jax.random.key(seed), (2, 7)) if m else None
  _, mem = bo.bmojo_attention(p[0], p[1], p[2], p[3], p[4], mem, window=window, chunk_size=chunk, k_sel=k_sel,
                              score=sc, segment_ids=jnp.asarray([[0] * 7, [0] * 3 + [5] * 4]), bound=bound)
  return mem


@pytest.mark.parametrize("window,chunk,k_sel,m,bias,bound", [
    (3, 6, 2, 4, True, "fifo"),
    (2, 3, 2, 5, True, "top_m"),
    pytest.param(2, 3, 1, 3, False, "fifo", marks=pytest.mark.slow),
])
def test_bmojo_store_sequence_parallel_matches_unsharded(window, chunk, k_sel, m, bias, bound):
  # Given the full B'MOJO read with a store (FIFO: chunks of C tokens straddle the 4-token shards, with C = 6 the 5
  # candidates span two shards; top_m: M = 5 best of 2 per chunk, so entries written on one shard are evicted on
  # later ones), a carried memory with candidates and store entries, documents spanning shards, and (with
  # selector_bias) gradients reaching the scores through the store logits
  t, b = 32, 2
  q, k, v, kf, vf, _ = _bmojo_inputs(t)
  score = jax.random.uniform(jax.random.key(5), (b, t))
  if bound == "top_m":  # four score levels: ties between entries of different shards (the earlier one stays)
    score = jnp.floor(score * 4) / 4
  seg = np.zeros((b, t), np.int32)
  # Row 1's carried store holds entries of documents 0 and 5; ids 0 and 5 come back as new documents, which must
  # not read them (documents are told apart by where they start).
  seg[1] = 0
  seg[1, 9:] = 5
  seg[1, 16:] = 8
  seg = jnp.asarray(seg)
  mem0 = _bmojo_memory(window, chunk, k_sel, m, bound=bound)
  assert int((mem0.store.positions >= 0).sum()) > 0
  sel = (jnp.asarray([0.5, 1.0, -0.3, 2.0]), jnp.asarray([0.2, 0.5, 0.1, 0.7])) if bias else None
  kw = dict(window=window, segment_ids=seg, chunk_size=chunk, k_sel=k_sel, selector_bias=sel, bound=bound)
  ref = lambda *a: bo.bmojo_attention(*a[:5], mem0, score=a[5], **kw)
  par = lambda *a: sp.bmojo_attention_sequence_parallel(*a[:5], mem0, score=a[5], axis_name="sequence", **kw)
  w_out = jax.random.normal(jax.random.key(9), q.shape)

  def loss(fn):
    def f(*a):
      out, mem = fn(*a)
      return jnp.sum(out * w_out) + jnp.sum(mem.store.v) + jnp.sum(mem.candidates.k * 0.5), (out, mem)
    return jax.value_and_grad(f, argnums=tuple(range(6)), has_aux=True)

  (l_ref, (o_ref, m_ref)), g_ref = jax.jit(loss(ref))(q, k, v, kf, vf, score)
  with jax.set_mesh(_mesh((8,))):
    # When each shard selects its chunks from an empty store, all_gathers them, folds the store and reads
    (l_par, (o_par, m_par)), g_par = jax.jit(loss(par))(q, k, v, kf, vf, score)
  # Then outputs, the new memory (store, candidates, windows, offsets) and the gradients are the unsharded ones
  np.testing.assert_allclose(o_par, o_ref, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(l_par, l_ref, rtol=1e-5)
  _close_leaves(m_par, m_ref)
  for name, gp, gr in zip(("q", "k", "v", "k_fade", "v_fade", "score"), g_par, g_ref):
    np.testing.assert_allclose(gp, gr, atol=1e-5, rtol=1e-5, err_msg=name)
  if bias:
    assert np.abs(np.asarray(g_ref[5])).max() > 0
