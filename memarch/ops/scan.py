"""Diagonal linear recurrences ``h_t = a_t * h_{t-1} + x_t`` behind one scan-type choice (pure JAX).

Three implementations of the same recurrence (CONVENTIONS.md C3):

  * ``LINEAR``: ``lax.scan`` over time (``unroll`` knob). Least memory traffic; the right choice on CPU.
  * ``ASSOCIATIVE``: ``lax.associative_scan`` over the pairs ``(a, x)``; O(T log T) work, log-depth (GPU).
  * ``CHUNKED``: an associative scan inside chunks of ``chunk_size`` tokens and a ``lax.scan`` across chunks,
    carrying only chunk-boundary states; bounded parallel work per step.

All accumulate in float32. Document resets are folded into ``a`` (``a_t = 0`` at a segment start), so a reset costs
nothing extra and every form handles it identically.
"""

from __future__ import annotations

import enum

import jax
import jax.numpy as jnp

from memarch.typing import Array, Float, Int


class ScanType(enum.Enum):
  """Which implementation of a linear recurrence to run; ``AUTO`` picks per backend."""
  AUTO = "auto"
  LINEAR = "linear"
  ASSOCIATIVE = "associative"
  CHUNKED = "chunked"


def resolve_scan_type(scan_type: ScanType | str = ScanType.AUTO, backend: str | None = None) -> ScanType:
  """Maps ``AUTO`` to ``LINEAR`` on CPU and ``ASSOCIATIVE`` on accelerators; passes any other choice through."""
  scan_type = ScanType(scan_type)
  if scan_type is not ScanType.AUTO:
    return scan_type
  backend = backend or jax.default_backend()
  return ScanType.LINEAR if backend == "cpu" else ScanType.ASSOCIATIVE


def segment_starts(segment_ids: Int[Array, "b t"], previous: Int[Array, " b"] | None = None) -> Array:
  """True where a token starts a new document: its segment id differs from the previous token's.

  Args:
    segment_ids: document ids of a row.
    previous: segment id of the token before this call (streaming); None means the call starts a fresh row, where
      position 0 is not a reset (the initial state is the caller's to choose).

  Returns:
    Boolean [b, t].
  """
  prev = jnp.concatenate(
      [segment_ids[:, :1] if previous is None else previous[:, None].astype(segment_ids.dtype),
       segment_ids[:, :-1]], axis=1)
  return segment_ids != prev


def _combine(left, right):
  a_l, x_l = left
  a_r, x_r = right
  return a_l * a_r, a_r * x_l + x_r


def _linear(a, x, h0, unroll):
  def step(h, ax):
    h = ax[0] * h + ax[1]
    return h, h
  h_last, hs = jax.lax.scan(step, h0, (jnp.moveaxis(a, 1, 0), jnp.moveaxis(x, 1, 0)), unroll=unroll)
  return jnp.moveaxis(hs, 0, 1), h_last


def _associative(a, x, h0):
  x = x.at[:, 0].add(a[:, 0] * h0)
  _, hs = jax.lax.associative_scan(_combine, (a, x), axis=1)
  return hs, hs[:, -1]


def _chunked(a, x, h0, chunk_size):
  b, t = a.shape[:2]
  n = -(-t // chunk_size)
  pad = n * chunk_size - t
  if pad:  # identity steps (a = 1, x = 0) leave the carried state unchanged
    a = jnp.concatenate([a, jnp.ones((b, pad) + a.shape[2:], a.dtype)], axis=1)
    x = jnp.concatenate([x, jnp.zeros((b, pad) + x.shape[2:], x.dtype)], axis=1)
  chunks = lambda z: jnp.moveaxis(z.reshape((b, n, chunk_size) + z.shape[2:]), 1, 0)

  @jax.checkpoint
  def body(h, ax):
    ca, cx = ax
    a_cum, h_local = jax.lax.associative_scan(_combine, (ca, cx), axis=1)
    hs = h_local + a_cum * h[:, None]
    return hs[:, -1], hs

  h_last, hs = jax.lax.scan(body, h0, (chunks(a), chunks(x)))
  hs = jnp.moveaxis(hs, 0, 1).reshape((b, n * chunk_size) + x.shape[2:])
  return hs[:, :t], h_last


def linear_scan(
    a: Float[Array, "b t *f"],
    x: Float[Array, "b t *f"],
    h0: Float[Array, "b *f"] | None = None,
    *,
    reset: Array | None = None,
    scan_type: ScanType | str = ScanType.AUTO,
    chunk_size: int = 64,
    unroll: int = 1,
) -> tuple[Array, Array]:
  """Computes ``h_t = a_t * h_{t-1} + x_t`` for all t (elementwise over the feature axes).

  Args:
    a: decay per token and feature.
    x: input per token and feature.
    h0: state before the first token (default zeros).
    reset: optional boolean [b, t]; where True, the state before token t is dropped (``h_t = x_t``).
    scan_type: implementation, see :class:`ScanType`.
    chunk_size: chunk length of ``CHUNKED`` (any ``t`` is allowed; the last chunk is padded).
    unroll: unroll factor of ``LINEAR``.

  Returns:
    ``(h, h_last)``: all states [b, t, *f] and the final state [b, *f], both float32.
  """
  if a.shape != x.shape:
    raise ValueError(f"linear_scan: a {a.shape} and x {x.shape} must have the same shape")
  a = a.astype(jnp.float32)
  x = x.astype(jnp.float32)
  if reset is not None:
    a = jnp.where(reset.reshape(reset.shape + (1,) * (a.ndim - 2)), 0.0, a)
  h0 = jnp.zeros((a.shape[0],) + a.shape[2:], jnp.float32) if h0 is None else h0.astype(jnp.float32)
  if a.shape[1] == 0:
    return x, h0
  kind = resolve_scan_type(scan_type)
  if a.shape[1] == 1:  # decode fast path
    h = a[:, 0] * h0 + x[:, 0]
    return h[:, None], h
  if kind is ScanType.LINEAR:
    return _linear(a, x, h0, unroll)
  if kind is ScanType.ASSOCIATIVE:
    return _associative(a, x, h0)
  return _chunked(a, x, h0, chunk_size)

