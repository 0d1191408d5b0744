"""B'MOJO attention: sliding window + SSM-derived "fading" keys + an innovation-selected eidetic store (pure JAX).

B'MOJO (Zancato et al., 2024, arXiv 2407.06324) reads, with **one softmax**, three sets of keys (spec ``bmojo.md``
§3, §4)::

    score(t, j) = q_t · k_j / √e       j ∈ [t−W+1, t]          in-context: the W most recent tokens
                = q̃_t · k̃_j / √e      j ∈ [t−2W+1, t−W]       fading: K/V projected from the SSM output s_j
                = q_t · k_i / √e       i ∈ store(t)            eidetic: innovation-selected past tokens
    o_t = Σ softmax(score(t, ·)) · (v_j | ṽ_j | v_i)

With the store empty (``memory_size == 0``) this is **B'MOJO-F** exactly as hybrid-model-factory implements it
[hmf]: the single softmax equals hmf's log-sum-exp merge of two flash-attention calls (spec §3).

The eidetic store [ours, spec §4; the paper's text is unverified, only "innovation-selected, bounded, causal,
asynchronous" is confirmed]:

  * **Innovation** (§4.1): ``e_t = ‖u_t − p_{t−1}‖²`` with ``u_t`` the (stop-gradient) input projected by a fixed
    ``P_u`` and ``p_{t−1} = s_{t−1} P_s`` the SSM's prediction of it (:func:`innovation_score`). Alternatives
    (§4.1): ``1 − max cos`` of the token's key with the window's and the store's keys (:func:`key_novelty_score`),
    or a score supplied by the caller (the read takes any ``score``).
  * **Selection with a write delay** (§4.2): tokens are grouped in chunks of ``C`` consecutive tokens of one
    document, cut at in-document offsets that are multiples of ``C``. When a chunk is complete, its ``k_sel``
    highest-innovation tokens (ties: the earlier token) are written. They become visible to queries of the **next**
    chunks only: a selected token was compared with later tokens of its own chunk, so reading it inside that chunk
    would leak the future. A document's unfinished last chunk is never written.
  * **What is stored** (§4.3): the token's own in-context key (RoPE at its position) and value, its position, its
    document key (the position of its document's first token: a segment id reused later in a row starts a new
    document, whichever way the row is cut into calls), its in-document chunk index and its score.
  * **Bound** (§4.4, ``bound="fifo"``): the store keeps the entries of the last ``M / k_sel`` written chunks
    (``M`` entries). Query ``t`` in chunk ``c`` of document ``s`` therefore reads the entries of chunks
    ``[c − M/k_sel, c − 1]`` of ``s``: a static band.
  * **Bound** (§4.4, ``bound="top_m"``): the store keeps the ``M`` highest-scored entries written so far in the
    document (at equal scores the stored entry stays), updated at each chunk end by a ``lax.scan`` over the
    selection blocks; query block ``b`` reads the buffer before the block plus the block's new entries, an entry
    evicted at the block's chunk end staying visible to the queries up to that end.
  * **Dedup** (§4.5): an entry still inside the window (``pos > t − W``) is masked.

Static-shape, block-banded implementation (§4.8) of one call of ``t`` tokens: queries are processed in blocks of
``Q = min(C, t)`` tokens. A block of ``Q <= C`` consecutive tokens contains the end of **at most one** complete
chunk (two ends ``e1 < e2`` would put ``e1`` inside ``e2``'s chunk). So each block contributes at most ``k_sel``
entries, selected by ``top_k`` over the ``C + Q − 1`` tokens that can hold its chunk, and query block ``b`` reads

  * in-context keys: the ``Q + W − 1`` tokens ``[bQ − W + 1, bQ + Q − 1]`` (carried window in front);
  * fading keys: the ``Q + W − 1`` SSM-derived tokens ``[bQ − 2W + 1, bQ + Q − 1 − W]``;
  * store keys: the entries of blocks ``b − M/k_sel .. b`` plus the carried store (the chunks written before the
    call),

each masked by position, document, chunk index and dedup. The in-context and fading reads are cut finer, into
sub-blocks of ``R | Q`` queries (:func:`query_block_size`, default ``W / 4``) that read ``R + W − 1`` keys of each
kind, so less of each span is masked. Cost per query: ``2(R + W − 1) + M + k_sel (M/k_sel + 1)`` keys, i.e.
O(L (2.5W + 2M)) for a call of ``L`` tokens with ``C = W`` and ``R = W / 4``, never O(L²).

The decoding state (§4.9) is bounded: the last ``W − 1`` in-context K/V, the last ``2W − 1`` fading K/V, the last
``C − 1`` tokens (candidates of the unfinished chunk) with their scores, the ``M`` store entries and three integers
per row. ``t == 1`` (the step form) is the same code with one block of one query.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from memarch.ops import attention as attn_ops
from memarch.typing import Array, Float, Int

_NEG_INF = -1e30  # finite: a query that sees no key gets a uniform softmax over masked logits, zeroed afterwards


class WindowKV(NamedTuple):
  """The last few keys / values of one key stream, chronological, batch-leading.

  Attributes:
    k: [b, slots, kv_heads, head_dim] keys (after RoPE).
    v: [b, slots, kv_heads, head_dim] values.
    positions: [b, slots] absolute position of each slot; -1 marks an empty slot.
    segment_ids: [b, slots] document key of each slot: the absolute position of its document's first token
      (unique per document of a row, even when a segment id is reused later in the row).
  """
  k: Array
  v: Array
  positions: Array
  segment_ids: Array


class StoreEntries(NamedTuple):
  """Tokens that are (or may become) eidetic-store entries, batch-leading.

  Attributes:
    k: [b, slots, kv_heads, head_dim] the token's in-context key (RoPE at its own position).
    v: [b, slots, kv_heads, head_dim] its in-context value.
    positions: [b, slots] its absolute position; -1 marks an empty slot.
    segment_ids: [b, slots] its document key (the absolute position of its document's first token).
    chunk: [b, slots] index of its selection chunk inside its document.
    score: [b, slots] its innovation score (float32).
  """
  k: Array
  v: Array
  positions: Array
  segment_ids: Array
  chunk: Array
  score: Array


class BMojoMemory(NamedTuple):
  """Everything a B'MOJO attention read carries from one call to the next (spec §4.9), batch-leading.

  Attributes:
    context: the last ``W − 1`` in-context keys / values.
    fading: the last ``2W − 1`` SSM-derived keys / values (only the oldest ``W`` of the next query's span are
      read; the newer ones become readable later).
    candidates: the last ``C − 1`` tokens with their scores: the unfinished chunk's candidates (``C − 1`` slots
      cover any unfinished chunk). Zero slots without a store.
    store: ``M`` entries of the last ``M / k_sel`` written chunks, oldest first. Zero slots without a store.
    offset: [b] in-document offset of the next token.
    last_segment: [b] document id of the last token seen (-1 before the first token).
    length: [b] tokens seen in this row (the absolute position of the next token).
  """
  context: WindowKV
  fading: WindowKV
  candidates: StoreEntries
  store: StoreEntries
  offset: Array
  last_segment: Array
  length: Array


def _window_kv(b: int, slots: int, kv_heads: int, head_dim: int, dtype) -> WindowKV:
  return WindowKV(jnp.zeros((b, slots, kv_heads, head_dim), dtype), jnp.zeros((b, slots, kv_heads, head_dim), dtype),
                  jnp.full((b, slots), -1, jnp.int32), jnp.zeros((b, slots), jnp.int32))


def _entries(b: int, slots: int, kv_heads: int, head_dim: int, dtype) -> StoreEntries:
  w = _window_kv(b, slots, kv_heads, head_dim, dtype)
  return StoreEntries(*w, jnp.zeros((b, slots), jnp.int32), jnp.zeros((b, slots), jnp.float32))


BOUNDS = ("fifo", "top_m")


def check_config(window: int, chunk_size: int, k_sel: int, memory_size: int, bound: str = "fifo") -> None:
  """Raises a ValueError naming the field when the B'MOJO read cannot be built.

  Args:
    window: ``W``.
    chunk_size: selection chunk ``C``.
    k_sel: entries written per chunk.
    memory_size: store bound ``M`` (0: no store, B'MOJO-F).
    bound: eviction rule, ``"fifo"`` or ``"top_m"`` (spec §4.4).
  """
  if bound not in BOUNDS:
    raise ValueError(f"bmojo: bound={bound!r} must be one of {BOUNDS}")
  if window < 1:
    raise ValueError(f"bmojo: window={window} must be >= 1")
  if chunk_size < 1:
    raise ValueError(f"bmojo: chunk_size={chunk_size} must be >= 1")
  if memory_size < 0:
    raise ValueError(f"bmojo: memory_size={memory_size} must be >= 0")
  if memory_size:
    if not 1 <= k_sel <= chunk_size:
      raise ValueError(f"bmojo: k_sel={k_sel} must be in [1, chunk_size={chunk_size}]")
    if bound == "fifo" and memory_size % k_sel:
      raise ValueError(f"bmojo: k_sel={k_sel} must divide memory_size={memory_size} (the FIFO keeps whole chunks)")


def init_memory(batch_size: int, *, window: int, chunk_size: int, k_sel: int, memory_size: int, kv_heads: int,
                head_dim: int, dtype=jnp.float32, bound: str = "fifo") -> BMojoMemory:
  """The empty memory before the first token.

  Args:
    batch_size: rows.
    window: ``W``.
    chunk_size: selection chunk ``C``.
    k_sel: entries written per chunk.
    memory_size: store bound ``M`` (0: B'MOJO-F, no store and no candidates).
    kv_heads: key / value heads.
    head_dim: per-head width.
    dtype: dtype of the carried keys and values.
    bound: the eviction rule the memory is used with (only validated here: both keep ``M`` store slots).

  Returns:
    A :class:`BMojoMemory` with every slot empty.
  """
  check_config(window, chunk_size, k_sel, memory_size, bound)
  b = batch_size
  cand = chunk_size - 1 if memory_size else 0
  return BMojoMemory(
      context=_window_kv(b, window - 1, kv_heads, head_dim, dtype),
      fading=_window_kv(b, 2 * window - 1, kv_heads, head_dim, dtype),
      candidates=_entries(b, cand, kv_heads, head_dim, dtype),
      store=_entries(b, memory_size, kv_heads, head_dim, dtype),
      offset=jnp.zeros((b,), jnp.int32),
      last_segment=jnp.full((b,), -1, jnp.int32),
      length=jnp.zeros((b,), jnp.int32))


def document_offsets(segment_ids: Int[Array, "b t"], last_segment: Int[Array, " b"],
                     offset: Int[Array, " b"]) -> tuple[Array, Array]:
  """In-document offset of every token and where documents start.

  Args:
    segment_ids: document ids of this call's tokens.
    last_segment: document id of the token before the call (-1: none).
    offset: in-document offset the first token has if it continues that document.

  Returns:
    ``(offsets, starts)``: int32 [b, t] offsets and bool [b, t], True where a token starts a document (its id
    differs from the previous token's; always at the first token of a row).
  """
  t = segment_ids.shape[1]
  tt = jnp.arange(t, dtype=jnp.int32)
  prev = jnp.concatenate([last_segment[:, None].astype(jnp.int32), segment_ids[:, :-1].astype(jnp.int32)], axis=1)
  starts = segment_ids != prev
  last_start = jax.lax.cummax(jnp.where(starts, tt, -1), axis=1)
  offsets = jnp.where(last_start >= 0, tt - last_start, offset[:, None] + tt)
  return offsets, starts


def innovation_score(target: Float[Array, "b t f"], prediction: Float[Array, "b t f"],
                     previous: Float[Array, "b f"], starts: Array) -> Array:
  """Innovation ``e_t = ‖target_t − prediction_{t−1}‖²`` (spec §4.1, [ours]).

  ``prediction_t`` is the SSM output at ``t`` mapped by the trainable probe (``s_t P_s``): how well the fading
  state after ``t − 1`` predicts token ``t``. ``e_t`` depends only on positions ``<= t``.

  Args:
    target: ``sg(LN(x_t)) P_u`` for the call's tokens.
    prediction: ``s_t P_s`` for the call's tokens.
    previous: ``s_{−1} P_s``: the prediction of the token before the call.
    starts: [b, t] True at a document start, where the prediction is 0 (the empty state predicts nothing).

  Returns:
    float32 [b, t] scores.
  """
  prev = jnp.concatenate([previous[:, None].astype(prediction.dtype), prediction[:, :-1]], axis=1)
  prev = jnp.where(starts[..., None], 0.0, prev)
  diff = target.astype(jnp.float32) - prev.astype(jnp.float32)
  return jnp.sum(diff * diff, axis=-1)


def _pad_time(z: Array, n: int, value=0) -> Array:
  if n == 0:
    return z
  return jnp.pad(z, [(0, 0), (0, n)] + [(0, 0)] * (z.ndim - 2), constant_values=value)


def _last(z: Array, n: int) -> Array:
  return z[:, z.shape[1] - n:]


def _cat(*zs: Array) -> Array:
  dtype = zs[-1].dtype
  return jnp.concatenate([z.astype(dtype) for z in zs], axis=1)


def _windows(z: Array, n: int, size: int, stride: int) -> Array:
  """Overlapping windows ``z[:, i·stride : i·stride + size]`` for ``i < n``: [b, n, size, ...].

  Built from ``ceil(size / stride)`` shifted reshapes instead of a gather, so the gradient is a sum of pads, not a
  scatter; one window (a decode step) is a slice, and many thin parts (``size ≫ stride``) a gather. ``z`` must hold
  at least ``(n − 1)·stride + size`` steps.
  """
  if n == 1:
    return z[:, None, :size]
  parts = -(-size // stride)
  if parts > 8:
    return jnp.take(z, (jnp.arange(n) * stride)[:, None] + jnp.arange(size)[None], axis=1)
  need = (n + parts - 1) * stride
  z = _pad_time(z[:, :need], max(0, need - z.shape[1]))
  rest = z.shape[2:]
  out = jnp.concatenate([z[:, j * stride:(j + n) * stride].reshape((z.shape[0], n, stride) + rest)
                         for j in range(parts)], axis=2)
  return out[:, :, :size]


def query_block_size(block: int, window: int, query_block: int | None = None) -> int:
  """Queries per sub-block of the in-context / fading read: a divisor of ``block`` (``Q = min(C, t)``).

  A sub-block of ``R`` queries reads ``R + W − 1`` in-context and ``R + W − 1`` fading keys, so smaller
  sub-blocks mask less (each query needs ``W`` of each) at the price of more, smaller matmuls. The result is the
  largest divisor of ``block`` that is at most ``query_block`` (None: ``max(W // 4, 16)``). At W = C = 512,
  T = 8192, 4 heads of 64, fwd + bwd, XLA's cost analysis gives 55 / 35 / 32 GFLOP and 11.4 / 8.3 / 9.7 GB
  accessed for R = 512 / 128 / 64: W / 4 moves the fewest bytes. It never changes the output.

  Args:
    block: queries per selection block.
    window: ``W``.
    query_block: upper bound on the sub-block size, or None.
  """
  if query_block is not None and query_block < 1:
    raise ValueError(f"bmojo_attention: query_block={query_block} must be >= 1")
  cap = max(window // 4, 16) if query_block is None else query_block
  return max(d for d in range(1, min(block, cap) + 1) if block % d == 0)


def store_group_size(blocks: int, block: int, back: int, k_sel: int, carried: int, kv_width: int,
                     heads: int, store_group: int | None = None) -> int:
  """Selection blocks per group of the store read: the divisor ``S`` of ``blocks`` with the least traffic.

  A group of ``S`` blocks of ``Q`` queries reads ``carried + (back + S) k_sel`` store keys: per query that is
  ``keys · (kv_width / (S Q) + heads)`` floats (the keys' copy shared by the group, plus one logit per head).
  With long blocks (C = W = 512) the minimum is S = 1; with MQAR's C = 8 and a band of 32 chunks it is S = 8.

  Args:
    blocks: selection blocks in the call.
    block: queries per block ``Q``.
    back: earlier blocks whose entries a block may read.
    k_sel: entries per block.
    carried: store entries carried into the call (read by every group).
    kv_width: ``kv_heads · head_dim``.
    heads: query heads.
    store_group: upper bound on ``S`` (None: none). The result never changes the output.
  """
  if store_group is not None and store_group < 1:
    raise ValueError(f"bmojo_attention: store_group={store_group} must be >= 1")
  cap = blocks if store_group is None else min(store_group, blocks)
  cost = lambda s: (carried + (back + s) * k_sel) * (kv_width / (s * block) + heads)
  return min((d for d in range(1, cap + 1) if blocks % d == 0), key=lambda d: (cost(d), d))


INNOVATIONS = ("ssm_residual", "key_novelty", "external")


def _unit_keys(k: Array, positions: Array, rope_max_wavelength: float | None) -> Array:
  """Pre-RoPE keys of every kv head, concatenated and l2-normalised: float32 [b, n, kv_heads · head_dim]."""
  k = k.astype(jnp.float32)
  if rope_max_wavelength is not None:  # RoPE is a rotation: rotating by -position undoes it
    k = attn_ops.rope(k, -positions, max_wavelength=rope_max_wavelength)
  k = k.reshape(k.shape[:2] + (k.shape[2] * k.shape[3],))
  return k * jax.lax.rsqrt(jnp.maximum(jnp.sum(k * k, axis=-1, keepdims=True), 1e-12))


class NoveltyKeys(NamedTuple):
  """The unit keys :func:`key_novelty_score` compares, one per slot of a :class:`BMojoMemory`, batch-leading.

  Each is the slot's key before RoPE, all kv heads concatenated and l2-normalised; an empty slot (position -1)
  holds zeros. Carried next to the memory so that a call un-rotates only its own new keys: recomputing them from
  the memory's keys costs a RoPE of all ``W − 1 + C − 1 + M`` slots per call, which dominates a decode step.

  Attributes:
    context: [b, W − 1, kv_heads · head_dim] of ``memory.context``.
    candidates: [b, C − 1, kv_heads · head_dim] of ``memory.candidates``.
    store: [b, M, kv_heads · head_dim] of ``memory.store``.
  """
  context: Array
  candidates: Array
  store: Array


def novelty_keys(memory: BMojoMemory, rope_max_wavelength: float | None = None) -> NoveltyKeys:
  """The :class:`NoveltyKeys` of ``memory``'s slots, un-rotated from its keys, in the memory's dtype.

  Args:
    memory: a memory with a store (its keys after RoPE when ``rope_max_wavelength`` is set).
    rope_max_wavelength: RoPE base the keys were rotated with (None: not rotated).
  """
  def unit(z: WindowKV | StoreEntries) -> Array:
    u = _unit_keys(z.k, z.positions, rope_max_wavelength)
    return jnp.where((z.positions >= 0)[..., None], u, 0.0).astype(z.k.dtype)
  return NoveltyKeys(unit(memory.context), unit(memory.candidates), unit(memory.store))


def key_novelty_score(
    k: Float[Array, "b t k e"],
    memory: BMojoMemory,
    *,
    window: int,
    chunk_size: int,
    k_sel: int,
    segment_ids: Int[Array, "b t"] | None = None,
    bound: str = "fifo",
    rope_max_wavelength: float | None = None,
    query_block: int | None = None,
    keys: NoveltyKeys | None = None,
) -> tuple[Array, NoveltyKeys]:
  """Innovation ``innovation="key_novelty"`` (spec §4.1 alternative, [ours]): ``e_t = 1 − max_j cos(k̄_t, k̄_j)``.

  ``k̄`` is a token's in-context key before RoPE (all kv heads concatenated; RoPE would make the cosine depend on
  the distance), and ``j`` ranges over ``K_window ∪ K_store``: the tokens ``[t − W + 1, t − 1]`` of ``t``'s
  document and the store entries query ``t`` can read (same document, written by an earlier chunk, inside the bound;
  for ``top_m`` an entry evicted at a chunk end stays visible up to that end, as in the read). With nothing to
  compare (a document's first token, ``W = 1`` and an empty store) the maximum is taken as −1, so ``e_t = 2``: the
  most novel. ``e_t`` depends on positions ``<= t`` only.

  The store a token compares with depends on what earlier chunks selected, which depends on their scores, so the
  store part is a ``lax.scan`` over the selection blocks of :func:`bmojo_attention` (``Q = min(C, t)`` tokens, at
  most one chunk end each) carrying the store and the unfinished chunk's candidates; the window part is one banded
  matmul. It selects exactly as :func:`bmojo_attention` will (same blocks, same ``top_k`` ties), so passing the
  returned scores to it reproduces the store this scan tracked. No gradient flows into the scores.

  The unit keys of the memory's slots come from ``keys`` (carried from the previous call) or, without it, are
  un-rotated from ``memory``'s keys; the unit keys of the memory :func:`bmojo_attention` returns for these scores
  come back with the scores, to be passed to the next call.

  Args:
    k: [b, t, kv_heads, head_dim] the call's in-context keys (after RoPE when ``rope_max_wavelength`` is set).
    memory: the memory before the call (must have a store).
    window: ``W``.
    chunk_size: selection chunk ``C``.
    k_sel: entries written per complete chunk.
    segment_ids: [b, t] document ids (None: one document).
    bound: ``"fifo"`` or ``"top_m"``, as in :func:`bmojo_attention`.
    rope_max_wavelength: RoPE base the keys were rotated with (None: not rotated).
    query_block: sub-block size of the window part (:func:`query_block_size`); a speed knob only.
    keys: the :class:`NoveltyKeys` of ``memory`` returned by the previous call (None: :func:`novelty_keys` of
      ``memory``).

  Returns:
    ``(scores, new_keys)``: float32 [b, t] scores in ``[0, 2]`` and the :class:`NoveltyKeys` of the memory after
    the call, in the dtype of ``keys`` (of the memory without it).
  """
  b, t, kh, e = k.shape
  m = memory.store.k.shape[1]
  if not m:
    raise ValueError("key_novelty_score: the memory has no store (memory_size = 0)")
  check_config(window, chunk_size, k_sel, m, bound)
  w, c = window, chunk_size
  if keys is None:
    keys = novelty_keys(memory, rope_max_wavelength)
  want = NoveltyKeys(*((b, z.k.shape[1], kh * e) for z in (memory.context, memory.candidates, memory.store)))
  if tuple(z.shape for z in keys) != tuple(want):
    raise ValueError(f"key_novelty_score: keys (context, candidates, store) have shapes "
                     f"{[list(z.shape) for z in keys]}, expected {[list(z) for z in want]} for this memory")
  k, memory, keys = jax.lax.stop_gradient((k, memory, keys))
  segment_ids = jnp.zeros((b, t), jnp.int32) if segment_ids is None else segment_ids.astype(jnp.int32)
  positions = memory.length[:, None] + jnp.arange(t, dtype=jnp.int32)[None]
  offsets, _ = document_offsets(segment_ids, memory.last_segment, memory.offset)
  docs = positions - offsets  # document keys, as bmojo_attention stores them
  unit = lambda z, pos: _unit_keys(z, pos, rope_max_wavelength)
  bq = min(c, t)
  nb = -(-t // bq)
  pad = nb * bq - t
  tp = nb * bq
  pos_p = memory.length[:, None] + jnp.arange(tp, dtype=jnp.int32)[None]
  seg_p = _pad_time(docs, pad)
  k_unit = unit(k, positions)                                                        # [b, t, D]
  kn = _pad_time(k_unit, pad)                                                        # [b, tp, D]

  # Window part: max cosine over [t − W + 1, t − 1] of the document, by sub-blocks of R queries (R + W − 1 keys).
  rq = query_block_size(bq, w, query_block)
  ns = tp // rq
  ctx = memory.context
  span = lambda z: _windows(z, ns, rq + w - 1, rq)
  sk = span(_cat(keys.context, kn))
  spos, sseg = span(_cat(ctx.positions, pos_p)), span(_cat(ctx.segment_ids, seg_p))
  qpos, qseg = pos_p.reshape(b, ns, rq, 1), seg_p.reshape(b, ns, rq, 1)
  cos = jnp.einsum("bnqd,bnsd->bnqs", kn.reshape(b, ns, rq, -1), sk)
  see = (spos[:, :, None] < qpos) & (spos[:, :, None] > qpos - w) & (spos[:, :, None] >= 0) & (sseg[:, :, None] == qseg)
  win_max = jnp.max(jnp.where(see, cos, -1.0), axis=-1).reshape(b, tp)

  # Store part: a scan over selection blocks carrying (store, candidates) with unit keys and final scores.
  band = m // k_sel
  chunk_p = _pad_time(offsets // c, pad)
  ends = _pad_time((offsets + 1) % c == 0, pad, False)
  valid = _pad_time(jnp.ones((b, t), bool), pad, False)
  entries = lambda z, u: StoreEntries(u.astype(jnp.float32), jnp.zeros((b, z.k.shape[1], 0), jnp.float32),
                                      z.positions, z.segment_ids, z.chunk, z.score)
  blocks = lambda z: jnp.moveaxis(z.reshape((b, nb, bq) + z.shape[2:]), 1, 0)
  xs = tuple(map(blocks, (kn, pos_p, seg_p, chunk_p, ends, valid, win_max)))

  def visible(ent: StoreEntries, pb, sb, cb):
    ok = ((ent.positions[:, None] >= 0) & (ent.segment_ids[:, None] == sb[:, :, None])
          & (ent.chunk[:, None] <= cb[:, :, None] - 1))
    if bound == "fifo":
      ok &= ent.chunk[:, None] >= cb[:, :, None] - band
    return ok

  def best(ent: StoreEntries, kb, ok):
    return jnp.max(jnp.where(ok, jnp.einsum("bqd,bsd->bqs", kb, ent.k), -1.0), axis=-1, initial=-1.0)

  def step(carry, x):
    store, cand = carry
    kb, pb, sb, cb, eb, vb, wb = x
    ok_old = visible(store, pb, sb, cb)
    score_pre = 1.0 - jnp.maximum(wb, best(store, kb, ok_old))
    # The chunk that ends in this block (at most one), selected as bmojo_attention selects it.
    block = StoreEntries(kb, jnp.zeros((b, bq, 0), jnp.float32), pb, sb, cb, score_pre)
    stream = jax.tree.map(_cat, cand, block)
    stream_valid = _cat(cand.positions >= 0, vb)
    has = (eb & vb).any(-1)
    end = jnp.argmax(eb & vb, axis=-1)[:, None]
    end_pos, end_seg, end_chunk = (jnp.take_along_axis(z, end, axis=1) for z in (pb, sb, cb))
    member = stream_valid & (stream.segment_ids == end_seg) & (stream.chunk == end_chunk) & has[:, None]
    _, pick = jax.lax.top_k(jnp.where(member, stream.score, -jnp.inf), k_sel)
    new = jax.tree.map(lambda z: jnp.take_along_axis(z, pick.reshape(pick.shape + (1,) * (z.ndim - 2)), axis=1),
                       stream)
    new = new._replace(positions=jnp.where(has[:, None], new.positions, -1))
    if bound == "fifo":
      updated = jax.tree.map(lambda old, z: _cat(old[:, k_sel:], z), store, new)
      kept_old = jnp.ones((b, m), bool)
      kept_new = jnp.ones((b, k_sel), bool)
    else:
      updated, keep = top_m_merge(store, new, end_seg[:, 0])
      in_keep = jnp.any(keep[:, :, None] == jnp.arange(m + k_sel), axis=1)
      kept_old, kept_new = in_keep[:, :m] | ~has[:, None], in_keep[:, m:]
    updated = jax.tree.map(lambda z, old: jnp.where(has.reshape((b,) + (1,) * (z.ndim - 1)), z, old), updated, store)
    # Tokens after the chunk end read the updated store: old entries evicted at the end drop out, new ones (chunk
    # rule: from the next chunk on) come in.
    after = (has[:, None] & (pb > end_pos))[:, :, None]
    ok_old &= kept_old[:, None] | ~after
    ok_new = visible(new, pb, sb, cb) & kept_new[:, None]
    score = 1.0 - jnp.maximum(jnp.maximum(wb, best(store, kb, ok_old)), best(new, kb, ok_new))
    block = block._replace(score=score)
    cand = jax.tree.map(lambda z: _last(z, c - 1), jax.tree.map(_cat, cand, block))
    cand = cand._replace(positions=jnp.where(_last(stream_valid, c - 1), cand.positions, -1))
    return (updated, cand), score

  init = (entries(memory.store, keys.store), entries(memory.candidates, keys.candidates))
  (store, _), scores = jax.lax.scan(step, init, xs)
  # The memory after the call: the window and the candidates are the last W − 1 / C − 1 tokens of the stream (as
  # bmojo_attention keeps them); the store is the one the scan tracked.
  last = lambda old_u, old_pos, n: (_last(_cat(old_u, k_unit), n), _last(_cat(old_pos, positions), n))
  kept = lambda u, pos: jnp.where((pos >= 0)[..., None], u, 0.0).astype(keys.store.dtype)
  new_keys = NoveltyKeys(kept(*last(keys.context, ctx.positions, w - 1)),
                         kept(*last(keys.candidates, memory.candidates.positions, c - 1)),
                         kept(store.k, store.positions))
  return jnp.moveaxis(scores, 0, 1).reshape(b, tp)[:, :t], new_keys


def _empty_unless(entries: StoreEntries, ok: Array) -> StoreEntries:
  """Entries with every slot where ``ok`` [b, n] is False emptied (position -1, all else 0).

  An emptied slot keeps nothing of the entry it was taken from, so the ``top_m`` store is one function of the
  entries written, whatever calls or shards they came through (what the sequence-sharded fold relies on).
  """
  clear = lambda z: jnp.where(ok.reshape(ok.shape + (1,) * (z.ndim - 2)), z, jnp.zeros_like(z))
  return jax.tree.map(clear, entries)._replace(positions=jnp.where(ok, entries.positions, -1))


def top_m_merge(store: StoreEntries, new: StoreEntries, document: Array) -> tuple[StoreEntries, Array]:
  """The ``bound="top_m"`` store after a chunk end of ``document`` [b] writes ``new`` (spec §4.4).

  Keeps the ``M`` best-scored entries of ``store ∪ new`` that belong to ``document`` (entries of an earlier
  document drop out), best first; at equal scores the stored entry stays (``top_k`` keeps the lower slot), so the
  store is the ``M`` best under (score, then writing order). Scores are ranked without their gradient; the other
  slots are empty.

  Returns:
    ``(kept, keep)``: the new store and, per slot, its index in ``concat(store, new)``.
  """
  m = store.k.shape[1]
  union = jax.tree.map(lambda old, z: _cat(old.astype(z.dtype), z), store, new)
  ok = (union.positions >= 0) & (union.segment_ids == document[:, None])
  _, keep = jax.lax.top_k(jnp.where(ok, jax.lax.stop_gradient(union.score), -jnp.inf), m)
  kept = jax.tree.map(lambda z: jnp.take_along_axis(z, keep.reshape(keep.shape + (1,) * (z.ndim - 2)), axis=1),
                      union)
  return _empty_unless(kept, jnp.take_along_axis(ok, keep, axis=1)), keep


def _top_m_read(store: StoreEntries, new: StoreEntries, has: Array, end: Array, q_p: Array, pos_p: Array,
                seg_p: Array, chunk_p: Array, logits: list, masks: list, *, read_bias, dims):
  """The ``bound="top_m"`` store (spec §4.4): a scan over selection blocks keeps the M best-scored entries.

  Block ``n`` of queries reads the union of the buffer before the block and the block's new entries; an entry
  that the block's chunk end evicts stays visible to the queries up to that end (``until``), a new one only from
  the next chunk on (the chunk rule). Appends the store logits / mask to ``logits`` / ``masks``.

  Returns:
    ``(store_pos, values, 1, per, nb, new_store)``: the positions read per query [b, nb, Q, S] (-1: masked), the
    store values [b, nb, S, kh, e], the group layout of the read (one block per group) and the buffer after the
    call.
  """
  b, nb, bq, ns, rq, per, kh, g, e, w, scale = dims
  m = store.k.shape[1]
  end_pos = jnp.take_along_axis(pos_p, end, axis=1)                               # [b, nb] the chunk end token
  end_seg = jnp.take_along_axis(seg_p, end, axis=1)
  slots = jnp.arange(m + new.k.shape[2])
  never = jnp.iinfo(jnp.int32).max

  def step(buf, xs):
    fresh_entries, has_n, end_pos_n, end_seg_n = xs
    union = jax.tree.map(lambda old, z: _cat(old.astype(z.dtype), z), buf, fresh_entries)   # [b, M + k_sel]
    kept, keep = top_m_merge(buf, fresh_entries, end_seg_n)
    new_buf = jax.tree.map(lambda z, old: jnp.where(has_n.reshape((b,) + (1,) * (z.ndim - 1)), z.astype(old.dtype),
                                                    old), kept, buf)
    evicted = has_n[:, None] & ~jnp.any(keep[:, :, None] == slots, axis=1)
    until = jnp.where(evicted, end_pos_n[:, None], never)
    return new_buf, (union, until)

  xs = (jax.tree.map(lambda z: jnp.moveaxis(z, 1, 0), new), has.T, end_pos.T, end_seg.T)
  final, (unions, until) = jax.lax.scan(step, store, xs)
  unions = jax.tree.map(lambda z: jnp.moveaxis(z, 0, 1), unions)                 # [b, nb, S, ...]
  until = jnp.moveaxis(until, 0, 1)
  q_pos = pos_p.reshape(b, nb, bq)[..., :, None]
  q_seg = seg_p.reshape(b, nb, bq)[..., :, None]
  q_chunk = chunk_p.reshape(b, nb, bq)[..., :, None]
  s_pos = unions.positions[:, :, None]
  mask = ((s_pos >= 0) & (unions.segment_ids[:, :, None] == q_seg) & (s_pos <= q_pos - w)
          & (unions.chunk[:, :, None] <= q_chunk - 1) & (q_pos <= until[:, :, None]))
  st = jnp.einsum("bnprkge,bnske->bnpkgrs", q_p.reshape(b, nb, per, rq, kh, g, e), unions.k,
                  preferred_element_type=jnp.float32) * scale
  if read_bias is not None:  # spec §4.7, as in the FIFO read
    gamma, tau = (jnp.asarray(z, jnp.float32).reshape(kh, g)[:, :, None] for z in read_bias)
    st = st + jax.nn.log_sigmoid(gamma * (unions.score[:, :, None, None, :] - tau))[:, :, None, :, :, None, :]
  logits.append(st.reshape(b, ns, kh, g, rq, -1))
  masks.append(mask.reshape(b, ns, rq, -1))
  return jnp.where(mask, s_pos, -1), unions.v, 1, per, nb, final


def _logits(q: Array, k: Array, scale: float) -> Array:
  """q [b, n, Q, kh, g, e], k [b, n, S, kh, e] -> float32 [b, n, kh, g, Q, S]."""
  return jnp.einsum("bnqkge,bnske->bnkgqs", q, k, preferred_element_type=jnp.float32) * scale


def bmojo_attention(
    q: Float[Array, "b t h e"],
    k: Float[Array, "b t k e"],
    v: Float[Array, "b t k e"],
    k_fade: Float[Array, "b t k e"],
    v_fade: Float[Array, "b t k e"],
    memory: BMojoMemory,
    *,
    window: int,
    segment_ids: Int[Array, "b t"] | None = None,
    score: Float[Array, "b t"] | None = None,
    q_fade: Float[Array, "b t h e"] | None = None,
    chunk_size: int | None = None,
    k_sel: int = 1,
    fresh: bool = False,
    scale: float | None = None,
    return_store_read: bool = False,
    query_block: int | None = None,
    store_group: int | None = None,
    selector_bias: tuple[Array, Array] | None = None,
    bound: str = "fifo",
):
  """One call of the B'MOJO read (B'MOJO-F when ``memory`` has no store slots), from ``memory`` to the new one.

  Args:
    q: queries after RoPE at their absolute positions; ``h`` is a multiple of the kv heads (GQA).
    k: in-context keys after RoPE.
    v: in-context values.
    k_fade: fading keys ``RoPE(s W_k')`` (from the SSM output).
    v_fade: fading values ``s W_v'``.
    memory: the memory before the call (:func:`init_memory` for a fresh row).
    window: ``W``.
    segment_ids: [b, t] document ids (None: one document, id 0).
    score: [b, t] innovation scores (only read when the memory has a store). No gradient flows through the
      selection; with ``selector_bias`` the scores of the entries read this call receive the bias's gradient.
    q_fade: queries scored against the fading keys (None: ``q``, hmf's tied default).
    chunk_size: selection chunk ``C`` (needed with a store; the candidates buffer holds ``C − 1`` slots).
    k_sel: entries written per complete chunk.
    fresh: ``memory`` is known to be empty: its store slots are left out of the read (the window slots are
      always read; empty ones are masked).
    scale: logit scale (default ``1/sqrt(head_dim)``).
    return_store_read: also return, per query, the positions of the store entries it reads (for tests).
    query_block: at most this many queries per sub-block of the in-context / fading read
      (:func:`query_block_size`; None: automatic). A speed knob only: every value gives the same output.
    store_group: at most this many selection blocks per group of the store read (:func:`store_group_size`;
      None: automatic). A speed knob only.
    selector_bias: ``(γ, τ)``, float32 [h] each: add ``log σ(γ_h (e_i − τ_h))`` to the logit of every store entry
      ``i`` for query head ``h`` (spec §4.7, option ``selector_bias``, [ours]), so attention usage also trains
      ``γ``, ``τ`` and the scores. None: no bias.
    bound: the store's eviction rule (spec §4.4): ``"fifo"`` keeps the entries of the last ``M / k_sel`` written
      chunks; ``"top_m"`` keeps the ``M`` highest-scored entries written so far in the document (a scan over the
      selection blocks; at equal scores the entry already stored stays). The memory must be used with one bound.

  Returns:
    ``(out, new_memory)`` with ``out`` [b, t, h, e] in ``q.dtype``; with ``return_store_read`` a third item: int32
    [b, t, S] positions of the store keys read by each query, -1 where masked.
  """
  b, t, h, e = q.shape
  kh = k.shape[2]
  if h % kh:
    raise ValueError(f"bmojo_attention: {h} query heads are not a multiple of {kh} kv heads")
  w = window
  m = memory.store.k.shape[1]
  use_store = m > 0
  if memory.context.k.shape[1] != w - 1 or memory.fading.k.shape[1] != 2 * w - 1:
    raise ValueError(f"bmojo_attention: memory holds {memory.context.k.shape[1]} / {memory.fading.k.shape[1]} "
                     f"window slots, expected window - 1 = {w - 1} / 2 window - 1 = {2 * w - 1}")
  if use_store:
    if chunk_size is None or score is None:
      raise ValueError("bmojo_attention: a memory with a store needs chunk_size and score")
    check_config(w, chunk_size, k_sel, m, bound)
    if memory.candidates.k.shape[1] != chunk_size - 1:
      raise ValueError(f"bmojo_attention: memory holds {memory.candidates.k.shape[1]} candidates, expected "
                       f"chunk_size - 1 = {chunk_size - 1}")
  c = chunk_size if use_store else max(w, 1)
  if selector_bias is not None:
    if not use_store:
      raise ValueError("bmojo_attention: selector_bias needs a memory with a store (memory_size > 0)")
    if any(jnp.shape(z) != (h,) for z in selector_bias):
      raise ValueError(f"bmojo_attention: selector_bias (gamma, tau) must be two [{h}] arrays (one per query head), "
                       f"got {[jnp.shape(z) for z in selector_bias]}")
  score_in = None if score is None else (
      jax.lax.stop_gradient(score) if selector_bias is None else score)
  scale = e ** -0.5 if scale is None else scale
  q_fade = q if q_fade is None else q_fade
  sd = memory.context.k.dtype
  segment_ids = jnp.zeros((b, t), jnp.int32) if segment_ids is None else segment_ids.astype(jnp.int32)
  positions = memory.length[:, None] + jnp.arange(t, dtype=jnp.int32)[None]
  offsets, _ = document_offsets(segment_ids, memory.last_segment, memory.offset)
  # Every mask below compares document keys (the position of the document's first token), not segment ids, so a
  # segment id that comes back later in the row is a new document whichever way the row is cut into calls.
  docs = positions - offsets

  # Selection blocks of Q tokens (at most one chunk end each); the padded tail has positions after every real
  # query, so causality hides it. The in-context and fading reads use sub-blocks of R | Q queries: R + W - 1 keys
  # of each kind per sub-block instead of Q + W - 1.
  bq = min(c, t)
  nb = -(-t // bq)
  pad = nb * bq - t
  tp = nb * bq
  rq = query_block_size(bq, w, query_block)
  ns, per = tp // rq, bq // rq
  g = h // kh
  pos_p = memory.length[:, None] + jnp.arange(tp, dtype=jnp.int32)[None]
  seg_p = _pad_time(docs, pad)
  q_p = _pad_time(q, pad)
  qs = q_p.reshape(b, ns, rq, kh, g, e)
  qfs = _pad_time(q_fade, pad).reshape(b, ns, rq, kh, g, e)
  sq_pos = pos_p.reshape(b, ns, rq)[..., :, None]
  sq_seg = seg_p.reshape(b, ns, rq)[..., :, None]
  span = lambda z: _windows(z, ns, rq + w - 1, rq)  # sub-block i reads stream [iR, iR + R + W - 2]

  # In-context keys [t - W + 1, t]; stream = carried W - 1 slots then this call's tokens.
  # (Padded tokens keep their real, later positions: no query can see them.)
  ctx = [span(_cat(old, new)) for old, new in
         zip(memory.context, (_pad_time(k, pad), _pad_time(v, pad), pos_p, seg_p))]
  ctx_mask = ((ctx[2][:, :, None] <= sq_pos) & (ctx[2][:, :, None] > sq_pos - w) & (ctx[2][:, :, None] >= 0)
              & (ctx[3][:, :, None] == sq_seg))
  # Fading keys [t - 2W + 1, t - W]; stream = carried 2W - 1 slots then this call's tokens.
  fad = [span(_cat(old, new)) for old, new in
         zip(memory.fading, (_pad_time(k_fade, pad), _pad_time(v_fade, pad), pos_p, seg_p))]
  fad_mask = ((fad[2][:, :, None] <= sq_pos - w) & (fad[2][:, :, None] > sq_pos - 2 * w) & (fad[2][:, :, None] >= 0)
              & (fad[3][:, :, None] == sq_seg))
  logits = [_logits(qs, ctx[0], scale), _logits(qfs, fad[0], scale)]               # [b, ns, kh, g, R, S]
  masks = [ctx_mask, fad_mask]
  values = jnp.concatenate([ctx[1].astype(v.dtype), fad[1].astype(v.dtype)], axis=2)  # [b, ns, S, kh, e]

  new_store = memory.store
  new_candidates = memory.candidates
  store_pos = None
  s_v = None
  if use_store:
    band = m // k_sel
    chunk = offsets // c
    valid = jnp.ones((b, t), bool)
    cand = memory.candidates
    # Candidate stream: the carried C - 1 tokens, then this call's tokens (padded ones are invalid).
    stream = StoreEntries(
        _cat(cand.k, _pad_time(k, pad).astype(sd)), _cat(cand.v, _pad_time(v, pad).astype(sd)),
        _cat(cand.positions, pos_p), _cat(cand.segment_ids, seg_p),
        _cat(cand.chunk, _pad_time(chunk, pad)),
        _cat(cand.score, _pad_time(score_in.astype(jnp.float32), pad)))
    stream_valid = _cat(cand.positions >= 0, _pad_time(valid, pad, False))
    # A token ends a chunk when its in-document offset is C - 1 mod C; at most one end per block of Q <= C tokens.
    ends = _pad_time(valid & ((offsets + 1) % c == 0), pad, False).reshape(b, nb, bq)
    has = ends.any(-1)                                                            # [b, nb]
    end = jnp.arange(nb) * bq + jnp.argmax(ends, axis=-1)                        # call index of the end token
    end_seg = jnp.take_along_axis(seg_p, end, axis=1)
    end_chunk = jnp.take_along_axis(_pad_time(chunk, pad), end, axis=1)
    # The ended chunk lies in call indices [end - C + 1, end] subset of [bQ - C + 1, bQ + Q - 1]: stream
    # indices [bQ, bQ + C + Q - 2] (the stream is shifted by the C - 1 carried candidates).
    sp = jax.tree.map(lambda z: _windows(z, nb, c + bq - 1, bq), stream)
    member = (_windows(stream_valid, nb, c + bq - 1, bq) & (sp.segment_ids == end_seg[..., None])
              & (sp.chunk == end_chunk[..., None]) & has[..., None])
    # top_k puts the earlier of equal scores first; a complete chunk has C >= k_sel members.
    _, pick = jax.lax.top_k(jnp.where(member, jax.lax.stop_gradient(sp.score), -jnp.inf), k_sel)  # [b, nb, k_sel]
    take = lambda z: jnp.take_along_axis(z, pick.reshape(pick.shape + (1,) * (z.ndim - 3)), axis=2)
    new = StoreEntries(*(take(z) for z in sp))
    new = new._replace(positions=jnp.where(has[..., None], new.positions, -1))

  if use_store and bound == "top_m":
    store_pos, s_v, sup, per_group, nsup, new_store = _top_m_read(
        memory.store, new, has, end, q_p, pos_p, seg_p, _pad_time(chunk, pad), logits, masks, read_bias=selector_bias,
        dims=(b, nb, bq, ns, rq, per, kh, g, e, w, scale))
    unpadded = jax.tree.map(lambda z: z[:, :z.shape[1] - pad], stream)
    new_candidates = jax.tree.map(lambda z, old: _last(z, c - 1).astype(old.dtype), unpadded, cand)
  elif use_store:
    # Store keys of query block b: entries written in blocks b - back .. b (earlier blocks' chunks are more than
    # M / k_sel chunks old for every query of block b), plus the carried store unless fresh. Read per group of
    # `sup` consecutive blocks (blocks jS - back .. jS + S - 1), which copies the entries fewer times when the
    # blocks are short (small C).
    back = min(band, nb - 1)
    sup = store_group_size(nb, bq, back, k_sel, 0 if fresh else m, kh * e, h, store_group)
    nsup = nb // sup
    front = lambda z: jnp.pad(z, [(0, 0), (back, 0)] + [(0, 0)] * (z.ndim - 2),
                              constant_values=-1 if z.dtype == jnp.int32 else 0)
    fields = 5 if selector_bias is None else 6  # the score only for the selector bias
    read = [_windows(front(z), nsup, back + sup, sup).reshape((b, nsup, (back + sup) * k_sel) + z.shape[3:])
            for z in new[:fields]]
    if not fresh:
      store = memory.store
      read = [jnp.concatenate([jnp.broadcast_to(old[:, None], (b, nsup) + old.shape[1:]).astype(z.dtype), z],
                              axis=2) for old, z in zip(store[:fields], read)]
    s_k, s_v, s_pos, s_seg, s_chunk = read[:5]
    group = lambda z: z.reshape(b, nsup, sup * bq)[..., :, None]
    q_chunk = group(_pad_time(chunk, pad))
    store_mask = ((s_pos[:, :, None] >= 0) & (s_seg[:, :, None] == group(seg_p))
                  & (s_pos[:, :, None] <= group(pos_p) - w)
                  & (s_chunk[:, :, None] <= q_chunk - 1) & (s_chunk[:, :, None] >= q_chunk - band))
    # Store logits per group, laid out per sub-block: [b, nsup, per', kh, g, R, S] -> [b, ns, kh, g, R, S].
    per_group = sup * per
    st = jnp.einsum("bnprkge,bnske->bnpkgrs", q_p.reshape(b, nsup, per_group, rq, kh, g, e), s_k,
                    preferred_element_type=jnp.float32) * scale
    if selector_bias is not None:  # spec §4.7: + log σ(γ_h (e_i − τ_h)) on every store logit
      gamma, tau = (jnp.asarray(z, jnp.float32).reshape(kh, g)[:, :, None] for z in selector_bias)
      bias = jax.nn.log_sigmoid(gamma * (read[5][:, :, None, None, :] - tau))           # [b, nsup, kh, g, S]
      st = st + bias[:, :, None, :, :, None, :]
    logits.append(st.reshape(b, ns, kh, g, rq, -1))
    masks.append(store_mask.reshape(b, ns, rq, -1))
    store_pos = jnp.where(store_mask, s_pos[:, :, None], -1)

    # FIFO: keep the last `band` written chunks of [carried || this call's]; blocks without an end are moved in
    # front of everything (stable sort) so they never displace a written chunk.
    slots = jax.tree.map(lambda old, z: _cat(old.reshape((b, band, k_sel) + old.shape[2:]).astype(z.dtype), z),
                         memory.store, new)
    keep = jnp.concatenate([jnp.ones((b, band), jnp.int32), has.astype(jnp.int32)], axis=1)
    order = jnp.argsort(keep, axis=1, stable=True)[:, nb:]                      # the last `band` slots
    pick_slots = lambda z: jnp.take_along_axis(z, order.reshape(order.shape + (1,) * (z.ndim - 2)), axis=1)
    new_store = jax.tree.map(lambda z, old: pick_slots(z).reshape(old.shape).astype(old.dtype), slots, memory.store)
    unpadded = jax.tree.map(lambda z: z[:, :z.shape[1] - pad], stream)
    new_candidates = jax.tree.map(lambda z, old: _last(z, c - 1).astype(old.dtype), unpadded, cand)

  # One masked softmax over [in-context || fading || store] keys (float32 statistics).
  mask = jnp.concatenate(masks, axis=-1)[:, :, None, None]                       # [b, ns, 1, 1, R, S]
  all_logits = jnp.where(mask, jnp.concatenate(logits, axis=-1), _NEG_INF)
  probs = jax.nn.softmax(all_logits, axis=-1)
  probs = jnp.where(mask.any(-1, keepdims=True), probs, 0.0).astype(v.dtype)
  n_cf = values.shape[2]
  out = jnp.einsum("bnkgqs,bnske->bnqkge", probs[..., :n_cf], values, preferred_element_type=jnp.float32)
  out = out.reshape(b, tp, h, e)
  if s_v is not None:
    p_st = probs[..., n_cf:].reshape((b, nsup, per_group, kh, g, rq, -1))
    out = out + jnp.einsum("bnpkgrs,bnske->bnprkge", p_st, s_v.astype(v.dtype),
                           preferred_element_type=jnp.float32).reshape(b, tp, h, e)
  out = out[:, :t].astype(q.dtype)

  new_memory = BMojoMemory(
      context=WindowKV(*(_last(_cat(old, new), w - 1).astype(old.dtype) for old, new in
                         zip(memory.context, (k, v, positions, docs)))),
      fading=WindowKV(*(_last(_cat(old, new), 2 * w - 1).astype(old.dtype) for old, new in
                        zip(memory.fading, (k_fade, v_fade, positions, docs)))),
      candidates=new_candidates,
      store=new_store,
      offset=offsets[:, -1] + 1,
      last_segment=segment_ids[:, -1],
      length=memory.length + t)
  if return_store_read:
    if store_pos is None:
      store_pos = jnp.full((b, nb, bq, 0), -1, jnp.int32)
    # Sliced in float32 (exact below 2^24): jax 0.10.2's CPU backend fails to compile the int32 select + slice
    # fusion for some shapes ("Cannot select X86ISD::SUBV_BROADCAST_LOAD"). Inspection only.
    store_pos = store_pos.astype(jnp.float32).reshape(b, tp, -1)[:, :t]
    return out, new_memory, store_pos.astype(jnp.int32)
  return out, new_memory


@jax.custom_vjp
def add_aux_gradient(w: Array, aux_loss: Array) -> Array:
  """Returns ``w`` unchanged; in the backward pass ``aux_loss`` also receives cotangent 1 (spec §4.1, [ours]).

  This adds ``aux_loss`` to whatever loss is differentiated, without a second output: a layer routes its
  auxiliary loss through a weight that is always on the path to the main loss (B'MOJO uses its output projection).
  The backward pass runs once per differentiation of the layer, so the total gradient is
  ``∇(loss + aux_loss)``. Forward-mode differentiation works as long as neither input has a tangent (e.g. a
  Jacobian with respect to inputs that reach ``aux_loss`` only through ``stop_gradient``).

  Args:
    w: any array on the path to the main loss.
    aux_loss: scalar auxiliary loss.

  Returns:
    ``w``.
  """
  del aux_loss
  return w


def _aux_fwd(w, aux_loss):
  return w, jnp.zeros((), aux_loss.dtype)


def _aux_bwd(zero, g):
  return g, jnp.ones_like(zero)


add_aux_gradient.defvjp(_aux_fwd, _aux_bwd)
