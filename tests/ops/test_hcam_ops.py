"""HCAM read op: both compute paths == a naive per-query loop (forward and gradients), k = M closed form, edges."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from memarch.ops import hcam as hcam_ops
from memarch.ops.hcam import HCAMParams, HCAMPath

B, Q, M, C, D, H, DK = 2, 5, 6, 3, 8, 2, 4
F = H * DK
PATHS = (HCAMPath.BLOCK_DENSE, HCAMPath.GATHER_PROJECTED, HCAMPath.GATHER_RAW)


def _params(key, e=D, d=D, h=H, dk=DK, f=F) -> HCAMParams:
  ks = jax.random.split(key, 10)
  n = lambda i, shape, fan: jax.random.normal(ks[i], shape) * fan ** -0.5
  return HCAMParams(
      summary_query=n(0, (e, f), e), summary_key=n(1, (d, f), d), query=n(2, (e, h, dk), e),
      query_bias=0.1 * n(3, (h, dk), 1), key=n(4, (d, h, dk), d), key_bias=0.1 * n(5, (h, dk), 1),
      value=n(6, (d, h, dk), d), value_bias=0.1 * n(7, (h, dk), 1), out=n(8, (h, dk, f), f),
      out_bias=0.1 * n(9, (f,), 1))


def _inputs(seed=0, m=M):
  kx, km = jax.random.split(jax.random.key(seed))
  x = jax.random.normal(kx, (B, Q, D))
  contents = jax.random.normal(km, (B, m, C, D))
  return x, contents


def _mask(m=M):
  """Random readability with three special rows: nothing readable, one chunk readable, everything readable."""
  mask = np.random.default_rng(0).random((B, Q, m)) < 0.6
  mask[0, 0] = False
  mask[0, 1] = False
  mask[0, 1, 2] = True
  mask[1, 2] = True
  return jnp.asarray(mask)


def _naive_selection(params, x, contents, mask, k, slot_mask):
  """Concrete top-k (float64 numpy): per (b, t) the readable chunks of highest score, best first."""
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  xs, cs = np.asarray(x, np.float64), np.asarray(contents, np.float64)
  sm = np.ones(cs.shape[:3], bool) if slot_mask is None else np.asarray(slot_mask)
  means = (cs * sm[..., None]).sum(2) / np.maximum(sm.sum(2), 1)[..., None]
  sel = {}
  for b in range(xs.shape[0]):
    s = (xs[b] @ p.summary_query) @ (means[b] @ p.summary_key).T
    for t in range(xs.shape[1]):
      readable = [j for j in range(cs.shape[1]) if mask[b, t, j] and sm[b, j].any()]
      sel[b, t] = sorted(readable, key=lambda j: -s[t, j])[:min(k, cs.shape[1])]
  return sel


@functools.partial(jax.jit, static_argnames="sg")
def _query_chunk(params, xt, chunk, valid, sg):
  """Spec §3 for one query and one chunk: its relevance score and the within-chunk MHA (all heads)."""
  c, d = chunk.shape
  h, dk = params.query.shape[1:]
  f = params.summary_query.shape[1]
  stop = jax.lax.stop_gradient if sg else (lambda z: z)
  mean = stop(jnp.sum(chunk * valid[:, None], 0) / jnp.sum(valid))
  score = jnp.dot(xt @ params.summary_query, mean @ params.summary_key) / np.sqrt(f)
  mem = stop(chunk + hcam_ops.position_code(c, d))
  qv = jnp.einsum("d,dhe->he", xt, params.query) + params.query_bias
  kv = jnp.einsum("cd,dhe->che", mem, params.key) + params.key_bias
  vv = jnp.einsum("cd,dhe->che", mem, params.value) + params.value_bias
  logit = jnp.where(valid[:, None] > 0, jnp.einsum("he,che->ch", qv, kv) / np.sqrt(dk), -jnp.inf)
  heads = jnp.einsum("ch,che->he", jax.nn.softmax(logit, axis=0), vv)
  return score, heads.reshape(h * dk) @ params.out.reshape(h * dk, f) + params.out_bias


@functools.partial(jax.jit, static_argnames="sg")
def _query(params, xt, chunks, valid, sg):
  """One query over its selected chunks, one chunk at a time: softmax over their scores, weighted MHA sum."""
  scores, mhas = zip(*(_query_chunk(params, xt, chunks[r], valid[r], sg) for r in range(chunks.shape[0])))
  w = jax.nn.softmax(jnp.stack(scores))  # softmax over the selected chunks only
  return sum(w[r] * mha for r, mha in enumerate(mhas))


def _naive_read(params, x, contents, sel, slot_mask=None, sg=True):
  """The naive loop: one query at a time over its selected chunks (selection fixed; the outer loop is eager)."""
  c = contents.shape[2]
  f = params.summary_query.shape[1]
  rows = []
  for b in range(x.shape[0]):
    cols = []
    for t in range(x.shape[1]):
      chosen = np.asarray(sel[b, t], int)
      if not chosen.size:
        cols.append(jnp.zeros((f,)))
        continue
      valid = jnp.ones((chosen.size, c)) if slot_mask is None else jnp.asarray(slot_mask[b, chosen], jnp.float32)
      cols.append(_query(params, x[b, t], contents[b, chosen], valid, sg))
    rows.append(jnp.stack(cols))
  return jnp.stack(rows)


def _loss(out):
  return jnp.sum(out * jnp.cos(jnp.arange(out.size, dtype=out.dtype).reshape(out.shape)))


@functools.cache
def _case(sg=True, use_slot_mask=False, k=3):
  params = _params(jax.random.key(1))
  x, contents = _inputs()
  mask = _mask()
  slot_mask = None
  if use_slot_mask:  # partly filled chunks, and one chunk with no valid slot at all
    slot_mask = jnp.asarray(np.random.default_rng(1).random((B, M, C)) < 0.7).at[:, :, 0].set(True)
    slot_mask = slot_mask.at[1, 3].set(False)
  sel = _naive_selection(params, x, contents, mask, k, slot_mask)
  naive = lambda p, xx, cc: _naive_read(p, xx, cc, sel, slot_mask, sg)
  ref = naive(params, x, contents)
  ref_grads = jax.grad(lambda p, xx, cc: _loss(naive(p, xx, cc)), argnums=(0, 1, 2))(params, x, contents)
  return params, x, contents, mask, slot_mask, ref, ref_grads


def _op(path, mask, slot_mask, sg, k=3):
  return lambda p, xx, cc: hcam_ops.hcam_read(p, xx, cc, mask, top_k=k, slot_mask=slot_mask, path=path,
                                               stop_gradient_memory=sg)


def _out_and_grads(op, params, x, contents):
  """One compile for the output and its gradients w.r.t. params, queries and memory."""
  f = jax.value_and_grad(lambda p, xx, cc: (_loss(o := op(p, xx, cc)), o), argnums=(0, 1, 2), has_aux=True)
  (_, out), grads = jax.jit(f)(params, x, contents)
  return out, grads


def _close(a, b, atol=1e-5):
  jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, atol=atol, rtol=1e-5), a, b)


def test_every_path_equals_the_naive_loop_forward_and_gradients():
  # Given memory with partly filled chunks (and one empty chunk), queries with nothing / one / everything / some
  # chunks readable, and the naive loop's output and gradients with gradients allowed into memory
  params, x, contents, mask, slot_mask, ref, ref_grads = _case(sg=False, use_slot_mask=True)
  assert np.abs(np.asarray(ref_grads[2])).max() > 0.0
  for path in PATHS:
    for sg in (False, True):
      # When the op runs on each compute path, with and without stop-gradient into memory
      out, grads = _out_and_grads(_op(path, mask, slot_mask, sg), params, x, contents)
      # Then outputs and gradients match (stop-gradient changes only the memory's gradient, which becomes zero)
      np.testing.assert_allclose(out, ref, atol=1e-5, rtol=1e-5, err_msg=str(path))
      _close(grads[:2], ref_grads[:2])
      if sg:
        np.testing.assert_array_equal(grads[2], 0.0)
      else:
        _close(grads[2], ref_grads[2])
  np.testing.assert_array_equal(out[0, 0], 0.0)  # nothing readable -> exactly zero


def test_k_equal_to_the_number_of_chunks_is_a_softmax_over_all_relevance():
  # Given every chunk readable and k = M: top-k selects everything, so (derived here)
  #   out_t = sum_j softmax_j(s_tj) MHA_tj,   s_tj = (x_t U_q).(mean_c X_jc U_k) / sqrt(F),
  #   MHA_tj = concat_h softmax_c(q^h_t . K^h_jc / sqrt(dk)) V^h_jc W_o + b_o,  K, V from X_j + PE.
  params, (x, contents) = _params(jax.random.key(2)), _inputs(3)
  mask = jnp.ones((B, Q, M), bool)
  s = jnp.einsum("bqf,bmf->bqm", x @ params.summary_query, contents.mean(2) @ params.summary_key) / np.sqrt(F)
  mem = contents + hcam_ops.position_code(C, D)
  qh = jnp.einsum("bqd,dhe->bqhe", x, params.query) + params.query_bias
  kh = jnp.einsum("bmcd,dhe->bmche", mem, params.key) + params.key_bias
  vh = jnp.einsum("bmcd,dhe->bmche", mem, params.value) + params.value_bias
  att = jax.nn.softmax(jnp.einsum("bqhe,bmche->bqmhc", qh, kh) / np.sqrt(DK), axis=-1)
  mha = jnp.einsum("bqmhc,bmche,hef->bqmf", att, vh, params.out) + params.out_bias
  expected = jnp.einsum("bqm,bqmf->bqf", jax.nn.softmax(s, axis=-1), mha)
  for path in PATHS:
    # When the op reads with k = M (and with k > M, which caps at M)
    for k in (M,) if path is not HCAMPath.GATHER_RAW else (M, M + 3):
      out = jax.jit(_op(path, mask, None, True, k))(params, x, contents)
      # Then it equals the closed form
      np.testing.assert_allclose(out, expected, atol=1e-5, rtol=1e-5, err_msg=f"{path} k={k}")


def test_all_masked_gives_zero_output_and_finite_gradients():
  params, (x, contents) = _params(jax.random.key(4)), _inputs(5)
  mask = jnp.zeros((B, Q, M), bool)
  for path in PATHS:
    out, grads = _out_and_grads(_op(path, mask, None, False), params, x, contents)
    np.testing.assert_array_equal(out, 0.0)
    assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))
    assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree.leaves(grads))


def test_fewer_readable_chunks_than_k_equals_reading_only_those():
  # Given a mask that leaves 2 readable chunks per query out of 6, and k = 4
  params, (x, contents) = _params(jax.random.key(6)), _inputs(7)
  keep = np.array([1, 4])
  mask = jnp.zeros((B, Q, M), bool).at[:, :, keep].set(True)
  for path in PATHS:
    # When reading the full memory, and a memory holding only the readable chunks
    out = jax.jit(_op(path, mask, None, True, 4))(params, x, contents)
    only = jax.jit(_op(path, jnp.ones((B, Q, 2), bool), None, True, 4))(params, x, contents[:, keep])
    # Then they agree: the unreadable chunks top-k still picks get weight exactly 0
    np.testing.assert_allclose(out, only, atol=1e-6, rtol=1e-6)


def test_masked_slots_of_a_partial_chunk_are_ignored():
  # Given a partly filled last chunk (2 of 3 slots), and garbage written into its empty slot
  params, (x, contents) = _params(jax.random.key(8)), _inputs(9)
  slot_mask = jnp.ones((B, M, C), bool).at[:, M - 1, 2].set(False)
  garbage = contents.at[:, M - 1, 2].set(1e3)
  mask = jnp.ones((B, Q, M), bool)
  for path in PATHS:
    op = jax.jit(_op(path, mask, slot_mask, True))
    # Then the garbage changes nothing
    np.testing.assert_allclose(op(params, x, garbage), op(params, x, contents), atol=1e-6)


def test_position_code_is_reversed_with_sin_half_then_cos_half():
  pe = np.asarray(hcam_ops.position_code(4, 6))
  np.testing.assert_allclose(pe[-1], [0, 0, 0, 1, 1, 1], atol=1e-7)  # last slot: position 0
  w = 10_000.0 ** (-2 * np.arange(3) / 6)
  np.testing.assert_allclose(pe[0], np.concatenate([np.sin(3 * w), np.cos(3 * w)]), atol=1e-6)
  with pytest.raises(ValueError, match="even"):
    hcam_ops.position_code(4, 5)


def test_auto_path_follows_the_cost_model():
  # Spec §8 shapes: training (Q = 64, L = 2048) -> block-dense; acting (Q = 1, L = 16384) -> gather-raw (as measured).
  train = dict(num_queries=64, num_chunks=64, chunk_size=32, top_k=8, d_in=256, d_out=256)
  act = dict(num_queries=1, num_chunks=512, chunk_size=32, top_k=8, d_in=256, d_out=256)
  assert hcam_ops.resolve_path("auto", **train) is HCAMPath.BLOCK_DENSE
  assert hcam_ops.resolve_path("auto", **act) is HCAMPath.GATHER_RAW
  assert hcam_ops.resolve_path("gather_projected", **act) is HCAMPath.GATHER_PROJECTED
  long = dict(train, num_chunks=512)  # many queries over a very long memory: a gather (measured ~2x faster)
  assert hcam_ops.resolve_path("auto", **long) is not HCAMPath.BLOCK_DENSE
  gflop = hcam_ops.path_costs(**train, gather_element_cost=0.0)  # the spec's pure FLOP model
  assert 8 * gflop[HCAMPath.GATHER_RAW] == pytest.approx(34.4e9, rel=0.02)  # the spec's B = 8 figures
  assert 8 * gflop[HCAMPath.BLOCK_DENSE] == pytest.approx(5.4e9, rel=0.05)


def _fifo_reference(stored, seg, c, m_max):
  """The chronological FIFO memory, naively (numpy): what every token may read, oldest chunk first.

  Returns per (row, token) the memory before the token's own write in the old chronological layout (empty slots at
  the front, the oldest chunk next) with its read mask (same document), and per row the last ``M_max + 1`` chunks
  (what the ring keeps: the FIFO and the chunk that left it last) as ``(chunk index, document, contents)`` tuples.
  """
  b, t, d = stored.shape
  views, masks, finals = np.zeros((b, t, m_max, c, d), np.float32), np.zeros((b, t, m_max), bool), []
  for row in range(b):
    chunks, start = [], 0
    for i in range(t):
      if i == 0 or seg[row, i] != seg[row, i - 1]:
        start = i  # a document starts: chunks are cut at in-document offsets that are multiples of C
      fifo = chunks[-m_max:]
      for j, (_, doc, chunk) in enumerate(fifo):
        slot = m_max - len(fifo) + j
        views[row, i, slot], masks[row, i, slot] = chunk, doc == seg[row, i]
      if (i - start + 1) % c == 0:  # token i completes a chunk; it is readable from token i + 1 on
        chunks.append((len(chunks), seg[row, i], stored[row, i - c + 1:i + 1]))
    finals.append(chunks[-(m_max + 1):])
  return views, masks, finals


@functools.partial(jax.jit, static_argnames=("fresh", "k", "tie_break"))
def _write_and_read(params, memory, queries, stored, seg, *, fresh, k, tie_break=True):
  contents, keys, mask, order, memory = hcam_ops.write_memory(memory, stored, seg, fresh=fresh)
  order = order if tie_break else None
  return hcam_ops.hcam_read(params, queries, contents, mask, top_k=k, keys=keys, chunk_order=order), memory


def test_ring_memory_reads_what_a_chronological_fifo_holds_with_eviction_resets_and_ties():
  # Given 17 tokens in two rows with document resets (row 0 at 9, row 1 at 3, an odd offset), C = 2 and M_max = 3
  # (a 4-slot ring): 8 chunks per row, so the ring wraps around and holds chunks of an earlier document after a
  # reset
  c, m_max, k, t = 2, 3, 2, 17
  rng = np.random.default_rng(11)  # numpy inputs: slicing them compiles nothing
  queries, stored = rng.standard_normal((2, B, t, D), np.float32)
  seg = np.array([[0] * 9 + [1] * 8, [5] * 3 + [6] * 14], np.int32)
  views, masks, finals = _fifo_reference(stored, seg, c, m_max)
  # and two weight sets: random ones, and ones with U_k = 0, so that every readable chunk scores exactly 0 and
  # top-k must break ties (by age: the old chronological buffer picked the oldest readable chunks)
  params = _params(jax.random.key(12))
  tied = params._replace(summary_key=jnp.zeros_like(params.summary_key))
  bt = B * t
  for p in (params, tied):
    # When the chronological reference is read, and the ring memory is written and read in one call, in uneven
    # chunks with the carried state, and token by token (decode steps, t == 1)
    ref = np.asarray(jax.jit(functools.partial(hcam_ops.hcam_read, top_k=k))(
        p, queries.reshape(bt, 1, D), views.reshape(bt, m_max, c, D), masks.reshape(bt, 1, m_max))).reshape(B, t, F)
    chunks = [(0, 1), (1, 6), (6, t)]  # t == 1 and t > 1 calls on a carried state; the last writes 5-6 > S chunks
    forms = {"full": [(0, t)], "chunks": chunks, "tokens": [(i, i + 1) for i in range(t)]}
    for name, bounds in forms.items():
      memory, outs = hcam_ops.init_memory(B, m_max, c, D), []
      for lo, hi in bounds:
        out, memory = _write_and_read(p, memory, queries[:, lo:hi], stored[:, lo:hi], seg[:, lo:hi],
                                      fresh=name == "full", k=k)
        outs.append(out)
      # Then every form reads exactly what the chronological FIFO held, ties resolved alike
      np.testing.assert_allclose(np.concatenate(outs, 1), ref, atol=1e-5, rtol=1e-5, err_msg=name)
      # and the ring holds the FIFO's chunks and the one evicted last, chunk i in slot i mod (M_max + 1), with their
      # means
      memory = jax.tree.map(np.asarray, memory)
      for row, kept in enumerate(finals):
        assert int((memory.chunk_index[row] >= 0).sum()) == len(kept) == m_max + 1
        for index, doc, chunk in kept:
          s = index % (m_max + 1)
          assert int(memory.chunk_index[row, s]) == index and int(memory.segment[row, s]) == doc, name
          np.testing.assert_allclose(memory.contents[row, s], chunk, atol=1e-6)
          np.testing.assert_allclose(memory.keys[row, s], chunk.mean(0), atol=1e-6)
      np.testing.assert_array_equal(memory.num_chunks, [8, 8])
  # and the tie case does need the tie-break: decoding the ring with ties broken by slot reads other chunks
  memory, outs = hcam_ops.init_memory(B, m_max, c, D), []
  for i in range(t):
    out, memory = _write_and_read(tied, memory, queries[:, i:i + 1], stored[:, i:i + 1], seg[:, i:i + 1],
                                  fresh=False, k=k, tie_break=False)
    outs.append(out)
  assert np.abs(np.concatenate(outs, 1) - ref).max() > 1e-3


def test_read_rejects_a_chunk_order_of_the_wrong_shape():
  spec = lambda *shape, dtype=jnp.float32: jax.ShapeDtypeStruct(shape, dtype)
  params = jax.eval_shape(_params, jax.random.key(13))
  with pytest.raises(ValueError, match="chunk_order"):
    jax.eval_shape(functools.partial(hcam_ops.hcam_read, top_k=2), params, spec(B, Q, D), spec(B, M, C, D),
                   spec(B, Q, M, dtype=bool), chunk_order=spec(B, M + 1, dtype=jnp.int32))
