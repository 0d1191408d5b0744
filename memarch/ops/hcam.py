"""HCAM read: hierarchical chunk attention over a chunked memory (pure JAX, no Flax).

Hierarchical Chunk Attention Memory (Lampinen et al., NeurIPS 2021; spec ``hcam.md`` §3). For a query ``x_t`` and a
memory of ``M`` chunks of ``C`` vectors each::

    a_t = x_t U_q,   kappa_j = sg(mean_c X_jc) U_k,   s_tj = a_t . kappa_j / sqrt(F)     single head, no bias
    (s~_t, I_t) = top_k over the chunks the query may read;   w_t = softmax(s~_t)           over the k chosen only
    X~_j = sg(X_j + PE)                                                                    reversed in-chunk code
    out_t = sum_r w_tr * MHA(x_t, X~_{I_tr})                                              MHA with biases, no mask

The paper / reference (DeepMind's Haiku module, read and run; no code copied) gives the maths above. Ours:

  * **Edge cases fixed.** A query that may read no chunk returns exactly zero (the reference averages garbage
    chunks); when fewer than ``k`` chunks are readable, the unreadable ones that top-k still picks get weight exactly
    0 and the softmax is renormalised over the readable ones; ``M < k`` uses ``k_eff = min(k, M)`` (the reference's
    ``top_k`` fails); an optional in-chunk ``slot_mask`` supports partly filled, user-supplied chunks (masked mean
    summary, masked softmax inside the chunk; a chunk with no valid slot is unreadable).
  * **Two exact compute paths** (spec §8; gather in two variants), chosen by a cost model (:func:`resolve_path`) or
    by the caller. All paths add the position code through per-slot biases (``(X + PE) W = X W + PE W``), and the
    chunk scores project whichever side has fewer rows (``(a U_k^T) . mean`` for a few queries):

      - ``BLOCK_DENSE``: attend inside every chunk for all queries at once; the per-chunk results are weighted by
        a dense ``[b, q, M]`` matrix holding the top-k weights (zero elsewhere). Only einsums; best when
        ``Q * k * C >~ L`` (training). The key / value projections are either applied to the whole memory once or,
        when ``Q H D < D F + Q F`` (e.g. ``Q = 64, H = 4, D = F = 256``), moved onto the query side
        (``(W_k q) . x`` and ``(sum p x) W_v``), which skips the projected copy of the memory.
      - ``GATHER_PROJECTED``: project the memory once and gather the projected keys / values of the selected chunks.
      - ``GATHER_RAW``: gather the raw selected chunks and project them per query (the reference's arithmetic,
        batched); its cost does not depend on ``L`` beyond the summary scores: best for a few queries (decoding).

  * ``stop_gradient_memory`` (default True, as in the reference) stops gradients into the memory contents / keys;
    False lets them flow (an extension).
"""

from __future__ import annotations

import enum
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from memarch.typing import Array, Bool, Float, Int

_NEG = -1e30  # finite "minus infinity" for masked scores (safe softmax, finite gradients)


class HCAMParams(NamedTuple):
  """Learned weights of one HCAM read (the reference's parameter layout, split per head).

  Attributes:
    summary_query: ``U_q`` [E, F], the single-head query of the chunk-relevance scores (no bias).
    summary_key: ``U_k`` [D, F], the projection of the chunk means (no bias).
    query: ``W_q`` [E, H, d_k] of the within-chunk MHA (applied to the raw query).
    query_bias: ``b_q`` [H, d_k].
    key: ``W_k`` [D, H, d_k].
    key_bias: ``b_k`` [H, d_k] (its gradient is identically zero: softmax ignores a per-query constant).
    value: ``W_v`` [D, H, d_k].
    value_bias: ``b_v`` [H, d_k].
    out: ``W_o`` [H, d_k, F].
    out_bias: ``b_o`` [F].
  """
  summary_query: Array
  summary_key: Array
  query: Array
  query_bias: Array
  key: Array
  key_bias: Array
  value: Array
  value_bias: Array
  out: Array
  out_bias: Array


class HCAMPath(enum.Enum):
  """How the read is computed (all exact); ``AUTO`` picks the cheapest by :func:`path_costs`."""
  AUTO = "auto"
  BLOCK_DENSE = "block_dense"
  GATHER_PROJECTED = "gather_projected"
  GATHER_RAW = "gather_raw"


# FLOP-equivalents charged per gathered element: the spec §8 CPU timings put a gathered float at ~1 ns against
# ~120 GFLOP/s of einsum throughput, so a pure FLOP count (where gather-projected never loses to block-dense) would
# pick gathers that run 2-3x slower. 64 is a conservative round value [ours].
GATHER_ELEMENT_COST = 64.0


def path_costs(*, num_queries: int, num_chunks: int, chunk_size: int, top_k: int, d_in: int,
               d_out: int, gather_element_cost: float = GATHER_ELEMENT_COST) -> dict[HCAMPath, float]:
  """Modelled forward cost per batch element of each path, in FLOPs (spec §8) plus a charge for gathered elements.

  The FLOP terms are the spec's (q / out projections, common to all paths, omitted); the gather charge is ours.

  Args:
    num_queries: ``Q``.
    num_chunks: ``M``.
    chunk_size: ``C``.
    top_k: ``k`` (already capped at ``M``).
    d_in: memory width ``D``.
    d_out: attention width ``F = H * d_k``.
    gather_element_cost: FLOP-equivalents per gathered element (0 gives the spec's pure FLOP model).

  Returns:
    Modelled cost of each concrete path.
  """
  q, l, kc, d, f = num_queries, num_chunks * chunk_size, top_k * chunk_size, d_in, d_out
  scores = 2 * q * num_chunks * f
  return {
      HCAMPath.BLOCK_DENSE: 4 * l * d * f + 4 * q * l * f + scores,
      HCAMPath.GATHER_RAW: 4 * q * kc * d * f + 4 * q * kc * f + scores + gather_element_cost * q * kc * d,
      HCAMPath.GATHER_PROJECTED: 4 * l * d * f + 4 * q * kc * f + scores + gather_element_cost * 2 * q * kc * f,
  }


def resolve_path(path: HCAMPath | str, **shape) -> HCAMPath:
  """``AUTO`` -> the path of smallest modelled cost (:func:`path_costs`; ties: block-dense first); others pass through.

  Args:
    path: a :class:`HCAMPath` or its value.
    **shape: the keyword arguments of :func:`path_costs`.

  Returns:
    A concrete path.
  """
  path = HCAMPath(path)
  if path is not HCAMPath.AUTO:
    return path
  costs = path_costs(**shape)
  return min(costs, key=costs.get)  # dict order breaks ties: BLOCK_DENSE, GATHER_RAW, GATHER_PROJECTED


def position_code(chunk_size: int, width: int) -> Float[Array, "c d"]:
  """The reference's in-chunk position code: reversed positions, ``[sin | cos]`` halves concatenated.

  Slot ``c`` has position ``p = C - 1 - c`` (the chunk's last slot is position 0) and
  ``PE[c] = [sin(p w_0) .. sin(p w_{D/2-1}), cos(p w_0) .. cos(p w_{D/2-1})]`` with ``w_i = 10000^(-2i/D)``.

  Args:
    chunk_size: ``C``.
    width: ``D`` (even).

  Returns:
    float32 [C, D].
  """
  if width % 2:
    raise ValueError(f"hcam position_code: width {width} must be even")
  p = jnp.arange(chunk_size - 1, -1, -1, dtype=jnp.float32)[:, None]
  freq = 10_000.0 ** (-2.0 * jnp.arange(width // 2, dtype=jnp.float32) / width)
  return jnp.concatenate([jnp.sin(p * freq), jnp.cos(p * freq)], axis=-1)


def chunk_means(contents: Float[Array, "b m c d"], slot_mask: Bool[Array, "b m c"] | None = None) -> Array:
  """Chunk summaries before ``U_k``: the mean over the chunk (over its valid slots when ``slot_mask`` is given).

  Args:
    contents: memory chunks.
    slot_mask: True where a slot holds a vector (None: all do).

  Returns:
    [b, m, d] means in float32 (zeros for a chunk with no valid slot).
  """
  x = contents.astype(jnp.float32)
  if slot_mask is None:
    return jnp.mean(x, axis=2)
  m = slot_mask.astype(jnp.float32)[..., None]
  return jnp.sum(x * m, axis=2) / jnp.maximum(jnp.sum(m, axis=2), 1.0)


def select_chunks(
    params: HCAMParams,
    queries: Float[Array, "b q e"],
    keys: Float[Array, "b m d"],
    mask: Bool[Array, "b q m"],
    top_k: int,
    *,
    chunk_order: Int[Array, "b m"] | None = None,
) -> tuple[Float[Array, "b q k"], Int[Array, "b q k"]]:
  """Relevance scores, top-k and the softmax over the selected, readable chunks (steps 1-3 of spec §3).

  Args:
    params: HCAM weights (``summary_query``, ``summary_key`` are used).
    queries: the raw queries ``x_t``.
    keys: chunk summaries (means), already stop-gradiented by the caller if wanted.
    mask: True where query ``t`` may read chunk ``j``.
    top_k: ``k``; the op uses ``min(k, M)``.
    chunk_order: a permutation of the chunk axis per row that ranks the chunks for exact score ties: among equal
      scores, top-k prefers (and lists first) the chunk that comes first in this order. None: the lower index
      (``lax.top_k``'s rule). :func:`write_memory` gives the chronological order (oldest first), so a ring-buffer
      memory selects exactly what a chronological one would.

  Returns:
    ``(weights, indices)``: float32 [b, q, k_eff] weights (summing to 1 over readable chunks, all zero for a query
    that may read none) and the int32 chunk indices (into ``keys``' chunk axis) they belong to, best first.
  """
  d, f = params.summary_key.shape
  q, m = mask.shape[1:]
  keys = keys.astype(queries.dtype)
  a = jnp.einsum("bqe,ef->bqf", queries, params.summary_query.astype(queries.dtype))
  u_k = params.summary_key.astype(queries.dtype)
  # s = (a U_k^T) . mean_j = a . (mean_j U_k): project the side with fewer rows (queries for decoding, chunks for
  # training); exact either way, and a single query over a long memory then costs O(M D), not O(M D F).
  if q * (d * f + m * d) < m * (d * f + q * f):
    s = jnp.einsum("bqd,bmd->bqm", jnp.einsum("bqf,df->bqd", a, u_k), keys, preferred_element_type=jnp.float32)
  else:
    s = jnp.einsum("bqf,bmf->bqm", a, jnp.einsum("bmd,df->bmf", keys, u_k), preferred_element_type=jnp.float32)
  s = s / math.sqrt(f)
  k_eff = min(top_k, mask.shape[-1])
  s = jnp.where(mask, s, _NEG)
  if chunk_order is None:
    top, idx = jax.lax.top_k(s, k_eff)
  else:  # top-k over the scores listed in ``chunk_order`` (lax.top_k keeps the first of equal scores), mapped back
    order = jnp.broadcast_to(chunk_order[:, None, :], s.shape).astype(jnp.int32)
    top, rank = jax.lax.top_k(jnp.take_along_axis(s, order, axis=-1), k_eff)
    idx = jnp.take_along_axis(order, rank, axis=-1)
  ok = jnp.take_along_axis(mask, idx, axis=-1)
  # Safe softmax over the readable selected scores only: no exp of a masked score, no 0/0.
  shift = jax.lax.stop_gradient(jnp.max(jnp.where(ok, top, _NEG), axis=-1, keepdims=True))
  e = jnp.where(ok, jnp.exp(jnp.where(ok, top - shift, 0.0)), 0.0)
  z = jnp.sum(e, axis=-1, keepdims=True)
  return e / jnp.where(z > 0, z, 1.0), idx


def _project(x: Array, w: Array, bias: Array) -> Array:
  """``x W + b`` over the last axis of ``x`` into [..., H, d_k]."""
  return jnp.einsum("...d,dhe->...he", x, w.astype(x.dtype)) + bias.astype(x.dtype)


def _absorb_projections(num_queries: int, num_heads: int, d_in: int, d_out: int) -> bool:
  """Whether block-dense should apply ``W_k`` / ``W_v`` on the query side rather than to every memory slot.

  Per memory slot, projecting costs ``~4 D F`` (K and V) plus ``4 Q F`` (scores and values), the absorbed form
  ``4 Q H D`` (scores and values against the raw ``D``-wide slots): it wins when ``Q H D < D F + Q F``, e.g. at
  training shapes with few heads (``Q = 64, H = 4, D = F = 256``: 20% fewer FLOPs and no projected copy of the
  memory) and always for a few queries.
  """
  return num_queries * num_heads * d_in < d_in * d_out + num_queries * d_out


def _chunk_softmax(logits: Array, slot_mask: Array | None) -> Array:
  """Softmax over the chunk-slot axis (last); fully masked rows give zeros."""
  if slot_mask is None:
    return jax.nn.softmax(logits, axis=-1)
  logits = jnp.where(slot_mask, logits, _NEG)
  return jnp.where(slot_mask.any(-1, keepdims=True), jax.nn.softmax(logits, axis=-1), 0.0)


def hcam_read(
    params: HCAMParams,
    queries: Float[Array, "b q e"],
    contents: Float[Array, "b m c d"],
    mask: Bool[Array, "b q m"],
    *,
    top_k: int,
    slot_mask: Bool[Array, "b m c"] | None = None,
    keys: Float[Array, "b m d"] | None = None,
    path: HCAMPath | str = HCAMPath.AUTO,
    stop_gradient_memory: bool = True,
    use_position_code: bool = True,
    chunk_order: Int[Array, "b m"] | None = None,
) -> Float[Array, "b q f"]:
  """Reads the chunked memory for every query (spec §3, edge cases of §5, paths of §8).

  Args:
    params: HCAM weights.
    queries: raw queries ``x_t`` [b, q, E].
    contents: memory chunks ``X`` [b, M, C, D].
    mask: True where query ``t`` may read chunk ``j`` (causality, documents, validity: the caller's).
    top_k: number of chunks each query attends inside (capped at ``M``).
    slot_mask: True where a chunk slot holds a vector (None: every slot does). Chunks with no valid slot are never
      read.
    keys: chunk summaries before ``U_k`` (None: :func:`chunk_means` of ``contents``).
    path: compute path; ``AUTO`` chooses by :func:`path_costs` (block-dense for training shapes, gather-raw for a
      few queries over a long memory, gather-projected for many queries over a very long memory).
    stop_gradient_memory: stop gradients into ``contents`` and ``keys`` (the reference's behaviour).
    use_position_code: add :func:`position_code` to the contents before the key / value projections.
    chunk_order: tie-break order of the chunks for top-k (:func:`select_chunks`; None: the lower index first).
      With it the output does not depend on where the chunks sit in ``contents`` (a ring buffer).

  Returns:
    [b, q, F] outputs in the queries' dtype; exactly zero for a query that may read no chunk.
  """
  b, q, _ = queries.shape
  _, m, c, d = contents.shape
  h, dk = params.query.shape[1:]
  if mask.shape != (b, q, m):
    raise ValueError(f"hcam_read: mask {mask.shape} must be [b, q, M]={(b, q, m)}")
  if chunk_order is not None and chunk_order.shape != (b, m):
    raise ValueError(f"hcam_read: chunk_order {chunk_order.shape} must be [b, M]={(b, m)}")
  dtype = queries.dtype
  if slot_mask is not None:
    mask = mask & slot_mask.any(-1)[:, None, :]
  if keys is None:
    keys = chunk_means(contents, slot_mask)
  mem = contents.astype(dtype)
  if stop_gradient_memory:
    keys, mem = jax.lax.stop_gradient(keys), jax.lax.stop_gradient(mem)
  # The position code is folded into per-slot biases, (X + PE) W + b = X W + (PE W + b): no pass over the memory.
  key_bias, value_bias = params.key_bias.astype(dtype), params.value_bias.astype(dtype)
  if use_position_code:
    pe = position_code(c, d).astype(dtype)
    key_bias, value_bias = _project(pe, params.key, key_bias), _project(pe, params.value, value_bias)  # [C, H, dk]

  weights, idx = select_chunks(params, queries, keys, mask, top_k, chunk_order=chunk_order)  # [b, q, k]
  k_eff = idx.shape[-1]
  path = resolve_path(path, num_queries=q, num_chunks=m, chunk_size=c, top_k=k_eff, d_in=d, d_out=h * dk)
  qh = _project(queries, params.query, params.query_bias)  # [b, q, h, dk]
  scale = dk ** -0.5

  if path is HCAMPath.BLOCK_DENSE:
    sm = None if slot_mask is None else slot_mask[:, None, None]
    # Dense [b, q, M] weights: the top-k weights scattered onto their chunks, zero elsewhere.
    dense_w = jnp.sum(jax.nn.one_hot(idx, m, dtype=jnp.float32) * weights[..., None], axis=2)[:, None, :, :, None]
    kb, vb = (jnp.broadcast_to(z, (c, h, dk)) for z in (key_bias, value_bias))  # [C, H, dk] per-slot biases
    if _absorb_projections(q, h, d, h * dk):
      # Few query-heads: move W_k / W_v onto the query side instead of projecting all L slots (exact):
      #   q^h . (X_jc W_k^h + kb_c^h) = (W_k^h q^h) . X_jc + q^h . kb_c^h
      #   sum_jc p_jc (X_jc W_v^h + vb_c^h) = (sum_jc p_jc X_jc) W_v^h + sum_c (sum_j p_jc) vb_c^h
      qk = jnp.einsum("bqhe,dhe->bhqd", qh, params.key.astype(dtype))
      logits = (jnp.einsum("bhqd,bmcd->bhqmc", qk, mem, preferred_element_type=jnp.float32)
                + jnp.einsum("bqhe,che->bhqc", qh, kb, preferred_element_type=jnp.float32)[:, :, :, None])
      probs = _chunk_softmax(logits * scale, sm) * dense_w
      u = jnp.einsum("bhqmc,bmcd->bqhd", probs.astype(dtype), mem, preferred_element_type=jnp.float32)
      o = (jnp.einsum("bqhd,dhe->bqhe", u.astype(dtype), params.value.astype(dtype),
                      preferred_element_type=jnp.float32)
           + jnp.einsum("bhqc,che->bqhe", jnp.sum(probs, axis=3).astype(dtype), vb,
                        preferred_element_type=jnp.float32))
    else:
      # Head-major layouts ([b, h, ...]): the einsums then need no transposes of the [b, h, q, M, C] scores
      # (measured ~10% faster on CPU than the [b, q, h, M, C] order).
      head_major = lambda w, bias: (jnp.einsum("bmcd,dhe->bhmce", mem, w.astype(dtype))
                                    + jnp.moveaxis(bias, 1, 0)[:, None].astype(dtype))
      kh, vh = head_major(params.key, kb), head_major(params.value, vb)  # [b, h, m, c, dk]
      logits = jnp.einsum("bqhe,bhmce->bhqmc", qh, kh, preferred_element_type=jnp.float32)
      probs = _chunk_softmax(logits * scale, sm) * dense_w
      o = jnp.einsum("bhqmc,bhmce->bqhe", probs.astype(dtype), vh, preferred_element_type=jnp.float32)
  else:
    gather = lambda z: jax.vmap(lambda zb, ib: zb[ib])(z, idx)  # [b, m, ...] -> [b, q, k, ...]
    if path is HCAMPath.GATHER_PROJECTED:
      kh = gather(_project(mem, params.key, key_bias))  # [b, q, k, c, h, dk]
      vh = gather(_project(mem, params.value, value_bias))
    else:
      raw = gather(mem)  # [b, q, k, c, d]
      kh = _project(raw, params.key, key_bias)
      vh = _project(raw, params.value, value_bias)
    logits = jnp.einsum("bqhe,bqkche->bqhkc", qh, kh, preferred_element_type=jnp.float32) * scale
    sm = None if slot_mask is None else gather(slot_mask)[:, :, None]  # [b, q, 1, k, c]
    probs = _chunk_softmax(logits, sm) * weights[:, :, None, :, None]
    o = jnp.einsum("bqhkc,bqkche->bqhe", probs.astype(dtype), vh, preferred_element_type=jnp.float32)

  out = jnp.einsum("bqhe,hef->bqf", o.astype(dtype), params.out.astype(dtype))
  # b_o scaled by the total weight: 1 normally, 0 for a query that reads nothing.
  out = out + jnp.sum(weights, axis=-1, keepdims=True).astype(dtype) * params.out_bias.astype(dtype)
  return out.astype(dtype)


class HCAMMemory(NamedTuple):
  """The chunked memory one HCAM layer writes while it reads a sequence (spec §2, §6; layout ours).

  Chunks are ``C`` consecutive stored vectors of one document, cut at in-document offsets that are multiples of
  ``C``; a chunk is written only when full. A query reads at most ``M_max`` chunks: the last ``M_max`` completed
  before it (FIFO eviction). The buffer is a ring of ``S = M_max + 1`` slots (spec §2): the chunk with running index
  ``i`` lives in slot ``i mod S`` and is written there in place, so the write pointer is ``num_chunks mod S``. The
  one extra slot holds the chunk that has just left the FIFO (no query may read it any more): a decode step can
  then write its new chunk first and read the updated ring, so the read never needs the overwritten chunk and XLA
  updates the ring in place instead of copying it (reading the ring as it was before an in-place write would make
  XLA keep, i.e. copy, that version). Slot order is not chronological, and nothing depends on it: the read mask is
  built from ``chunk_index``, and top-k breaks exact score ties by chronological order (``chunk_order`` of
  :func:`write_memory`), so a read selects what a chronological (oldest-first) buffer would.

  Attributes:
    contents: [b, S, C, D] stored chunks (float32 by default), chunk ``i`` in slot ``i mod S``.
    keys: [b, S, D] the mean of each stored chunk (its summary before ``U_k``, spec §2), computed once when the
      chunk is written, so a read costs ``O(S D)`` for the summaries instead of re-reducing ``O(S C D)`` contents;
      zero for an empty slot.
    chunk_index: [b, S] running index of each chunk in its row (0 for the row's first chunk, counted across
      documents); -1: empty slot.
    segment: [b, S] document id of each chunk.
    recent: [b, C - 1, D] the last ``C - 1`` stored vectors (the spec's accumulator as a sliding buffer: a chunk
      completed by the next call's first tokens takes its head from here).
    offset: [b] in-document offset of the next token, modulo ``C``.
    last_segment: [b] document id of the last token seen (-1 before the first token).
    num_chunks: [b] chunks written so far in this row (the next chunk's ``chunk_index``; its slot is
      ``num_chunks mod S``, the spec's ``write_ptr``).
  """
  contents: Array
  keys: Array
  chunk_index: Array
  segment: Array
  recent: Array
  offset: Array
  last_segment: Array
  num_chunks: Array


def init_memory(batch_size: int, max_chunks: int, chunk_size: int, width: int,
                dtype: jnp.dtype = jnp.float32) -> HCAMMemory:
  """An empty memory whose queries read up to ``max_chunks`` chunks of ``chunk_size`` vectors of ``width`` floats.

  The ring has ``max_chunks + 1`` slots (:class:`HCAMMemory`).
  """
  slots = max_chunks + 1
  return HCAMMemory(
      contents=jnp.zeros((batch_size, slots, chunk_size, width), dtype),
      keys=jnp.zeros((batch_size, slots, width), dtype),
      chunk_index=jnp.full((batch_size, slots), -1, jnp.int32),
      segment=jnp.zeros((batch_size, slots), jnp.int32),
      recent=jnp.zeros((batch_size, chunk_size - 1, width), dtype),
      offset=jnp.zeros((batch_size,), jnp.int32),
      last_segment=jnp.full((batch_size,), -1, jnp.int32),
      num_chunks=jnp.zeros((batch_size,), jnp.int32))


def write_memory(
    memory: HCAMMemory,
    stored: Float[Array, "b t d"],
    segment_ids: Int[Array, "b t"],
    *,
    fresh: bool = False,
) -> tuple[Array, Array, Array, Array | None, HCAMMemory]:
  """Cuts this call's stored vectors into chunks and says which chunks each of its queries may read (spec §6).

  Query ``t`` may read chunk ``j`` iff the chunk is complete and entirely in its past (it ended *before* ``t``;
  the chunk ending at ``t`` itself is left to local attention), belongs to the same document, and would still be
  in a streaming FIFO buffer of ``M_max`` chunks at time ``t`` (``n_done(t) - index_j <= M_max``). The last rule
  keeps one long call exactly equal to streaming.

  The new chunks are written into their ring slots (``chunk_index mod S``, ``S = M_max + 1``) by one in-place
  scatter, whatever ``t``; of more than ``S`` new chunks only the last ``S`` are written (the others are evicted
  within the call). A decode step (``t == 1``) then reads the updated ring: the chunk it may have overwritten had
  already left the FIFO, and the chunk it may have written ends at (not before) the token. So a decode step
  touches ``O(C D)`` floats of contents, not the whole ring, and under ``jit`` with the state donated or carried
  through ``lax.scan`` XLA updates the ring in place. A call with ``t > 1`` reads the ring as it was before the
  call followed by its new chunks (one copy of the ring per call, for the early queries that still see chunks the
  call's later writes evict).

  Args:
    memory: the memory before this call.
    stored: [b, t, D] vectors to store (the caller stop-gradients them if wanted).
    segment_ids: [b, t] document ids; a token whose id differs from the previous token's starts a document.
    fresh: ``memory`` is known to be empty (``init_memory``): the carried slots are left out of the read.

  Returns:
    ``(contents, keys, mask, chunk_order, new_memory)``: the chunks readable in this call [b, M', C, D] (the
    carried ring as it was before the call, then the ``N = ceil((t + C - 1) / C)`` slots for chunks completed in
    this call, in order; only the latter when ``fresh``; the ring after the write when ``t == 1``), their means
    [b, M', D] (the carried ones from ``memory.keys``, only the new chunks are reduced), the read mask [b, t, M'],
    the chronological order of those M' slots (oldest first; pass it to :func:`hcam_read` so that score ties are
    broken as in a chronological buffer; None when ``fresh``: the new slots are already in order), and the memory
    after the call.
  """
  b, t, _ = stored.shape
  slots, c = memory.contents.shape[1:3]
  m_max = slots - 1  # chunks a query may read (init_memory's max_chunks)
  n = (t + c - 1) // c  # static bound on the chunks this call can complete
  tt = jnp.arange(t, dtype=jnp.int32)
  prev = jnp.concatenate([memory.last_segment[:, None], segment_ids[:, :-1]], axis=1)
  starts = segment_ids != prev
  last_start = jax.lax.cummax(jnp.where(starts, tt, -1), axis=1)
  offset = jnp.where(last_start >= 0, tt - last_start, memory.offset[:, None] + tt)
  ends = (offset + 1) % c == 0  # token t completes a chunk of its document
  completed = jnp.cumsum(ends, axis=1, dtype=jnp.int32)
  n_done = memory.num_chunks[:, None] + completed - ends  # chunks completed strictly before t

  # Compact the completed chunks: the n-th one ends at token end_pos[n] (-1: none).
  slot = jnp.where(ends, completed - 1, n)
  end_pos = jax.vmap(lambda s: jnp.full((n,), -1, jnp.int32).at[s].set(tt, mode="drop"))(slot)
  stream = jnp.concatenate([memory.recent.astype(stored.dtype), stored], axis=1)  # token t at index t + C - 1
  cover = jnp.maximum(end_pos, 0)[:, :, None] + jnp.arange(c)  # chunk ending at e is stream[e .. e + C - 1]
  new_contents = jax.vmap(lambda s, i: s[i])(stream, cover).astype(memory.contents.dtype)  # [b, n, C, D]
  new_keys = chunk_means(new_contents).astype(memory.keys.dtype)  # O(n C D): only this call's chunks are reduced
  n_new = completed[:, -1]
  new_index = jnp.where(jnp.arange(n) < n_new[:, None], memory.num_chunks[:, None] + jnp.arange(n), -1)
  new_segment = jnp.take_along_axis(segment_ids, jnp.maximum(end_pos, 0), axis=1)

  # Ring write: new chunk r (index num_chunks + r) goes to slot (num_chunks + r) mod S if it is valid and among the
  # last S of this call (so the written slots are distinct); the others get slot S, out of range, and are dropped.
  r = jnp.arange(n, dtype=jnp.int32)
  write = (r < n_new[:, None]) & (r >= n_new[:, None] - slots)
  ring_slot = jnp.where(write, (memory.num_chunks[:, None] + r) % slots, slots)
  # vmap: a scatter with a batch dimension, which XLA keeps sharded like the batch.
  put = lambda buf, new: jax.vmap(lambda z, i, u: z.at[i].set(u, mode="drop"))(buf, ring_slot, new.astype(buf.dtype))
  new_memory = HCAMMemory(
      contents=put(memory.contents, new_contents),
      keys=put(memory.keys, new_keys),
      chunk_index=put(memory.chunk_index, new_index),
      segment=put(memory.segment, new_segment),
      recent=stream[:, stream.shape[1] - (c - 1):].astype(memory.recent.dtype),
      offset=(offset[:, -1] + 1) % c,
      last_segment=segment_ids[:, -1].astype(jnp.int32),
      num_chunks=memory.num_chunks + n_new)

  # Chronological order of a ring's slots: the oldest is at the write pointer (while the ring is not yet full the
  # empty slots come first; they are never readable).
  ring_order = lambda num_chunks: (num_chunks[:, None] + jnp.arange(slots, dtype=jnp.int32)) % slots
  if fresh:
    read_contents, read_keys, read_index, read_segment = new_contents, new_keys, new_index, new_segment
    read_order = None
  elif t == 1:  # decoding: read the ring after the write (see above), so that XLA writes it in place
    read_contents, read_keys, read_index, read_segment = (new_memory.contents, new_memory.keys,
                                                          new_memory.chunk_index, new_memory.segment)
    read_order = ring_order(new_memory.num_chunks)
  else:  # the carried ring (before this call evicts from it) then the new chunks
    cat = lambda old, new: jnp.concatenate([old, new], axis=1)
    read_contents, read_keys = cat(memory.contents, new_contents), cat(memory.keys, new_keys)
    read_index, read_segment = cat(memory.chunk_index, new_index), cat(memory.segment, new_segment)
    read_order = cat(ring_order(memory.num_chunks), slots + jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (b, n)))
  idx, nd = read_index[:, None, :], n_done[:, :, None]
  mask = (idx >= 0) & (idx < nd) & (nd - idx <= m_max) & (read_segment[:, None, :] == segment_ids[:, :, None])
  return read_contents.astype(stored.dtype), read_keys, mask, read_order, new_memory
