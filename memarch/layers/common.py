"""Building blocks shared by every model: RMSNorm, SwiGLU MLP, causal depthwise conv1d, dtype helpers.

All modules keep float32 parameters (``param_dtype``) and compute in ``dtype`` (None: the promoted input dtype),
and annotate every parameter with logical axis names from :mod:`memarch.sharding`.
"""

from __future__ import annotations

from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from memarch.typing import Array

DType = jnp.dtype | str | None


def resolve_sequence_axis(explicit: str | None) -> str | None:
  """The mesh axis a sequence-parallel layer splits the sequence over (spec bmojo.md §5.5).

  ``explicit`` when given; otherwise the mesh axis the ``act_len`` logical rule names on the current mesh
  (``jax.set_mesh`` and ``nn.logical_axis_rules``, e.g. ``config.mesh`` with a ``("sequence", n)`` axis under the
  default rules), if it has more than one device; else None (unsharded).

  Raises:
    ValueError: ``act_len`` maps to several mesh axes.
  """
  if explicit is not None:
    return explicit
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return None
  spec = nn.logical_to_mesh_axes(("act_len",))[0]
  axes = tuple(a for a in ((spec,) if isinstance(spec, str) else (spec or ())) if a in mesh.axis_names)
  if len(axes) > 1:
    raise ValueError(f"logical_axis_rules: 'act_len' maps to several mesh axes {axes}; sequence parallelism "
                     "supports one")
  return axes[0] if axes and mesh.shape[axes[0]] > 1 else None


def as_dtype(dtype: DType) -> jnp.dtype | None:
  """``"bfloat16"`` / ``jnp.bfloat16`` / None -> a numpy dtype or None."""
  return None if dtype is None else jnp.dtype(dtype)


def variance_scaling(scale: float = 1.0, mode: str = "fan_in", in_axis=-2, out_axis=-1):
  """Truncated-normal variance-scaling initialiser factory (scale is the variance multiplier)."""
  return nn.initializers.variance_scaling(scale, mode, "truncated_normal", in_axis=in_axis, out_axis=out_axis)


class RMSNorm(nn.Module):
  """Root-mean-square layer norm (Zhang & Sennrich, 2019): ``x / rms(x) * (1 + scale)``.

  The gain is stored as ``scale`` around zero, so weight decay pulls it towards the identity.

  Attributes:
    eps: added to the mean square.
    dtype: output dtype (None: the input dtype). Statistics are always float32.
    param_dtype: dtype of ``scale``.
  """
  eps: float = 1e-6
  dtype: DType = None
  param_dtype: DType = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """Normalises the last axis of ``x``."""
    scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.zeros_init(), ("embed",)),
                       (x.shape[-1],), as_dtype(self.param_dtype))
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (y * (1.0 + scale.astype(jnp.float32))).astype(as_dtype(self.dtype) or x.dtype)


class SwiGLU(nn.Module):
  """Gated MLP ``W_down (SiLU(x W_gate) * x W_up)`` (Shazeer, 2020).

  Attributes:
    hidden: hidden width.
    w_init_variance_scale: variance multiplier of the input projections' initialiser.
    dtype: computation dtype (None: promoted input dtype).
    param_dtype: parameter dtype.
  """
  hidden: int
  w_init_variance_scale: float = 1.0
  dtype: DType = None
  param_dtype: DType = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """Applies the MLP to the last axis of ``x``."""
    d = x.shape[-1]
    pd = as_dtype(self.param_dtype)
    w_in = self.param("w_in", nn.with_logical_partitioning(
        variance_scaling(self.w_init_variance_scale, in_axis=0, out_axis=(1, 2)), ("embed", None, "mlp")),
                      (d, 2, self.hidden), pd)
    w_out = self.param("w_out", nn.with_logical_partitioning(variance_scaling(1.0), ("mlp", "embed")),
                       (self.hidden, d), pd)
    x, w_in, w_out = nn.dtypes.promote_dtype(x, w_in, w_out, dtype=as_dtype(self.dtype))
    gate_up = jnp.einsum("...d,dgf->...gf", x, w_in)
    h = nn.silu(gate_up[..., 0, :]) * gate_up[..., 1, :]
    return h @ w_out


class ConvState(NamedTuple):
  """State of a causal depthwise convolution: the last ``width - 1`` inputs.

  Attributes:
    inputs: [b, width - 1, d] previous inputs, oldest first (zeros before the first token).
    segment_ids: [b, width - 1] their document ids (-1 for empty slots).
  """
  inputs: Array
  segment_ids: Array


class CausalConv1D(nn.Module):
  """Causal depthwise 1-D convolution ``y_t = b + sum_j w_j * x_{t-j}`` over ``width`` taps.

  Taps that reach into another document (a different segment id) contribute nothing, so packed documents stay
  isolated; the state carries the last ``width - 1`` inputs so chunked and token-by-token calls match the full one.

  Attributes:
    width: number of taps (kernel length).
    use_bias: add a per-channel bias.
    dtype: computation dtype.
    param_dtype: parameter dtype.
    state_dtype: dtype of the carried inputs.
  """
  width: int = 4
  use_bias: bool = True
  dtype: DType = None
  param_dtype: DType = jnp.float32
  state_dtype: DType = jnp.float32

  @nn.compact
  def __call__(self, x: Array, *, segment_ids: Array | None = None, state: ConvState | None = None,
               prefix: Array | None = None) -> tuple[Array, ConvState]:
    """Convolves ``x`` [b, t, d] causally from ``state``.

    Args:
      x: inputs [b, t, d].
      segment_ids: document ids [b, t] (None: one document).
      state: previous inputs (None: zeros, i.e. start of sequence).
      prefix: optional [width - 1, d] inputs that precede every document (oldest first): taps that reach before
        a document's first token (or before the start of the sequence) read them instead of zeros, as if each
        document were preceded by ``prefix`` (used by a Titans memory that absorbs persistent tokens, spec §6).

    Returns:
      ``(y, new_state)`` with ``y`` [b, t, d].
    """
    b, t, d = x.shape
    w = self.param("kernel", nn.with_logical_partitioning(
        nn.initializers.normal(stddev=self.width ** -0.5), ("conv", "embed")), (self.width, d),
                   as_dtype(self.param_dtype))
    if state is None:
      state = self.init_state(b, d)
    if segment_ids is None:
      segment_ids = jnp.zeros((b, t), jnp.int32)
      prev_seg = jnp.where(state.segment_ids >= 0, 0, -1)
    else:
      prev_seg = state.segment_ids
    if prefix is not None and prefix.shape != (self.width - 1, d):
      raise ValueError(f"CausalConv1D: prefix must have shape {(self.width - 1, d)}, got {prefix.shape}")
    if self.width == 1:
      prefix = None
    xs = jnp.concatenate([state.inputs.astype(x.dtype), x], axis=1)  # [b, w-1+t, d]
    segs = jnp.concatenate([prev_seg, segment_ids], axis=1)
    xs, w = nn.dtypes.promote_dtype(xs, w, dtype=as_dtype(self.dtype))
    y = jnp.zeros((b, t, d), xs.dtype)
    outside = jnp.zeros((b, t), jnp.int32)  # taps so far that fell before the document start
    for j in range(self.width):  # tap j looks j steps back
      start = self.width - 1 - j
      same = segs[:, start:start + t] == segment_ids
      if prefix is None:
        tap = jnp.where(same[..., None], xs[:, start:start + t], 0)
      else:
        # Documents are contiguous, so the outside taps of a token are its farthest ones: tap j reads prefix
        # position -outside (the last prefix input is one step before the document).
        outside = outside + (~same).astype(jnp.int32)
        before = prefix.astype(xs.dtype)[jnp.clip(self.width - 1 - outside, 0, self.width - 2)]
        tap = jnp.where(same[..., None], xs[:, start:start + t], before)
      y = y + tap * w[self.width - 1 - j]
    if self.use_bias:
      bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros_init(), ("embed",)), (d,),
                        as_dtype(self.param_dtype))
      y = y + bias.astype(y.dtype)
    keep = self.width - 1
    new_state = ConvState(xs[:, xs.shape[1] - keep:].astype(as_dtype(self.state_dtype)),
                          segs[:, segs.shape[1] - keep:])
    return y, new_state

  def init_state(self, batch_size: int, features: int) -> ConvState:
    """Zeros for ``width - 1`` previous inputs of ``features`` channels, marked empty."""
    keep = self.width - 1
    return ConvState(jnp.zeros((batch_size, keep, features), as_dtype(self.state_dtype)),
                     jnp.full((batch_size, keep), -1, jnp.int32))
