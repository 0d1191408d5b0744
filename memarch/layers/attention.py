"""Multi-head attention as a memarch sequence mixer: full causal, sliding window, persistent prefix, KV cache.

The state is a KV cache kept in chronological order:

  * full attention keeps ``max_len`` slots; a call with ``t`` new tokens writes them after the filled ones;
  * sliding-window attention keeps only the last ``window - 1`` tokens (all a future query can see), so its state
    is bounded whatever the sequence length.

Empty slots carry position -1 and are never visible. Keys are stored after RoPE at their absolute position, so
cached keys never need re-rotation (RoPE is relative).

Persistent memory (Titans eq. 19) is ``num_persistent`` learned vectors in model space, projected by the same
``W_K`` / ``W_V`` as the tokens and visible to every query: ``attention([p_1 .. p_P || x])`` without the prefix
taking part in the output length or the cache. A block that shares its persistent vectors with another branch
(Titans MAG / MAL, whose memory also absorbs them) owns them and passes them in through ``persistent=``.
"""

from __future__ import annotations

from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from memarch.layers.common import CausalConv1D, ConvState, DType, as_dtype, variance_scaling
from memarch.ops import attention as attn_ops
from memarch.typing import Array

# Persistent vectors live in the block's post-norm input space; N(0, 0.02) as in Titans spec §6.
PERSISTENT_INIT_STDDEV = 0.02


class KVCache(NamedTuple):
  """KV cache of one attention layer, chronological, batch-leading.

  Attributes:
    k: [b, slots, kv_heads, head_dim] keys after RoPE.
    v: [b, slots, kv_heads, head_dim] values.
    positions: [b, slots] absolute position of each slot; -1 marks an empty slot.
    segment_ids: [b, slots] document id of each slot.
    length: [b] number of tokens seen so far (the position of the next token).
    conv: state of the short input convolution (``conv_width > 0``), else None.
  """
  k: Array
  v: Array
  positions: Array
  segment_ids: Array
  length: Array
  conv: ConvState | None = None


class MultiHeadAttention(nn.Module):
  """Causal multi-head (optionally grouped-query) attention with RoPE, following the layer protocol.

  Attributes:
    num_heads: query heads.
    head_dim: per-head width (default ``d_model // num_heads``).
    num_kv_heads: key/value heads (default ``num_heads``; fewer gives GQA).
    window: if set, each query sees only the ``window`` most recent tokens (itself included) and the cache holds
      ``window - 1`` tokens.
    num_persistent: learned persistent-memory vectors visible to every query (Titans eq. 19), initialised
      N(0, 0.02); 0 disables (vectors owned by the caller can still be passed to ``__call__``).
    max_len: cache slots of full attention (the longest prefill + decode a state can hold).
    conv_width: if > 0, a causal depthwise convolution of this width mixes each input with its predecessors before
      the q/k/v projections (a "short convolution", as in H3 / Based): a key can then carry the identity of the
      token before it, which makes associative recall learnable by a single layer. 0 disables it.
    d_model: model width, needed by ``init_state`` on an unbound module when ``head_dim`` is unset or the short
      convolution is on (None: passed to ``init_state`` or inferred at call time).
    use_rope: rotate q and k by their absolute positions.
    block_size: query block length of the full-sequence form (invisible key blocks are skipped).
    rope_max_wavelength: RoPE base.
    w_init_variance_scale: variance multiplier of the q/k/v projections' initialiser.
    dtype: computation dtype (None: promoted input dtype).
    param_dtype: parameter dtype.
    state_dtype: KV cache dtype (float32 by default).
  """
  num_heads: int
  head_dim: int | None = None
  num_kv_heads: int | None = None
  window: int | None = None
  num_persistent: int = 0
  max_len: int = 2048
  conv_width: int = 0
  d_model: int | None = None
  use_rope: bool = True
  block_size: int = 256
  rope_max_wavelength: float = 10_000.0
  w_init_variance_scale: float = 1.0
  dtype: DType = None
  param_dtype: DType = jnp.float32
  state_dtype: DType = jnp.float32

  def _dims(self, d_model: int | None = None) -> tuple[int, int, int]:
    d_model = d_model or self.d_model
    head_dim = self.head_dim
    if head_dim is None:
      if d_model is None:
        raise ValueError("MultiHeadAttention: set head_dim to call init_state on an unbound module")
      head_dim = d_model // self.num_heads
    kv = self.num_kv_heads or self.num_heads
    if self.num_heads % kv:
      raise ValueError(f"MultiHeadAttention: num_heads={self.num_heads} is not a multiple of num_kv_heads={kv}")
    return self.num_heads, kv, head_dim

  def cache_slots(self) -> int:
    """Number of cache slots: ``window - 1`` for sliding windows, else ``max_len``."""
    if self.window is not None:
      if self.window < 1:
        raise ValueError(f"MultiHeadAttention: window={self.window} must be >= 1")
      return self.window - 1
    return self.max_len

  def init_state(self, batch_size: int, d_model: int | None = None) -> KVCache:
    """An empty cache for ``batch_size`` sequences (``d_model`` is needed only when ``head_dim`` is unset)."""
    _, kv, e = self._dims(d_model)
    s = self.cache_slots()
    sd = as_dtype(self.state_dtype)
    conv = None
    if self.conv_width:
      d_model = d_model or self.d_model
      if d_model is None:
        raise ValueError("MultiHeadAttention: set d_model (or pass it) to build the short-convolution state")
      conv = self._conv(parent=None).init_state(batch_size, d_model)
    return KVCache(
        k=jnp.zeros((batch_size, s, kv, e), sd),
        v=jnp.zeros((batch_size, s, kv, e), sd),
        positions=jnp.full((batch_size, s), -1, jnp.int32),
        segment_ids=jnp.zeros((batch_size, s), jnp.int32),
        length=jnp.zeros((batch_size,), jnp.int32),
        conv=conv)

  def _conv(self, **kwargs) -> CausalConv1D:
    return CausalConv1D(width=self.conv_width, dtype=self.dtype, param_dtype=self.param_dtype,
                        state_dtype=self.state_dtype, **kwargs)

  def state_size(self, d_model: int | None = None) -> int:
    """Floats of KV cache per sequence: ``2 * slots * kv_heads * head_dim`` (+ the short convolution's inputs)."""
    _, kv, e = self._dims(d_model)
    conv = (self.conv_width - 1) * (d_model or self.d_model or 0) if self.conv_width else 0
    return 2 * self.cache_slots() * kv * e + conv

  @nn.compact
  def __call__(self, x: Array, *, segment_ids: Array | None = None, state: KVCache | None = None,
               persistent: Array | None = None) -> tuple[Array, KVCache]:
    """Attends causally over the cache and the new tokens.

    Args:
      x: [b, t, d] inputs.
      segment_ids: [b, t] document ids (None: one document, id 0).
      state: KV cache from a previous call (None: empty cache).
      persistent: [N_p, d] persistent vectors owned by the caller, visible to every query like the module's own
        (only with ``num_persistent == 0``).

    Returns:
      ``(y, new_state)``: output [b, t, d] and the cache after the last token.
    """
    b, t, d = x.shape
    h, kv, e = self._dims(d)
    pd = as_dtype(self.param_dtype)
    dtype = as_dtype(self.dtype)
    init_in = variance_scaling(self.w_init_variance_scale, in_axis=0, out_axis=(1, 2))
    wq = self.param("q", nn.with_logical_partitioning(init_in, ("embed", "heads", "kv")), (d, h, e), pd)
    wk = self.param("k", nn.with_logical_partitioning(init_in, ("embed", "heads", "kv")), (d, kv, e), pd)
    wv = self.param("v", nn.with_logical_partitioning(init_in, ("embed", "heads", "kv")), (d, kv, e), pd)
    wo = self.param("o", nn.with_logical_partitioning(
        variance_scaling(1.0, in_axis=(0, 1), out_axis=2), ("heads", "kv", "embed")), (h, e, d), pd)
    x_c, wq, wk, wv, wo = nn.dtypes.promote_dtype(x, wq, wk, wv, wo, dtype=dtype)

    fresh = state is None  # nothing cached: attend over the new tokens only
    if fresh:
      state = self.init_state(b, d)
    if segment_ids is None:
      segment_ids = jnp.zeros((b, t), jnp.int32)
    positions = state.length[:, None] + jnp.arange(t, dtype=jnp.int32)[None]
    conv_state = None
    if self.conv_width:
      x_c, conv_state = self._conv(name="conv")(x_c, segment_ids=segment_ids, state=state.conv)

    q = jnp.einsum("btd,dhe->bthe", x_c, wq)
    k = jnp.einsum("btd,dhe->bthe", x_c, wk)
    v = jnp.einsum("btd,dhe->bthe", x_c, wv)
    q_plain = q
    if self.use_rope:
      q = attn_ops.rope(q, positions, max_wavelength=self.rope_max_wavelength)
      k = attn_ops.rope(k, positions, max_wavelength=self.rope_max_wavelength)

    prefix_k = prefix_v = None
    if persistent is not None and (self.num_persistent or persistent.ndim != 2 or persistent.shape[1] != d):
      raise ValueError(f"MultiHeadAttention: persistent must be [N_p, {d}] with num_persistent=0, got shape "
                       f"{persistent.shape} and num_persistent={self.num_persistent}")
    if self.num_persistent:
      persistent = self.param("persistent", nn.with_logical_partitioning(
          nn.initializers.normal(stddev=PERSISTENT_INIT_STDDEV), (None, "embed")), (self.num_persistent, d), pd)
    if persistent is not None:
      persistent = persistent.astype(x_c.dtype)
      # No RoPE on the prefix; it is scored with the unrotated queries (relative distance 0, see the op).
      prefix_k = jnp.einsum("pd,dhe->phe", persistent, wk)
      prefix_v = jnp.einsum("pd,dhe->phe", persistent, wv)

    # Keys = cache slots followed by the new tokens (both chronological).
    sd = as_dtype(self.state_dtype)
    cat = lambda old, new: jnp.concatenate([old.astype(new.dtype), new], axis=1)
    all_k, all_v = cat(state.k, k), cat(state.v, v)
    all_pos, all_seg = cat(state.positions, positions), cat(state.segment_ids, segment_ids)
    if fresh:  # keys are exactly the new tokens: skip the blocks no query can see
      out = attn_ops.blockwise_causal_attention(q, k, v, positions, segment_ids, window=self.window,
                                                prefix_k=prefix_k, prefix_v=prefix_v, prefix_q=q_plain,
                                                block_size=self.block_size)
    else:
      mask = attn_ops.attention_mask(positions, all_pos, segment_ids, all_seg, window=self.window)
      out = attn_ops.dot_product_attention(q, all_k, all_v, mask, prefix_k=prefix_k, prefix_v=prefix_v,
                                           prefix_q=q_plain)
    y = jnp.einsum("bthe,hed->btd", out, wo)

    new_state = self._update_cache(state, k.astype(sd), v.astype(sd), positions, segment_ids,
                                   (all_k.astype(sd), all_v.astype(sd), all_pos, all_seg))
    new_state = new_state._replace(conv=conv_state)
    return y.astype(dtype or x.dtype), new_state

  def _update_cache(self, state, k, v, positions, segment_ids, concatenated) -> KVCache:
    t = k.shape[1]
    length = state.length + t
    if self.window is not None:  # keep the last window - 1 tokens
      s = self.cache_slots()
      start = concatenated[0].shape[1] - s
      return KVCache(*(z[:, start:] for z in concatenated), length)
    if t > self.max_len:
      raise ValueError(f"MultiHeadAttention: {t} tokens do not fit a KV cache of max_len={self.max_len}")
    # Full cache: write the new tokens at slot `length` of each row (slot index == position). A write past
    # max_len is clamped by dynamic_update_slice; callers size max_len for prefill + decode (generate() checks).
    put = jax.vmap(lambda buf, new, i: jax.lax.dynamic_update_slice_in_dim(buf, new, i, axis=0))
    return KVCache(put(state.k, k, state.length), put(state.v, v, state.length),
                   put(state.positions, positions, state.length), put(state.segment_ids, segment_ids, state.length),
                   length)
