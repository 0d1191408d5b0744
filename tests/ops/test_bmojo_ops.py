"""B'MOJO read (ops): a naive per-token loop that keeps the store explicitly == the block-banded form == streaming.

The reference below is written from the spec (bmojo.md §3, §4), not from the fast path: it walks the tokens one by
one, keeps the unfinished chunk's tokens in a list, writes the top-k_sel of a chunk when it completes, evicts whole
chunks first-in first-out, and reads every key set by filtering positions.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from memarch.ops import attention as attn_ops
from memarch.ops import bmojo

B, T, H, KH, E = 2, 23, 4, 2, 8
# Row 1 packs four documents starting at 4, 7 and 15 (7 and 15 are not chunk multiples); the third reuses the first
# one's id 0, so the old document's keys are still in its fading span and store band: a new document all the same.
SEG = np.array([[0] * T, [0] * 4 + [1] * 3 + [0] * 8 + [2] * 8])


def _softmax(z, xp):
  z = z - z.max(axis=1, keepdims=True)
  return xp.exp(z) / xp.exp(z).sum(axis=1, keepdims=True)


def naive_bmojo(q, k, v, kf, vf, score, seg, *, window, chunk, k_sel, m, qf=None, xp=np, bias=None,
                bias_score=None, bound="fifo"):
  """Token-by-token reference: explicit window / fading filters and an explicit FIFO list of written chunks.

  ``xp=np`` runs in float64 numpy (fast forward reference); ``xp=jnp`` is differentiable (gradient reference).
  ``bound="top_m"`` keeps the ``m`` best-scored written entries of the document instead of the last ``m / k_sel``
  chunks (at equal scores the stored entry stays). ``bias = (gamma, tau)`` adds ``log σ(γ_h (e_j − τ_h))`` to store logits, with ``e`` = ``bias_score`` (default
  ``score``; pass a traced copy to differentiate through it).
  """
  if xp is np:
    q, k, v, kf, vf = (np.asarray(z, np.float64) for z in (q, k, v, kf, vf))
    qf = None if qf is None else np.asarray(qf, np.float64)
  qf = q if qf is None else qf
  score, seg = np.asarray(score), np.asarray(seg)
  b, t, h, e = q.shape
  g = h // k.shape[2]
  rep = lambda z: xp.repeat(z, g, axis=1)  # [n, kh, e] -> [n, h, e]
  rows, reads = [], []
  for r in range(b):
    written, cur, offset, outs, row_reads = [], [], 0, [], []
    for i in range(t):
      if i == 0 or seg[r, i] != seg[r, i - 1]:
        offset, cur = 0, []
      same = lambda j: seg[r, j] == seg[r, i] and j >= i - offset  # i's document (ids may come back later)
      ctx = [j for j in range(t) if i - window < j <= i and same(j)]
      fad = [j for j in range(t) if i - 2 * window < j <= i - window and same(j)]
      sto = [j for chunk_entries in written for j in chunk_entries if same(j) and j <= i - window]
      row_reads.append(sorted(sto))
      logits = [xp.einsum("he,nhe->hn", q[r, i], rep(k[r, np.array(ctx)]))]
      vals = [rep(v[r, np.array(ctx)])]
      if fad:
        logits.append(xp.einsum("he,nhe->hn", qf[r, i], rep(kf[r, np.array(fad)])))
        vals.append(rep(vf[r, np.array(fad)]))
      if sto:
        sto_logits = xp.einsum("he,nhe->hn", q[r, i], rep(k[r, np.array(sto)]))
        if bias is not None:
          e_sto = (score if bias_score is None else bias_score)[r, np.array(sto)]
          z = bias[0][:, None] * (e_sto[None, :] - bias[1][:, None])
          # log σ(z) * √e, because all logits are divided by √e below
          sto_logits = sto_logits + (-xp.logaddexp(0.0, -z)) * np.sqrt(e)
        logits.append(sto_logits)
        vals.append(rep(v[r, np.array(sto)]))
      p = _softmax(xp.concatenate(logits, axis=1) / np.sqrt(e), xp)
      outs.append(xp.einsum("hn,nhe->he", p, xp.concatenate(vals, axis=0)))
      # Write after reading: the chunk completed by token i is visible from the next chunk on.
      cur.append(i)
      if m and (offset + 1) % chunk == 0:
        best = sorted(cur, key=lambda j: (-score[r, j], j))[:k_sel]
        if bound == "fifo":
          written = (written + [sorted(best)])[-(m // k_sel):]
        else:  # one list of the m best entries of this document
          pool = [j for chunk_entries in written for j in chunk_entries if same(j)] + sorted(best)
          written = [sorted(pool, key=lambda j: -score[r, j])[:m]]
        cur = []
      offset += 1
    rows.append(xp.stack(outs))
    reads.append(row_reads)
  return xp.stack(rows), reads


@functools.cache
def _inputs(seed=0):
  ks = jax.random.split(jax.random.key(seed), 8)
  q, qf = (jax.random.normal(kk, (B, T, H, E)) for kk in ks[:2])
  k, v, kf, vf = (jax.random.normal(kk, (B, T, KH, E)) for kk in ks[2:6])
  score = jax.random.uniform(ks[6], (B, T))
  return q, k, v, kf, vf, qf, score


CFGS = {
    "bmojo": dict(window=3, chunk=4, k_sel=2, m=4),
    "top_m": dict(window=2, chunk=3, k_sel=2, m=3, bound="top_m"),
    "bmojo_f": dict(window=3, chunk=4, k_sel=1, m=0),
    "c_lt_w": dict(window=4, chunk=3, k_sel=1, m=3),
}


def _memory(cfg, b=B):
  return bmojo.init_memory(b, window=cfg["window"], chunk_size=cfg["chunk"], k_sel=cfg["k_sel"],
                           memory_size=cfg["m"], kv_heads=KH, head_dim=E, bound=cfg.get("bound", "fifo"))


@functools.cache
def _fast_cached(cfg_items, untied, query_block, store_group):
  return _fast_impl(dict(cfg_items), untied, query_block, store_group)


def _fast(cfg, untied=False, query_block=None, store_group=None):
  return _fast_cached(tuple(sorted(cfg.items())), untied, query_block, store_group)


def _fast_impl(cfg, untied, query_block, store_group):
  @jax.jit
  def run(q, k, v, kf, vf, qf, score, seg, memory):
    return bmojo.bmojo_attention(q, k, v, kf, vf, memory, window=cfg["window"], segment_ids=seg, score=score,
                                 q_fade=qf if untied else None, chunk_size=cfg["chunk"], k_sel=cfg["k_sel"],
                                 return_store_read=True, query_block=query_block,
                                 store_group=store_group, bound=cfg.get("bound", "fifo"))
  return run


def _streamed(cfg, bounds, untied=False, inputs=None, query_block=None, store_group=None):
  run = _fast(cfg, untied, query_block, store_group)
  q, k, v, kf, vf, qf, score = inputs or _inputs()
  memory, outs, reads = _memory(cfg), [], []
  seg = jnp.asarray(SEG)
  for lo, hi in bounds:
    sl = lambda z: z[:, lo:hi]
    o, memory, rd = run(*map(sl, (q, k, v, kf, vf, qf, score, seg)), memory)
    outs.append(o)
    reads.append(_read_sets(np.asarray(rd)))
  return jnp.concatenate(outs, 1), memory, [sum((r[i] for r in reads), []) for i in range(B)]


def _read_sets(store_read):
  return [[sorted(int(p) for p in row if p >= 0) for row in batch] for batch in store_read]


@pytest.mark.parametrize("name,untied,query_block,store_group", [
    ("bmojo", False, None, None), ("bmojo", True, 2, 3), ("bmojo_f", False, 2, None), ("top_m", False, None, None),
    pytest.param("bmojo_f", True, None, None, marks=pytest.mark.slow),
    pytest.param("c_lt_w", True, None, None, marks=pytest.mark.slow),
    pytest.param("c_lt_w", False, 1, 2, marks=pytest.mark.slow)])
def test_naive_equals_block_banded_and_streaming(name, untied, query_block, store_group):
  # Given random q/k/v, fading k/v, innovation scores and packed documents in row 1
  cfg = CFGS[name]
  q, k, v, kf, vf, qf, score = _inputs()
  ref, ref_reads = naive_bmojo(q, k, v, kf, vf, score, SEG, **cfg, qf=qf if untied else None)
  # When the fast path runs in one call, in uneven calls with the carried memory, and token by token
  # (query_block: sub-blocks of the in-context / fading read; store_group: blocks per group of the store read;
  # speed knobs that must not change anything)
  knobs = dict(query_block=query_block, store_group=store_group)
  full, mem_full, read_full = _streamed(cfg, [(0, T)], untied, **knobs)
  chunked, mem_chunked, _ = _streamed(cfg, [(0, 5), (5, 6), (6, 17), (17, T)], untied, **knobs)
  steps, mem_steps, read_steps = _streamed(cfg, [(i, i + 1) for i in range(T)], untied, **knobs)
  # Then outputs equal the reference, and so do the store entries each query reads and the final memories
  np.testing.assert_allclose(full, ref, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(chunked, ref, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(steps, ref, atol=1e-5, rtol=1e-5)
  assert read_full == ref_reads
  assert read_steps == ref_reads
  for a, b in ((mem_full, mem_chunked), (mem_full, mem_steps)):
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-6), a, b)
  if cfg["m"]:
    # The store is really used: some query reads an entry outside its window and fading span.
    assert any(len(s) for row in ref_reads for s in row)


@pytest.mark.parametrize("name", ["bmojo", "top_m"])
def test_gradients_naive_equal_block_banded(name):
  cfg = CFGS[name]
  q, k, v, kf, vf, qf, score = _inputs()
  ct = jax.random.normal(jax.random.key(9), (B, T, H, E))
  run = _fast(cfg, untied=True, query_block=2, store_group=3)  # sub-blocked reads, grouped store reads

  def loss_fast(args):
    out = run(*args[:6], score, jnp.asarray(SEG), _memory(cfg))[0]
    return jnp.sum(out * ct)

  def loss_ref(args):
    out, _ = naive_bmojo(*args[:5], score, SEG, **cfg, qf=args[5], xp=jnp)
    return jnp.sum(out * ct)

  args = (q, k, v, kf, vf, qf)
  g_fast = jax.jit(jax.grad(loss_fast))(args)
  g_ref = jax.jit(jax.grad(loss_ref))(args)
  for a, b in zip(g_fast, g_ref):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)
  # Gradients through the carried memory: a split run gives the same gradients as one call.

  def loss_split(args):
    seg = jnp.asarray(SEG)
    sl = lambda z, lo, hi: z[:, lo:hi]
    memory, outs = _memory(cfg), []
    for lo, hi in ((0, 7), (7, T)):
      o, memory, _ = run(*(sl(z, lo, hi) for z in args[:6]), sl(score, lo, hi), sl(seg, lo, hi), memory)
      outs.append(o)
    return jnp.sum(jnp.concatenate(outs, 1) * ct)

  g_split = jax.jit(jax.grad(loss_split))(args)
  for a, b in zip(g_split, g_fast):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)


def test_bmojo_f_single_softmax_equals_lse_merge_of_two_windowed_paths():
  # hmf's kernel: flash attention over (q, k, v) and over the fading path shifted by W, merged by log-sum-exp.
  w = 4
  q, k, v, kf, vf, _, _ = _inputs(1)
  memory = bmojo.init_memory(B, window=w, chunk_size=w, k_sel=1, memory_size=0, kv_heads=KH, head_dim=E)
  out, _ = jax.jit(functools.partial(bmojo.bmojo_attention, window=w))(q, k, v, kf, vf, memory)
  pos = jnp.arange(T)
  rep = lambda z: jnp.repeat(z, H // KH, axis=2)

  def path(kk, vv, lo, hi):
    s = jnp.einsum("bthe,bshe->bhts", q, rep(kk)) / np.sqrt(E)
    d = pos[:, None] - pos[None]
    ok = (d >= lo) & (d <= hi)
    s = jnp.where(ok, s, -jnp.inf)
    lse = jax.scipy.special.logsumexp(s, axis=-1)
    p = jnp.where(ok, jnp.exp(s - jnp.where(jnp.isfinite(lse), lse, 0.0)[..., None]), 0.0)
    return jnp.einsum("bhts,bshe->bthe", p, rep(vv)), jnp.moveaxis(lse, 1, 2)

  o1, l1 = path(k, v, 0, w - 1)
  o2, l2 = path(kf, vf, w, 2 * w - 1)  # lse = -inf for the first W positions
  mx = jnp.maximum(l1, l2)
  a1, a2 = jnp.exp(l1 - mx), jnp.exp(l2 - mx)
  merged = (o1 * a1[..., None] + o2 * a2[..., None]) / (a1 + a2)[..., None]
  np.testing.assert_allclose(out, merged, atol=2e-6)


def test_selected_entries_are_read_only_from_the_next_chunk_and_within_the_bound():
  # Given one document, W = 2, C = 4, k_sel = 1 and M = 2 (the last two written chunks)
  cfg = dict(window=2, chunk=4, k_sel=1, m=2)
  q, k, v, kf, vf, _, _ = _inputs(2)
  score = jnp.zeros((B, T)).at[:, 1].set(5.0).at[:, 6].set(5.0).at[:, 8].set(5.0).at[:, 13].set(5.0)
  seg = jnp.zeros((B, T), jnp.int32)
  memory = _memory(cfg)
  run = jax.jit(lambda v: bmojo.bmojo_attention(q, k, v, kf, vf, memory, window=2, segment_ids=seg, score=score,
                                                chunk_size=4, k_sel=1, return_store_read=True))
  _, mem, read = run(v)
  reads = _read_sets(np.asarray(read))[0]
  # Then position 1 (chunk 0) is read from chunk 1 on, never before, and evicted after chunk 2 is written
  assert all(1 not in reads[t] for t in range(4))
  assert all(1 in reads[t] for t in range(4, 12))
  assert all(1 not in reads[t] for t in range(12, T))
  assert reads[16] == [8, 13] and reads[12] == [6, 8]
  # Every query reads at most M entries, and the final store holds the last two chunks' picks
  assert max(len(r) for r in reads) <= 2
  np.testing.assert_array_equal(mem.store.positions[0], [13, 16])
  # And the Jacobian wrt values: no dependence on the future, on unselected tokens outside the window and fading
  # span, or on evicted entries (t = 20 reads 13 and the pick of chunk 4, 16, whose scores tie at 0: the earliest;
  # its fading span [17, 18] reads v_fade, not v)
  jac = jax.jit(jax.jacfwd(lambda vv: run(vv)[0][0, 20]))(v)  # [h, e, b, t, kh, e]
  dep = np.abs(np.asarray(jac[:, :, 0])).sum(axis=(0, 1, 3, 4))
  visible = {13, 16, 19, 20}  # store + window
  for j in range(T):
    assert (dep[j] > 0) == (j in visible), (j, dep[j])


def test_future_scores_and_values_do_not_change_the_past():
  # The top-k of a chunk compares a token with later ones: perturbing scores / values after tau must change
  # neither the outputs nor the store entries read by queries <= tau (including tau inside a chunk).
  cfg = CFGS["bmojo"]
  q, k, v, kf, vf, qf, score = _inputs(3)
  run = _fast(cfg, untied=True)
  seg = jnp.asarray(SEG)
  base, _, base_read = run(q, k, v, kf, vf, qf, score, seg, _memory(cfg))
  for tau in (5, 10, 14):
    noise = jax.random.normal(jax.random.key(tau), (B, T))
    later = (jnp.arange(T) > tau)[None]
    score2 = jnp.where(later, score + 3 * noise, score)
    v2 = jnp.where(later[..., None, None], v + 1.0, v)
    out, _, read = run(q, k, v2, kf, vf, qf, score2, seg, _memory(cfg))
    np.testing.assert_allclose(out[:, :tau + 1], base[:, :tau + 1], atol=1e-6)
    assert _read_sets(np.asarray(read[:, :tau + 1])) == _read_sets(np.asarray(base_read[:, :tau + 1]))
    assert np.abs(np.asarray(out[:, tau + 1:] - base[:, tau + 1:])).max() > 0


def test_innovation_score_and_offsets():
  seg = jnp.array([[3, 3, 4, 4, 4]])
  off, starts = bmojo.document_offsets(seg, jnp.array([3]), jnp.array([6]))
  np.testing.assert_array_equal(off, [[6, 7, 0, 1, 2]])
  np.testing.assert_array_equal(starts, [[False, False, True, False, False]])
  target = jnp.arange(10.0).reshape(1, 5, 2)
  pred = jnp.ones((1, 5, 2))
  e = bmojo.innovation_score(target, pred, jnp.full((1, 2), 2.0), starts)
  expected = [(0 - 2) ** 2 + (1 - 2) ** 2, 1 ** 2 + 2 ** 2, 4 ** 2 + 5 ** 2, 5 ** 2 + 6 ** 2, 7 ** 2 + 8 ** 2]
  np.testing.assert_allclose(e[0], expected)


def test_bad_configs_raise_naming_the_field():
  with pytest.raises(ValueError, match="k_sel"):
    bmojo.check_config(4, 4, 3, 8)
  with pytest.raises(ValueError, match="k_sel"):
    bmojo.check_config(4, 2, 3, 6)
  with pytest.raises(ValueError, match="window"):
    bmojo.check_config(0, 2, 1, 2)
  memory = bmojo.init_memory(1, window=2, chunk_size=2, k_sel=1, memory_size=2, kv_heads=1, head_dim=2)
  x = jnp.zeros((1, 3, 1, 2))
  with pytest.raises(ValueError, match="window"):
    bmojo.bmojo_attention(x, x, x, x, x, memory, window=3, score=jnp.zeros((1, 3)), chunk_size=2, k_sel=1)
  with pytest.raises(ValueError, match="score"):
    bmojo.bmojo_attention(x, x, x, x, x, memory, window=2, chunk_size=2, k_sel=1)
  with pytest.raises(ValueError, match="query_block"):
    bmojo.bmojo_attention(x, x, x, x, x, memory, window=2, score=jnp.zeros((1, 3)), chunk_size=2, k_sel=1,
                          query_block=0)
  keys = bmojo.novelty_keys(memory)
  with pytest.raises(ValueError, match=r"keys \(context, candidates, store\) have shapes .*\[1, 1, 2\]\], expected"):
    bmojo.key_novelty_score(x, memory, window=2, chunk_size=2, k_sel=1, keys=keys._replace(store=keys.store[:, :1]))


def _bias_run(cfg):
  @jax.jit
  def run(q, k, v, kf, vf, score, seg, memory, gamma, tau):
    return bmojo.bmojo_attention(q, k, v, kf, vf, memory, window=cfg["window"], segment_ids=seg, score=score,
                                 chunk_size=cfg["chunk"], k_sel=cfg["k_sel"], selector_bias=(gamma, tau),
                                 store_group=2)[0]
  return run


def _bias_inputs():
  ks = jax.random.split(jax.random.key(5), 2)
  return jax.random.normal(ks[0], (H,)), jax.random.uniform(ks[1], (H,))


def test_selector_bias_equals_reference_full_and_token_by_token():
  # Given the store option selector_bias (spec §4.7): log σ(γ_h (e_i − τ_h)) on every store logit
  cfg = CFGS["bmojo"]
  q, k, v, kf, vf, _, score = _inputs()
  gamma, tau = _bias_inputs()
  seg = jnp.asarray(SEG)
  ref, _ = naive_bmojo(q, k, v, kf, vf, score, SEG, **cfg, bias=(np.asarray(gamma, np.float64),
                                                               np.asarray(tau, np.float64)))
  plain, _ = naive_bmojo(q, k, v, kf, vf, score, SEG, **cfg)
  run = _bias_run(cfg)
  full = run(q, k, v, kf, vf, score, seg, _memory(cfg), gamma, tau)
  memory, steps = _memory(cfg), []
  step = jax.jit(lambda *a: bmojo.bmojo_attention(*a[:6], window=cfg["window"], segment_ids=a[7], score=a[6],
                                                  chunk_size=cfg["chunk"], k_sel=cfg["k_sel"],
                                                  selector_bias=(a[8], a[9])))
  for i in range(T):
    o, memory = step(*(z[:, i:i + 1] for z in (q, k, v, kf, vf)), memory, score[:, i:i + 1], seg[:, i:i + 1],
                     gamma, tau)
    steps.append(o)
  # Then the fast path equals the reference in one call and token by token, and the bias matters
  np.testing.assert_allclose(full, ref, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(jnp.concatenate(steps, 1), ref, atol=1e-5, rtol=1e-5)
  assert np.abs(ref - plain).max() > 1e-3
  with pytest.raises(ValueError, match="selector_bias"):
    bmojo.bmojo_attention(q, k, v, kf, vf, _memory(cfg), window=cfg["window"], score=score, chunk_size=cfg["chunk"],
                          k_sel=cfg["k_sel"], selector_bias=(gamma[:1], tau))


def test_selector_bias_gradients_reach_scores_gamma_and_tau():
  cfg = CFGS["bmojo"]
  q, k, v, kf, vf, _, score = _inputs()
  gamma, tau = _bias_inputs()
  ct = jax.random.normal(jax.random.key(9), (B, T, H, E))
  run = _bias_run(cfg)
  loss_fast = lambda sc, g, t: jnp.sum(run(q, k, v, kf, vf, sc, jnp.asarray(SEG), _memory(cfg), g, t) * ct)
  loss_ref = lambda sc, g, t: jnp.sum(naive_bmojo(q, k, v, kf, vf, score, SEG, **cfg, xp=jnp, bias=(g, t),
                                                  bias_score=sc)[0] * ct)
  g_fast = jax.jit(jax.grad(loss_fast, argnums=(0, 1, 2)))(score, gamma, tau)
  g_ref = jax.jit(jax.grad(loss_ref, argnums=(0, 1, 2)))(score, gamma, tau)
  for a, b in zip(g_fast, g_ref):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)
  assert np.abs(g_fast[0]).max() > 1e-4  # the scores of read entries do receive a gradient


def test_top_m_keeps_the_best_scored_entries_not_the_latest():
  # Given the same store size under both bounds (window 2, chunks of 3, 2 entries per chunk, M = 4)
  fifo = dict(window=2, chunk=3, k_sel=2, m=4)
  top_m = dict(fifo, bound="top_m")
  q, k, v, kf, vf, _, score = _inputs()
  _, reads_fifo = naive_bmojo(q, k, v, kf, vf, score, SEG, **fifo)
  out, memory, reads = _streamed(top_m, [(0, T)])
  ref, ref_reads = naive_bmojo(q, k, v, kf, vf, score, SEG, **top_m)
  # Then the fast top_m path equals its reference, which reads differently from the FIFO
  np.testing.assert_allclose(out, ref, atol=1e-5, rtol=1e-5)
  assert reads == ref_reads and ref_reads != reads_fifo
  # And the final store of row 0 (one document) holds the 4 best-scored of all entries written
  sc = np.asarray(score[0])
  written = [j for c0 in range(0, T - T % 3, 3) for j in sorted(range(c0, c0 + 3), key=lambda j: (-sc[j], j))[:2]]
  best = sorted(written, key=lambda j: -sc[j])[:4]
  assert sorted(np.asarray(memory.store.positions[0]).tolist()) == sorted(best)


def naive_key_novelty(kraw, seg, *, window, chunk, k_sel, m, bound="fifo", use_store=True):
  """Per-token ``e_t = 1 − max cos(k̄_t, K_window ∪ K_store)`` (spec §4.1), float64, keeping the store explicitly.

  ``kraw`` are the keys before RoPE; the store is updated with the scores as they are computed, exactly as in
  :func:`naive_bmojo` (FIFO of written chunks or the ``m`` best entries of the document). ``use_store=False``
  compares with the window only (to show the store matters).
  """
  kraw = np.asarray(kraw, np.float64)
  b, t = kraw.shape[:2]
  kn = kraw.reshape(b, t, -1)
  kn = kn / np.linalg.norm(kn, axis=-1, keepdims=True)
  seg = np.asarray(seg)
  out = np.zeros((b, t))
  for r in range(b):
    written, cur, offset = [], [], 0
    for i in range(t):
      if i == 0 or seg[r, i] != seg[r, i - 1]:
        offset, cur = 0, []
      same = lambda j: seg[r, j] == seg[r, i] and j >= i - offset
      near = [j for j in range(max(0, i - window + 1), i) if same(j)]
      sto = [j for chunk_entries in written for j in chunk_entries if same(j)] if use_store else []
      out[r, i] = 1.0 - max((float(kn[r, i] @ kn[r, j]) for j in near + sto), default=-1.0)
      cur.append(i)
      if (offset + 1) % chunk == 0:
        best = sorted(cur, key=lambda j: (-out[r, j], j))[:k_sel]
        if bound == "fifo":
          written = (written + [sorted(best)])[-(m // k_sel):]
        else:
          pool = [j for chunk_entries in written for j in chunk_entries if same(j)] + sorted(best)
          written = [sorted(pool, key=lambda j: -out[r, j])[:m]]
        cur = []
      offset += 1
  return out


def _novelty_stream(cfg, bounds, inputs, seg=SEG):
  q, k_rot, v, kf, vf = inputs

  @jax.jit
  def run(q, k, v, kf, vf, seg, memory, keys):
    score, keys = bmojo.key_novelty_score(
        k, memory, window=cfg["window"], chunk_size=cfg["chunk"], k_sel=cfg["k_sel"], segment_ids=seg,
        bound=cfg.get("bound", "fifo"), rope_max_wavelength=10_000.0, keys=keys)
    out, memory = bmojo.bmojo_attention(q, k, v, kf, vf, memory, window=cfg["window"], segment_ids=seg, score=score,
                                        chunk_size=cfg["chunk"], k_sel=cfg["k_sel"], bound=cfg.get("bound", "fifo"))
    return out, memory, score, keys

  memory, outs, scores = _memory(cfg), [], []
  keys = bmojo.novelty_keys(memory)
  seg = jnp.asarray(seg)
  for lo, hi in bounds:
    o, memory, s, keys = run(*(z[:, lo:hi] for z in (q, k_rot, v, kf, vf, seg)), memory, keys)
    # The carried unit keys are those of the read's new memory, slot for slot (what the next call compares with)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), keys,
                 bmojo.novelty_keys(memory, rope_max_wavelength=10_000.0))
    outs.append(o)
    scores.append(s)
  return jnp.concatenate(outs, 1), jnp.concatenate(scores, 1), memory


# top_m's scan is also covered by the eviction test below in the default suite.
@pytest.mark.parametrize("name", ["bmojo", pytest.param("top_m", marks=pytest.mark.slow),
                                  pytest.param("c_lt_w", marks=pytest.mark.slow)])
def test_key_novelty_equals_reference_full_uneven_calls_and_token_by_token(name):
  # Given keys rotated by RoPE at their positions, packed documents in row 1, and the store bound of `name`
  cfg = CFGS[name]
  q, kraw, v, kf, vf, _, _ = _inputs(4)
  k_rot = attn_ops.rope(kraw, jnp.broadcast_to(jnp.arange(T), (B, T)))
  # When the novelty scores are computed per token from the pre-RoPE keys with an explicit store
  ref_score = naive_key_novelty(kraw, SEG, **cfg)
  ref_out, _ = naive_bmojo(q, k_rot, v, kf, vf, ref_score, SEG, **cfg)
  # Then the scan gives the same scores and outputs in one call, in uneven calls and token by token
  inputs = (q, k_rot, v, kf, vf)
  full, s_full, m_full = _novelty_stream(cfg, [(0, T)], inputs)
  chunked, s_chk, m_chk = _novelty_stream(cfg, [(0, 5), (5, 6), (6, 17), (17, T)], inputs)
  steps, s_steps, m_steps = _novelty_stream(cfg, [(i, i + 1) for i in range(T)], inputs)
  for s in (s_full, s_chk, s_steps):
    np.testing.assert_allclose(s, ref_score, atol=1e-5)
  for o in (full, chunked, steps):
    np.testing.assert_allclose(o, ref_out, atol=1e-5, rtol=1e-5)
  for a in (m_chk, m_steps):
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-5), a, m_full)
  # And the store changes the scores (a window-only score would differ), and first tokens score 2
  window_only = naive_key_novelty(kraw, SEG, **cfg, use_store=False)
  assert np.abs(window_only - ref_score).max() > 1e-3
  np.testing.assert_allclose(s_full[:, 0], 2.0)
  np.testing.assert_allclose(s_full[1, [4, 7, 15]], 2.0)  # document starts


def test_key_novelty_repeated_key_scores_zero_and_is_causal():
  # A key equal (before RoPE) to one in the window scores 0; perturbing later keys leaves earlier scores alone.
  cfg = CFGS["bmojo"]
  _, kraw, *_ = _inputs(5)
  kraw = kraw.at[:, 7].set(kraw[:, 5] * 3.0)
  pos = jnp.broadcast_to(jnp.arange(T), (B, T))
  fn = jax.jit(lambda kr: bmojo.key_novelty_score(
      attn_ops.rope(kr, pos), _memory(cfg), window=3, chunk_size=4, k_sel=2, segment_ids=jnp.asarray(SEG),
      rope_max_wavelength=10_000.0)[0])
  base = fn(kraw)
  np.testing.assert_allclose(base[0, 7], 0.0, atol=1e-6)
  for tau in (6, 13):
    later = (jnp.arange(T) > tau)[None, :, None, None]
    pert = fn(jnp.where(later, kraw + jax.random.normal(jax.random.key(tau), kraw.shape), kraw))
    np.testing.assert_array_equal(pert[:, :tau + 1], base[:, :tau + 1])
    assert np.abs(np.asarray(pert[:, tau + 1:] - base[:, tau + 1:])).max() > 1e-3


def test_key_novelty_top_m_entry_evicted_at_a_chunk_end_drops_out_for_the_rest_of_the_block():
  # Given W = 1 (no window: the store alone decides), M = 2 (the first chunk's entry scores 2 and stays), C = 4
  # and documents that start at 2 (row 0) and 1 (row 1), so every selection block of 4 tokens holds a chunk end
  # followed by tokens of the next chunk
  cfg = dict(window=1, chunk=4, k_sel=1, m=2, bound="top_m")
  seg = np.array([[0] * 2 + [1] * (T - 2), [0] + [1] * (T - 1)])
  q, kraw, v, kf, vf, _, _ = _inputs(6)
  k_rot = attn_ops.rope(kraw, jnp.broadcast_to(jnp.arange(T), (B, T)))
  ref = naive_key_novelty(kraw, seg, **cfg)
  # When scored in one call and token by token
  _, full, _ = _novelty_stream(cfg, [(0, T)], (q, k_rot, v, kf, vf), seg)
  _, steps, _ = _novelty_stream(cfg, [(i, i + 1) for i in range(T)], (q, k_rot, v, kf, vf), seg)
  # Then the tokens after a chunk end compare with the new entry only, as the reference does
  np.testing.assert_allclose(full, ref, atol=1e-5)
  np.testing.assert_allclose(steps, ref, atol=1e-5)


def test_key_novelty_stores_the_distinct_tokens_among_repeated_fillers():
  # Given an MQAR-like row (spec §4.11): one filler key repeated everywhere except at 6 distinct keys
  t, c = 24, 4
  special = np.array([2, 5, 7, 9, 10, 14])
  keys = np.tile(np.asarray(jax.random.normal(jax.random.key(0), (1, 1, KH, E))), (1, t, 1, 1))
  keys[0, special] = np.asarray(jax.random.normal(jax.random.key(1), (len(special), KH, E)))
  keys = jnp.asarray(keys)
  memory = bmojo.init_memory(1, window=3, chunk_size=c, k_sel=2, memory_size=12, kv_heads=KH, head_dim=E)
  # When scored by key novelty and written by the read (a FIFO of all 6 chunks)
  score, _ = bmojo.key_novelty_score(keys, memory, window=3, chunk_size=c, k_sel=2)
  _, mem = bmojo.bmojo_attention(jnp.zeros((1, t, H, E)), keys, keys, keys, keys, memory, window=3, score=score,
                                 chunk_size=c, k_sel=2)
  # Then a repeated filler scores 0 (it matches its window or the stored first filler), the document's first token 2
  # (nothing to compare), every distinct key scores high, and the store holds all of them
  score = np.asarray(score)[0]
  fillers = np.setdiff1d(np.arange(1, t), special)
  np.testing.assert_allclose(score[fillers], 0.0, atol=1e-6)
  np.testing.assert_allclose(score[0], 2.0)
  assert score[special].min() > 0.3, score[special]
  assert set(special) <= set(np.asarray(mem.store.positions)[0].tolist())
