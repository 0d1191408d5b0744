"""HCAM (Lampinen et al., 2021) as a memarch sequence mixer: local attention plus hierarchical chunk memory.

``HCAMBlock`` is the mixer the LM puts in ``x + mixer(RMSNorm(x))`` (spec ``hcam.md`` §7; the LM adds the MLP)::

    a = LocalAttn(u)                   causal sliding window >= C, KV cache bounded by the window
    h = u + a;   z = RMSNorm(h)
    y = a + HCAMRead(z, memory)        memory = this layer's past z's (or h's), cut into chunks of C
    memory <- write(z)                 a chunk is written when its C-th vector arrives

so the LM computes ``x + a + HCAM(RMSNorm(u + a))`` with ``u = RMSNorm(x)``.

What comes from where:

  * **Paper / reference** (DeepMind's released read module, re-derived, no code copied): the read (chunk means,
    single-head relevance, top-k, softmax over the k, MHA inside the chosen chunks with a reversed sinusoidal
    in-chunk code, relevance-weighted sum, stop-gradient into memory), variance-scaling-2.0 initialisation, zero
    biases, and "an HCAM block in each layer" with the result added to a residual.
  * **Ours:** everything about writing (never released), the block layout, and streaming:

      - *Which chunks a query reads.* Only completed chunks that ended before it, of its own document, still in the
        FIFO buffer (:func:`memarch.ops.hcam.write_memory`). Chunks are cut at in-document offsets that are
        multiples of ``C`` (so a packed document chunks exactly as it would alone); a document's unfinished last
        chunk is never written.
      - *The partially filled current chunk* is never read through HCAM: the local window (``window >= C``) covers
        every token of it (for query ``t`` at in-chunk offset ``o <= C - 1``, the chunk start is ``o`` steps back),
        and the chunk that ``t`` itself completes is also still inside the window. So no step is missed, nothing
        leaks from the future, and full forward == chunk-by-chunk == token-by-token exactly (up to float rounding).
      - *Bounded state.* A query reads at most ``max_chunks`` chunks, with FIFO eviction (the oldest leaves when a
        new one arrives at capacity); within one long call, a query also cannot read chunks that streaming would
        have evicted by its time, so both forms agree. The chunks live in a ring of ``max_chunks + 1`` slots written
        in place: a decode step writes one chunk slot instead of copying the memory, and the extra slot lets it read
        after writing (:class:`memarch.ops.hcam.HCAMMemory`). Top-k breaks exact score ties by chunk age, not
        slot, so the slot order never matters.
      - *The residual inside the mixer.* The mixer sees only ``u = RMSNorm(x)``, so the HCAM sub-block's pre-norm
        input is ``u + a`` rather than the spec's ``x + a`` (RMSNorm removes the scale of ``x``; the two differ in
        the relative weight of ``a``). Building the block without the LM's pre-norm would need the LM to call the
        mixer on the raw stream.
"""

from __future__ import annotations

from typing import NamedTuple

import flax.linen as nn
import jax.numpy as jnp

from memarch.layers.attention import KVCache, MultiHeadAttention
from memarch.layers.common import DType, RMSNorm, as_dtype, variance_scaling
from memarch.ops import hcam as hcam_ops
from memarch.ops.hcam import HCAMMemory, HCAMPath
from memarch.typing import Array


class HCAMRead(nn.Module):
  """The HCAM read with its own weights (spec §3): ``out_t = sum_r w_tr MHA(x_t, X~_{I_tr})``.

  Owns the reference's parameters (names of :class:`memarch.ops.hcam.HCAMParams`) and calls
  :func:`memarch.ops.hcam.hcam_read`; usable on any chunked memory, e.g. a user-supplied one with ``slot_mask``.

  Attributes:
    num_heads: heads of the within-chunk attention (the reference's default is 1).
    head_dim: per-head width (default ``output width // num_heads``).
    top_k: chunks each query attends inside.
    out_features: output (and relevance) width ``F`` (None: the query width).
    path: compute path (``auto``, ``block_dense``, ``gather_projected``, ``gather_raw``).
    stop_gradient_memory: stop gradients into the memory (the reference's behaviour).
    use_position_code: add the reversed in-chunk position code to the memory.
    w_init_variance_scale: variance-scaling multiplier of every weight (the reference uses 2.0).
    dtype: computation dtype (None: promoted input dtype).
    param_dtype: parameter dtype.
  """
  num_heads: int
  head_dim: int | None = None
  top_k: int = 4
  out_features: int | None = None
  path: HCAMPath | str = HCAMPath.AUTO
  stop_gradient_memory: bool = True
  use_position_code: bool = True
  w_init_variance_scale: float = 2.0
  dtype: DType = None
  param_dtype: DType = jnp.float32

  @nn.compact
  def __call__(self, queries: Array, contents: Array, mask: Array, *, slot_mask: Array | None = None,
               keys: Array | None = None, chunk_order: Array | None = None) -> Array:
    """Reads ``contents`` for every query.

    Args:
      queries: [b, q, E] raw queries.
      contents: [b, M, C, D] memory chunks.
      mask: [b, q, M] True where a query may read a chunk.
      slot_mask: [b, M, C] True where a chunk slot is filled (None: all are).
      keys: [b, M, D] chunk means kept with the memory (None: reduced from ``contents`` here).
      chunk_order: [b, M] permutation of the chunks that breaks exact top-k score ties, first preferred (None: the
        lower index; :func:`memarch.ops.hcam.write_memory` gives the chronological order of its ring buffer).

    Returns:
      [b, q, F] relevance-weighted sum of the within-chunk attention outputs (zero where nothing is readable).
    """
    e, d = queries.shape[-1], contents.shape[-1]
    f = self.out_features or e
    h = self.num_heads
    dk = self.head_dim or f // h
    pd = as_dtype(self.param_dtype)
    s = self.w_init_variance_scale
    w = lambda name, shape, axes, init: self.param(name, nn.with_logical_partitioning(init, axes), shape, pd)
    zeros = nn.initializers.zeros_init()
    params = hcam_ops.HCAMParams(
        summary_query=w("summary_query", (e, f), ("embed", None), variance_scaling(s, in_axis=0, out_axis=1)),
        summary_key=w("summary_key", (d, f), ("embed", None), variance_scaling(s, in_axis=0, out_axis=1)),
        query=w("query", (e, h, dk), ("embed", "heads", "kv"), variance_scaling(s, in_axis=0, out_axis=(1, 2))),
        query_bias=w("query_bias", (h, dk), ("heads", "kv"), zeros),
        key=w("key", (d, h, dk), ("embed", "heads", "kv"), variance_scaling(s, in_axis=0, out_axis=(1, 2))),
        key_bias=w("key_bias", (h, dk), ("heads", "kv"), zeros),
        value=w("value", (d, h, dk), ("embed", "heads", "kv"), variance_scaling(s, in_axis=0, out_axis=(1, 2))),
        value_bias=w("value_bias", (h, dk), ("heads", "kv"), zeros),
        out=w("out", (h, dk, f), ("heads", "kv", "embed"), variance_scaling(s, in_axis=(0, 1), out_axis=2)),
        out_bias=w("out_bias", (f,), ("embed",), zeros))
    queries, contents, *leaves = nn.dtypes.promote_dtype(queries, contents, *params, dtype=as_dtype(self.dtype))
    if self.is_mutable_collection("intermediates"):
      # Optional, for inspection only (``mutable=["intermediates"]``): the chunks each query reads and their
      # relevance weights, ``selection = (weights [b, q, k], indices [b, q, k])`` as the read computes them. The
      # indices are slots of ``contents``: for HCAMBlock's first call (no state) the chunk numbers of the sequence;
      # with a carried state, ring slots (chunk ``i`` at ``i mod (max_chunks + 1)``), then, when ``t > 1``, this
      # call's new chunks in order. Ties are broken by ``chunk_order``, as in the read.
      readable = mask if slot_mask is None else mask & slot_mask.any(-1)[:, None, :]
      means = hcam_ops.chunk_means(contents, slot_mask) if keys is None else keys
      self.sow("intermediates", "selection", hcam_ops.select_chunks(
          hcam_ops.HCAMParams(*leaves), queries, means, readable, self.top_k, chunk_order=chunk_order))
    return hcam_ops.hcam_read(
        hcam_ops.HCAMParams(*leaves), queries, contents, mask, top_k=self.top_k, slot_mask=slot_mask, keys=keys,
        path=self.path, stop_gradient_memory=self.stop_gradient_memory,
        use_position_code=self.use_position_code, chunk_order=chunk_order)


class HCAMState(NamedTuple):
  """State of one :class:`HCAMBlock`, batch-leading.

  Attributes:
    local: the local attention's KV cache (the last ``window - 1`` tokens).
    memory: the chunked memory (:class:`memarch.ops.hcam.HCAMMemory`), float32 by default.
  """
  local: KVCache
  memory: HCAMMemory


class HCAMBlock(nn.Module):
  """Local sliding-window attention plus an HCAM read of this layer's own chunked past (see the module docstring).

  Attributes:
    num_heads: heads of the local attention and of the within-chunk attention.
    head_dim: per-head width (default ``d_model // num_heads``).
    chunk_size: ``C``, vectors per memory chunk.
    top_k: chunks each query attends inside.
    max_chunks: ``M_max``, chunks a query can read (FIFO eviction beyond; the ring has one more slot).
    window: local attention window (None: ``chunk_size``); must be ``>= chunk_size`` so the unfinished chunk is
      always visible locally.
    memory_source: what is stored: ``"normed"`` (the HCAM query ``z``, spec default) or ``"residual"`` (``u + a``,
      the pre-norm stream as the mixer sees it, TrXL-style).
    path: HCAM compute path (``auto``, ``block_dense``, ``gather_projected``, ``gather_raw``).
    stop_gradient_memory: stop gradients into memory (reference behaviour; False is an extension).
    use_position_code: add the reversed in-chunk position code to the memory.
    d_model: model width, needed by ``init_state`` / ``state_size`` on an unbound module (None: from the input).
    rope_max_wavelength: RoPE base of the local attention.
    hcam_init_variance_scale: variance-scaling multiplier of the HCAM weights (the reference's 2.0).
    norm_eps: epsilon of the RMSNorm before the HCAM read.
    dtype: computation dtype (None: promoted input dtype).
    param_dtype: parameter dtype.
    state_dtype: dtype of the KV cache and the memory (float32 by default).
  """
  num_heads: int
  head_dim: int | None = None
  chunk_size: int = 16
  top_k: int = 4
  max_chunks: int = 64
  window: int | None = None
  memory_source: str = "normed"
  path: HCAMPath | str = HCAMPath.AUTO
  stop_gradient_memory: bool = True
  use_position_code: bool = True
  d_model: int | None = None
  rope_max_wavelength: float = 10_000.0
  hcam_init_variance_scale: float = 2.0
  norm_eps: float = 1e-6
  dtype: DType = None
  param_dtype: DType = jnp.float32
  state_dtype: DType = jnp.float32

  def check(self, d_model: int | None = None) -> int:
    """Validates the fields; returns the model width.

    Args:
      d_model: model width (None: the ``d_model`` field).

    Returns:
      The model width.

    Raises:
      ValueError: naming the field that is inconsistent.
    """
    d_model = d_model or self.d_model
    if d_model is None:
      raise ValueError("HCAMBlock: set d_model to call init_state / state_size on an unbound module")
    if self.chunk_size < 1 or self.top_k < 1 or self.max_chunks < 1:
      raise ValueError(f"HCAMBlock: chunk_size={self.chunk_size}, top_k={self.top_k} and "
                       f"max_chunks={self.max_chunks} must be >= 1")
    if self.local_window() < self.chunk_size:
      raise ValueError(f"HCAMBlock: window={self.window} must be >= chunk_size={self.chunk_size}, or the "
                       "unfinished chunk would be out of reach")
    if self.memory_source not in ("normed", "residual"):
      raise ValueError(f"HCAMBlock: memory_source={self.memory_source!r}: expected 'normed' or 'residual'")
    if self.use_position_code and d_model % 2:
      raise ValueError(f"HCAMBlock: the position code needs an even d_model, got {d_model}")
    HCAMPath(self.path)
    return d_model

  def local_window(self) -> int:
    """The local attention window (``window``, default ``chunk_size``)."""
    return self.chunk_size if self.window is None else self.window

  def _local(self, **kwargs) -> MultiHeadAttention:
    return MultiHeadAttention(num_heads=self.num_heads, head_dim=self.head_dim, window=self.local_window(),
                              d_model=self.d_model, rope_max_wavelength=self.rope_max_wavelength,
                              dtype=self.dtype, param_dtype=self.param_dtype, state_dtype=self.state_dtype,
                              **kwargs)

  def init_state(self, batch_size: int, d_model: int | None = None) -> HCAMState:
    """An empty KV window and an empty memory for ``batch_size`` sequences."""
    d = self.check(d_model)
    return HCAMState(
        local=self._local(parent=None).init_state(batch_size, d),
        memory=hcam_ops.init_memory(batch_size, self.max_chunks, self.chunk_size, d, as_dtype(self.state_dtype)))

  def state_size(self, d_model: int | None = None) -> int:
    """Floats of state per sequence: the KV window, the ring's chunks and means, the last ``C - 1`` vectors.

    That is ``window terms + (max_chunks + 1) (C + 1) d + (C - 1) d``: the ring has one slot more than a query reads
    (:class:`memarch.ops.hcam.HCAMMemory`).
    """
    d = self.check(d_model)
    return (self._local(parent=None).state_size(d) + (self.max_chunks + 1) * (self.chunk_size + 1) * d
            + (self.chunk_size - 1) * d)

  def setup(self):
    self.local = self._local()
    self.memory_norm = RMSNorm(eps=self.norm_eps, dtype=self.dtype, param_dtype=self.param_dtype)
    self.read = HCAMRead(num_heads=self.num_heads, head_dim=self.head_dim, top_k=self.top_k, path=self.path,
                         stop_gradient_memory=self.stop_gradient_memory, use_position_code=self.use_position_code,
                         w_init_variance_scale=self.hcam_init_variance_scale, dtype=self.dtype,
                         param_dtype=self.param_dtype)

  def __call__(self, x: Array, *, segment_ids: Array | None = None,
               state: HCAMState | None = None) -> tuple[Array, HCAMState]:
    """Local attention, then an HCAM read of this layer's completed past chunks; writes the new chunks.

    Args:
      x: [b, t, d] inputs (the LM's normed residual stream).
      segment_ids: [b, t] document ids (None: one document, id 0).
      state: state from a previous call (None: start of sequence).

    Returns:
      ``(y, new_state)``: ``y = a + HCAM(z)`` [b, t, d] (the LM adds it to its residual) and the state after the
      last token.
    """
    b, t, d = x.shape
    self.check(d)
    fresh = state is None
    if fresh:
      state = self.init_state(b, d)
    if segment_ids is None:
      segment_ids = jnp.zeros((b, t), jnp.int32)
    a, local = self.local(x, segment_ids=segment_ids, state=None if fresh else state.local)
    h = x + a
    z = self.memory_norm(h)
    contents, keys, mask, order, memory = hcam_ops.write_memory(
        state.memory, z if self.memory_source == "normed" else h, segment_ids.astype(jnp.int32), fresh=fresh)
    y = a + self.read(z, contents, mask, keys=keys, chunk_order=order)
    dtype = as_dtype(self.dtype) or x.dtype
    y = nn.with_logical_constraint(y.astype(dtype), ("act_batch", "act_len", "act_emb"))
    return y, HCAMState(local, memory)
