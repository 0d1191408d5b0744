"""B'MOJO-F and B'MOJO (Zancato et al., 2024) as memarch sequence mixers: SWA + Mamba-2 + an eidetic store.

One layer holds three memories (spec ``bmojo.md`` §2-§4)::

    s        = Mamba2(x)                                  fading memory, full width (after its out_proj)
    q, k, v  = x W_q, x W_k, x W_v                        in-context: the W most recent tokens
    q̃, k̃, ṽ = x W_q', s W_k', s W_v'                     fading keys at [t-2W+1, t-W]  (W' = W when tied)
    store    = innovation-selected past tokens            long-term eidetic memory (B'MOJO only)
    y_t      = softmax over all of them, one softmax  ·  W_o      the SSM output only supplies keys / values

:class:`BMojoF` is hybrid-model-factory's B'MOJO-F [hmf]: window + SSM-derived keys, tied weights by default, RoPE
at absolute positions on both paths. :class:`BMojo` adds the eidetic store of spec §4, which is **our design**
(the paper's store was never released; only "innovation-selected, bounded, causal, asynchronous" is confirmed):

  * innovation ``e_t = ‖sg(LN(x_t)) P_u − s_{t−1} P_s‖²`` with ``P_u`` fixed (the identity, or a fixed random
    projection to ``innovation_dim``) and the probe ``P_s`` trained by ``L_aux = aux_weight · mean_t e_t``
    (``innovation="ssm_residual"``; ``"key_novelty"`` and ``"external"`` are the spec's alternatives);
  * per chunk of ``C`` tokens of one document the ``k_sel`` highest scores are written, visible from the next
    chunk on; a FIFO of the last ``M / k_sel`` chunks bounds the store at ``M`` entries; entries still in the
    window are masked;
  * the auxiliary loss reaches the probe without a second output: its gradient is injected through ``W_o``
    (:func:`memarch.ops.bmojo.add_aux_gradient`), i.e. training minimises ``loss + L_aux``.

The state is bounded whatever the sequence length: the Mamba-2 state (conv tail + SSM), the last ``W − 1``
in-context and ``2W − 1`` fading keys / values, the ``C − 1`` candidates of the unfinished chunk, the ``M`` store
entries and the last SSM output (B'MOJO; with key novelty, the unit keys of the memory's slots instead). One call is
the block-banded form; ``t == 1`` is the step form.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from memarch.layers.common import DType, as_dtype, resolve_sequence_axis, variance_scaling
from memarch.layers.mamba2 import Mamba2, Mamba2State
from memarch.ops import attention as attn_ops
from memarch.ops import bmojo as bmojo_ops
from memarch.ops import sequence_parallel
from memarch.typing import Array


class BMojoState(NamedTuple):
  """Recurrent state of one B'MOJO(-F) layer, batch-leading, float32 by default.

  Attributes:
    ssm: the Mamba-2 state (conv tail and SSM state).
    memory: window, fading and eidetic-store keys / values with their positions (:class:`BMojoMemory`).
    s_last: [b, d_model] SSM output of the last token, whose probe output predicts the next token (B'MOJO);
      [b, 0] for B'MOJO-F and the other innovation scores.
    novelty: the unit pre-RoPE keys of the memory's slots (:class:`memarch.ops.bmojo.NoveltyKeys`), carried so that
      a call un-rotates only its own keys (B'MOJO with ``innovation="key_novelty"``); [b, 0, 0] each otherwise.
  """
  ssm: Mamba2State
  memory: bmojo_ops.BMojoMemory
  s_last: Array
  novelty: bmojo_ops.NoveltyKeys


class BMojoF(nn.Module):
  """B'MOJO-F [hmf]: one softmax over the W most recent tokens and W keys / values derived from a Mamba-2 output.

  Attributes:
    num_heads: query heads.
    window: ``W``: in-context span; the fading span is ``[t − 2W + 1, t − W]``.
    head_dim: per-head width (default ``d_model // num_heads``).
    num_kv_heads: key / value heads (default ``num_heads``; fewer gives GQA).
    d_model: model width (needed by ``init_state`` / ``state_size`` on an unbound module).
    tie_attn_weights: use ``W_q, W_k, W_v`` for the fading path too (hmf's default); False adds ``q_fade``,
      ``k_fade``, ``v_fade``.
    d_state: Mamba-2 state width ``N``.
    expand: Mamba-2 ``d_inner = expand · d_model``.
    ssm_head_dim: Mamba-2 head width ``P`` (None: ``min(64, d_inner)``).
    conv_width: Mamba-2 causal conv taps.
    ssm_chunk_size: chunk length of the chunked SSD form.
    query_block: at most this many queries per sub-block of the in-context / fading read (None: automatic, see
      :func:`memarch.ops.bmojo.query_block_size`); a speed knob, the output does not depend on it.
    use_rope: rotate queries and keys by their absolute positions (both paths).
    rope_max_wavelength: RoPE base.
    qk_norm: per-head RMS norm of every query and key before RoPE, with learned gains ``1 + q_norm`` and
      ``1 + k_norm`` [head_dim] (spec §3's option): the in-context and the fading path (and so the store's keys)
      share them. It bounds every logit by ``√D_h · max|1 + q_norm| · max|1 + k_norm|``, whatever the scale of the
      projections. Off by default: on MQAR it kept B'MOJO on the 1 / kv plateau (README, Results).
    w_init_variance_scale: variance multiplier of the q / k / v projections' initialiser.
    dtype: computation dtype (None: promoted input dtype).
    param_dtype: parameter dtype.
    state_dtype: dtype of the carried state (float32 by default).
    sequence_axis: mesh axis (of the mesh set by ``jax.set_mesh``) to split the sequence over for ``t > 1`` (None: the
      axis the ``act_len`` logical rule names on the current mesh, if any; unsharded without one). The Mamba-2 runs
      with the same ``sequence_axis``; each shard builds its read memory from halos of ``W − 1`` in-context and
      ``2W − 1`` fading keys (and, with a store, ``C − 1`` candidates and an all-gather of the store each preceding
      shard writes), see
      :func:`memarch.ops.sequence_parallel.bmojo_attention_sequence_parallel` and spec §5.5. ``t`` must be divisible
      by the axis size. The state passed in / returned is the one before / after the global sequence.
  """
  num_heads: int
  window: int
  head_dim: int | None = None
  num_kv_heads: int | None = None
  d_model: int | None = None
  tie_attn_weights: bool = True
  d_state: int = 64
  expand: int = 2
  ssm_head_dim: int | None = None
  conv_width: int = 4
  ssm_chunk_size: int = 64
  query_block: int | None = None
  use_rope: bool = True
  rope_max_wavelength: float = 10_000.0
  qk_norm: bool = False
  w_init_variance_scale: float = 1.0
  dtype: DType = None
  param_dtype: DType = jnp.float32
  state_dtype: DType = jnp.float32
  sequence_axis: str | None = None

  # -- configuration -------------------------------------------------------------------------------------------

  def store_config(self) -> tuple[int, int, int]:
    """``(chunk_size, k_sel, memory_size)`` of the eidetic store; ``memory_size == 0``: none (B'MOJO-F)."""
    return max(self.window, 1), 1, 0

  def dims(self, d_model: int | None = None) -> tuple[int, int, int]:
    """``(num_heads, num_kv_heads, head_dim)``, validating the fields.

    Args:
      d_model: model width (None: the ``d_model`` field).

    Returns:
      The attention head counts and width.

    Raises:
      ValueError: naming the field that makes the shapes inconsistent.
    """
    d_model = d_model or self.d_model
    head_dim = self.head_dim
    if head_dim is None:
      if d_model is None:
        raise ValueError(f"{type(self).__name__}: set head_dim or d_model to build the state of an unbound module")
      head_dim = d_model // self.num_heads
    kv = self.num_kv_heads or self.num_heads
    if self.num_heads % kv:
      raise ValueError(f"{type(self).__name__}: num_heads={self.num_heads} is not a multiple of num_kv_heads={kv}")
    if self.use_rope and head_dim % 2:
      raise ValueError(f"{type(self).__name__}: head_dim={head_dim} must be even for RoPE")
    bmojo_ops.check_config(self.window, *self.store_config(), self._bound())
    return self.num_heads, kv, head_dim

  def check(self, d_model: int | None = None) -> None:
    """Raises a ValueError naming the field when the layer cannot be built for width ``d_model``."""
    d_model = d_model or self.d_model
    self.dims(d_model)
    self._ssm(parent=None).dims(d_model)

  def _ssm(self, **kwargs) -> Mamba2:
    return Mamba2(d_model=self.d_model, d_state=self.d_state, expand=self.expand, head_dim=self.ssm_head_dim,
                  conv_width=self.conv_width, chunk_size=self.ssm_chunk_size, dtype=self.dtype,
                  param_dtype=self.param_dtype, state_dtype=self.state_dtype, **kwargs)

  def init_state(self, batch_size: int, d_model: int | None = None) -> BMojoState:
    """The state before the first token: empty window, fading and store slots, zero SSM state.

    Args:
      batch_size: number of sequences.
      d_model: model width (None: the ``d_model`` field).

    Returns:
      A :class:`BMojoState`.
    """
    d_model = d_model or self.d_model
    _, kv, e = self.dims(d_model)
    if d_model is None:
      raise ValueError(f"{type(self).__name__}: set d_model to build the state of an unbound module")
    c, k_sel, m = self.store_config()
    sd = as_dtype(self.state_dtype)
    memory = bmojo_ops.init_memory(batch_size, window=self.window, chunk_size=c, k_sel=k_sel, memory_size=m,
                                   kv_heads=kv, head_dim=e, dtype=sd, bound=self._bound())
    ssm = self._ssm(parent=None).init_state(batch_size, d_model)
    slots = lambda z: (batch_size, z.k.shape[1], kv * e) if self._keeps_novelty_keys() else (batch_size, 0, 0)
    novelty = bmojo_ops.NoveltyKeys(*(jnp.zeros(slots(z), sd) for z in (memory.context, memory.candidates,
                                                                         memory.store)))
    return BMojoState(ssm, memory, jnp.zeros((batch_size, d_model if self._keeps_s_last() else 0), sd), novelty)

  def state_size(self, d_model: int | None = None) -> int:
    """Floats of state per sequence: the Mamba-2 state, ``(3W − 2) · 2 · kv_heads · head_dim`` window and fading
    keys / values, and for B'MOJO ``(M + C − 1)`` store / candidate keys, values and scores plus ``d_model`` (the
    SSM-residual innovation) or ``(W − 1 + C − 1 + M) · kv_heads · head_dim`` unit keys (key novelty)."""
    d_model = d_model or self.d_model
    _, kv, e = self.dims(d_model)
    c, _, m = self.store_config()
    n = self._ssm(parent=None).state_size(d_model) + (3 * self.window - 2) * 2 * kv * e
    if m:
      n += (m + c - 1) * (2 * kv * e + 1) + (d_model if self._keeps_s_last() else 0)
    if self._keeps_novelty_keys():
      n += (self.window - 1 + c - 1 + m) * kv * e
    return n

  # -- forward -------------------------------------------------------------------------------------------------

  def _proj(self, name: str, d: int, heads: int, e: int) -> Array:
    init_in = variance_scaling(self.w_init_variance_scale, in_axis=0, out_axis=(1, 2))
    return self.param(name, nn.with_logical_partitioning(init_in, ("embed", "heads", "kv")), (d, heads, e),
                      as_dtype(self.param_dtype))

  def _rope(self, z: Array, positions: Array) -> Array:
    return attn_ops.rope(z, positions, max_wavelength=self.rope_max_wavelength) if self.use_rope else z

  def _qk_norm(self, name: str, e: int):
    """With ``qk_norm``: ``z ↦ z / rms(z) · (1 + gain)`` over the head width (float32 statistics); else identity."""
    if not self.qk_norm:
      return lambda z: z
    gain = self.param(name, nn.with_logical_partitioning(nn.initializers.zeros_init(), ("kv",)), (e,),
                      as_dtype(self.param_dtype))

    def norm(z: Array) -> Array:
      z32 = z.astype(jnp.float32)
      y = z32 * jax.lax.rsqrt(jnp.mean(z32 * z32, axis=-1, keepdims=True) + 1e-6)
      return (y * (1.0 + gain.astype(jnp.float32))).astype(z.dtype)
    return norm

  def _innovation(self, x: Array, s: Array, k: Array, state: BMojoState, segment_ids: Array,
                  external: Array | None):
    """Scores, the auxiliary loss and the carried novelty keys; B'MOJO-F has no scores and no loss."""
    del x, s, k, segment_ids
    if external is not None:
      raise ValueError(f"{type(self).__name__}: innovation_scores are only read by BMojo with "
                       "innovation='external'")
    return None, None, state.novelty

  def _selector_bias(self, num_heads: int):
    """``(γ, τ)`` of the store-logit bias (B'MOJO option); B'MOJO-F has no store."""
    del num_heads
    return None

  def _bound(self) -> str:
    """The store's eviction rule (B'MOJO option); B'MOJO-F has no store."""
    return "fifo"

  def _keeps_s_last(self) -> bool:
    """Whether the state carries the last SSM output (the SSM-residual innovation predicts from it)."""
    return False

  def _keeps_novelty_keys(self) -> bool:
    """Whether the state carries the unit keys of the memory's slots (the key-novelty innovation compares them)."""
    return False

  @nn.compact
  def __call__(self, x: Array, *, segment_ids: Array | None = None, state: BMojoState | None = None,
               innovation_scores: Array | None = None) -> tuple[Array, BMojoState]:
    """Runs the layer over ``x`` from ``state``.

    Args:
      x: [b, t, d] inputs.
      segment_ids: [b, t] document ids (None: one document).
      state: state from a previous call (None: :meth:`init_state`).
      innovation_scores: [b, t] per-token scores supplied by the caller: read only by B'MOJO with
        ``innovation="external"`` (required there, rejected elsewhere).

    Returns:
      ``(y, new_state)``: output [b, t, d] and the state after the last token.
    """
    b, t, d = x.shape
    h, kv, e = self.dims(d)
    c, k_sel, _ = self.store_config()
    dtype = as_dtype(self.dtype)
    fresh = state is None
    if fresh:
      state = self.init_state(b, d)
    seg = jnp.zeros((b, t), jnp.int32) if segment_ids is None else segment_ids.astype(jnp.int32)

    sequence_axis = resolve_sequence_axis(self.sequence_axis)
    s, ssm_state = self._ssm(name="ssm", sequence_axis=sequence_axis)(
        x, segment_ids=segment_ids, state=state.ssm)
    wq, wk, wv = self._proj("q", d, h, e), self._proj("k", d, kv, e), self._proj("v", d, kv, e)
    wo = self.param("o", nn.with_logical_partitioning(
        variance_scaling(1.0, in_axis=(0, 1), out_axis=2), ("heads", "kv", "embed")), (h, e, d),
        as_dtype(self.param_dtype))
    fade_w = () if self.tie_attn_weights else (
        self._proj("q_fade", d, h, e), self._proj("k_fade", d, kv, e), self._proj("v_fade", d, kv, e))
    x_c, s_c, wq, wk, wv, *fade_w = nn.dtypes.promote_dtype(x, s, wq, wk, wv, *fade_w, dtype=dtype)
    wqf, wkf, wvf = fade_w if fade_w else (None, wk, wv)

    positions = state.memory.length[:, None] + jnp.arange(t, dtype=jnp.int32)[None]
    q_norm, k_norm = self._qk_norm("q_norm", e), self._qk_norm("k_norm", e)
    q = self._rope(q_norm(jnp.einsum("btd,dhe->bthe", x_c, wq)), positions)
    k = self._rope(k_norm(jnp.einsum("btd,dhe->bthe", x_c, wk)), positions)
    v = jnp.einsum("btd,dhe->bthe", x_c, wv)
    k_fade = self._rope(k_norm(jnp.einsum("btd,dhe->bthe", s_c, wkf)), positions)
    v_fade = jnp.einsum("btd,dhe->bthe", s_c, wvf)
    q_fade = None if wqf is None else self._rope(q_norm(jnp.einsum("btd,dhe->bthe", x_c, wqf)), positions)

    score, aux_loss, novelty = self._innovation(x, s, k, state, seg, innovation_scores)
    if sequence_axis is not None and t > 1:  # halos, offset prefix and the store band (spec §5.5)
      out, memory = sequence_parallel.bmojo_attention_sequence_parallel(
          q, k, v, k_fade, v_fade, state.memory, window=self.window, axis_name=sequence_axis,
          segment_ids=seg, score=score, q_fade=q_fade, chunk_size=c, k_sel=k_sel, query_block=self.query_block,
          selector_bias=self._selector_bias(h), bound=self._bound())
    else:
      out, memory = bmojo_ops.bmojo_attention(
          q, k, v, k_fade, v_fade, state.memory, window=self.window, segment_ids=seg, score=score, q_fade=q_fade,
          chunk_size=c, k_sel=k_sel, fresh=fresh, query_block=self.query_block,
          selector_bias=self._selector_bias(h), bound=self._bound())
    if aux_loss is not None:
      wo = bmojo_ops.add_aux_gradient(wo, aux_loss)
    (wo,) = nn.dtypes.promote_dtype(wo, dtype=dtype)
    y = jnp.einsum("bthe,hed->btd", out.astype(wo.dtype), wo)
    sd = as_dtype(self.state_dtype)
    s_last = s[:, -1].astype(sd) if state.s_last.shape[-1] else state.s_last
    return y.astype(dtype or x.dtype), BMojoState(ssm_state, memory, s_last, novelty)


def _fixed_projection(d: int, d_e: int | None, seed: int) -> Array | None:
  """``P_u``: None (identity) or a fixed, non-trainable random ``[d, d_e]`` projection (spec §4.1)."""
  if d_e is None:
    return None
  return jax.random.normal(jax.random.key(seed), (d, d_e), jnp.float32) / math.sqrt(d)


class BMojo(BMojoF):
  """Full B'MOJO: B'MOJO-F plus the innovation-selected eidetic store (spec §4, our design; see the module doc).

  Attributes:
    chunk_size: selection chunk ``C`` (None: ``window``).
    k_sel: entries written per complete chunk (None: ``min(4, C)``); ``1 <= k_sel <= C``.
    memory_size: store bound ``M`` (None: ``16 · k_sel``); a multiple of ``k_sel``.
    innovation: how tokens are scored for the store (spec §4.1): ``"ssm_residual"`` (the paper-consistent default:
      ``‖sg(LN(x_t)) P_u − s_{t−1} P_s‖²``, with the probe and ``L_aux``), ``"key_novelty"`` (``1 − max cos`` of
      the token's pre-RoPE key with the window's and the visible store's keys,
      :func:`memarch.ops.bmojo.key_novelty_score`; no parameters, no auxiliary loss) or ``"external"`` (the
      caller's ``innovation_scores`` [b, t], e.g. a surprisal; no auxiliary loss).
    innovation_dim: width ``d_e`` of the SSM-residual test (None: ``d_model`` with ``P_u`` the identity; else a
      fixed random projection).
    innovation_seed: seed of the fixed random ``P_u``.
    aux_weight: ``λ_aux`` of ``L_aux = λ_aux · mean_t e_t``, which trains the probe ``P_s``; 0 leaves it at init.
    aux_grad_to_ssm: let ``L_aux`` also train the SSM (s is then not stop-gradiented in ``L_aux``). Forward-mode
      Jacobians with respect to the inputs need False.
    selector_bias: add ``log σ(γ_h (e_i − τ_h))`` to every store logit (spec §4.7, [ours]): params
      ``selector_gamma`` / ``selector_tau`` [heads], init 0; the scores then carry the bias's gradient into the probe
      ``P_s`` (and into the SSM with ``aux_grad_to_ssm``), so attention usage also trains the selector.
    bound: eviction rule of the store (spec §4.4): ``"fifo"`` (the last ``M / k_sel`` chunks' entries; needs
      ``k_sel | M``) or ``"top_m"`` (the ``M`` best-scored entries of the document so far; a scan over the chunks).
  """
  chunk_size: int | None = None
  k_sel: int | None = None
  memory_size: int | None = None
  innovation: str = "ssm_residual"
  innovation_dim: int | None = None
  innovation_seed: int = 0
  aux_weight: float = 0.1
  aux_grad_to_ssm: bool = False
  selector_bias: bool = False
  bound: str = "fifo"

  def store_config(self) -> tuple[int, int, int]:
    """``(C, k_sel, M)`` with the defaults resolved (``C = W``, ``k_sel = min(4, C)``, ``M = 16 k_sel``)."""
    c = self.window if self.chunk_size is None else self.chunk_size
    k_sel = min(4, c) if self.k_sel is None else self.k_sel
    m = 16 * k_sel if self.memory_size is None else self.memory_size
    if m < 1:
      raise ValueError(f"BMojo: memory_size={m} must be >= 1 (use BMojoF for no store)")
    if self.innovation not in bmojo_ops.INNOVATIONS:
      raise ValueError(f"BMojo: innovation={self.innovation!r} must be one of {bmojo_ops.INNOVATIONS}")
    return c, k_sel, m

  def _keeps_s_last(self) -> bool:
    return self.innovation == "ssm_residual"

  def _keeps_novelty_keys(self) -> bool:
    return self.innovation == "key_novelty"

  def _innovation(self, x: Array, s: Array, k: Array, state: BMojoState, segment_ids: Array,
                  external: Array | None):
    """The scores the selection ranks, ``L_aux`` and the carried novelty keys (spec §4.1; ``innovation`` picks
    the score).

    ``ssm_residual``: ``e_t = ‖sg(LN(x_t)) P_u − s_{t−1} P_s‖²`` (stop-gradient scores unless ``selector_bias``)
    and ``L_aux = aux_weight · mean_t e_t``. ``key_novelty``: :func:`memarch.ops.bmojo.key_novelty_score` of the
    keys ``k`` (no gradient, no ``L_aux``). ``external``: the caller's ``innovation_scores`` (no ``L_aux``; with
    ``selector_bias`` their gradient is the caller's business).
    """
    b, t, d = x.shape
    if self.innovation != "external" and external is not None:
      raise ValueError(f"BMojo: innovation_scores are only read with innovation='external' (got "
                       f"innovation={self.innovation!r})")
    if self.innovation == "external":
      if external is None:
        raise ValueError("BMojo: innovation='external' needs innovation_scores [b, t] in the call")
      if external.shape != (b, t):
        raise ValueError(f"BMojo: innovation_scores must be [b={b}, t={t}], got {list(external.shape)}")
      e = external.astype(jnp.float32)
      self.sow("intermediates", "innovation", jax.lax.stop_gradient(e))
      return (e if self.selector_bias else jax.lax.stop_gradient(e)), None, state.novelty
    if self.innovation == "key_novelty":
      c, k_sel, _ = self.store_config()
      e, novelty = bmojo_ops.key_novelty_score(
          k, state.memory, window=self.window, chunk_size=c, k_sel=k_sel, segment_ids=segment_ids,
          bound=self.bound, rope_max_wavelength=self.rope_max_wavelength if self.use_rope else None,
          query_block=self.query_block, keys=state.novelty)
      self.sow("intermediates", "innovation", e)
      return e, None, novelty
    d_e = self.innovation_dim or d
    probe = self.param("innovation_probe", nn.with_logical_partitioning(
        variance_scaling(1.0, in_axis=0, out_axis=1), ("embed", None)), (d, d_e), as_dtype(self.param_dtype))
    probe = probe.astype(jnp.float32)
    x32 = jax.lax.stop_gradient(x.astype(jnp.float32))
    mu = jnp.mean(x32, axis=-1, keepdims=True)
    xn = (x32 - mu) * jax.lax.rsqrt(jnp.mean((x32 - mu) ** 2, axis=-1, keepdims=True) + 1e-5)
    p_u = _fixed_projection(d, self.innovation_dim, self.innovation_seed)
    target = xn if p_u is None else xn @ p_u
    s32, s_prev = s.astype(jnp.float32), state.s_last.astype(jnp.float32)
    if not self.aux_grad_to_ssm:
      s32, s_prev = jax.lax.stop_gradient(s32), jax.lax.stop_gradient(s_prev)
    _, starts = bmojo_ops.document_offsets(segment_ids, state.memory.last_segment, state.memory.offset)
    e = bmojo_ops.innovation_score(target, s32 @ probe, s_prev @ probe, starts)
    aux = self.aux_weight * jnp.mean(e) if self.aux_weight else None
    # For inspection only (``mutable=["intermediates"]``): the per-token innovation scores the selection ranks.
    self.sow("intermediates", "innovation", jax.lax.stop_gradient(e))
    return (e if self.selector_bias else jax.lax.stop_gradient(e)), aux, state.novelty

  def _bound(self) -> str:
    return self.bound

  def _selector_bias(self, num_heads: int):
    """``(γ, τ)`` [h] each, both initialised to 0 (a constant ``log ½`` on every store logit at init)."""
    if not self.selector_bias:
      return None
    init = nn.with_logical_partitioning(nn.initializers.zeros, ("heads",))
    return (self.param("selector_gamma", init, (num_heads,), jnp.float32),
            self.param("selector_tau", init, (num_heads,), jnp.float32))
