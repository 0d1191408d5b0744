"""Mamba-2 state-space duality (SSD): one recurrence, three forms (pure JAX, no Flax).

Per head ``h`` (in group ``g(h)``), with a scalar decay ``A_h < 0`` and an input-dependent step ``dt_t > 0``::

    a_t = exp(dt_t A_h)                       in (0, 1]
    H_t = a_t H_{t-1} + dt_t x_t B_tᵀ         H ∈ ℝ^{P×N}, float32
    y_t = H_t C_t

``x`` is [b, t, heads, P]; ``B`` and ``C`` are [b, t, G, N] and shared by the ``heads / G`` consecutive heads of a
group (head ``i`` reads group ``i // (heads / G)``, as in Mamba-2). ``dt`` is already positive (the caller applies
softplus and its bias). The skip term ``D x`` is **not** part of these ops; the layer adds it.

Forms (all take ``h0`` and return ``(y, h_last)``):

  * :func:`ssd_naive`: ``lax.scan`` over tokens; the test oracle and the ``ScanType.LINEAR`` choice.
  * :func:`ssd_chunked`: the chunked matmul form (``ScanType.CHUNKED``): an attention-like Q×Q term inside each
    chunk and a state handed from chunk to chunk by a ``lax.scan`` whose body is rematerialised, so a
    differentiated call keeps only the ``T / Q`` boundary states. Any ``T``: the tail is padded with ``dt = 0``
    (identity steps).
  * :func:`ssd_step`: one token (decoding).

Document resets: ``reset[b, t]`` True means the state before token t is dropped (``a_t = 0``), so token t starts a
new document. :func:`memarch.ops.scan.segment_starts` turns segment ids into resets. The chunked form never takes a
log of 0: inside a chunk a reset is a mask (tokens in different documents of the chunk do not interact, and the
carried state reaches only the tokens before the chunk's first reset).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from memarch.ops.scan import ScanType
from memarch.typing import Array, Bool, Float

SSMState = Float[Array, "b h e n"]


def _prepare(x, dt, A, B, C, h0, reset):
  """Checks the shapes of the SSD inputs, casts them to float32 and fills the defaults.

  Args:
    x: [b, t, heads, head_dim].
    dt: [b, t, heads].
    A: [heads].
    B: [b, t, groups, d_state].
    C: [b, t, groups, d_state].
    h0: [b, heads, head_dim, d_state] or None (zeros).
    reset: [b, t] or None (no resets).

  Returns:
    The same seven arrays, float32 (``reset`` boolean), defaults filled.

  Raises:
    ValueError: naming the argument whose shape does not fit.
  """
  b, t, h, p = x.shape
  if B.shape != C.shape or B.shape[:2] != (b, t):
    raise ValueError(f"ssd: B {B.shape} and C {C.shape} must both be [b={b}, t={t}, groups, d_state]")
  g, n = B.shape[2:]
  if h % g:
    raise ValueError(f"ssd: {g} groups do not divide {h} heads")
  if dt.shape != (b, t, h) or A.shape != (h,):
    raise ValueError(f"ssd: dt {dt.shape} must be [b, t, heads]={(b, t, h)} and A {A.shape} must be [heads]")
  f32 = lambda z: z.astype(jnp.float32)
  h0 = jnp.zeros((b, h, p, n), jnp.float32) if h0 is None else f32(h0)
  if h0.shape != (b, h, p, n):
    raise ValueError(f"ssd: h0 {h0.shape} must be [b, heads, head_dim, d_state]={(b, h, p, n)}")
  reset = jnp.zeros((b, t), bool) if reset is None else reset.astype(bool)
  return f32(x), f32(dt), f32(A), f32(B), f32(C), h0, reset


def ssd_step(
    x: Float[Array, "b h e"],
    dt: Float[Array, "b h"],
    A: Float[Array, " h"],
    B: Float[Array, "b g n"],
    C: Float[Array, "b g n"],
    h: SSMState,
    *,
    reset: Bool[Array, " b"] | None = None,
) -> tuple[Array, Array]:
  """One token of the recurrence (decoding).

  Args:
    x: inputs per head.
    dt: positive step sizes per head.
    A: negative decay rate per head.
    B: input projections per group.
    C: output projections per group.
    h: state before the token, float32 [b, heads, head_dim, d_state].
    reset: optional [b]; True drops ``h`` (the token starts a document).

  Returns:
    ``(y, h_new)``: output [b, heads, head_dim] in ``x.dtype`` and the float32 state after the token.
  """
  out_dtype = x.dtype
  r = None if reset is None else reset[:, None]
  xs, dts, As, Bs, Cs, h, r = _prepare(x[:, None], dt[:, None], A, B[:, None], C[:, None], h, r)
  hg = x.shape[1] // Bs.shape[2]
  Bh = jnp.repeat(Bs[:, 0], hg, axis=1)  # [b, h, n]
  Ch = jnp.repeat(Cs[:, 0], hg, axis=1)
  a = jnp.where(r[:, 0, None], 0.0, jnp.exp(dts[:, 0] * As))  # [b, h]
  h = a[..., None, None] * h + (dts[:, 0, :, None] * xs[:, 0])[..., None] * Bh[:, :, None, :]
  y = jnp.einsum("bhpn,bhn->bhp", h, Ch)
  return y.astype(out_dtype), h


def ssd_naive(
    x: Float[Array, "b t h e"],
    dt: Float[Array, "b t h"],
    A: Float[Array, " h"],
    B: Float[Array, "b t g n"],
    C: Float[Array, "b t g n"],
    h0: SSMState | None = None,
    *,
    reset: Bool[Array, "b t"] | None = None,
    unroll: int = 1,
) -> tuple[Array, Array]:
  """The recurrence token by token with ``lax.scan`` (reference; ``ScanType.LINEAR``).

  Args:
    x: inputs [b, t, heads, head_dim].
    dt: positive step sizes [b, t, heads].
    A: negative decay rate per head [heads].
    B: input projections [b, t, groups, d_state].
    C: output projections [b, t, groups, d_state].
    h0: state before the first token (None: zeros), [b, heads, head_dim, d_state].
    reset: optional [b, t]; True drops the state before that token.
    unroll: ``lax.scan`` unroll factor.

  Returns:
    ``(y, h_last)``: outputs [b, t, heads, head_dim] in ``x.dtype`` and the float32 final state.
  """
  out_dtype = x.dtype
  x, dt, A, B, C, h0, reset = _prepare(x, dt, A, B, C, h0, reset)

  def step(h, inputs):
    xt, dtt, bt, ct, rt = inputs
    y, h = ssd_step(xt, dtt, A, bt, ct, h, reset=rt)
    return h, y

  moved = [jnp.moveaxis(z, 1, 0) for z in (x, dt, B, C, reset)]
  h_last, ys = jax.lax.scan(step, h0, moved, unroll=unroll)
  return jnp.moveaxis(ys, 0, 1).astype(out_dtype), h_last


def _chunk_body(A, h_prev, chunk):
  """One chunk of the chunked form: outputs of its tokens and the state after it.

  Args:
    A: [g, k] decay rates, heads split as groups x heads per group.
    h_prev: [b, g, k, p, n] state before the chunk.
    chunk: ``(x [b,q,g,k,p], dt [b,q,g,k], B [b,q,g,n], C [b,q,g,n], reset [b,q])`` for the chunk's ``q`` tokens.

  Returns:
    ``(h_next, y)``: the state after the chunk and the outputs [b, q, g, k, p].
  """
  x, dt, B, C, reset = chunk
  q = x.shape[1]
  log_a = dt * A                              # [b,q,g,k], <= 0
  log_a_t = jnp.moveaxis(log_a, 1, -1)        # [b,g,k,q]
  # doc[t]: how many resets up to t inside the chunk; tokens interact only within the same doc.
  doc = jnp.cumsum(reset.astype(jnp.int32), axis=1)  # [b,q]
  causal = jnp.tril(jnp.ones((q, q), bool))
  same = causal & (doc[:, :, None] == doc[:, None, :])  # [b,q(t),q(s)]
  # segsum[t, s] = sum_{s < r <= t} log a_r, accumulated directly (not as a difference of two cumsums) so the
  # entries kept by the mask are exact non-positive sums; the mask goes to -inf *before* exp.
  strict = jnp.tril(jnp.ones((q, q), bool), -1)
  segsum = jnp.cumsum(jnp.where(strict, log_a_t[..., :, None], 0.0), axis=-2)  # [b,g,k,q(t),q(s)]
  decay = jnp.exp(jnp.where(same[:, None, None], segsum, -jnp.inf))

  xdt = x * dt[..., None]                     # [b,q,g,k,p]
  scores = jnp.einsum("btgn,bsgn->bgts", C, B)[:, :, None] * decay  # [b,g,k,t,s]
  y_diag = jnp.einsum("bgkts,bsgkp->btgkp", scores, xdt)

  # Contribution of the carried state: exp(sum_{r <= t} log a_r) while no reset has happened in the chunk.
  from_start = jnp.where((doc == 0)[:, :, None, None], jnp.exp(jnp.cumsum(log_a, axis=1)), 0.0)  # [b,q,g,k]
  y_off = jnp.einsum("btgn,bgkpn->btgkp", C, h_prev) * from_start[..., None]

  # State after the chunk: the carried state decayed over the whole chunk plus the chunk's own inputs, each
  # decayed from its token to the end (the last row of `decay`, already masked to the last document).
  to_end = decay[..., -1, :]                  # [b,g,k,q(s)]
  h_own = jnp.einsum("bgks,bsgkp,bsgn->bgkpn", to_end, xdt, B)
  h_next = from_start[:, -1][..., None, None] * h_prev + h_own
  return h_next, y_diag + y_off


def ssd_chunked(
    x: Float[Array, "b t h e"],
    dt: Float[Array, "b t h"],
    A: Float[Array, " h"],
    B: Float[Array, "b t g n"],
    C: Float[Array, "b t g n"],
    h0: SSMState | None = None,
    *,
    reset: Bool[Array, "b t"] | None = None,
    chunk_size: int = 64,
    remat: bool = True,
) -> tuple[Array, Array]:
  """The chunked SSD form (training / prefill; ``ScanType.CHUNKED``).

  Inside a chunk of ``Q`` tokens the output is ``(L ∘ C Bᵀ)(dt ∘ x)`` plus the carried state read out through
  ``C`` with its decay; across chunks the state is passed by a ``lax.scan``. All arithmetic is float32.

  Args:
    x: inputs [b, t, heads, head_dim].
    dt: positive step sizes [b, t, heads].
    A: negative decay rate per head [heads].
    B: input projections [b, t, groups, d_state].
    C: output projections [b, t, groups, d_state].
    h0: state before the first token (None: zeros), [b, heads, head_dim, d_state].
    reset: optional [b, t]; True drops the state before that token.
    chunk_size: chunk length ``Q`` (any ``t``; the last chunk is padded with identity steps).
    remat: rematerialise each chunk in the backward pass (keeps only the chunk-boundary states).

  Returns:
    ``(y, h_last)``: outputs [b, t, heads, head_dim] in ``x.dtype`` and the float32 final state.
  """
  if chunk_size < 1:
    raise ValueError(f"ssd_chunked: chunk_size={chunk_size} must be >= 1")
  out_dtype = x.dtype
  b, t, h, p = x.shape
  x, dt, A, B, C, h0, reset = _prepare(x, dt, A, B, C, h0, reset)
  g, n = B.shape[2:]
  k = h // g
  q = min(chunk_size, t) if t else 1
  nc = -(-t // q)
  pad = nc * q - t
  if pad:  # dt = 0 makes a padded step the identity (a = 1, no input)
    padt = lambda z: jnp.pad(z, [(0, 0), (0, pad)] + [(0, 0)] * (z.ndim - 2))
    x, dt, B, C, reset = map(padt, (x, dt, B, C, reset))
  chunks = lambda z: jnp.moveaxis(z.reshape((b, nc, q) + z.shape[2:]), 1, 0)
  xs = chunks(x.reshape(b, nc * q, g, k, p))
  dts = chunks(dt.reshape(b, nc * q, g, k))
  body = lambda hc, c: _chunk_body(A.reshape(g, k), hc, c)
  if remat:
    body = jax.checkpoint(body)
  h_last, ys = jax.lax.scan(body, h0.reshape(b, g, k, p, n), (xs, dts, chunks(B), chunks(C), chunks(reset)))
  y = jnp.moveaxis(ys, 0, 1).reshape(b, nc * q, h, p)[:, :t]
  return y.astype(out_dtype), h_last.reshape(b, h, p, n)


def resolve_ssd_scan_type(scan_type: ScanType | str = ScanType.AUTO) -> ScanType:
  """``AUTO`` -> ``CHUNKED`` on every backend (faster forward+backward on CPU too, spec bmojo §5.4)."""
  scan_type = ScanType(scan_type)
  if scan_type is ScanType.AUTO:
    return ScanType.CHUNKED
  if scan_type not in (ScanType.LINEAR, ScanType.CHUNKED):
    raise ValueError(f"ssd: scan_type={scan_type.value!r} is not implemented; use 'linear' or 'chunked'")
  return scan_type


def ssd(
    x: Float[Array, "b t h e"],
    dt: Float[Array, "b t h"],
    A: Float[Array, " h"],
    B: Float[Array, "b t g n"],
    C: Float[Array, "b t g n"],
    h0: SSMState | None = None,
    *,
    reset: Bool[Array, "b t"] | None = None,
    scan_type: ScanType | str = ScanType.AUTO,
    chunk_size: int = 64,
) -> tuple[Array, Array]:
  """SSD with the form chosen by ``scan_type``; ``t == 1`` always takes :func:`ssd_step`.

  Args:
    x: inputs [b, t, heads, head_dim].
    dt: positive step sizes [b, t, heads].
    A: negative decay rate per head [heads].
    B: input projections [b, t, groups, d_state].
    C: output projections [b, t, groups, d_state].
    h0: state before the first token (None: zeros).
    reset: optional [b, t]; True drops the state before that token.
    scan_type: ``LINEAR`` (:func:`ssd_naive`), ``CHUNKED`` or ``AUTO`` (:func:`ssd_chunked`).
    chunk_size: chunk length of the chunked form.

  Returns:
    ``(y, h_last)`` as in :func:`ssd_chunked`.
  """
  kind = resolve_ssd_scan_type(scan_type)
  if x.shape[1] == 1:
    if h0 is None:
      h0 = jnp.zeros(x.shape[:1] + x.shape[2:] + B.shape[-1:], jnp.float32)
    y, h = ssd_step(x[:, 0], dt[:, 0], A, B[:, 0], C[:, 0], h0, reset=None if reset is None else reset[:, 0])
    return y[:, None], h
  if kind is ScanType.LINEAR:
    return ssd_naive(x, dt, A, B, C, h0, reset=reset)
  return ssd_chunked(x, dt, A, B, C, h0, reset=reset, chunk_size=chunk_size)
