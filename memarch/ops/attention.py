"""Softmax attention with positions, segment ids, sliding windows and an always-visible prefix (pure JAX).

Every attention variant in memarch reduces to one masked softmax over keys that carry their absolute position and
segment id. A key at position ``p_k`` is visible to a query at position ``p_q`` when

  * ``p_k <= p_q``                      (causal),
  * ``p_q - p_k < window``              (sliding window, if ``window`` is set),
  * ``seg_k == seg_q``                  (documents packed in one row never see each other),
  * ``p_k >= 0``                        (slot holds a token: empty cache slots carry position -1),

or when it belongs to the *prefix* (Titans persistent memory, eq. 19), which every query sees. Softmax statistics
are computed in float32 whatever the input dtype.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from memarch.typing import Array, Bool, Float, Int, typed

_NEG_INF = -1e30  # large finite value: a fully masked row gives a uniform (finite) softmax, zeroed afterwards


@typed
def attention_mask(
    q_positions: Int[Array, "b t"],
    k_positions: Int[Array, "b s"],
    q_segment_ids: Int[Array, "b t"] | None = None,
    k_segment_ids: Int[Array, "b s"] | None = None,
    *,
    window: int | None = None,
) -> Bool[Array, "b t s"]:
  """Visibility of each key to each query (causal, windowed, same segment, valid slot).

  Args:
    q_positions: absolute position of each query token.
    k_positions: absolute position of each key slot; negative marks an empty slot.
    q_segment_ids: document id of each query (None: a single document).
    k_segment_ids: document id of each key (None: a single document).
    window: if set, a query sees only the ``window`` most recent positions, itself included.

  Returns:
    Boolean mask, True where the key is visible.
  """
  qp = q_positions[:, :, None]
  kp = k_positions[:, None, :]
  mask = (kp <= qp) & (kp >= 0)
  if window is not None:
    mask &= (qp - kp) < window
  if (q_segment_ids is None) != (k_segment_ids is None):
    raise ValueError("attention_mask: give both q_segment_ids and k_segment_ids, or neither")
  if q_segment_ids is not None:
    mask &= q_segment_ids[:, :, None] == k_segment_ids[:, None, :]
  return mask


@typed
def dot_product_attention(
    q: Float[Array, "b t h e"],
    k: Float[Array, "b s kh e"],
    v: Float[Array, "b s kh ev"],
    mask: Bool[Array, "b t s"],
    *,
    prefix_k: Float[Array, "p kh e"] | None = None,
    prefix_v: Float[Array, "p kh ev"] | None = None,
    prefix_q: Float[Array, "b t h e"] | None = None,
    scale: float | None = None,
) -> Float[Array, "b t h ev"]:
  """Multi-head (grouped-query) softmax attention under ``mask``, with an optional always-visible prefix.

  Args:
    q: queries; ``h`` must be a multiple of the kv heads ``kh`` (GQA; ``h == kh`` is plain MHA).
    k: keys.
    v: values.
    mask: visibility of each key to each query, from :func:`attention_mask`.
    prefix_k: keys shared by every sequence and visible to every query (persistent memory), or None.
    prefix_v: values of the prefix.
    prefix_q: queries scored against the prefix (default ``q``). Attention layers pass the queries *before* RoPE:
      an unrotated prefix then sits at relative distance 0 from every query, so prefix scores do not depend on
      absolute position and packed documents stay translation invariant.
    scale: logit scale, default ``1/sqrt(e)``.

  Returns:
    Attention output in ``q.dtype``. Queries that see no key at all return zeros.
  """
  b, t, h, e = q.shape
  kh = k.shape[2]
  if h % kh:
    raise ValueError(f"dot_product_attention: {h} query heads are not a multiple of {kh} kv heads")
  scale = e ** -0.5 if scale is None else scale
  qg = q.reshape(b, t, kh, h // kh, e)
  logits = jnp.einsum("btkge,bske->bkgts", qg, k, preferred_element_type=jnp.float32) * scale
  if prefix_k is not None:
    p = prefix_k.shape[0]
    pq = qg if prefix_q is None else prefix_q.reshape(b, t, kh, h // kh, e)
    prefix_logits = jnp.einsum("btkge,pke->bkgtp", pq, prefix_k.astype(k.dtype),
                               preferred_element_type=jnp.float32) * scale
    logits = jnp.concatenate([prefix_logits, logits], axis=-1)
    v = jnp.concatenate([jnp.broadcast_to(prefix_v.astype(v.dtype), (b, p) + prefix_v.shape[1:]), v], axis=1)
    mask = jnp.concatenate([jnp.ones((b, t, p), bool), mask], axis=2)
  logits = jnp.where(mask[:, None, None], logits, _NEG_INF)
  probs = jax.nn.softmax(logits, axis=-1)
  probs = jnp.where(mask[:, None, None].any(-1, keepdims=True), probs, 0.0)
  out = jnp.einsum("bkgts,bskf->btkgf", probs.astype(v.dtype), v, preferred_element_type=jnp.float32)
  return out.reshape(b, t, h, v.shape[-1]).astype(q.dtype)


def rope(x: Array, positions: Array, *, max_wavelength: float = 10_000.0) -> Array:
  """Rotary position embedding (Su et al., 2021) on the last axis of ``x`` [..., t, h, e] at ``positions`` [..., t].

  The rotation is relative: ``<rope(q, i), rope(k, j)>`` depends only on ``i - j``. memarch applies it at absolute
  token positions, so keys cached during decoding and keys of a sliding window need no re-rotation.
  """
  e = x.shape[-1]
  if e % 2:
    raise ValueError(f"rope: feature width {e} must be even")
  freq = max_wavelength ** (-jnp.arange(0, e, 2, dtype=jnp.float32) / e)
  angle = positions.astype(jnp.float32)[..., None, None] * freq  # [..., t, 1, e/2]
  sin, cos = jnp.sin(angle), jnp.cos(angle)
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)


def blockwise_causal_attention(
    q: Array,
    k: Array,
    v: Array,
    positions: Array,
    segment_ids: Array | None = None,
    *,
    window: int | None = None,
    prefix_k: Array | None = None,
    prefix_v: Array | None = None,
    prefix_q: Array | None = None,
    block_size: int = 256,
) -> Array:
  """Causal (optionally windowed) self-attention computed one query block at a time, skipping invisible keys.

  Equals :func:`dot_product_attention` under ``attention_mask(positions, positions, segment_ids, segment_ids,
  window=window)`` when the ``t`` tokens are consecutive (``positions[:, i] = positions[:, 0] + i``, as in one call of
  a layer). Query block ``[lo, hi)`` attends only to keys ``[max(0, lo - window + 1), hi)``, so the upper triangle
  (and, with a window, everything older than it) is never computed: about half the work of the dense form for
  causal attention and O(t * window) for sliding windows.

  Args:
    q: [b, t, h, e] queries.
    k: [b, t, kh, e] keys of the same tokens.
    v: [b, t, kh, ev] values.
    positions: [b, t] consecutive absolute positions.
    segment_ids: [b, t] document ids (None: one document).
    window: sliding-window length, or None for full causal attention.
    prefix_k: always-visible prefix keys (see :func:`dot_product_attention`).
    prefix_v: prefix values.
    prefix_q: queries scored against the prefix.
    block_size: longest query block; a static Python loop runs over ``n = ceil(t / block_size)`` blocks of
      near-equal length (``t // n`` or ``t // n + 1``, never less than ``block_size / 2``). Equal blocks do less work
      than ``block_size`` blocks plus a short remainder, and never leave a lone last query (e.g. ``t = 513 =
      2 * 256 + 1``), whose matrix-vector products XLA:GPU rewrites as broadcast-multiply-reduce: a ballet HCAM eval
      at ``t = 513``, batch 250 failed to compile on an H200 (jax 0.11.2) with an invalid reshape
      ``[1, 4, 32] -> [1, 4, 32, 16]``, the shape of that rewrite for the lone query against its 16-key window.

  Returns:
    [b, t, h, ev] attention output.
  """
  t = q.shape[1]
  if t <= block_size:
    mask = attention_mask(positions, positions, segment_ids, segment_ids, window=window)
    return dot_product_attention(q, k, v, mask, prefix_k=prefix_k, prefix_v=prefix_v, prefix_q=prefix_q)
  outs = []
  n = -(-t // block_size)
  bounds = [i * t // n for i in range(n + 1)]
  for lo, hi in zip(bounds[:-1], bounds[1:]):
    k_lo = 0 if window is None else max(0, lo - window + 1)
    q_seg = None if segment_ids is None else segment_ids[:, lo:hi]
    k_seg = None if segment_ids is None else segment_ids[:, k_lo:hi]
    mask = attention_mask(positions[:, lo:hi], positions[:, k_lo:hi], q_seg, k_seg, window=window)
    outs.append(dot_product_attention(
        q[:, lo:hi], k[:, k_lo:hi], v[:, k_lo:hi], mask, prefix_k=prefix_k, prefix_v=prefix_v,
        prefix_q=None if prefix_q is None else prefix_q[:, lo:hi]))
  return jnp.concatenate(outs, axis=1)
