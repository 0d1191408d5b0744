"""Pure-JAX core of the Titans neural long-term memory (LMM).

Behrouz, Zhong, Mirrokni, *Titans: Learning to Memorize at Test Time*, arXiv 2501.00663v1. Equation numbers
refer to v1; section numbers of the form "spec §x" refer to the memarch developer spec `spec/titans.md`.

The memory is a small MLP f(W; z) per head whose fast weights W are trained at test time on the associative loss
(eq. 12) with momentum (eq. 14) and weight decay (eq. 13). This module has no Flax import (CONVENTIONS C1): the
learned initial memory W_0 and the LayerNorm of the `residual_norm` wrapper are plain pytrees that the layer
turns into Flax params; the fast weights and the momentum are explicit fp32 state (C2).

Three forms share one semantics (spec §2.2, §2.3, §4):

* `lmm_reference`: the naive per-token loop, the ground truth;
* `lmm_chunked`: the chunked parallel form (spec §3, eqs. 16-18) with per-token momentum and decay folded
  exactly into each chunk (spec §3.4), a `lax.scan` over chunks and `jax.checkpoint` on the chunk body;
* `lmm_step`: the T == 1 decode step, which is `lmm_chunked` with one token.

Design notes [ours]: the scan runs over chunks, carrying the window-start weights M_ref, so a window of
n = b / c > 1 chunks is processed chunk by chunk (its gradients are still all taken at M_ref, eq. 16); the
window-parallel variant of spec §3.2 (vmap over the n chunks plus an associative scan) and the dual form of
spec §3.5 (token-level reads inside a chunk without per-token weights) are not implemented: reads are
chunk-granular as in spec §2.3, and c = 1 gives token-level reads. Document starts may be at any multiple of
c (spec §4 asks only for multiples of b): they restart the gradient window of that sequence. The chunk's
weighted surprise sums are written out (`_chunk_surprises`): one forward and one backward pass of the memory MLP
serve all weightings, instead of a VJP per weighting.

Shapes: q, k, v are [B, T, H, d]; theta, eta, alpha are [B, T, H]; segment_ids and mask are [B, T]. Every
fast-weight leaf of the state is [B, H, ...].
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
PyTree = Any

_WRAPS = ("none", "residual", "residual_norm")
_ACTIVATIONS = ("gelu", "silu")


# ----------------------------------------------------------------------------------------------------------------
# Configuration, parameters and state.
# ----------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LMMConfig:
  """Static configuration of the long-term memory and of its test-time update.

  Hashable, so it can be closed over or passed as a static argument under `jax.jit`.

  Attributes:
    depth: Number of linear layers L_M >= 1 of the memory MLP (spec §2.5). L_M = 1 is the matrix memory f(z) = z W.
    expansion: Hidden width of the MLP as a multiple of the head width (ignored for L_M = 1).
    activation: Hidden activation, "gelu" (exact erf form) or "silu".
    wrap: "none" (f = MLP), "residual" (f(z) = z + MLP(z)) or "residual_norm" (f(z) = z + LN(MLP(z)), with an
      outer-loop LayerNorm scale and offset per head). `None` picks the spec default: "none" for L_M = 1 and
      "residual_norm" otherwise.
    use_bias: Whether the MLP layers have (fast-weight) biases.
    norm_eps: Epsilon of the `residual_norm` LayerNorm.
    chunk_size: c, the granularity at which weights are materialised and read (spec §2.3, §3.1).
    ttt_batch_size: b, the TTT gradient window (eq. 16): every surprise inside a window is taken at the
      window-start weights. Must be a multiple of `chunk_size`; `None` means b = c.
    retrieve_offset: o in {0, 1}. Token t (1-based) reads M at tau(t) = c * floor((t - 1 + o) / c) (spec §2.3).
    inner_loss_scale: s in l_t(W) = s * sum_j (f(W; k_t) - v_t)_j^2 (eq. 12 has s = 1, App. C has s = 1/2).
    max_grad_norm: tau of the per-chunk, per-head soft clamp g <- g * tau * tanh(|g| / tau) / |g| of spec §9,
      applied to the theta-weighted chunk surprise g = sum_m theta_m u_m; `None` disables it (spec default).
  """

  depth: int = 2
  expansion: int = 4
  activation: str = "gelu"
  wrap: str | None = None
  use_bias: bool = False
  norm_eps: float = 1e-6
  chunk_size: int = 64
  ttt_batch_size: int | None = None
  retrieve_offset: int = 1
  inner_loss_scale: float = 0.5
  max_grad_norm: float | None = None

  def __post_init__(self):
    if self.depth < 1:
      raise ValueError(f"depth must be >= 1, got {self.depth}.")
    if self.wrap is None:
      object.__setattr__(self, "wrap", "none" if self.depth == 1 else "residual_norm")
    if self.wrap not in _WRAPS:
      raise ValueError(f"wrap must be one of {_WRAPS}, got {self.wrap!r}.")
    if self.activation not in _ACTIVATIONS:
      raise ValueError(f"activation must be one of {_ACTIVATIONS}, got {self.activation!r}.")
    if self.chunk_size < 1:
      raise ValueError(f"chunk_size must be >= 1, got {self.chunk_size}.")
    if self.ttt_batch_size is None:
      object.__setattr__(self, "ttt_batch_size", self.chunk_size)
    if self.ttt_batch_size % self.chunk_size:
      raise ValueError(
          f"ttt_batch_size ({self.ttt_batch_size}) must be a multiple of chunk_size ({self.chunk_size}).")
    if self.retrieve_offset not in (0, 1):
      raise ValueError(f"retrieve_offset must be 0 or 1, got {self.retrieve_offset}.")
    if self.max_grad_norm is not None and self.max_grad_norm <= 0:
      raise ValueError(f"max_grad_norm must be positive or None, got {self.max_grad_norm}.")

  @property
  def chunks_per_window(self) -> int:
    """Number n = b / c of chunks in one gradient window."""
    return self.ttt_batch_size // self.chunk_size


class MemoryParams(NamedTuple):
  """Outer-loop (learned) parameters of the memory, one independent copy per head.

  Attributes:
    weights: The initial memory W_0 (spec §2.5): a dict with "w_0" ... "w_{L-1}" of shape (H, d_in, d_out) and,
      with `use_bias`, "b_0" ... of shape (H, d_out).
    norm: For `wrap="residual_norm"`, a dict with the LayerNorm "scale" and "bias", each (H, d); else None.
    momentum: The momentum S that a sequence start or a document start restores, same structure as `weights`;
      None means S = 0 (the paper). A memory that first absorbs a fixed prefix (Titans persistent tokens, spec
      §6) passes the state after that prefix here as (`weights`, `momentum`).
  """

  weights: dict[str, Array]
  norm: dict[str, Array] | None
  momentum: dict[str, Array] | None = None


class MemoryState(NamedTuple):
  """Recurrent state of the LMM (spec §4); every leaf is batch-leading.

  All memory states refer to the last *completed* chunk boundary; the tokens of an incomplete chunk wait in the
  pending buffer, so that any split of a sequence into calls equals one call.

  Attributes:
    weights: Fast weights M at the last completed chunk boundary; the pytree of `MemoryParams.weights` with
      leaves (B, H, ...), float32.
    momentum: Momentum ("surprise") S at the same point; same structure as `weights`.
    ref_weights: M at the start of the current gradient window (eq. 16); equals `weights` unless b > c.
    pending_k: (B, c - 1, H, d) keys of the incomplete chunk (left-aligned; unused slots are zero).
    pending_v: (B, c - 1, H, d) their values.
    pending_gates: (B, c - 1, H, 3) their theta, eta and alpha.
    pending_mask: (B, c - 1) float, 1 for a real pending token and 0 for a masked or unused slot.
    n_pending: (B,) int32, number of tokens in the incomplete chunk (the same for every sequence).
    window_phase: (B,) int32, completed chunks in the current gradient window (0 <= phase < b / c).
    last_segment: (B,) int32, segment id of the last token seen, so a document start at a call boundary is
      detected.
  """

  weights: dict[str, Array]
  momentum: dict[str, Array]
  ref_weights: dict[str, Array]
  pending_k: Array
  pending_v: Array
  pending_gates: Array
  pending_mask: Array
  n_pending: Array
  window_phase: Array
  last_segment: Array


def _layer_widths(head_dim: int, depth: int, expansion: int) -> list[tuple[int, int]]:
  if depth == 1:
    return [(head_dim, head_dim)]
  hidden = expansion * head_dim
  return [(head_dim, hidden)] + [(hidden, hidden)] * (depth - 2) + [(hidden, head_dim)]


def init_memory_params(
    rng: Array,
    num_heads: int,
    head_dim: int,
    depth: int = 2,
    expansion: int = 4,
    *,
    wrap: str | None = None,
    use_bias: bool = False,
    zero_init: bool = False,
    dtype: Any = jnp.float32,
) -> MemoryParams:
  """Initialises the learned initial memory W_0 and the wrapper LayerNorm (spec §2.5).

  Args:
    rng: PRNG key.
    num_heads: H; every head gets an independent memory.
    head_dim: d, the input and output width of the memory.
    depth: L_M, number of layers.
    expansion: Hidden width multiple for L_M >= 2.
    wrap: As `LMMConfig.wrap`; `None` picks the default for `depth`.
    use_bias: Whether to create (zero-initialised) fast-weight biases.
    zero_init: Zero weights instead of Xavier/Glorot-uniform (an option for the linear memory).
    dtype: Parameter dtype.

  Returns:
    The `MemoryParams`; weight leaves have a leading head axis.
  """
  wrap = LMMConfig(depth=depth, expansion=expansion, wrap=wrap).wrap
  widths = _layer_widths(head_dim, depth, expansion)
  keys = jax.random.split(rng, len(widths))
  weights = {}
  for i, ((d_in, d_out), key) in enumerate(zip(widths, keys)):
    if zero_init:
      weights[f"w_{i}"] = jnp.zeros((num_heads, d_in, d_out), dtype)
    else:
      limit = math.sqrt(6.0 / (d_in + d_out))
      weights[f"w_{i}"] = jax.random.uniform(key, (num_heads, d_in, d_out), dtype, -limit, limit)
    if use_bias:
      weights[f"b_{i}"] = jnp.zeros((num_heads, d_out), dtype)
  norm = None
  if wrap == "residual_norm":
    norm = {"scale": jnp.ones((num_heads, head_dim), dtype), "bias": jnp.zeros((num_heads, head_dim), dtype)}
  return MemoryParams(weights=weights, norm=norm)


def init_state(
    params: MemoryParams, batch_size: int, config: LMMConfig, dtype: Any = jnp.float32
) -> MemoryState:
  """The state at sequence start: M = W_0, S = 0 (or `params.momentum`), nothing pending (spec §4).

  Differentiable w.r.t. `params.weights`, which is how W_0 receives its outer gradient.

  Args:
    params: The memory parameters (`weights` and `momentum` are used).
    batch_size: B.
    config: The LMM configuration (gives the chunk size).
    dtype: State dtype; float32 unless a float64 test asks otherwise.

  Returns:
    The initial `MemoryState`.
  """
  bcast = lambda w: jnp.broadcast_to(w.astype(dtype)[None], (batch_size,) + w.shape)
  w0 = jax.tree.map(bcast, params.weights)
  s0 = jax.tree.map(jnp.zeros_like, w0) if params.momentum is None else jax.tree.map(bcast, params.momentum)
  num_heads, head_dim = params.weights["w_0"].shape[:2]
  p = config.chunk_size - 1
  zeros_int = jnp.zeros((batch_size,), jnp.int32)
  return MemoryState(
      weights=w0,
      momentum=s0,
      ref_weights=w0,
      pending_k=jnp.zeros((batch_size, p, num_heads, head_dim), dtype),
      pending_v=jnp.zeros((batch_size, p, num_heads, head_dim), dtype),
      pending_gates=jnp.zeros((batch_size, p, num_heads, 3), dtype),
      pending_mask=jnp.zeros((batch_size, p), dtype),
      n_pending=zeros_int,
      window_phase=zeros_int,
      last_segment=zeros_int,
  )


def state_size(config: LMMConfig, num_heads: int, head_dim: int) -> int:
  """Floats of recurrent state per sequence (weights, momentum, window reference and pending buffer).

  Args:
    config: The LMM configuration.
    num_heads: H.
    head_dim: d.

  Returns:
    The number of state floats per sequence.
  """
  widths = _layer_widths(head_dim, config.depth, config.expansion)
  per_head = sum(a * b + (b if config.use_bias else 0) for a, b in widths)
  pending = (config.chunk_size - 1) * (num_heads * (2 * head_dim + 3) + 1)
  return 3 * num_heads * per_head + pending


# ----------------------------------------------------------------------------------------------------------------
# The memory model and its inner loss (one head; leading axes of z are tokens).
# ----------------------------------------------------------------------------------------------------------------


def apply_memory(weights: dict[str, Array], z: Array, norm: dict[str, Array] | None, config: LMMConfig) -> Array:
  """The memory forward pass f(W; z) of one head (spec §2.5), also the retrieval of eq. 15.

  Args:
    weights: Fast weights of one head: "w_i" (d_in, d_out) and optional "b_i" (d_out,).
    z: Inputs [..., d].
    norm: LayerNorm "scale" and "bias" (d,) for `wrap="residual_norm"`, else None.
    config: The LMM configuration.

  Returns:
    f(W; z), shape [..., d].
  """
  h = z
  for i in range(config.depth):
    h = h @ weights[f"w_{i}"]
    if config.use_bias:
      h = h + weights[f"b_{i}"]
    if i < config.depth - 1:
      h = jax.nn.gelu(h, approximate=False) if config.activation == "gelu" else jax.nn.silu(h)
  if config.wrap == "residual":
    h = z + h
  elif config.wrap == "residual_norm":
    mu = jnp.mean(h, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(h - mu), axis=-1, keepdims=True)
    h = z + (h - mu) * jax.lax.rsqrt(var + config.norm_eps) * norm["scale"] + norm["bias"]
  return h


def inner_loss(weights: dict[str, Array], k: Array, v: Array, norm: dict[str, Array] | None,
               config: LMMConfig) -> Array:
  """Per-token associative loss l_t(W) = s * sum_j (f(W; k_t) - v_t)_j^2 of eq. 12 (spec §2.1, §2.6).

  Args:
    weights: Fast weights of one head.
    k: Keys [..., d].
    v: Values [..., d].
    norm: Wrapper LayerNorm parameters of the head, or None.
    config: The LMM configuration (gives s = `inner_loss_scale`).

  Returns:
    The losses, shape [...].
  """
  r = apply_memory(weights, k, norm, config) - v
  return config.inner_loss_scale * jnp.sum(jnp.square(r), axis=-1)


def _activation_and_grad(h: Array, activation: str) -> tuple[Array, Array]:
  """The hidden activation of `apply_memory` (same ops) and its derivative, both differentiable by JAX."""
  if activation == "gelu":  # gelu(x) = x Phi(x), gelu'(x) = Phi(x) + x phi(x)
    erfc = jax.lax.erfc(-h * np.sqrt(0.5).astype(h.dtype))
    return 0.5 * h * erfc, 0.5 * erfc + h * np.asarray(1.0 / math.sqrt(2.0 * math.pi), h.dtype) * jnp.exp(-0.5 * h * h)
  sig = jax.nn.sigmoid(h)  # silu(x) = x sigma(x), silu'(x) = sigma(x) (1 + x (1 - sigma(x)))
  return h * sig, sig * (1.0 + h * (1.0 - sig))


def _chunk_surprises(weights: dict[str, Array], k: Array, v: Array, cts: Array, norm: dict[str, Array] | None,
                     config: LMMConfig) -> tuple[Array, list[dict[str, Array]]]:
  """Weighted sums of per-token surprises at shared weights, with the MLP's backward pass taken once.

  For weightings w_1 .. w_n of the c tokens this returns g_j = sum_t w_j[t] grad l_t(W) (eq. 12), what `jax.vmap`
  of the VJP of `inner_loss` over the n cotangents gives, written out: the backward pass of the memory MLP is
  linear in the per-token cotangent, so the per-token error signals Delta^l of every layer are computed once
  (cotangent 1 per token) and each weighting only adds its own contraction g_j^l = X^l^T diag(w_j) Delta^l (every
  layer's per-token gradient has rank one, spec §3.5). Plain jnp code, so the outer gradient is JAX's derivative
  of this function (forward and reverse mode).

  Args:
    weights: Fast weights of one head (the window-start weights M_ref).
    k: Keys [c, d].
    v: Values [c, d].
    cts: [n, c] token weightings.
    norm: Wrapper LayerNorm parameters of the head, or None.
    config: The LMM configuration.

  Returns:
    losses: [c] inner losses l_t(W).
    grads: n pytrees shaped like `weights`, g_1 .. g_n.
  """
  inputs, act_grads, h = [], [], k
  for i in range(config.depth):  # the ops of `apply_memory`, keeping what the backward pass needs
    inputs.append(h)
    h = h @ weights[f"w_{i}"]
    if config.use_bias:
      h = h + weights[f"b_{i}"]
    if i < config.depth - 1:
      h, dh = _activation_and_grad(h, config.activation)
      act_grads.append(dh)
  if config.wrap == "residual_norm":
    mu = jnp.mean(h, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(h - mu), axis=-1, keepdims=True)
    rstd = jax.lax.rsqrt(var + config.norm_eps)
    xhat = (h - mu) * rstd
    out = k + xhat * norm["scale"] + norm["bias"]
  else:
    out = k + h if config.wrap == "residual" else h
  r = out - v
  losses = config.inner_loss_scale * jnp.sum(jnp.square(r), axis=-1)
  delta = 2.0 * config.inner_loss_scale * r  # d l_t / d f(W; k_t)
  if config.wrap == "residual_norm":  # back through the LayerNorm
    dx = delta * norm["scale"]
    delta = rstd * (dx - jnp.mean(dx, axis=-1, keepdims=True) - xhat * jnp.mean(dx * xhat, axis=-1, keepdims=True))
  grads = [{} for _ in range(cts.shape[0])]
  for i in reversed(range(config.depth)):
    # One [d_in, c] x [c, d_out] matmul per weighting (separate matmuls give XLA's CPU backend a cheaper backward
    # pass than one stacked [n, d_in, d_out] einsum).
    for g, w in zip(grads, cts):
      g[f"w_{i}"] = jnp.einsum("ci,cj->ij", w[:, None] * inputs[i], delta)
      if config.use_bias:
        g[f"b_{i}"] = w @ delta
    if i:
      delta = jnp.einsum("cj,ij->ci", delta, weights[f"w_{i}"]) * act_grads[i - 1]
  return losses, [{name: g[name] for name in weights} for g in grads]


def _reset_momentum(params: MemoryParams, dtype: Any) -> PyTree:
  """The momentum a reset restores: `params.momentum`, or zeros shaped like `params.weights`."""
  if params.momentum is None:
    return jax.tree.map(lambda w: jnp.zeros(w.shape, dtype), params.weights)
  return jax.tree.map(lambda m: m.astype(dtype), params.momentum)


def _tree_where(pred: Array, a: PyTree, b: PyTree) -> PyTree:
  return jax.tree.map(lambda x, y: jnp.where(pred, x, y), a, b)


def _tree_norm(tree: PyTree) -> Array:
  """Frobenius norm over all leaves, with a finite gradient at 0 (an empty chunk has g = 0)."""
  sq = sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(tree))
  return jnp.where(sq > 0, jnp.sqrt(jnp.where(sq > 0, sq, 1.0)), 0.0)


def _soft_clamp_factor(norm: Array, tau: float) -> Array:
  """Factor tau * tanh(|g| / tau) / |g| of the spec §9 clamp (1 at g = 0), safe to differentiate."""
  safe = jnp.where(norm > 0, norm, 1.0)
  return jnp.where(norm > 0, tau * jnp.tanh(safe / tau) / safe, 1.0)


def _reset_flags(segment_ids: Array | None, last_segment: Array, batch: int, length: int) -> Array:
  """[B, T] bool: token t starts a new document (its segment id differs from the previous token's)."""
  if segment_ids is None:
    return jnp.zeros((batch, length), bool)
  segment_ids = segment_ids.astype(jnp.int32)
  prev = jnp.concatenate([last_segment[:, None], segment_ids[:, :-1]], axis=1)
  return segment_ids != prev


def concrete_value(x: Any) -> np.ndarray | None:
  """``x`` as a NumPy array when it is concrete (not traced), else None."""
  try:
    return np.asarray(x)
  except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
    return None


def _check_reset_alignment(resets: Array, n_pending: Array, chunk_size: int) -> None:
  """Raises if a document starts inside a chunk (only checked when the inputs are concrete)."""
  resets, n_pending = concrete_value(resets), concrete_value(n_pending)
  if resets is None or n_pending is None or chunk_size == 1:
    return
  pos = np.arange(resets.shape[1])[None, :] + n_pending[:, None]
  bad = resets & (pos % chunk_size != 0)
  if bad.any():
    b, t = np.argwhere(bad)[0]
    raise ValueError(
        f"Segment reset at call position {t} (sequence {b}) is not aligned to chunk_size={chunk_size}: documents "
        "must start at multiples of the chunk size (pad documents to a multiple of it).")


# ----------------------------------------------------------------------------------------------------------------
# Reference: the naive per-token loop of spec §2.2.
# ----------------------------------------------------------------------------------------------------------------


def lmm_reference(
    q: Array,
    k: Array,
    v: Array,
    theta: Array,
    eta: Array,
    alpha: Array,
    state: MemoryState,
    segment_ids: Array | None = None,
    *,
    params: MemoryParams,
    config: LMMConfig,
    mask: Array | None = None,
) -> tuple[Array, tuple[PyTree, PyTree]]:
  """Naive token loop of eqs. 13-14 with gradient window b (eq. 16): the ground truth (spec §2.2, §2.3).

  For every token t (1-based), with t' the start of t's gradient window:
    u_t = grad l_t(W) at W = M_{t'},  S_t = eta_t S_{t-1} - theta_t u_t,  M_t = (1 - alpha_t) M_{t-1} + S_t,
  and y_t = f(M_{tau(t)}; q_t) with tau(t) = c * floor((t - 1 + o) / c). A masked token is an identity step
  with output 0; a document start resets (M, S) to (W_0, 0) (or to `params.momentum`) and restarts the gradient
  window. With
  `max_grad_norm`, each chunk's theta-weighted surprise sum is soft-clamped as in `lmm_chunked`.

  Args:
    q: Queries [B, T, H, d].
    k: Keys [B, T, H, d].
    v: Values [B, T, H, d].
    theta: Inner learning rates theta_t [B, T, H].
    eta: Momentum decays eta_t in [0, 1], [B, T, H].
    alpha: Forget gates alpha_t in [0, 1], [B, T, H].
    state: Start state; it must have no pending tokens (the call starts on a chunk boundary).
    segment_ids: Optional [B, T] int document ids.
    params: Memory parameters (W_0 for resets, wrapper LayerNorm).
    config: The LMM configuration.
    mask: Optional [B, T] validity mask (1 = real token).

  Returns:
    y: [B, T, H, d] retrievals, in the dtype of q.
    (weights, momentum): M and S at the last chunk boundary reached, leaves (B, H, ...); they equal
      `MemoryState.weights` and `.momentum` returned by `lmm_chunked` on the same call.
  """
  batch, length, _, _ = q.shape
  out_dtype = q.dtype
  c, b = config.chunk_size, config.ttt_batch_size
  dtype = state.momentum["w_0"].dtype
  npend = concrete_value(state.n_pending)
  if npend is not None and npend.any():
    raise ValueError("lmm_reference needs a state without pending tokens.")
  resets = _reset_flags(segment_ids, state.last_segment, batch, length)
  _check_reset_alignment(resets, jnp.zeros((batch,), jnp.int32), c)
  mask = jnp.ones((batch, length), dtype) if mask is None else mask.astype(dtype)
  cast = lambda x: x.astype(dtype)
  q, k, v, theta, eta, alpha = map(cast, (q, k, v, theta, eta, alpha))
  params_w = jax.tree.map(cast, params.weights)
  norm = None if params.norm is None else jax.tree.map(cast, params.norm)
  reset_s = _reset_momentum(params, dtype)
  pad = (-length) % c

  def one_head(q, k, v, th, et, al, m0, s0, ref0, phase0, msk, rst, w0, nrm, sr):
    grad_fn = jax.grad(lambda w, kk, vv: inner_loss(w, kk, vv, nrm, config))
    kp = jnp.pad(k, ((0, pad), (0, 0)))
    vp = jnp.pad(v, ((0, pad), (0, 0)))
    wp = jnp.pad(th * msk, (0, pad))

    def step(carry, xs):
      m, s, ref, bm, bs, pos, factor = carry
      t, qt, kt, vt, tht, ett, alt, mt, rt = xs
      # A document start (chunk-aligned) is also a chunk boundary: reads and state restart from (W_0, 0).
      m, bm = _tree_where(rt, w0, m), _tree_where(rt, w0, bm)
      s = _tree_where(rt, sr, s)
      bs = _tree_where(rt, s, bs)
      pos = jnp.where(rt, 0, pos)
      ref = _tree_where(pos % b == 0, m, ref)
      if config.max_grad_norm is not None:
        # The chunk's surprise sum, recomputed naively token by token at the chunk start.
        kc = jax.lax.dynamic_slice_in_dim(kp, t, c)
        vc = jax.lax.dynamic_slice_in_dim(vp, t, c)
        wc = jax.lax.dynamic_slice_in_dim(wp, t, c)
        per_tok = jax.vmap(grad_fn, in_axes=(None, 0, 0))(ref, kc, vc)
        g = jax.tree.map(lambda x: jnp.tensordot(wc, x, axes=1), per_tok)
        factor = jnp.where(t % c == 0, _soft_clamp_factor(_tree_norm(g), config.max_grad_norm), factor)
      u = grad_fn(ref, kt, vt)
      valid = mt > 0
      s_new = jax.tree.map(lambda s_, u_: ett * s_ - tht * factor * u_, s, u)
      m_new = jax.tree.map(lambda m_, s_: (1.0 - alt) * m_ + s_, m, s_new)
      m = _tree_where(valid, m_new, m)
      s = _tree_where(valid, s_new, s)
      at_boundary = (t + 1) % c == 0
      reads_new = at_boundary if config.retrieve_offset == 1 else False
      y = apply_memory(_tree_where(reads_new, m, bm), qt, nrm, config) * mt
      bm = _tree_where(at_boundary, m, bm)
      bs = _tree_where(at_boundary, s, bs)
      return (m, s, ref, bm, bs, pos + 1, factor), y

    carry0 = (m0, s0, ref0, m0, s0, phase0 * c, jnp.ones((), dtype))
    xs = (jnp.arange(length), q, k, v, th, et, al, msk, rst)
    (_, _, _, bm, bs, _, _), y = jax.lax.scan(step, carry0, xs)
    return y, bm, bs

  heads = jax.vmap(one_head, in_axes=(1, 1, 1, 1, 1, 1, 0, 0, 0, None, None, None, 0, 0, 0), out_axes=(1, 0, 0))
  batched = jax.vmap(heads, in_axes=(0,) * 12 + (None, None, None), out_axes=(0, 0, 0))
  y, bm, bs = batched(q, k, v, theta, eta, alpha, state.weights, state.momentum, state.ref_weights,
                      state.window_phase, mask, resets, params_w, norm, reset_s)
  return y.astype(out_dtype), (bm, bs)


# ----------------------------------------------------------------------------------------------------------------
# Chunked parallel form (spec §3) with the pending buffer of spec §4.
# ----------------------------------------------------------------------------------------------------------------


def _log_cumsums(x: Array) -> tuple[Array, Array, Array, Array]:
  """Zero-safe log-space prefix sums of x in [0, 1]: a factor x_l = 0 is counted apart instead of taking its log.

  Returns (sum_{l < i} log x_l, zeros_{l < i}) for i = 0 .. c - 1 and (sum_{l <= r} log x_l, zeros_{l <= r}) for
  r = -1 .. c - 1.
  """
  zero = x <= 0
  logs = jnp.log(jnp.where(zero, 1.0, x))
  # Prefix sums as a triangular matmul (cheap to compile, MXU-friendly; c is small).
  c = x.shape[0]
  tri = (jnp.arange(c)[None, :] < jnp.arange(c + 1)[:, None]).astype(x.dtype)  # row r + 1 sums l <= r
  incl = tri @ logs
  zincl = jnp.round(tri @ zero.astype(x.dtype)).astype(jnp.int32)
  return incl[:-1], zincl[:-1], incl, zincl


def _chunk_coefficients(theta: Array, eta: Array, alpha: Array, upd: Array) -> tuple[Array, Array, Array]:
  """Exact per-token folding of eta and alpha into one chunk (spec §3.4, general 2x2 form).

  One token is the affine map [M; S] <- A_t [M; S] - theta_t u_t [1; 1] with A_t = [[gamma_t, eta_t], [0, eta_t]]
  (gamma_t = 1 - alpha_t); a masked token is A_t = I, theta_t = 0. Token m's gradient enters the chunk-end state
  through Q_{m+1} [1; 1] theta_m with Q_{m+1} = A_c ... A_{m+1}, and the chunk as a whole applies A = Q_1. For
  upper-triangular factors [[g, kappa], [0, e]] the product is
    Q_{m+1} = [[G_m, sum_{i>m} G_i kappa_i prod_{m<l<i} e_l], [0, E_m]],  G_m = prod_{i>m} g_i,  E_m = prod_{i>m} e_i,
  so the M-coefficient is rho_m = G_m + (upper-right entry), as in spec §3.4.

  Args:
    theta: [c] inner learning rates.
    eta: [c] momentum decays.
    alpha: [c] forget gates.
    upd: [c] bool, whether the token updates the memory.

  Returns:
    w_m: [c] coefficients of u_m in M_end (theta_m * rho_m of spec §3.4).
    w_s: [c] coefficients of u_m in S_end (theta_m * E_m).
    a: [3] the chunk's A = [[a0, a1], [0, a2]].
  """
  c = theta.shape[0]
  g = jnp.where(upd, 1.0 - alpha, 1.0)
  kappa = jnp.where(upd, eta, 0.0)
  e = jnp.where(upd, eta, 1.0)

  # Products in log space (spec §3.4); every product is <= 1. The gradient w.r.t. a gate value that is exactly
  # 0 (eta = 0 or alpha = 1) is returned as 0; the values stay exact.
  def suffix(x):  # prod_{i > r} x_i for r = -1 .. c - 1
    _, _, incl, zincl = _log_cumsums(x)
    ok = zincl == zincl[-1]
    return jnp.where(ok, jnp.exp(jnp.where(ok, incl[-1] - incl, 0.0)), 0.0)

  g_suf, e_suf = suffix(g), suffix(e)  # [c + 1]; entry 0 is the whole chunk
  # D[r, i] = prod_{r < l < i} e_l for i > r (rows r = -1 .. c - 1).
  excl, zexcl, incl, zincl = _log_cumsums(e)
  valid = (jnp.arange(c)[None, :] > jnp.arange(-1, c)[:, None]) & (zexcl[None, :] == zincl[:, None])
  d = jnp.where(valid, jnp.exp(jnp.where(valid, excl[None, :] - incl[:, None], 0.0)), 0.0)
  upper = d @ (g_suf[1:] * kappa)  # [c + 1]
  th = jnp.where(upd, theta, 0.0)
  return th * (g_suf[1:] + upper[1:]), th * e_suf[1:], jnp.stack([g_suf[0], upper[0], e_suf[0]])


def _make_chunk_body(config: LMMConfig, w0: PyTree, s0: PyTree, norm: PyTree, with_aux: bool,
                     has_resets: bool = True):
  """The scan body over chunks for one (sequence, head); a reset restores (w0, s0).

  With b = c the window reference is always the chunk-start weights, and the carry is ``(m, s, phase)``;
  otherwise ``(m, s, ref, phase)``. ``has_resets=False`` (no segment ids) drops the reset selects and, with o = 1,
  expects the queries shifted by one slot (the caller reads the last slot and applies the output mask).
  """
  n_window = config.chunks_per_window
  need_g = with_aux or config.max_grad_norm is not None
  shifted_reads = config.retrieve_offset == 1 and not has_resets

  def body(carry, xs):
    if n_window == 1:
      m, s, phase = carry
    else:
      m, s, ref, phase = carry
    k, v, q, th, et, al, upd, outm, reset, complete = xs
    if has_resets:  # Document start (chunk-aligned): back to (W_0, 0) and a fresh gradient window.
      m = _tree_where(reset, w0, m)
      s = _tree_where(reset, s0, s)
      phase = jnp.where(reset, 0, phase)
    ref = m if n_window == 1 else _tree_where(phase == 0, m, ref)

    w_m, w_s, a = _chunk_coefficients(th, et, al, upd)
    # All surprises of the chunk at the window-start weights (eqs. 16-17): one forward and one backward pass of the
    # memory MLP, then one weighted contraction per layer and weighting (a weighted sum of per-token gradients at
    # shared weights is the gradient of the weighted loss).
    cts = jnp.stack([w_m, w_s] + ([jnp.where(upd, th, 0.0)] if need_g else []))
    losses, grads = _chunk_surprises(ref, k, v, cts, norm, config)
    g_m, g_s = grads[0], grads[1]
    g_norm = _tree_norm(grads[2]) if need_g else None
    factor = 1.0
    if config.max_grad_norm is not None:
      factor = _soft_clamp_factor(g_norm, config.max_grad_norm)

    # Chunk-end states (spec §3.4): M_end = Γ M + Ψ S - g^M, S_end = E S - g^S.
    m_new = jax.tree.map(lambda m_, s_, g_: a[0] * m_ + a[1] * s_ - factor * g_, m, s, g_m)
    s_new = jax.tree.map(lambda s_, g_: a[2] * s_ - factor * g_, s, g_s)

    # Retrieval (eq. 15, spec §2.3): with o = 1 the chunk's last token reads the chunk-end weights. Without
    # resets the queries come shifted by one slot (`shifted_reads`): this chunk's start weights serve the previous
    # chunk's last token and the first c - 1 of this one, one read per chunk.
    if shifted_reads:
      y = apply_memory(m, q, norm, config)
    elif config.retrieve_offset == 1:
      y = jnp.concatenate([apply_memory(m, q[:-1], norm, config), apply_memory(m_new, q[-1:], norm, config)])
      y = y * outm[:, None]
    else:
      y = apply_memory(m, q, norm, config) * outm[:, None]

    phase = jnp.where(complete, (phase + 1) % n_window, phase)
    aux = ()
    if with_aux:
      cnt = jnp.maximum(jnp.sum(upd), 1)
      after = inner_loss(m_new, k, v, norm, config)
      aux = (jnp.sum(jnp.where(upd, losses, 0.0)) / cnt, jnp.sum(jnp.where(upd, after, 0.0)) / cnt, g_norm)
    carry = (m_new, s_new, phase) if n_window == 1 else (m_new, s_new, ref, phase)
    return carry, (y, aux)

  return body


def lmm_chunked(
    q: Array,
    k: Array,
    v: Array,
    theta: Array,
    eta: Array,
    alpha: Array,
    state: MemoryState,
    segment_ids: Array | None = None,
    *,
    params: MemoryParams,
    config: LMMConfig,
    mask: Array | None = None,
    return_aux: bool = False,
    aligned: bool = False,
) -> tuple[Array, MemoryState] | tuple[Array, MemoryState, dict[str, Array]]:
  """Chunked parallel LMM (spec §3, eqs. 16-18) with streaming state (spec §4).

  The pending tokens of `state` are prepended, every complete chunk updates the memory, and the remaining
  (< c) tokens become the new pending buffer, so any split of a sequence into calls equals one call. Inside a
  chunk all surprises are taken at the window-start weights M_{t'} and the per-token momentum and decay are
  folded exactly (spec §3.4); the chunks run in a `lax.scan` with a rematerialised body. The result equals
  `lmm_reference` on the same tokens.

  Chunk and window phase are global: they depend on the absolute position in the stream, so a left-padded
  sequence equals the unpadded one only if the padding is a multiple of b (or b = c = 1). Document starts
  (changes of `segment_ids`) must be chunk-aligned; they reset (M, S) to (W_0, 0) (S to `params.momentum` when
  given) and restart the gradient window
  (checked eagerly when the inputs are concrete; under `jit` a misaligned start is undefined). A start at the head
  of the trailing incomplete chunk is applied when the call reaches that chunk, complete or not, so the returned
  state is already (W_0, 0) with a fresh window and the later calls that complete the chunk need no flag.

  Args:
    q: Queries [B, T, H, d].
    k: Keys [B, T, H, d].
    v: Values [B, T, H, d].
    theta: Inner learning rates theta_t >= 0, [B, T, H].
    eta: Momentum decays eta_t in [0, 1], [B, T, H].
    alpha: Forget gates alpha_t in [0, 1], [B, T, H].
    state: The state from `init_state` or from a previous call.
    segment_ids: Optional [B, T] int document ids.
    params: Memory parameters (W_0 for resets, wrapper LayerNorm).
    config: The LMM configuration.
    mask: Optional [B, T] validity mask; a masked token is an identity step and its output is 0.
    return_aux: Also return per-chunk diagnostics (spec §9).
    aligned: `state` is known to hold no pending tokens (a caller that always feeds whole chunks, as MAC does).
      The call's buffer then has no slots for them: a call of c tokens runs one chunk instead of two. Checked
      when `state.n_pending` is concrete; under `jit` a state with pending tokens gives wrong results.

  Returns:
    y: [B, T, H, d] retrievals, in the dtype of q.
    new_state: The updated `MemoryState`.
    aux (only with `return_aux`): dict of [B, N, H] arrays over the N chunks of the call's buffer,
      "loss_before" and "loss_after" (mean inner loss of the updating tokens at M_ref and at the chunk-end
      weights) and "surprise_norm" (|sum_m theta_m u_m| before clamping), plus "chunk_mask" [B, N], 1 for the
      chunks that were complete and applied.
  """
  batch, length, num_heads, head_dim = q.shape
  out_dtype = q.dtype
  c = config.chunk_size
  p = c - 1
  dtype = state.momentum["w_0"].dtype
  resets = _reset_flags(segment_ids, state.last_segment, batch, length)
  _check_reset_alignment(resets, state.n_pending, c)
  mask = jnp.ones((batch, length), dtype) if mask is None else mask.astype(dtype)
  cast = lambda x: x.astype(dtype)
  q, k, v, theta, eta, alpha = map(cast, (q, k, v, theta, eta, alpha))
  gates = jnp.stack([theta, eta, alpha], axis=-1)
  params_w = jax.tree.map(cast, params.weights)
  norm = None if params.norm is None else jax.tree.map(cast, params.norm)
  reset_s = _reset_momentum(params, dtype)
  has_resets = segment_ids is not None
  shifted = config.retrieve_offset == 1 and not has_resets
  if aligned:
    pending = concrete_value(state.n_pending)
    if pending is not None and pending.any():
      raise ValueError(f"lmm_chunked(aligned=True): the state holds pending tokens (n_pending={pending.tolist()})")
  n_chunks = -(-((0 if aligned else p) + length) // c)
  buf_len = n_chunks * c

  def one_sequence(q, k, v, gates, msk, rst, m0, s0, ref0, pk, pv, pg, pm, n_pend, phase0):
    # Buffer of buf_len + p slots: pending tokens first, then the call's tokens from slot n_pend; the extra p
    # slots let the next pending buffer be sliced out without clamping.
    if aligned:
      pk = pv = pg = pm = None
      n_pend = jnp.zeros((), jnp.int32)

    def place(pending, new):
      buf = jnp.zeros((buf_len + p,) + new.shape[1:], new.dtype)
      if pending is not None:
        buf = buf.at[:p].set(pending)
      return jax.lax.dynamic_update_slice_in_dim(buf, new, n_pend, axis=0)

    slot = jnp.arange(buf_len + p)
    n_tot = n_pend + length
    n_full = (n_tot // c) * c
    kb, vb, gb = place(pk, k), place(pv, v), place(pg, gates)
    valid = (place(pm, msk) > 0) & (slot < n_tot)
    upd = valid & (slot < n_full)
    qb = place(None, q)
    outm = place(None, msk)
    rb = place(None, rst)

    def chunks(x):
      return x[:buf_len].reshape((n_chunks, c) + x.shape[1:])

    complete = (jnp.arange(n_chunks) + 1) * c <= n_full

    def one_head(m0, s0, ref0, w0, sr, nrm, k, v, q, g):
      body = jax.checkpoint(_make_chunk_body(config, w0, sr, nrm, return_aux, has_resets=has_resets))
      qs = jnp.concatenate([jnp.zeros_like(q[:1]), q[:buf_len - 1]]) if shifted else q
      xs = (chunks(k), chunks(v), chunks(qs), chunks(g[:, 0]), chunks(g[:, 1]), chunks(g[:, 2]),
            chunks(upd), chunks(outm), chunks(rb)[:, 0], complete)
      if config.chunks_per_window == 1:  # ref is m at every chunk start
        (m, s, phase), (y, aux) = jax.lax.scan(body, (m0, s0, phase0), xs)
        ref = m
      else:
        (m, s, ref, phase), (y, aux) = jax.lax.scan(body, (m0, s0, ref0, phase0), xs)
      y = y.reshape(buf_len, head_dim)
      if shifted:  # slot i's read came out at i + 1; the last slot reads the final chunk-end weights
        y = jnp.concatenate([y[1:], apply_memory(m, q[buf_len - 1:buf_len], nrm, config)])
        y = y * outm[:buf_len, None]
      return m, s, ref, phase, y, aux

    m, s, ref, phase, y, aux = jax.vmap(one_head, in_axes=(0, 0, 0, 0, 0, 0, 1, 1, 1, 1),
                                        out_axes=(0, 0, 0, 0, 1, 1))(m0, s0, ref0, params_w, reset_s, norm, kb, vb,
                                                                     qb, gb)
    y = jax.lax.dynamic_slice_in_dim(y, n_pend, length, axis=0)
    n_new = n_tot - n_full
    keep = jnp.arange(p) < n_new

    def next_pending(buf):
      x = jax.lax.dynamic_slice_in_dim(buf, n_full, p, axis=0)
      return jnp.where(keep.reshape((p,) + (1,) * (x.ndim - 1)), x, 0)

    pending = (next_pending(kb), next_pending(vb), next_pending(gb), next_pending(valid.astype(dtype)))
    return y, m, s, ref, phase[0], pending, n_new, aux, complete

  y, m, s, ref, phase, pending, n_new, aux, complete = jax.vmap(one_sequence)(
      q, k, v, gates, mask, resets, state.weights, state.momentum, state.ref_weights,
      state.pending_k, state.pending_v, state.pending_gates, state.pending_mask, state.n_pending,
      state.window_phase)
  if segment_ids is None:
    last_segment = state.last_segment
  else:
    last_segment = segment_ids[:, -1].astype(jnp.int32) if length else state.last_segment
  new_state = MemoryState(
      weights=m, momentum=s, ref_weights=ref, pending_k=pending[0], pending_v=pending[1],
      pending_gates=pending[2], pending_mask=pending[3], n_pending=n_new.astype(jnp.int32),
      window_phase=phase.astype(jnp.int32), last_segment=last_segment)
  y = y.astype(out_dtype)
  if not return_aux:
    return y, new_state
  loss_before, loss_after, g_norm = aux
  aux_dict = {"loss_before": loss_before, "loss_after": loss_after, "surprise_norm": g_norm,
              "chunk_mask": complete.astype(dtype)}
  return y, new_state, aux_dict


def lmm_step(
    q: Array,
    k: Array,
    v: Array,
    theta: Array,
    eta: Array,
    alpha: Array,
    state: MemoryState,
    segment_ids: Array | None = None,
    *,
    params: MemoryParams,
    config: LMMConfig,
    mask: Array | None = None,
) -> tuple[Array, MemoryState]:
  """Decode step for T == 1 (spec §4): queue the token, update if its chunk is now complete, then retrieve.

  The token that completes a chunk runs `lmm_chunked` on it (one chunk update, c surprises at the window-start
  weights); every other token only reads the weights of the last chunk boundary and joins the pending buffer,
  which is what `lmm_chunked` does for it, at the cost of one memory read. The chunk phase (`n_pending`) is the
  same for every sequence, so the choice is one `lax.cond` for the batch. With c = 1 every token is an update.

  Args:
    q: Queries [B, 1, H, d].
    k: Keys [B, 1, H, d].
    v: Values [B, 1, H, d].
    theta: [B, 1, H].
    eta: [B, 1, H].
    alpha: [B, 1, H].
    state: The current state.
    segment_ids: Optional [B, 1] document ids.
    params: Memory parameters.
    config: The LMM configuration.
    mask: Optional [B, 1] validity mask.

  Returns:
    y: [B, 1, H, d] retrieval.
    new_state: The updated `MemoryState`.
  """
  if q.shape[1] != 1:
    raise ValueError(f"lmm_step expects one token, got T={q.shape[1]}.")
  batch = q.shape[0]
  c = config.chunk_size
  update = lambda ops: lmm_chunked(*ops, segment_ids, params=params, config=config, mask=mask)
  if c == 1:
    return update((q, k, v, theta, eta, alpha, state))
  resets = _reset_flags(segment_ids, state.last_segment, batch, 1)
  _check_reset_alignment(resets, state.n_pending, c)

  def read_and_queue(ops):
    q, k, v, theta, eta, alpha, state = ops
    dtype = state.momentum["w_0"].dtype
    n = state.n_pending  # < c - 1 here
    # A document start (only at a chunk's first slot, n == 0) restores (W_0, S_0) and a fresh window now, as
    # `lmm_chunked` does when it reaches the chunk.
    reset = resets[:, 0] & (n == 0)
    fresh = init_state(params, batch, config, dtype=dtype)
    m = _tree_where_rows(reset, fresh.weights, state.weights)
    norm = None if params.norm is None else jax.tree.map(lambda a: a.astype(dtype), params.norm)
    read = jax.vmap(jax.vmap(lambda w, z, nrm: apply_memory(w, z, nrm, config), in_axes=(0, 0, 0)),
                    in_axes=(0, 0, None))
    msk = jnp.ones((batch,), dtype) if mask is None else mask[:, 0].astype(dtype)
    y = read(m, q[:, 0].astype(dtype), norm) * msk[:, None, None]
    slot = jax.nn.one_hot(n, c - 1, dtype=dtype)  # [B, c - 1]
    put = lambda buf, x: buf + slot.reshape(slot.shape + (1,) * (buf.ndim - 2)) * x[:, None].astype(dtype)
    gates = jnp.stack([theta[:, 0], eta[:, 0], alpha[:, 0]], axis=-1)
    last = state.last_segment if segment_ids is None else segment_ids[:, -1].astype(jnp.int32)
    phase = jnp.where(reset, 0, state.window_phase)
    new_state = state._replace(
        weights=m,
        momentum=_tree_where_rows(reset, fresh.momentum, state.momentum),
        ref_weights=_tree_where_rows(phase == 0, m, state.ref_weights),  # as the chunk body sets it
        pending_k=put(state.pending_k, k[:, 0]), pending_v=put(state.pending_v, v[:, 0]),
        pending_gates=put(state.pending_gates, gates), pending_mask=put(state.pending_mask, (msk > 0)),
        n_pending=n + 1, window_phase=phase, last_segment=last)
    return y[:, None].astype(q.dtype), new_state

  return jax.lax.cond(state.n_pending[0] + 1 >= c, update, read_and_queue, (q, k, v, theta, eta, alpha, state))


def _tree_where_rows(pred: Array, a: PyTree, b: PyTree) -> PyTree:
  """Leaf-wise ``where(pred, a, b)`` with ``pred`` [B] broadcast over each leaf's trailing axes."""
  return jax.tree.map(lambda x, y: jnp.where(pred.reshape(pred.shape + (1,) * (x.ndim - 1)), x, y), a, b)
