"""Titans (Behrouz, Zhong, Mirrokni, arXiv 2501.00663v1) as memarch sequence mixers.

* `NeuralMemory`: the long-term memory (LMM) layer of spec §5 (paper §3, §4.4), registered alone as "titans_lmm"
  (paper "Titans (LMM)", spec §7.4);
* `TitansMAG`: memory as a gate (eqs. 26-28, spec §7.2);
* `TitansMAL`: memory as a layer (eqs. 29-31, spec §7.3);
* `TitansMAC`: memory as context (eqs. 21-25, spec §7.1).

The test-time update itself (eqs. 12-18) lives in `memarch.ops.titans`; these modules own the outer-loop
parameters (projections, gates, the learned initial memory W_0, output gate) and the streaming state.

Paper vs. ours (see `spec/titans.md` for the tags):

* [paper] SiLU on q/k/v, l2-normalised q and k, a depthwise conv after each projection, data-dependent theta, eta,
  alpha, an output normalisation + linear gate before W_O, persistent memory (eq. 19), the three hybrids.
* [ours] the order proj -> causal depthwise conv (width 4) -> SiLU -> l2 (per head), theta = theta_max * sigmoid,
  zero-initialised gate projections with bias initialisation knobs, RMSNorm(y) * SiLU(x W_G), the MAG gate
  RMSNorm_y(y) * sigmoid(RMSNorm_z(z)), MAL as two residual sub-blocks, the MAC causal masks and streaming.

Packed documents: a document must start at a multiple of the memory's `chunk_size` (the chunk phase is global,
spec §4); with `chunk_size=1` any boundary works. Misaligned starts raise eagerly and are undefined under `jit`.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from memarch.layers.attention import PERSISTENT_INIT_STDDEV, KVCache, MultiHeadAttention
from memarch.layers.common import CausalConv1D, ConvState, DType, RMSNorm, as_dtype, variance_scaling
from memarch.ops import attention as attn_ops
from memarch.ops import titans as titans_ops
from memarch.typing import Array

_L2_EPS = 1e-6


# ----------------------------------------------------------------------------------------------------------------
# Small parameter-owning helpers.
# ----------------------------------------------------------------------------------------------------------------


class _HeadProjection(nn.Module):
  """``x [.., d] -> [.., H, e]`` with a kernel (d, H, e) on logical axes ("embed", "heads", "kv").

  Attributes:
    num_heads: H.
    head_dim: e.
    w_init_variance_scale: variance multiplier of the initialiser.
    dtype: computation dtype (None: promoted input dtype).
    param_dtype: parameter dtype.
  """
  num_heads: int
  head_dim: int
  w_init_variance_scale: float = 1.0
  dtype: DType = None
  param_dtype: DType = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """Projects the last axis of ``x`` to heads."""
    init = variance_scaling(self.w_init_variance_scale, in_axis=0, out_axis=(1, 2))
    w = self.param("kernel", nn.with_logical_partitioning(init, ("embed", "heads", "kv")),
                   (x.shape[-1], self.num_heads, self.head_dim), as_dtype(self.param_dtype))
    x, w = nn.dtypes.promote_dtype(x, w, dtype=as_dtype(self.dtype))
    return jnp.einsum("...d,dhe->...he", x, w)


class _OutProjection(nn.Module):
  """``[.., H, e] -> [.., d]`` with a kernel (H, e, d) on logical axes ("heads", "kv", "embed").

  Attributes:
    dtype: computation dtype (None: promoted input dtype).
    param_dtype: parameter dtype.
  """
  dtype: DType = None
  param_dtype: DType = jnp.float32

  @nn.compact
  def __call__(self, y: Array, features: int) -> Array:
    """Merges the heads of ``y`` into ``features`` (the model width)."""
    init = variance_scaling(1.0, in_axis=(0, 1), out_axis=2)
    w = self.param("kernel", nn.with_logical_partitioning(init, ("heads", "kv", "embed")),
                   (y.shape[-2], y.shape[-1], features), as_dtype(self.param_dtype))
    y, w = nn.dtypes.promote_dtype(y, w, dtype=as_dtype(self.dtype))
    return jnp.einsum("...he,hed->...d", y, w)


class _Gates(nn.Module):
  """Data-dependent inner learning rate, momentum and forget gates (spec §2.4).

  theta_t = theta_max * sigmoid(x_t w_theta + b_theta), eta_t = sigmoid(x_t w_eta + b_eta),
  alpha_t = sigmoid(x_t w_alpha + b_alpha), per head; w_* start at zero [ours], b_* at the given biases.

  Attributes:
    num_heads: H.
    max_lr: theta_max.
    biases: initial (b_theta, b_eta, b_alpha).
    param_dtype: parameter dtype.
  """
  num_heads: int
  max_lr: float
  biases: tuple[float, float, float]
  param_dtype: DType = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> tuple[Array, Array, Array]:
    """Returns float32 (theta, eta, alpha), each [b, t, H]."""
    pd = as_dtype(self.param_dtype)
    w = self.param("w", nn.with_logical_partitioning(nn.initializers.zeros_init(), ("embed", None, "heads")),
                   (x.shape[-1], 3, self.num_heads), pd)
    bias_init = lambda key, shape, dtype: jnp.broadcast_to(
        jnp.asarray(self.biases, dtype)[:, None], shape)
    b = self.param("b", nn.with_logical_partitioning(bias_init, (None, "heads")), (3, self.num_heads), pd)
    logits = jnp.einsum("btd,dgh->btgh", x.astype(jnp.float32), w.astype(jnp.float32)) + b.astype(jnp.float32)
    gates = jax.nn.sigmoid(logits)
    return self.max_lr * gates[:, :, 0], gates[:, :, 1], gates[:, :, 2]


class _InitialMemory(nn.Module):
  """The learned initial memory W_0 (and the `residual_norm` LayerNorm), one copy per head (spec §2.5).

  Parameters have the head axis first (logical "heads"), so heads shard on `tensor` with the rest of the layer.

  Attributes:
    num_heads: H.
    head_dim: e.
    config: the LMM configuration (depth, expansion, wrap, biases).
    zero_init: zero weights instead of Xavier/Glorot-uniform.
    param_dtype: parameter dtype.
  """
  num_heads: int
  head_dim: int
  config: titans_ops.LMMConfig
  zero_init: bool = False
  param_dtype: DType = jnp.float32

  def _make(self, key: Array) -> titans_ops.MemoryParams:
    c = self.config
    return titans_ops.init_memory_params(key, self.num_heads, self.head_dim, c.depth, c.expansion, wrap=c.wrap,
                                         use_bias=c.use_bias, zero_init=self.zero_init,
                                         dtype=as_dtype(self.param_dtype))

  @nn.compact
  def __call__(self) -> titans_ops.MemoryParams:
    """Returns the `MemoryParams` (W_0 leaves (H, ...), LayerNorm (H, e) or None)."""
    shapes = jax.eval_shape(self._make, jax.random.key(0))
    weights = {}
    for name, leaf in shapes.weights.items():
      axes = ("heads",) + (None,) * (leaf.ndim - 1)
      init = lambda key, shape, dtype, name=name: self._make(key).weights[name]
      weights[name] = self.param(name, nn.with_logical_partitioning(init, axes), leaf.shape, leaf.dtype)
    norm = None
    if shapes.norm is not None:
      norm = {
          "scale": self.param("norm_scale", nn.with_logical_partitioning(nn.initializers.ones_init(),
                                                                         ("heads", "kv")),
                              shapes.norm["scale"].shape, shapes.norm["scale"].dtype),
          "bias": self.param("norm_bias", nn.with_logical_partitioning(nn.initializers.zeros_init(),
                                                                       ("heads", "kv")),
                             shapes.norm["bias"].shape, shapes.norm["bias"].dtype)}
    return titans_ops.MemoryParams(weights=weights, norm=norm)


class _Linear(nn.Module):
  """A square ``x W`` with W (d, d) on logical axes (None, "embed").

  Attributes:
    dtype: computation dtype (None: promoted input dtype).
    param_dtype: parameter dtype.
  """
  dtype: DType = None
  param_dtype: DType = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """Applies W to the last axis of ``x``."""
    d = x.shape[-1]
    w = self.param("kernel", nn.with_logical_partitioning(variance_scaling(1.0), (None, "embed")), (d, d),
                   as_dtype(self.param_dtype))
    x, w = nn.dtypes.promote_dtype(x, w, dtype=as_dtype(self.dtype))
    return x @ w


def _l2norm(x: Array) -> Array:
  x32 = x.astype(jnp.float32)
  return (x32 * jax.lax.rsqrt(jnp.sum(x32 * x32, axis=-1, keepdims=True) + _L2_EPS)).astype(x.dtype)


def _tree_select(pred: Array, a: Any, b: Any) -> Any:
  """Leaf-wise ``where(pred, a, b)`` with ``pred`` [b] broadcast over trailing axes."""
  return jax.tree.map(lambda x, y: jnp.where(pred.reshape(pred.shape + (1,) * (x.ndim - 1)), x, y), a, b)


class _Persistent(nn.Module):
  """N_p learned persistent-memory vectors in the block's (post-norm) input space (eq. 19), initialised N(0, 0.02).

  Attributes:
    num: N_p.
    param_dtype: parameter dtype.
  """
  num: int
  param_dtype: DType = jnp.float32

  @nn.compact
  def __call__(self, d: int) -> Array:
    """Returns the (N_p, d) vectors."""
    return self.param("vectors", nn.with_logical_partitioning(nn.initializers.normal(stddev=PERSISTENT_INIT_STDDEV),
                                                              (None, "embed")), (self.num, d),
                      as_dtype(self.param_dtype))


def _check_alignment(starts: Array, n_pending: Array, chunk_size: int) -> None:
  """Raises if a document starts inside a memory chunk (checked only when the inputs are concrete)."""
  try:
    starts, n_pending = np.asarray(starts), np.asarray(n_pending)
  except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
    return
  pos = np.arange(starts.shape[1])[None, :] + n_pending[:, None]
  if (starts & (pos % chunk_size != 0)).any():
    raise ValueError(f"A document starts inside a memory chunk: documents must start at multiples of "
                     f"chunk_size={chunk_size} (pad documents to a multiple of it).")


def _document_starts(segment_ids: Array | None, last_segment: Array, batch: int, length: int) -> Array:
  """[b, t] bool: token starts a new document (its id differs from the previous token's)."""
  if segment_ids is None:
    return jnp.zeros((batch, length), bool)
  seg = segment_ids.astype(jnp.int32)
  prev = jnp.concatenate([last_segment[:, None], seg[:, :-1]], axis=1)
  return seg != prev


# ----------------------------------------------------------------------------------------------------------------
# The LMM layer.
# ----------------------------------------------------------------------------------------------------------------


class NeuralMemoryState(NamedTuple):
  """Streaming state of `NeuralMemory` (spec §4); float32 leaves, batch-leading.

  Attributes:
    conv: state of the causal depthwise conv over the concatenated q/k/v projections (None without conv).
    memory: the `memarch.ops.titans.MemoryState` (fast weights, momentum, window reference, pending chunk).
    restart: [b] bool, the memory must be set to (W_0, 0) before its next chunk is processed: set only by
      `init_state`, which cannot read W_0 (a parameter). A document start that is still pending at the end of a
      call needs no flag: the op resets the carried state when it reaches that chunk's first slot, so the
      returned state is already (W_0, 0) with a fresh gradient window.
  """
  conv: ConvState | None
  memory: titans_ops.MemoryState
  restart: Array


class NeuralMemory(nn.Module):
  """The Titans long-term memory layer (spec §5), a sequence mixer following the layer protocol.

  ::

      q = l2(SiLU(Conv(x W_Q)))   k = l2(SiLU(Conv(x W_K)))   v = SiLU(Conv(x W_V))        (per head)
      theta, eta, alpha = theta_max sigmoid(x w_theta + b_theta), sigmoid(..), sigmoid(..)   (spec §2.4)
      y = LMM(q, k, v, theta, eta, alpha)                       (eqs. 12-18 via memarch.ops.titans)
      out = W_O (RMSNorm(y) * SiLU(x W_G))

  The input ``x`` is already normalised by the block's pre-norm (spec §5's x-hat). One call runs
  `lmm_chunked` from the carried state; ``t == 1`` runs `lmm_step`.

  Attributes:
    num_heads: H, independent memories.
    head_dim: e (None: d_model // num_heads).
    d_model: model width, needed by `init_state` / `state_size` on an unbound module (None: from the input, or
      passed to them).
    depth: L_M, layers of the memory MLP (spec §2.5).
    expansion: hidden width of the memory MLP as a multiple of e.
    activation: hidden activation of the memory MLP, "gelu" or "silu".
    wrap: "none", "residual" or "residual_norm" (None: "none" for L_M = 1, else "residual_norm").
    use_bias: fast-weight biases in the memory MLP.
    zero_init_memory: zero W_0 instead of Glorot-uniform.
    chunk_size: c, the chunk at which weights are materialised and read (spec §2.3, §3.1).
    ttt_batch_size: b, the gradient window of eq. 16 (None: b = c).
    retrieve_offset: o of spec §2.3.
    inner_loss_scale: s of the inner loss (spec §2.6).
    max_grad_norm: soft clamp of each chunk's surprise norm (spec §9; None: off).
    max_lr: theta_max (None: 1.0 for L_M = 1, else 0.1; spec §2.4). theta = 1 is an exact overwrite only
      without momentum and at c = 1: the momentum replays a key's step until the key comes back, and within a
      chunk (all gradients at its start weights) the steps along a repeated key add up. On long streams with
      recurring keys, theta_max = 1 diverges even at c = 1; use about 1 / c with the clamp `max_grad_norm`
      (configs/niah).
    init_theta_bias: initial b_theta (theta = 0.12 theta_max at -2).
    init_eta_bias: initial b_eta (eta = 0.88 at 2).
    init_alpha_bias: initial b_alpha (alpha = 0.018 at -4).
    conv_width: taps of the causal depthwise conv after the q/k/v projections (0 disables it; paper ablation
      "w/o conv").
    qkv_silu: SiLU on q, k, v [paper].
    qk_l2norm: l2-normalise q and k per head [paper].
    output_gate: multiply RMSNorm(y) by SiLU(x W_G) before W_O [paper]; False keeps W_O RMSNorm(y).
    norm_eps: epsilon of the output RMSNorm.
    w_init_variance_scale: variance multiplier of the input projections' initialiser.
    dtype: computation dtype of the projections (None: promoted input dtype); the memory always runs in
      `state_dtype`.
    param_dtype: parameter dtype.
    state_dtype: dtype of the fast weights, momentum and conv state (float32; float64 in x64 tests).
  """
  num_heads: int
  head_dim: int | None = None
  d_model: int | None = None
  depth: int = 2
  expansion: int = 4
  activation: str = "gelu"
  wrap: str | None = None
  use_bias: bool = False
  zero_init_memory: bool = False
  chunk_size: int = 64
  ttt_batch_size: int | None = None
  retrieve_offset: int = 1
  inner_loss_scale: float = 0.5
  max_grad_norm: float | None = None
  max_lr: float | None = None
  init_theta_bias: float = -2.0
  init_eta_bias: float = 2.0
  init_alpha_bias: float = -4.0
  conv_width: int = 4
  qkv_silu: bool = True
  qk_l2norm: bool = True
  output_gate: bool = True
  norm_eps: float = 1e-6
  w_init_variance_scale: float = 1.0
  dtype: DType = None
  param_dtype: DType = jnp.float32
  state_dtype: DType = jnp.float32

  # -- static helpers (usable on an unbound module) ---------------------------------------------------------------

  def lmm_config(self) -> titans_ops.LMMConfig:
    """The `LMMConfig` of the test-time update."""
    return titans_ops.LMMConfig(
        depth=self.depth, expansion=self.expansion, activation=self.activation, wrap=self.wrap,
        use_bias=self.use_bias, chunk_size=self.chunk_size, ttt_batch_size=self.ttt_batch_size,
        retrieve_offset=self.retrieve_offset, inner_loss_scale=self.inner_loss_scale,
        max_grad_norm=self.max_grad_norm)

  def theta_max(self) -> float:
    """theta_max: `max_lr`, or the spec §2.4 default (1.0 for L_M = 1, 0.1 deeper)."""
    if self.max_lr is not None:
      return self.max_lr
    return 1.0 if self.depth == 1 else 0.1

  def dims(self, d_model: int | None = None) -> tuple[int, int]:
    """(H, e), validating the fields.

    Args:
      d_model: model width (None: the `d_model` field).

    Returns:
      The number of heads and the head width.

    Raises:
      ValueError: when the head width cannot be determined.
    """
    head_dim = self.head_dim
    if head_dim is None:
      d_model = d_model or self.d_model
      if d_model is None:
        raise ValueError("NeuralMemory: set head_dim or d_model to call init_state / state_size unbound")
      head_dim = d_model // self.num_heads
    return self.num_heads, head_dim

  def init_state(self, batch_size: int, d_model: int | None = None) -> NeuralMemoryState:
    """The state before the first token; the memory is set to the learned W_0 at the first chunk (`restart`).

    Args:
      batch_size: number of sequences.
      d_model: model width (None: the `d_model` field).

    Returns:
      The initial `NeuralMemoryState`.
    """
    h, e = self.dims(d_model)
    config = self.lmm_config()
    sd = as_dtype(self.state_dtype)
    shapes = jax.eval_shape(lambda k: titans_ops.init_memory_params(
        k, h, e, config.depth, config.expansion, wrap=config.wrap, use_bias=config.use_bias, dtype=sd),
                            jax.random.key(0))
    zeros = titans_ops.MemoryParams(weights=jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes.weights),
                                    norm=None)
    memory = titans_ops.init_state(zeros, batch_size, config, dtype=sd)
    conv = None
    if self.conv_width:
      conv = self._conv(parent=None).init_state(batch_size, 3 * h * e)
    return NeuralMemoryState(conv, memory, jnp.ones((batch_size,), bool))

  def state_size(self, d_model: int | None = None) -> int:
    """Floats of state per sequence: fast weights, momentum, window reference, pending chunk, conv tails."""
    h, e = self.dims(d_model)
    conv = (self.conv_width - 1) * 3 * h * e if self.conv_width else 0
    return titans_ops.state_size(self.lmm_config(), h, e) + conv

  def _conv(self, **kwargs) -> CausalConv1D:
    return CausalConv1D(width=self.conv_width, dtype=self.dtype, param_dtype=self.param_dtype,
                        state_dtype=self.state_dtype, **kwargs)

  # -- parameters ---------------------------------------------------------------------------------------------------

  def setup(self):
    h, e = self.dims()
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    proj = lambda name: _HeadProjection(h, e, self.w_init_variance_scale, name=name, **kw)
    self.q, self.k, self.v = proj("q"), proj("k"), proj("v")
    if self.output_gate:
      self.g = proj("g")
    self.o = _OutProjection(**kw)
    if self.conv_width:
      self.conv = self._conv()
    self.gates = _Gates(h, self.theta_max(), (self.init_theta_bias, self.init_eta_bias, self.init_alpha_bias),
                        param_dtype=self.param_dtype)
    self.out_norm = RMSNorm(eps=self.norm_eps, dtype=jnp.float32, param_dtype=self.param_dtype)
    self.memory = _InitialMemory(h, e, self.lmm_config(), self.zero_init_memory, self.param_dtype)

  # -- the layer ----------------------------------------------------------------------------------------------------

  def _raw_qkv(self, x: Array) -> Array:
    """The concatenated q/k/v projections [b, t, 3 H e] before the conv."""
    b, t, d = x.shape
    h, e = self.dims(d)
    return jnp.concatenate([self.q(x), self.k(x), self.v(x)], axis=2).reshape(b, t, 3 * h * e)

  def project(self, x: Array, segment_ids: Array | None, conv_state: ConvState | None,
              conv_prefix: Array | None = None) -> tuple[tuple[Array, ...], ConvState | None]:
    """q, k, v and the gates of spec §5 / §2.4 from ``x``.

    Args:
      x: [b, t, d] (already normalised) inputs.
      segment_ids: [b, t] document ids or None; the conv never mixes documents.
      conv_state: conv tails from a previous call (None: start of sequence).
      conv_prefix: [conv_width - 1, 3 H e] conv inputs that precede every document (see `absorb`), or None.

    Returns:
      ``((q, k, v, theta, eta, alpha), new_conv_state)``: q, k, v [b, t, H, e] and the float32 gates [b, t, H].
    """
    b, t, d = x.shape
    h, e = self.dims(d)
    qkv = self._raw_qkv(x)
    if self.conv_width:
      qkv, conv_state = self.conv(qkv, segment_ids=segment_ids, state=conv_state, prefix=conv_prefix)
    q, k, v = jnp.split(qkv.reshape(b, t, 3 * h, e), 3, axis=2)
    if self.qkv_silu:
      q, k, v = nn.silu(q), nn.silu(k), nn.silu(v)
    if self.qk_l2norm:
      q, k = _l2norm(q), _l2norm(k)
    return (q, k, v) + self.gates(x), conv_state

  def absorb(self, prefix: Array, params: titans_ops.MemoryParams, needed: Array | bool = True
             ) -> tuple[titans_ops.MemoryParams, Array | None]:
    """The memory after absorbing ``prefix`` from (W_0, 0): the state every document starts from (spec §6).

    MAG and MAL write the persistent tokens into the memory before the sequence (eqs. 26 and 29 use
    x~ = [P || x]). P is written like the first tokens of a document (chunk grid and gradient window from P's first
    token, conv from zeros) and its last, possibly partial, window is then closed, so that x starts a fresh chunk
    grid and gradient window at (W_P, S_P) and documents stay chunk-aligned [ours]. This equals LMM([P || x])
    exactly when N_p is a multiple of `ttt_batch_size`; otherwise it differs only in that closing. The conv of
    x's first tokens reads P's last projections, as in [P || x].

    Args:
      prefix: [N_p, d] the (normalised) prefix vectors.
      params: the learned `MemoryParams` (W_0).
      needed: a bool scalar; when False the (costly) absorption is skipped and W_0 is returned, for calls in
        which no document starts (a decode step, say).

    Returns:
      ``(params_P, conv_prefix)``: `MemoryParams` with weights W_P and momentum S_P (what a reset restores), and
      the [conv_width - 1, 3 H e] conv inputs before every document (None without conv).
    """
    n, d = prefix.shape
    config = self.lmm_config()
    sd = as_dtype(self.state_dtype)
    (q, k, v, theta, eta, alpha), _ = self.project(prefix[None], None, None)
    conv_prefix = None
    if self.conv_width:
      raw = self._raw_qkv(prefix[None])[0]
      w = self.conv_width - 1
      conv_prefix = jnp.pad(raw, ((max(w - n, 0), 0), (0, 0)))[-w:] if w else raw[:0]
    pad = (-n) % config.ttt_batch_size  # masked identity steps that close P's last window
    padded = [jnp.pad(a.astype(sd), ((0, 0), (0, pad)) + ((0, 0),) * (a.ndim - 2))
              for a in (q, k, v, theta, eta, alpha)]
    mask = jnp.pad(jnp.ones((1, n), sd), ((0, 0), (0, pad)))
    cast = lambda tree: jax.tree.map(lambda a: a.astype(sd), tree)

    def run(_):
      start = titans_ops.init_state(params, 1, config, dtype=sd)
      _, after = titans_ops.lmm_chunked(*padded, start, params=params, config=config, mask=mask, aligned=True)
      return jax.tree.map(lambda a: a[0], (after.weights, after.momentum))

    def skip(_):
      w0 = cast(params.weights)
      return w0, jax.tree.map(jnp.zeros_like, w0)

    weights, momentum = jax.lax.cond(needed, run, skip, None)
    return params._replace(weights=weights, momentum=momentum), conv_prefix

  def read_out(self, y: Array, x: Array) -> Array:
    """The output path W_O (RMSNorm(y) * SiLU(x W_G)) of spec §5.

    Args:
      y: [b, t, H, e] retrievals.
      x: [b, t, d] layer inputs (for the gate).

    Returns:
      [b, t, d] in the computation dtype.
    """
    b, t, d = x.shape
    h, e = self.dims(d)
    dtype = as_dtype(self.dtype) or x.dtype
    o = self.out_norm(y.reshape(b, t, h * e)).reshape(b, t, h, e)
    if self.output_gate:
      o = o * nn.silu(self.g(x).astype(jnp.float32))
    return self.o(o.astype(dtype), d)

  def memorize(self, q: Array, k: Array, v: Array, gates: tuple[Array, Array, Array], params, state, starts,
               segment_ids, *, return_aux: bool = False, aligned: bool = False):
    """Runs the test-time update (`lmm_chunked`, or `lmm_step` for one token) from ``state``.

    Args:
      q: [b, t, H, e] queries.
      k: [b, t, H, e] keys.
      v: [b, t, H, e] values.
      gates: float32 (theta, eta, alpha), each [b, t, H].
      params: the `MemoryParams`.
      state: the carried `NeuralMemoryState` (its `conv` is ignored).
      starts: [b, t] bool document starts (unused: the op handles them; kept for callers).
      segment_ids: [b, t] document ids or None.
      return_aux: also return the per-chunk diagnostics of `lmm_chunked`.
      aligned: ``state`` is known to hold no pending tokens (a fresh state), so `lmm_chunked` leaves out their
        buffer slots (one chunk fewer to compute; `lmm_chunked`'s ``aligned``).

    Returns:
      ``(y, memory_state, restart[, aux])`` with the retrievals y [b, t, H, e] (float32).
    """
    config = self.lmm_config()
    sd = as_dtype(self.state_dtype)
    b, t = q.shape[:2]
    mem = state.memory
    # A fresh state (from `init_state`): back to (W_0, 0) and a fresh gradient window, exactly what the op does
    # for a document start at a chunk boundary.
    fresh = titans_ops.init_state(params, b, config, dtype=sd)
    mem = mem._replace(
        weights=_tree_select(state.restart, fresh.weights, mem.weights),
        momentum=_tree_select(state.restart, fresh.momentum, mem.momentum),
        ref_weights=_tree_select(state.restart, fresh.ref_weights, mem.ref_weights),
        window_phase=jnp.where(state.restart, 0, mem.window_phase))
    f32 = lambda a: a.astype(sd)
    args = tuple(map(f32, (q, k, v) + tuple(gates)))
    if t == 1 and not return_aux:
      y, new_mem = titans_ops.lmm_step(*args, mem, segment_ids, params=params, config=config)
      aux = None
    else:
      out = titans_ops.lmm_chunked(*args, mem, segment_ids, params=params, config=config, return_aux=return_aux,
                                   aligned=aligned)
      y, new_mem, aux = out if return_aux else out + (None,)
    # A document start in the pending chunk already reset the returned state (the op applies it at the chunk's
    # first slot, complete or not), so nothing is left to restart.
    del starts
    return (y, new_mem, jnp.zeros_like(state.restart)) + ((aux,) if return_aux else ())

  def __call__(self, x: Array, *, segment_ids: Array | None = None, state: NeuralMemoryState | None = None,
               return_aux: bool = False, prefix: Array | None = None):
    """Reads from and writes to the memory over ``x`` from ``state``.

    Args:
      x: [b, t, d] (normalised) inputs.
      segment_ids: [b, t] document ids (None: one document); documents must start at multiples of `chunk_size`.
      state: state from a previous call (None: `init_state`).
      return_aux: also return diagnostics (spec §9) as a third output.
      prefix: [N_p, d] vectors the memory absorbs before every document (Titans persistent tokens in MAG / MAL,
        spec §6; see `absorb`), or None. Pass the same prefix on every call of a stream.

    Returns:
      ``(y, new_state)``, or ``(y, new_state, aux)`` with `return_aux`: y [b, t, d]; aux a dict of [b, N, H]
      per-chunk "loss_before", "loss_after" (mean inner loss of the chunk's tokens at the window-start and at the
      chunk-end weights), "surprise_norm" (norm of the theta-weighted surprise), "chunk_mask" [b, N] (1 for chunks
      applied in this call) and the mean gates "theta", "eta", "alpha" [b, H].
    """
    b, t, d = x.shape
    fresh = state is None
    if fresh:
      state = self.init_state(b, d)
    params = self.memory()
    starts = _document_starts(segment_ids, state.memory.last_segment, b, t)
    conv_prefix = None
    if prefix is not None:
      if prefix.ndim != 2 or prefix.shape[1] != d:
        raise ValueError(f"NeuralMemory: prefix must be [N_p, {d}], got shape {prefix.shape}")
      params, conv_prefix = self.absorb(prefix, params, needed=jnp.any(state.restart) | jnp.any(starts))
    (q, k, v, theta, eta, alpha), conv_state = self.project(x, segment_ids, state.conv, conv_prefix)
    out = self.memorize(q, k, v, (theta, eta, alpha), params, state, starts, segment_ids, return_aux=return_aux,
                        aligned=fresh)
    y, mem, restart = out[:3]
    result = self.read_out(y, x).astype(as_dtype(self.dtype) or x.dtype)
    new_state = NeuralMemoryState(conv_state, mem, restart)
    if not return_aux:
      return result, new_state
    aux = dict(out[3], theta=theta.mean(1), eta=eta.mean(1), alpha=alpha.mean(1))
    return result, new_state, aux


# ----------------------------------------------------------------------------------------------------------------
# Hybrids: MAG and MAL.
# ----------------------------------------------------------------------------------------------------------------


class TitansHybridState(NamedTuple):
  """Streaming state of `TitansMAG` / `TitansMAL`.

  Attributes:
    attention: the sliding-window KV cache (bounded by `window - 1` tokens).
    memory: the `NeuralMemoryState`.
  """
  attention: KVCache
  memory: NeuralMemoryState


class _TitansHybrid(nn.Module):
  """Shared fields and sub-layers of MAG and MAL (see those classes).

  Attributes:
    num_heads: attention heads (and memory heads unless `memory_options` sets them).
    head_dim: per-head width (None: d_model // num_heads).
    d_model: model width (needed by `init_state` / `state_size` on an unbound module).
    window: sliding-window length of the attention (None: full causal attention with `max_len` cache slots).
    num_persistent: N_p persistent-memory vectors (eq. 19), owned by the block: visible to every attention query
      and, with `memory_absorbs_persistent`, written into the memory before every document; 0 disables.
    memory_absorbs_persistent: the memory branch runs over [P || x] (eqs. 26 and 29 use x~ = [P || x]; spec §6;
      see `NeuralMemory.absorb`); False feeds it x only.
    max_len: cache slots when `window` is None.
    attention_conv_width: short conv before the attention's q/k/v (0: none; an addition of ours, off by default).
    rope_max_wavelength: RoPE base of the attention.
    memory_options: extra `NeuralMemory` fields as ``((name, value), ...)`` (e.g. chunk_size, depth, max_lr).
    dtype: computation dtype.
    param_dtype: parameter dtype.
    state_dtype: state dtype (float32).
  """
  num_heads: int
  head_dim: int | None = None
  d_model: int | None = None
  window: int | None = None
  num_persistent: int = 0
  memory_absorbs_persistent: bool = True
  max_len: int = 2048
  attention_conv_width: int = 0
  rope_max_wavelength: float = 10_000.0
  memory_options: tuple[tuple[str, Any], ...] = ()
  dtype: DType = None
  param_dtype: DType = jnp.float32
  state_dtype: DType = jnp.float32

  def _attention(self, **kwargs) -> MultiHeadAttention:
    # The block owns P (`_persistent`) and passes it to the attention, which therefore has none of its own.
    return MultiHeadAttention(
        num_heads=self.num_heads, head_dim=self.head_dim, window=self.window, num_persistent=0,
        max_len=self.max_len, conv_width=self.attention_conv_width, d_model=self.d_model,
        rope_max_wavelength=self.rope_max_wavelength, dtype=self.dtype, param_dtype=self.param_dtype,
        state_dtype=self.state_dtype, **kwargs)

  def _memory(self, **kwargs) -> NeuralMemory:
    fields = dict(num_heads=self.num_heads, head_dim=self.head_dim, d_model=self.d_model, dtype=self.dtype,
                  param_dtype=self.param_dtype, state_dtype=self.state_dtype)
    fields.update(dict(self.memory_options))
    return NeuralMemory(**fields, **kwargs)

  def _persistent(self, d: int, dtype: Any) -> tuple[Array | None, Array | None]:
    """(P for the attention, P for the memory or None), P [N_p, d] in the computation dtype."""
    if not self.num_persistent:
      return None, None
    p = self.persistent(d).astype(dtype)
    return p, (p if self.memory_absorbs_persistent else None)

  def init_state(self, batch_size: int, d_model: int | None = None) -> TitansHybridState:
    """Empty attention cache and a fresh memory (W_0, or W_P after the persistent tokens, at the first chunk)."""
    return TitansHybridState(self._attention(parent=None).init_state(batch_size, d_model),
                             self._memory(parent=None).init_state(batch_size, d_model))

  def state_size(self, d_model: int | None = None) -> int:
    """Floats of state per sequence: the attention cache plus the memory state."""
    return self._attention(parent=None).state_size(d_model) + self._memory(parent=None).state_size(d_model)


class TitansMAG(_TitansHybrid):
  """Memory as a gate (paper eqs. 26-28, Figs. 3b and 4; spec §7.2), a sequence mixer.

  ::

      y = SWA*(x)    sliding-window attention with the persistent prefix always visible   (eq. 27)
      z = LMM(x)     the NeuralMemory layer, in parallel on the same input
      o = RMSNorm_y(y) * sigmoid(RMSNorm_z(z))    ("sigmoid_z"; or sigmoid(RMSNorm_y(y) * RMSNorm_z(z)))
      out = o W_O

  [paper] the two branches and a non-linear gate of the normalised outputs, the memory over x~ = [P || x]
  (eq. 26; `NeuralMemory.absorb` gives the [ours] details); [ours] the gate's exact form (the paper's wording is
  ambiguous) and an output projection.

  Attributes:
    gate: "sigmoid_z" or "sigmoid_product".
  """
  gate: str = "sigmoid_z"

  def setup(self):
    if self.gate not in ("sigmoid_z", "sigmoid_product"):
      raise ValueError(f"TitansMAG: gate must be 'sigmoid_z' or 'sigmoid_product', got {self.gate!r}")
    self.attention = self._attention()
    self.memory = self._memory()
    if self.num_persistent:
      self.persistent = _Persistent(self.num_persistent, self.param_dtype)
    self.norm_y = RMSNorm(dtype=jnp.float32, param_dtype=self.param_dtype)
    self.norm_z = RMSNorm(dtype=jnp.float32, param_dtype=self.param_dtype)
    self.out = _Linear(dtype=self.dtype, param_dtype=self.param_dtype)

  def __call__(self, x: Array, *, segment_ids: Array | None = None,
               state: TitansHybridState | None = None) -> tuple[Array, TitansHybridState]:
    """Runs both branches over ``x`` from ``state`` and gates them.

    Args:
      x: [b, t, d] (normalised) inputs.
      segment_ids: [b, t] document ids (None: one document).
      state: state from a previous call (None: `init_state`).

    Returns:
      ``(out, new_state)`` with out [b, t, d].
    """
    b, t, d = x.shape
    fresh = state is None  # a fresh memory state holds no pending tokens (NeuralMemory skips their slots)
    if fresh:
      state = self.init_state(b, d)
    p_attn, p_mem = self._persistent(d, as_dtype(self.dtype) or x.dtype)
    y, attn_state = self.attention(x, segment_ids=segment_ids, state=state.attention, persistent=p_attn)
    z, mem_state = self.memory(x, segment_ids=segment_ids, state=None if fresh else state.memory, prefix=p_mem)
    yn, zn = self.norm_y(y), self.norm_z(z)
    o = yn * jax.nn.sigmoid(zn) if self.gate == "sigmoid_z" else jax.nn.sigmoid(yn * zn)
    out = self.out(o.astype(as_dtype(self.dtype) or x.dtype))
    return out.astype(as_dtype(self.dtype) or x.dtype), TitansHybridState(attn_state, mem_state)


class TitansMAL(_TitansHybrid):
  """Memory as a layer (paper eqs. 29-31, Fig. 5; spec §7.3), a sequence mixer.

  Two residual sub-blocks inside one mixer [ours]: with m = LMM(x) and u = x + m,
  ``out = m + SWA(RMSNorm(u))``, so the LM block's ``x + out`` equals ``u + SWA(RMSNorm(u))``. The paper writes
  plain SW-Attn here; the persistent prefix (if any) is visible to every query, as in MAG, and the memory runs
  over x~ = [P || x] (eq. 29; `NeuralMemory.absorb`).
  """

  def setup(self):
    self.memory = self._memory()
    self.attention = self._attention()
    if self.num_persistent:
      self.persistent = _Persistent(self.num_persistent, self.param_dtype)
    self.norm = RMSNorm(dtype=self.dtype, param_dtype=self.param_dtype)

  def __call__(self, x: Array, *, segment_ids: Array | None = None,
               state: TitansHybridState | None = None) -> tuple[Array, TitansHybridState]:
    """Memory layer, then sliding-window attention, over ``x`` from ``state``.

    Args:
      x: [b, t, d] (normalised) inputs.
      segment_ids: [b, t] document ids (None: one document).
      state: state from a previous call (None: `init_state`).

    Returns:
      ``(out, new_state)`` with out [b, t, d].
    """
    b, t, d = x.shape
    fresh = state is None  # a fresh memory state holds no pending tokens (NeuralMemory skips their slots)
    if fresh:
      state = self.init_state(b, d)
    p_attn, p_mem = self._persistent(d, as_dtype(self.dtype) or x.dtype)
    m, mem_state = self.memory(x, segment_ids=segment_ids, state=None if fresh else state.memory, prefix=p_mem)
    a, attn_state = self.attention(self.norm(x + m), segment_ids=segment_ids, state=state.attention,
                                   persistent=p_attn)
    out = (m + a).astype(as_dtype(self.dtype) or x.dtype)
    return out, TitansHybridState(attn_state, mem_state)


# ----------------------------------------------------------------------------------------------------------------
# MAC: memory as context.
# ----------------------------------------------------------------------------------------------------------------


class TitansMACState(NamedTuple):
  """Streaming state of `TitansMAC`; batch-leading, float32 except the integer bookkeeping.

  The memory is kept at the last completed chunk boundary; the tokens of the incomplete chunk are kept as their
  attention outputs Y (their keys and values are already in the segment cache), and that chunk's memory write is
  recomputed from the boundary when it completes, so any split of a sequence equals one call.

  Attributes:
    x_conv: the memory's conv tails over the input stream (the eq. 21 queries).
    y_conv: the memory's conv tails over the attention-output stream, at the last chunk boundary.
    memory: `MemoryState` at the last chunk boundary (never has pending tokens).
    restart: [b] bool, reset the memory to (W_0, 0) before the next chunk (set by `init_state`).
    pending_y: [b, c, d] attention outputs of the incomplete chunk's tokens (slot order; the rest is zero).
    n_pending: [b] int32, tokens in the incomplete chunk.
    keys: [b, C, 2, H, e] attention keys of the current segment's tokens, by offset in the segment; index 0 of
      the third axis is the retrieval h_j (eq. 21), index 1 the token x_j.
    values: [b, C, 2, H, e] the matching values.
    valid: [b, C] bool, which segment offsets hold a token.
    last_segment: [b] int32, document id of the last token seen.
  """
  x_conv: ConvState | None
  y_conv: ConvState | None
  memory: titans_ops.MemoryState
  restart: Array
  pending_y: Array
  n_pending: Array
  keys: Array
  values: Array
  valid: Array
  last_segment: Array


class TitansMAC(nn.Module):
  """Memory as context (paper §4.1, eqs. 21-25, Figs. 2 and 3a; spec §7.1), a sequence mixer.

  The sequence is cut into segments of C = `segment_len` tokens. For a segment with inputs X and memory M at its
  start::

      h_i = LMM-read(M; q(x_i))                     eq. 21, retrieval with the pre-segment memory (no update)
      Y   = Attn([P || h || X]) at the X positions  eqs. 22-23; query i sees P, h_j and x_j for j <= i
      write Y into the memory (k, v, gates from Y)   eq. 24, one TTT window (b = C) of chunks of c tokens
      o_i = RMSNorm(Y_i) * sigmoid(RMSNorm(z_i)),  z_i = LMM-read(M^(tau(i)); q(Y_i))     eq. 25
      out = o W_out

  [paper] the three steps, persistent tokens P, the Fig. 3a attention over [P || h || X].
  [ours] the aligned causal mask over h (a fully visible h block would leak later tokens, spec §7.1 trap 1); the
  eq. 25 retrieval follows the chunk rule of spec §2.3, so position i reads the memory after the chunks completed
  up to i (trap 2); h_i = the LMM layer's output path (RMSNorm, SiLU gate, W_O) on the raw retrieval, so h lives
  in model space and is projected by the attention's W_K / W_V like any token; h_j and x_j share RoPE position j
  (segment-relative); the memory's W_Q serves eqs. 21 and 25 (separate conv streams); the MAG gate for eq. 25.

  Segments restart at document starts (which must fall on multiples of the memory chunk c): a packed document then
  computes exactly what it computes alone. The memory's gradient window b is the segment (`ttt_batch_size` = C),
  so its window-start weights are the eq. 21 memory.

  Attributes:
    num_heads: attention heads (and memory heads unless `memory_options` sets them).
    head_dim: per-head width (None: d_model // num_heads).
    d_model: model width (needed by `init_state` / `state_size` on an unbound module).
    segment_len: C, tokens per segment; a multiple of the memory's `chunk_size`.
    num_persistent: N_p persistent-memory vectors (eq. 19), visible to every query; 0 disables.
    rope_max_wavelength: RoPE base of the attention.
    gate: eq. 25's gate, "sigmoid_z" or "sigmoid_product" (as `TitansMAG`).
    memory_options: extra `NeuralMemory` fields as ``((name, value), ...)``; `ttt_batch_size` is forced to C.
    dtype: computation dtype.
    param_dtype: parameter dtype.
    state_dtype: state dtype (float32).
  """
  num_heads: int
  head_dim: int | None = None
  d_model: int | None = None
  segment_len: int = 64
  num_persistent: int = 0
  rope_max_wavelength: float = 10_000.0
  gate: str = "sigmoid_z"
  memory_options: tuple[tuple[str, Any], ...] = ()
  dtype: DType = None
  param_dtype: DType = jnp.float32
  state_dtype: DType = jnp.float32

  def _memory(self, **kwargs) -> NeuralMemory:
    fields = dict(num_heads=self.num_heads, head_dim=self.head_dim, d_model=self.d_model, dtype=self.dtype,
                  param_dtype=self.param_dtype, state_dtype=self.state_dtype)
    fields.update(dict(self.memory_options))
    fields["ttt_batch_size"] = self.segment_len
    memory = NeuralMemory(**fields, **kwargs)
    if self.segment_len % memory.chunk_size:
      raise ValueError(f"TitansMAC: segment_len={self.segment_len} must be a multiple of the memory chunk_size="
                       f"{memory.chunk_size}")
    return memory

  def _dims(self, d_model: int | None = None) -> tuple[int, int, int]:
    d_model = d_model or self.d_model
    if d_model is None:
      raise ValueError("TitansMAC: set d_model to call init_state / state_size on an unbound module")
    head_dim = self.head_dim or d_model // self.num_heads
    return d_model, self.num_heads, head_dim

  def init_state(self, batch_size: int, d_model: int | None = None) -> TitansMACState:
    """The state before the first token (the memory is set to W_0 at the first chunk).

    Args:
      batch_size: number of sequences.
      d_model: model width (None: the `d_model` field).

    Returns:
      The initial `TitansMACState`.
    """
    d, h, e = self._dims(d_model)
    memory = self._memory(parent=None)
    mem = memory.init_state(batch_size, d)
    c, cs = memory.chunk_size, self.segment_len
    sd = as_dtype(self.state_dtype)
    zeros_int = jnp.zeros((batch_size,), jnp.int32)
    return TitansMACState(
        x_conv=mem.conv, y_conv=mem.conv, memory=mem.memory, restart=jnp.ones((batch_size,), bool),
        pending_y=jnp.zeros((batch_size, c, d), sd), n_pending=zeros_int,
        keys=jnp.zeros((batch_size, cs, 2, h, e), sd), values=jnp.zeros((batch_size, cs, 2, h, e), sd),
        valid=jnp.zeros((batch_size, cs), bool), last_segment=zeros_int)

  def state_size(self, d_model: int | None = None) -> int:
    """Floats of state per sequence: memory (+ both conv streams), the segment's keys/values, pending outputs."""
    d, h, e = self._dims(d_model)
    memory = self._memory(parent=None)
    conv = (memory.conv_width - 1) * 3 * memory.dims(d)[0] * memory.dims(d)[1] if memory.conv_width else 0
    return memory.state_size(d) + conv + 4 * self.segment_len * h * e + memory.chunk_size * d

  def setup(self):
    if self.gate not in ("sigmoid_z", "sigmoid_product"):
      raise ValueError(f"TitansMAC: gate must be 'sigmoid_z' or 'sigmoid_product', got {self.gate!r}")
    self.memory = self._memory()
    _, h, e = self._dims(self.d_model or (self.head_dim or 0) * self.num_heads)
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    self.attn_q = _HeadProjection(h, e, **kw)
    self.attn_k = _HeadProjection(h, e, **kw)
    self.attn_v = _HeadProjection(h, e, **kw)
    self.attn_o = _OutProjection(**kw)
    self.norm_y = RMSNorm(dtype=jnp.float32, param_dtype=self.param_dtype)
    self.norm_z = RMSNorm(dtype=jnp.float32, param_dtype=self.param_dtype)
    self.out = _Linear(**kw)
    if self.num_persistent:
      self.persistent = _Persistent(self.num_persistent, self.param_dtype)

  def __call__(self, x: Array, *, segment_ids: Array | None = None,
               state: TitansMACState | None = None) -> tuple[Array, TitansMACState]:
    """Runs MAC over ``x`` from ``state``: one `lax.scan` step per memory chunk of c tokens.

    Args:
      x: [b, t, d] (normalised) inputs.
      segment_ids: [b, t] document ids (None: one document); documents start at multiples of the memory chunk.
      state: state from a previous call (None: `init_state`).

    Returns:
      ``(out, new_state)`` with out [b, t, d].
    """
    b, t, d = x.shape
    known = None if state is None else titans_ops.concrete_value(state.n_pending)
    no_pending = state is None or (known is not None and not known.any())
    if state is None:
      state = self.init_state(b, d)
    memory = self.memory
    config = memory.lmm_config()
    c, cs = config.chunk_size, self.segment_len
    sd = as_dtype(self.state_dtype)
    dtype = as_dtype(self.dtype) or x.dtype
    params = memory.memory()
    fresh = titans_ops.init_state(params, b, config, dtype=sd)
    n_pend = state.n_pending

    starts = _document_starts(segment_ids, state.last_segment, b, t)
    _check_alignment(starts, n_pend, c)
    # Per-token work that does not depend on the memory: the eq. 21 queries (memory W_Q, x-stream conv) and the
    # attention projections of the tokens.
    (q_read, *_), x_conv = memory.project(x, segment_ids, state.x_conv)
    aq, ak, av = self.attn_q(x), self.attn_k(x), self.attn_v(x)
    h_heads, e = aq.shape[-2:]
    prefix_k = prefix_v = None
    if self.num_persistent:
      persistent = self.persistent(d)
      prefix_k, prefix_v = self.attn_k(persistent.astype(dtype)), self.attn_v(persistent.astype(dtype))

    # Lay the call's tokens into chunk slots after the n_pend pending ones (same layout as the op); a call known to
    # start on a chunk boundary (a fresh state, as in training) needs no slots for them.
    n_chunks = -(-((0 if no_pending else c - 1) + t) // c)
    n_slots = n_chunks * c

    def place(a):
      buf = jnp.zeros((b, n_slots) + a.shape[2:], a.dtype)
      return jax.vmap(lambda bf, v, i: jax.lax.dynamic_update_slice_in_dim(bf, v, i, axis=0))(buf, a, n_pend)

    def chunked(a):
      return jnp.moveaxis(a.reshape((b, n_chunks, c) + a.shape[2:]), 1, 0)

    is_new = place(jnp.ones((b, t), bool))
    xs = tuple(chunked(place(a)) for a in (x, q_read, aq, ak, av, is_new, starts))
    # A document start is always at slot 0 of a chunk (checked above), so it resets the chunk's carry.

    restart = state.restart
    mem0 = state.memory._replace(
        weights=_tree_select(restart, fresh.weights, state.memory.weights),
        momentum=_tree_select(restart, fresh.momentum, state.memory.momentum),
        ref_weights=_tree_select(restart, fresh.ref_weights, state.memory.ref_weights),
        window_phase=jnp.where(restart, 0, state.memory.window_phase))
    empty_conv = None
    if state.y_conv is not None:
      empty_conv = memory._conv(parent=None).init_state(b, state.y_conv.inputs.shape[-1])

    read = jax.vmap(jax.vmap(lambda w, z, nrm: titans_ops.apply_memory(w, z, nrm, config),
                             in_axes=(0, 1, 0), out_axes=1), in_axes=(0, 0, None))
    slot = jnp.arange(c)

    def step(carry, inputs):
      mem, y_conv, pending_y, keys, values, valid, old = carry
      x_c, q_c, aq_c, ak_c, av_c, new_c, start_c = inputs
      reset = start_c[:, 0] & new_c[:, 0]
      mem = mem._replace(weights=_tree_select(reset, fresh.weights, mem.weights),
                         momentum=_tree_select(reset, fresh.momentum, mem.momentum),
                         ref_weights=_tree_select(reset, fresh.ref_weights, mem.ref_weights),
                         window_phase=jnp.where(reset, 0, mem.window_phase))
      if y_conv is not None:
        y_conv = _tree_select(reset, empty_conv, y_conv)
      valid = valid & ~reset[:, None]
      old = old & ~reset[:, None]
      offset = mem.window_phase * c  # [b] offset of this chunk in its segment
      # Eq. 21: retrieve with the segment-start memory (the op's window reference once the window has begun).
      m_pre = _tree_select(mem.window_phase == 0, mem.weights, mem.ref_weights)
      h = memory.read_out(read(m_pre, q_c.astype(sd), jax.tree.map(lambda a: a.astype(sd), params.norm)
                               if params.norm is not None else None).astype(dtype), x_c)
      pos = offset[:, None] + slot[None]
      rot = lambda z: attn_ops.rope(z, pos, max_wavelength=self.rope_max_wavelength)
      hk, hv = self.attn_k(h), self.attn_v(h)
      new_k = jnp.stack([rot(hk), rot(ak_c)], axis=2).astype(sd)
      new_v = jnp.stack([hv, av_c], axis=2).astype(sd)
      put = jax.vmap(lambda buf, v, i: jax.lax.dynamic_update_slice_in_dim(buf, v, i, axis=0))
      window = lambda buf: jax.vmap(lambda bf, i: jax.lax.dynamic_slice_in_dim(bf, i, c, axis=0))(buf, offset)
      sel = lambda m, a, bb: jnp.where(m.reshape(m.shape + (1,) * (a.ndim - 2)), a, bb)
      keys = put(keys, sel(new_c, new_k, window(keys)), offset)
      values = put(values, sel(new_c, new_v, window(values)), offset)
      valid = put(valid, new_c | window(valid), offset)
      # Eqs. 22-23 with the aligned causal mask: query at offset p sees P, and h_j, x_j for j <= p.
      seen = valid[:, None, :] & (jnp.arange(cs)[None, None, :] <= pos[:, :, None])  # [b, c, C]
      mask = jnp.repeat(seen, 2, axis=2)
      flat = lambda a: a.reshape(b, 2 * cs, h_heads, e).astype(dtype)
      att = attn_ops.dot_product_attention(rot(aq_c), flat(keys), flat(values), mask, prefix_k=prefix_k,
                                           prefix_v=prefix_v, prefix_q=aq_c)
      y_new = self.attn_o(att, d)
      y_c = sel(new_c, y_new.astype(sd), pending_y)
      live = new_c | old
      # Eq. 24: write the chunk's attention outputs from the last chunk boundary; eq. 25: read back.
      (q2, k2, v2, th, et, al), y_conv_new = memory.project(y_c.astype(dtype), None, y_conv)
      r, mem_new = titans_ops.lmm_chunked(*(a.astype(sd) for a in (q2, k2, v2, th, et, al)), mem,
                                          params=params, config=config, mask=live, aligned=True)
      z = memory.read_out(r.astype(dtype), y_c.astype(dtype))
      yn, zn = self.norm_y(y_c), self.norm_z(z)
      o = yn * jax.nn.sigmoid(zn) if self.gate == "sigmoid_z" else jax.nn.sigmoid(yn * zn)
      out = self.out(o.astype(dtype))
      complete = live.all(axis=1)
      mem = jax.tree.map(lambda n, o_: jnp.where(complete.reshape((b,) + (1,) * (n.ndim - 1)), n, o_),
                         mem_new, mem)
      if y_conv is not None:
        y_conv = _tree_select(complete, y_conv_new, y_conv)
      # The incomplete chunk's outputs wait for its write; a chunk slot range with no token changes nothing.
      kept = jnp.where(complete[:, None, None], 0.0, jnp.where(live[..., None], y_c, 0.0)).astype(sd)
      pending_y = jnp.where(live.any(axis=1)[:, None, None], kept, pending_y)
      segment_done = complete & (mem.window_phase == 0)
      valid = valid & ~segment_done[:, None]
      old = jnp.zeros_like(old)
      return (mem, y_conv, pending_y, keys, values, valid, old), out

    old0 = slot[None, :] < n_pend[:, None]
    carry0 = (mem0, state.y_conv, state.pending_y, state.keys, state.values, state.valid, old0)
    if self.is_initializing():  # create every parameter outside the scan (linen cannot create them inside)
      step(carry0, jax.tree.map(lambda a: a[0], xs))
    carry, outs = jax.lax.scan(step, carry0, xs)
    mem, y_conv, pending_y, keys, values, valid, _ = carry
    outs = jnp.moveaxis(outs, 0, 1).reshape(b, n_slots, d)
    y = jax.vmap(lambda o, i: jax.lax.dynamic_slice_in_dim(o, i, t, axis=0))(outs, n_pend)
    last_segment = state.last_segment if segment_ids is None else segment_ids[:, -1].astype(jnp.int32)
    new_state = TitansMACState(
        x_conv=x_conv, y_conv=y_conv, memory=mem, restart=jnp.zeros_like(restart), pending_y=pending_y,
        n_pending=((n_pend + t) % c).astype(jnp.int32), keys=keys, values=values, valid=valid,
        last_segment=last_segment)
    return y.astype(dtype), new_state
