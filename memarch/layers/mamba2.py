"""Mamba-2 (Dao & Gu, 2024) as a memarch sequence mixer: the SSD block with a causal conv and a gated RMSNorm.

The block (spec ``bmojo.md`` §5.1)::

    [z, x', B, C, dt] = in_proj(u)                   z, x': d_inner = expand * d_model;  B, C: G * N;  dt: H
    x', B, C = SiLU(causal_depthwise_conv([x', B, C]))
    A_h = -exp(A_log_h);   dt = softplus(dt + dt_bias_h)
    y = SSD(x', dt, A, B, C) + D_h x'
    out = out_proj(RMSNorm(y * SiLU(z)))             gated RMSNorm, per group, after the gate

The state is the conv's last ``conv_width - 1`` inputs and the float32 SSM state ``[b, H, P, N]``; one call runs the
chunked SSD form from it, ``t == 1`` the recurrent step. Packed documents: the conv masks taps across a document
boundary and the SSM state is dropped at a document start.

Paper: the block and its initialisation. Ours: the parameter layout (``in_proj`` stored as three matrices so each
carries one set of logical axes) and the segment handling.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from memarch.layers.common import (CausalConv1D, ConvState, DType, as_dtype, resolve_sequence_axis,
                                   variance_scaling)
from memarch.ops import sequence_parallel
from memarch.ops import ssd as ssd_ops
from memarch.ops.scan import ScanType, segment_starts
from memarch.typing import Array


class Mamba2State(NamedTuple):
  """Recurrent state of one Mamba-2 layer, batch-leading.

  Attributes:
    conv: the causal conv's last ``conv_width - 1`` inputs ``[x', B, C]`` and their document ids (the last id is
      also the document of the previous token, which decides a reset at the next call's first token).
    ssm: [b, num_heads, head_dim, d_state] SSM state (float32 by default).
  """
  conv: ConvState
  ssm: Array


def _dt_bias_init(dt_min: float, dt_max: float, dt_floor: float):
  """``softplus⁻¹(dt)`` with ``dt ~ logU[dt_min, dt_max]`` floored at ``dt_floor`` (Mamba-2's dt_bias init)."""
  def init(key, shape, dtype=jnp.float32):
    u = jax.random.uniform(key, shape, jnp.float32)
    dt = jnp.maximum(jnp.exp(u * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)), dt_floor)
    return (dt + jnp.log(-jnp.expm1(-dt))).astype(dtype)  # inverse softplus
  return init


def _a_log_init(a_min: float, a_max: float):
  """``log A`` with ``A ~ U[a_min, a_max]``."""
  def init(key, shape, dtype=jnp.float32):
    return jnp.log(jax.random.uniform(key, shape, jnp.float32, a_min, a_max)).astype(dtype)
  return init


class Mamba2(nn.Module):
  """The Mamba-2 block following the layer protocol (see the module docstring).

  Attributes:
    d_model: input / output width (needed by ``init_state`` / ``state_size`` on an unbound module; None: read
      from the input when called).
    d_state: SSM state width ``N`` per head (Mamba-2 default 128; 16-64 at MQAR scale).
    expand: ``d_inner = expand * d_model``.
    head_dim: SSM head width ``P`` (None: ``min(64, d_inner)``); must divide ``d_inner``.
    num_groups: ``G`` groups of heads sharing ``B`` and ``C``; must divide the number of heads.
    conv_width: taps of the causal depthwise conv (>= 2: the conv state also carries the previous document id).
    chunk_size: chunk length ``Q`` of the chunked SSD form.
    scan_type: SSD form for ``t > 1``: ``AUTO`` / ``CHUNKED`` (chunked) or ``LINEAR`` (token recurrence).
    a_init_range: ``A`` is initialised ``U[lo, hi]`` (stored as ``A_log``).
    dt_init_range: ``dt`` at init is ``logU[lo, hi]``, stored as its inverse softplus in ``dt_bias``.
    dt_init_floor: lower bound of ``dt`` at init.
    norm_eps: epsilon of the gated RMSNorm.
    w_init_variance_scale: variance multiplier of the input projections' initialiser.
    dtype: computation dtype (None: promoted input dtype); the SSD itself always runs in float32.
    param_dtype: parameter dtype.
    state_dtype: dtype of the carried conv and SSM states (float32 by default).
    sequence_axis: mesh axis (of the mesh set by ``jax.set_mesh``) to split the sequence over for ``t > 1`` (None: the
      axis the ``act_len`` logical rule names on the current mesh, if any, see
      :func:`memarch.layers.common.resolve_sequence_axis`; unsharded without one). The conv and the SSD then run under
      ``jax.shard_map``, manual over this axis only, with a ``conv_width - 1`` token halo and the SSM state pass of
      :mod:`memarch.ops.sequence_parallel` (spec §5.5); ``t`` must be divisible by the axis size. A given ``state`` is
      the state before the global first token (shard 0 starts from it) and the returned state is the true one after
      the global last token, as unsharded.
  """
  d_model: int | None = None
  d_state: int = 128
  expand: int = 2
  head_dim: int | None = None
  num_groups: int = 1
  conv_width: int = 4
  chunk_size: int = 64
  scan_type: ScanType | str = ScanType.AUTO
  a_init_range: tuple[float, float] = (1.0, 16.0)
  dt_init_range: tuple[float, float] = (1e-3, 0.1)
  dt_init_floor: float = 1e-4
  norm_eps: float = 1e-5
  w_init_variance_scale: float = 1.0
  dtype: DType = None
  param_dtype: DType = jnp.float32
  state_dtype: DType = jnp.float32
  sequence_axis: str | None = None

  def dims(self, d_model: int | None = None) -> tuple[int, int, int, int]:
    """``(d_inner, num_heads, head_dim, conv_channels)``, validating the fields.

    Args:
      d_model: model width (None: the ``d_model`` field).

    Returns:
      The inner width, number of SSM heads, head width and conv channels ``d_inner + 2 G N``.

    Raises:
      ValueError: naming the field that makes the shapes inconsistent.
    """
    d_model = self.d_model if d_model is None else d_model
    if d_model is None:
      raise ValueError("Mamba2: set d_model to call init_state / state_size on an unbound module")
    d_inner = self.expand * d_model
    head_dim = self.head_dim or min(64, d_inner)
    if d_inner % head_dim:
      raise ValueError(f"Mamba2: head_dim={head_dim} does not divide d_inner = expand * d_model = {d_inner}")
    heads = d_inner // head_dim
    if heads % self.num_groups:
      raise ValueError(f"Mamba2: num_groups={self.num_groups} does not divide the {heads} heads")
    if self.conv_width < 2:
      raise ValueError(f"Mamba2: conv_width={self.conv_width} must be >= 2")
    if self.chunk_size < 1:
      raise ValueError(f"Mamba2: chunk_size={self.chunk_size} must be >= 1")
    return d_inner, heads, head_dim, d_inner + 2 * self.num_groups * self.d_state

  def init_state(self, batch_size: int, d_model: int | None = None) -> Mamba2State:
    """Zeros: an empty conv window (marked as no document) and a zero SSM state.

    Args:
      batch_size: number of sequences.
      d_model: model width (None: the ``d_model`` field).

    Returns:
      The state before the first token.
    """
    _, heads, head_dim, channels = self.dims(d_model)
    conv = CausalConv1D(width=self.conv_width, state_dtype=self.state_dtype, parent=None).init_state(
        batch_size, channels)
    ssm = jnp.zeros((batch_size, heads, head_dim, self.d_state), as_dtype(self.state_dtype))
    return Mamba2State(conv, ssm)

  def state_size(self, d_model: int | None = None) -> int:
    """Floats of state per sequence: ``H P N`` (SSM) + ``(conv_width - 1)(d_inner + 2 G N)`` (conv window)."""
    _, heads, head_dim, channels = self.dims(d_model)
    return heads * head_dim * self.d_state + (self.conv_width - 1) * channels

  @nn.compact
  def __call__(self, x: Array, *, segment_ids: Array | None = None,
               state: Mamba2State | None = None) -> tuple[Array, Mamba2State]:
    """Runs the block over ``x`` from ``state``.

    Args:
      x: [b, t, d] inputs.
      segment_ids: [b, t] document ids (None: one document).
      state: state from a previous call (None: :meth:`init_state`).

    Returns:
      ``(y, new_state)``: output [b, t, d] and the state after the last token.
    """
    b, t, d = x.shape
    d_inner, heads, head_dim, _ = self.dims(d)
    g, n = self.num_groups, self.d_state
    pd = as_dtype(self.param_dtype)
    dtype = as_dtype(self.dtype)
    if state is None:
      state = self.init_state(b, d)

    init_in = variance_scaling(self.w_init_variance_scale, in_axis=0, out_axis=(1, 2))
    w_zx = self.param("in_zx", nn.with_logical_partitioning(init_in, ("embed", None, "mlp")), (d, 2, d_inner), pd)
    w_bc = self.param("in_bc", nn.with_logical_partitioning(init_in, ("embed", None, None)), (d, 2, g * n), pd)
    w_dt = self.param("in_dt", nn.with_logical_partitioning(
        variance_scaling(self.w_init_variance_scale), ("embed", "heads")), (d, heads), pd)
    a_log = self.param("A_log", nn.with_logical_partitioning(_a_log_init(*self.a_init_range), ("heads",)),
                       (heads,), pd)
    dt_bias = self.param("dt_bias", nn.with_logical_partitioning(
        _dt_bias_init(*self.dt_init_range, self.dt_init_floor), ("heads",)), (heads,), pd)
    d_skip = self.param("D", nn.with_logical_partitioning(nn.initializers.ones_init(), ("heads",)), (heads,), pd)
    norm_scale = self.param("norm_scale", nn.with_logical_partitioning(nn.initializers.zeros_init(), ("mlp",)),
                            (d_inner,), pd)
    w_out = self.param("out", nn.with_logical_partitioning(variance_scaling(1.0), ("mlp", "embed")),
                       (d_inner, d), pd)
    x_c, w_zx, w_bc, w_dt, w_out = nn.dtypes.promote_dtype(x, w_zx, w_bc, w_dt, w_out, dtype=dtype)

    zx = jnp.einsum("btd,dkf->btkf", x_c, w_zx)
    z, xp = zx[:, :, 0], zx[:, :, 1]
    bc = jnp.einsum("btd,dkf->btkf", x_c, w_bc).reshape(b, t, 2 * g * n)
    dt = jnp.einsum("btd,dh->bth", x_c, w_dt)

    conv = CausalConv1D(width=self.conv_width, dtype=self.dtype, param_dtype=self.param_dtype,
                        state_dtype=self.state_dtype, name="conv")
    # The SSD parameters and the recurrence stay in float32 whatever the activation dtype.
    a = -jnp.exp(a_log.astype(jnp.float32))
    dt = jax.nn.softplus(dt.astype(jnp.float32) + dt_bias.astype(jnp.float32))
    if segment_ids is not None:
      segment_ids = segment_ids.astype(jnp.int32)

    sequence_axis = resolve_sequence_axis(self.sequence_axis)
    if sequence_axis is not None and t > 1:
      # The conv runs inside the shard_map as a pure function of its parameters (created here at init).
      xbc = jnp.concatenate([xp, bc], axis=-1)
      if self.is_initializing():
        conv(xbc[:, :1])
      conv_fn = lambda p, u, s, st: conv.clone(parent=None).apply({"params": p}, u, segment_ids=s,
                                                                  state=ConvState(*st))
      y, conv_state, ssm = sequence_parallel.conv_ssd_sequence_parallel(
          conv_fn, nn.meta.unbox(conv.variables["params"]), xbc, dt, a, d_skip, segment_ids, tuple(state.conv),
          state.ssm, d_inner=d_inner, groups=g, axis_name=sequence_axis, chunk_size=self.chunk_size,
          scan_type=self.scan_type)
      conv_state = ConvState(*conv_state)
    else:
      # Whether the first token starts a new document: its id differs from the previous token's (the last id in
      # the conv window; -1 there means no previous token, so the given initial state is kept).
      prev_seg = state.conv.segment_ids[:, -1]
      reset = None if segment_ids is None else segment_starts(
          segment_ids, jnp.where(prev_seg >= 0, prev_seg, segment_ids[:, 0]))
      xbc, conv_state = conv(jnp.concatenate([xp, bc], axis=-1), segment_ids=segment_ids, state=state.conv)
      xbc = nn.silu(xbc)
      xp = xbc[..., :d_inner].reshape(b, t, heads, head_dim)
      bmat = xbc[..., d_inner:d_inner + g * n].reshape(b, t, g, n)
      cmat = xbc[..., d_inner + g * n:].reshape(b, t, g, n)
      y, ssm = ssd_ops.ssd(xp, dt, a, bmat, cmat, state.ssm, reset=reset, scan_type=self.scan_type,
                           chunk_size=self.chunk_size)
      y = y.astype(jnp.float32) + d_skip.astype(jnp.float32)[:, None] * xp.astype(jnp.float32)
      y = y.reshape(b, t, d_inner)

    # Gated RMSNorm: gate first, then normalise each group of d_inner / G channels (statistics in float32).
    y = y * nn.silu(z.astype(jnp.float32))
    yg = y.reshape(b, t, g, d_inner // g)
    yg = yg * jax.lax.rsqrt(jnp.mean(yg * yg, axis=-1, keepdims=True) + self.norm_eps)
    y = yg.reshape(b, t, d_inner) * (1.0 + norm_scale.astype(jnp.float32))
    out = jnp.einsum("btf,fd->btd", y.astype(w_out.dtype), w_out)
    return out.astype(dtype or x.dtype), Mamba2State(conv_state, ssm.astype(as_dtype(self.state_dtype)))
