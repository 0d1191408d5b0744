"""Sequence parallelism: a recurrence and a causal window split over a mesh axis (pure JAX, no Flax).

The global sequence ``[b, T, ...]`` is split into ``S`` contiguous shards of ``T / S`` tokens along the mesh axis
``axis_name`` (shard ``i`` holds tokens ``[i T/S, (i+1) T/S)``). Two exchanges make a sharded run equal the
unsharded one (spec ``bmojo.md`` §5.5):

  * :func:`halo`: the last ``n`` tokens before a shard's first token, passed point to point (``ppermute``) from the
    preceding shard(s). It feeds anything with a finite causal window: the causal conv's ``conv_width - 1`` tap
    tail, and B'MOJO's ``W - 1`` in-context and ``2W - 1`` fading keys. Shard 0 gets ``fill`` (the state of a
    previous call, or an "empty" marker).
  * the SSM state pass of :func:`ssd_sequence_sharded`, recurrentgemma's ``multi_shard_correction`` pattern: each
    shard runs the chunked SSD from a zero state and also returns the product of its decays; one ``all_gather`` of
    ``(h_last, prod a)`` (``O(S · state)`` floats, independent of ``T``) lets every shard fold its true incoming
    state ``h_in`` and correct its outputs by the carried term ``y_t += (prod_{s<=t} a_s) h_in C_t``.

B'MOJO (spec §3, §4) adds, per shard, the document-offset prefix (an ``all_gather`` of one integer pair per row)
and, with the eidetic store, the store band: each shard's selection is run from an empty store, the ``M`` entries
it writes are all-gathered and folded into the store in front of every shard, as a FIFO (``bound="fifo"``) or as
the ``M`` best-scored (``bound="top_m"``) (:func:`bmojo_attention_sharded`).

Functions named ``*_sharded`` run **inside** ``jax.shard_map`` over ``axis_name`` (they see one shard);
:func:`ssd_sequence_parallel`, :func:`conv_ssd_sequence_parallel` (Mamba-2's conv + SSD core) and
:func:`bmojo_attention_sequence_parallel` are the wrappers that take global arrays and open the ``shard_map``
themselves (manual over ``axis_name`` only; every other mesh axis, e.g. a ``data`` axis sharding the batch, stays
automatic). ``T`` must be divisible by the axis size; a decode step (``t == 1``) is not sharded.

Ours: the layout (contiguous shards, an all-gather fold rather than a ring of ``S - 1`` sequential sends) and the
segment-id handling across shard boundaries (a document may span any number of shards).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from memarch.ops import bmojo as bmojo_ops
from memarch.ops import ssd as ssd_ops
from memarch.ops.scan import ScanType, segment_starts
from memarch.typing import Array, Bool, Float, Int


def axis_size(axis_name: str, caller: str) -> int:
  """Size of a bound mesh axis, or a ValueError naming ``axis_name`` when called outside its ``shard_map``."""
  try:
    return jax.lax.axis_size(axis_name)
  except NameError:
    raise ValueError(f"{caller}: axis_name={axis_name!r} is not bound; call it inside jax.shard_map over that "
                     "mesh axis (or use the *_sequence_parallel wrapper)") from None


def halo(z: Array, n: int, axis_name: str, fill: Array | float = 0, *, axis: int = 1) -> Array:
  """The ``n`` steps just before this shard's first step, taken from the preceding shards (inside ``shard_map``).

  Shard ``i`` of length ``L`` gets global steps ``[i L - n, i L)`` of ``z`` along ``axis``; steps before the
  global start (all of them on shard 0) come from ``fill``, which stands for the ``n`` steps preceding the
  sequence (e.g. a carried conv window, or ``-1`` segment ids marking "no token"). ``n`` may exceed ``L``: the halo
  then spans ``ceil(n / L)`` shards, one ``ppermute`` per hop.

  Args:
    z: this shard's array, the sequence along ``axis``.
    n: halo length (>= 0).
    axis_name: the sequence mesh axis.
    fill: the steps before the global sequence: a scalar or an array broadcastable to the halo's shape
      (``z.shape`` with ``n`` along ``axis``); its last step is the one just before the sequence.
    axis: the sequence axis of ``z``.

  Returns:
    The halo, ``z.shape`` with ``n`` along ``axis``, in ``z.dtype``, oldest step first.

  Raises:
    ValueError: naming ``n`` or ``axis_name``.
  """
  if n < 0:
    raise ValueError(f"halo: n={n} must be >= 0")
  shards = axis_size(axis_name, "halo")
  axis = axis % z.ndim
  length = z.shape[axis]
  shape = z.shape[:axis] + (n,) + z.shape[axis + 1:]
  fill = jnp.broadcast_to(jnp.asarray(fill, z.dtype), shape)
  if n == 0:
    return fill
  if length == 0:
    raise ValueError("halo: the shard is empty (length 0 along `axis`)")
  hops = -(-n // length)
  pieces = []
  for k in range(hops, 0, -1):  # oldest first; shard i receives shard i - k's steps (zeros where i < k)
    piece = z if k > 1 else jax.lax.slice_in_dim(z, length - min(n, length), length, axis=axis)
    pieces.append(jax.lax.ppermute(piece, axis_name, [(i, i + k) for i in range(shards - k)]))
  prev = jax.lax.slice_in_dim(jnp.concatenate(pieces, axis=axis), -n, None, axis=axis) if hops > 1 else pieces[0]
  # Step j of the halo is global position i L - n + j; it precedes the sequence (reads fill[j + i L]) when < 0.
  j = jnp.arange(n) + jax.lax.axis_index(axis_name) * length
  bshape = [1] * z.ndim
  bshape[axis] = n
  fill = jnp.take(fill, jnp.minimum(j, n - 1), axis=axis)
  return jnp.where((j < n).reshape(bshape), fill, prev)


def ssd_sequence_sharded(
    x: Float[Array, "b t h e"],
    dt: Float[Array, "b t h"],
    A: Float[Array, " h"],
    B: Float[Array, "b t g n"],
    C: Float[Array, "b t g n"],
    h0: ssd_ops.SSMState | None = None,
    *,
    reset: Bool[Array, "b t"] | None = None,
    axis_name: str,
    chunk_size: int = 64,
    scan_type: ScanType | str = ScanType.CHUNKED,
) -> tuple[Array, Array]:
  """One shard of the SSD over a sequence split along ``axis_name`` (call inside ``shard_map``; spec §5.5).

  With ``H_in`` the true state before the shard's first token, the shard's outputs and final state are::

      y_t    = y⁰_t + (prod_{s <= t} a_s) · H_in C_t        (0 from the shard's first reset on)
      H_last = (prod_{s in shard} a_s) · H_in + H⁰_last

  where ``y⁰, H⁰`` come from the SSD run locally from a zero state and ``a_s = exp(dt_s A)`` (0 at a reset). An
  ``all_gather`` of every shard's ``(H⁰_last, prod a)`` gives the fold ``H_in(i) = prod a(i-1) · H_in(i-1) +
  H⁰_last(i-1)`` from ``H_in(0) = h0``. All of it is float32.

  Args:
    x: this shard's inputs [b, t, heads, head_dim].
    dt: positive step sizes [b, t, heads].
    A: negative decay rate per head [heads] (replicated).
    B: input projections [b, t, groups, d_state].
    C: output projections [b, t, groups, d_state].
    h0: state before the **global** first token (None: zeros), [b, heads, head_dim, d_state], replicated over
      ``axis_name`` (only shard 0 starts from it; the others see it through the fold).
    reset: optional [b, t]; True drops the state before that token. A document that starts on a shard's first
      token has ``reset`` True there (see :func:`memarch.ops.scan.segment_starts` with :func:`halo`).
    axis_name: the sequence mesh axis.
    chunk_size: chunk length of the local chunked form.
    scan_type: local form, ``CHUNKED`` / ``AUTO`` (:func:`~memarch.ops.ssd.ssd_chunked`) or ``LINEAR``.

  Returns:
    ``(y, h_last)``: this shard's outputs [b, t, heads, head_dim] in ``x.dtype`` and the true float32 state after
    its last token (on the last shard: the global final state).

  Raises:
    ValueError: naming ``axis_name`` outside its ``shard_map``, or the argument whose shape does not fit.
  """
  shards = axis_size(axis_name, "ssd_sequence_sharded")
  out_dtype = x.dtype
  x, dt, A, B, C, h0, reset = ssd_ops._prepare(x, dt, A, B, C, h0, reset)  # shapes checked, float32
  b, t, h, p = x.shape
  g, n = B.shape[2:]
  # The local run starts from zero; the zero state is marked as varying over the axis like the scan's carry.
  zero = jax.lax.pcast(jnp.zeros((b, h, p, n), jnp.float32), (axis_name,), to="varying")
  y_loc, h_loc = ssd_ops.ssd(x, dt, A, B, C, zero, reset=reset, scan_type=scan_type, chunk_size=chunk_size)

  # Decay from the shard start through token t, zero from the shard's first reset on; its last row is prod a.
  alive = jnp.cumsum(reset.astype(jnp.int32), axis=1) == 0
  from_start = jnp.where(alive[..., None], jnp.exp(jnp.cumsum(dt * A, axis=1)), 0.0)  # [b, t, h]
  prod_a = from_start[:, -1]

  # Fold the gathered shard summaries up to this shard (S is small and static: an unrolled loop).
  all_h = jax.lax.all_gather(h_loc, axis_name)      # [S, b, h, p, n]
  all_a = jax.lax.all_gather(prod_a, axis_name)     # [S, b, h]
  me = jax.lax.axis_index(axis_name)
  h_in = h0
  for i in range(shards - 1):
    h_in = jnp.where(i < me, all_a[i][..., None, None] * h_in + all_h[i], h_in)

  carried = jnp.einsum("btgn,bgkpn->btgkp", C, h_in.reshape(b, g, h // g, p, n)).reshape(b, t, h, p)
  y = y_loc.astype(jnp.float32) + from_start[..., None] * carried
  h_last = prod_a[..., None, None] * h_in + h_loc
  return y.astype(out_dtype), h_last


def _sequence_mesh(mesh, axis_name: str, length: int, caller: str):
  """The mesh to ``shard_map`` over and the number of shards; ValueErrors name the offending field."""
  mesh = mesh if mesh is not None else jax.sharding.get_abstract_mesh()
  if mesh.empty:
    raise ValueError(f"{caller}: axis_name={axis_name!r} needs a mesh (pass mesh= or use jax.set_mesh)")
  if axis_name not in mesh.axis_names:
    raise ValueError(f"{caller}: axis_name={axis_name!r} is not an axis of the mesh {tuple(mesh.axis_names)}")
  shards = mesh.shape[axis_name]
  if length % shards:
    raise ValueError(f"{caller}: the sequence length t={length} is not divisible by the {shards} shards of mesh "
                     f"axis {axis_name!r}")
  return mesh, shards


def ssd_sequence_parallel(
    x: Float[Array, "b t h e"],
    dt: Float[Array, "b t h"],
    A: Float[Array, " h"],
    B: Float[Array, "b t g n"],
    C: Float[Array, "b t g n"],
    h0: ssd_ops.SSMState | None = None,
    *,
    reset: Bool[Array, "b t"] | None = None,
    axis_name: str,
    mesh=None,
    chunk_size: int = 64,
    scan_type: ScanType | str = ScanType.CHUNKED,
) -> tuple[Array, Array]:
  """The SSD on global arrays, sequence-sharded over ``axis_name``: same contract as :func:`ssd_chunked`.

  Opens a ``jax.shard_map`` manual over ``axis_name`` only and runs :func:`ssd_sequence_sharded` on each shard.

  Args:
    x, dt, A, B, C, h0, reset: as in :func:`memarch.ops.ssd.ssd_chunked` (global sequence).
    axis_name: the mesh axis the sequence is split over.
    mesh: the mesh (None: the one set by ``jax.set_mesh``).
    chunk_size: chunk length of each shard's chunked form.
    scan_type: each shard's local form.

  Returns:
    ``(y, h_last)``: outputs [b, t, heads, head_dim] in ``x.dtype`` and the float32 global final state.

  Raises:
    ValueError: no mesh, ``axis_name`` not in it, or ``t`` not divisible by its size.
  """
  mesh, _ = _sequence_mesh(mesh, axis_name, x.shape[1], "ssd_sequence_parallel")
  if reset is None:
    reset = jnp.zeros(x.shape[:2], bool)
  if h0 is None:
    h0 = jnp.zeros(x.shape[:1] + x.shape[2:] + B.shape[-1:], jnp.float32)
  seq = P(None, axis_name)

  def local(x, dt, A, B, C, h0, reset):
    y, h = ssd_sequence_sharded(x, dt, A, B, C, h0, reset=reset, axis_name=axis_name, chunk_size=chunk_size,
                                scan_type=scan_type)
    return y, h[None]

  fn = jax.shard_map(local, mesh=mesh, in_specs=(seq, seq, P(), seq, seq, P(), seq),
                     out_specs=(seq, P(axis_name)), axis_names={axis_name})
  y, h_last = fn(x, dt, A, B, C, h0, reset)
  return y, h_last[-1]


ConvFn = Callable[[Any, Array, Array, tuple[Array, Array]], tuple[Array, tuple[Array, Array]]]


def conv_ssd_sequence_parallel(
    conv_fn: ConvFn,
    conv_params: Any,
    xbc: Float[Array, "b t c"],
    dt: Float[Array, "b t h"],
    A: Float[Array, " h"],
    D: Float[Array, " h"],
    segment_ids: Int[Array, "b t"] | None,
    conv_state: tuple[Array, Array],
    ssm_state: ssd_ops.SSMState,
    *,
    d_inner: int,
    groups: int,
    axis_name: str,
    mesh=None,
    chunk_size: int = 64,
    scan_type: ScanType | str = ScanType.CHUNKED,
) -> tuple[Array, tuple[Array, Array], Array]:
  """Mamba-2's sequence-dependent core, sequence-sharded: causal conv with a halo, SiLU, SSD with the state pass.

  Per shard: the conv window is the ``conv_width - 1`` pre-conv tokens (and their segment ids) before the shard
  (:func:`halo`; shard 0 reads ``conv_state``); a document starting on the shard's first token is a reset (its id
  differs from the halo's last id); then :func:`ssd_sequence_sharded` from ``ssm_state`` and the skip ``D x'``.

  Args:
    conv_fn: ``conv_fn(params, x, segment_ids, (inputs, segment_ids)) -> (y, (inputs, segment_ids))``, the causal
      conv of :class:`memarch.layers.common.CausalConv1D` as a pure function of its parameters.
    conv_params: its parameters (replicated over ``axis_name``).
    xbc: pre-conv activations ``[x', B, C]`` [b, t, d_inner + 2 G N] (global sequence).
    dt: positive step sizes [b, t, heads] (softplus already applied), float32.
    A: negative decay per head [heads].
    D: skip weight per head [heads].
    segment_ids: [b, t] document ids >= 0 (None: one document).
    conv_state: ``(inputs [b, w - 1, c], segment_ids [b, w - 1])`` before the first token (``-1``: empty slot).
    ssm_state: [b, heads, head_dim, d_state] SSM state before the first token.
    d_inner: width of ``x'``.
    groups: ``G`` groups of ``B`` / ``C``.
    axis_name: the mesh axis the sequence is split over.
    mesh: the mesh (None: the one set by ``jax.set_mesh``).
    chunk_size: chunk length of each shard's chunked SSD.
    scan_type: each shard's local SSD form.

  Returns:
    ``(y, conv_state, ssm_state)``: ``y = SSD(x') + D x'`` float32 [b, t, d_inner] and the conv window and float32
    SSM state after the global last token (what the unsharded layer returns).

  Raises:
    ValueError: no mesh, ``axis_name`` not in it, ``t`` not divisible by its size, or bad shapes.
  """
  b, t, c = xbc.shape
  heads, head_dim, d_state = ssm_state.shape[1:]
  if c != d_inner + 2 * groups * d_state:
    raise ValueError(f"conv_ssd_sequence_parallel: xbc width {c} != d_inner + 2 G N = "
                     f"{d_inner + 2 * groups * d_state}")
  if dt.shape != (b, t, heads):
    raise ValueError(f"conv_ssd_sequence_parallel: dt {dt.shape} must be [b, t, heads] = {(b, t, heads)}")
  mesh, _ = _sequence_mesh(mesh, axis_name, t, "conv_ssd_sequence_parallel")
  keep = conv_state[0].shape[1]
  state_seg = conv_state[1].astype(jnp.int32)
  if segment_ids is None:  # one document: as the layer does, an occupied slot of the window counts as the same one
    segment_ids = jnp.zeros((b, t), jnp.int32)
    state_seg = jnp.where(state_seg >= 0, 0, -1)
  seq = P(None, axis_name)

  def local(params, xbc, dt, A, D, seg, state_x, state_seg, h0):
    win_x = halo(xbc, keep, axis_name, state_x)  # in xbc's dtype, as the conv reads its window
    win_seg = halo(seg, keep, axis_name, state_seg)
    xbc, (tail_x, tail_seg) = conv_fn(params, xbc, seg, (win_x, win_seg))
    # -1 in the window means no previous token: the first token then keeps the initial state (as the layer).
    prev = win_seg[:, -1] if keep else jnp.full((b,), -1, jnp.int32)
    reset = segment_starts(seg, jnp.where(prev >= 0, prev, seg[:, 0]))
    xbc = jax.nn.silu(xbc)
    tl = xbc.shape[1]
    xp = xbc[..., :d_inner].reshape(b, tl, heads, head_dim)
    bm = xbc[..., d_inner:d_inner + groups * d_state].reshape(b, tl, groups, d_state)
    cm = xbc[..., d_inner + groups * d_state:].reshape(b, tl, groups, d_state)
    y, h = ssd_sequence_sharded(xp, dt, A, bm, cm, h0, reset=reset, axis_name=axis_name, chunk_size=chunk_size,
                                scan_type=scan_type)
    y = y.astype(jnp.float32) + D.astype(jnp.float32)[:, None] * xp.astype(jnp.float32)
    return y.reshape(b, tl, d_inner), tail_x[None], tail_seg[None], h[None]

  fn = jax.shard_map(
      local, mesh=mesh, in_specs=(P(), seq, seq, P(), P(), seq, P(), P(), P()),
      out_specs=(seq, P(axis_name), P(axis_name), P(axis_name)), axis_names={axis_name})
  y, tail_x, tail_seg, h = fn(conv_params, xbc, dt, A, D, segment_ids, conv_state[0], state_seg, ssm_state)
  return y, (tail_x[-1], tail_seg[-1]), h[-1]


def bmojo_memory_sharded(memory: bmojo_ops.BMojoMemory, k: Array, v: Array, k_fade: Array, v_fade: Array,
                         segment_ids: Int[Array, "b t"], *, window: int, axis_name: str,
                         score: Float[Array, "b t"] | None = None,
                         chunk_size: int | None = None) -> bmojo_ops.BMojoMemory:
  """The read memory in front of this shard's first token, from halos and a prefix (call inside ``shard_map``).

  What the unsharded read would carry after the tokens of the preceding shards, except the eidetic store (left as
  ``memory.store``; :func:`bmojo_attention_sharded` folds it):

    * ``context`` / ``fading``: the last ``W − 1`` in-context and ``2W − 1`` fading keys, values, positions and
      document keys (the position of each document's first token) before the shard (:func:`halo`, shard 0 reads
      ``memory``'s; the halo may span shards);
    * ``candidates`` (with a store): the last ``C − 1`` tokens with their keys, values, positions, document keys,
      in-document chunk indices and scores;
    * ``last_segment``: the previous token's document id; ``length``: ``memory.length + i · t``;
    * ``offset``: the in-document offset the first token has if it continues that document, a prefix over the
      shards (``all_gather`` of whether each shard starts a document and its last token's offset, then a fold).

  Args:
    memory: the memory before the global first token (replicated over ``axis_name``).
    k: this shard's in-context keys [b, t, kv_heads, head_dim] (after RoPE at absolute positions).
    v: in-context values.
    k_fade: fading keys (after RoPE).
    v_fade: fading values.
    segment_ids: [b, t] document ids (int32).
    window: ``W``.
    axis_name: the sequence mesh axis.
    score: [b, t] float32 selection scores (needed when ``memory`` has candidate slots).
    chunk_size: selection chunk ``C`` (needed when ``memory`` has candidate slots).

  Returns:
    The :class:`~memarch.ops.bmojo.BMojoMemory` for :func:`~memarch.ops.bmojo.bmojo_attention` on this shard.

  Raises:
    ValueError: naming ``score`` / ``chunk_size`` when the memory has candidates and they are missing.
  """
  shards = axis_size(axis_name, "bmojo_memory_sharded")
  b, t = segment_ids.shape
  me = jax.lax.axis_index(axis_name)
  length = memory.length + me * t
  positions = length[:, None] + jnp.arange(t, dtype=jnp.int32)[None]

  def window_halo(n, new, old):
    return type(old)(*(halo(z.astype(o.dtype), n, axis_name, o) for z, o in zip(new, old)))

  last_segment = halo(segment_ids, 1, axis_name, memory.last_segment[:, None].astype(jnp.int32))[:, 0]
  # Offsets fold: a shard that starts a document fixes the next shard's offset; one that does not adds t.
  offsets, starts = bmojo_ops.document_offsets(segment_ids, last_segment, jnp.zeros((b,), jnp.int32))
  all_has = jax.lax.all_gather(starts.any(axis=1), axis_name)     # [S, b]
  all_next = jax.lax.all_gather(offsets[:, -1] + 1, axis_name)    # [S, b]: valid where the shard starts one
  offset = memory.offset.astype(jnp.int32)
  for i in range(shards - 1):
    offset = jnp.where(i < me, jnp.where(all_has[i], all_next[i], offset + t), offset)
  # The memory keys its slots by document (the position of the document's first token), as bmojo_attention does.
  offsets, _ = bmojo_ops.document_offsets(segment_ids, last_segment, offset)
  docs = positions - offsets
  context = window_halo(window - 1, (k, v, positions, docs), memory.context)
  fading = window_halo(2 * window - 1, (k_fade, v_fade, positions, docs), memory.fading)
  candidates = memory.candidates
  n_cand = candidates.k.shape[1]
  if n_cand:
    if score is None or chunk_size is None:
      raise ValueError("bmojo_memory_sharded: a memory with candidates needs score and chunk_size")
    candidates = window_halo(n_cand, (k, v, positions, docs, offsets // chunk_size, score), candidates)
  return memory._replace(context=context, fading=fading, candidates=candidates, offset=offset,
                         last_segment=last_segment, length=length)


def _fold_store(carried: bmojo_ops.StoreEntries, written: bmojo_ops.StoreEntries, k_sel: int,
                axis_name: str) -> bmojo_ops.StoreEntries:
  """The FIFO store in front of this shard: the last ``M / k_sel`` chunks of the carried store and of the chunks
  written by the preceding shards (``written``: each shard's store after its tokens from an empty one, where
  empty chunk slots have position -1). One ``all_gather`` of ``M`` entries per shard (spec §5.5, the store band).
  """
  b, m = carried.positions.shape
  band = m // k_sel
  every = jax.tree.map(lambda z: jax.lax.all_gather(z, axis_name), written)   # [S, b, M, ...]
  me = jax.lax.axis_index(axis_name)
  by_chunk = lambda z: z.reshape((b, band, k_sel) + z.shape[2:])
  store = carried
  for i in range(axis_size(axis_name, "_fold_store") - 1):
    new = jax.tree.map(lambda z: z[i], every)
    slots = jax.tree.map(lambda old, z: jnp.concatenate([by_chunk(old), by_chunk(z).astype(old.dtype)], axis=1),
                         store, new)
    # As bmojo_attention's FIFO: carried slots always count, a shard's empty chunk slots never displace one.
    keep = jnp.concatenate([jnp.ones((b, band), jnp.int32),
                            (by_chunk(new.positions)[..., 0] >= 0).astype(jnp.int32)], axis=1)
    order = jnp.argsort(keep, axis=1, stable=True)[:, band:]
    pick = lambda z: jnp.take_along_axis(z, order.reshape(order.shape + (1,) * (z.ndim - 2)), axis=1)
    folded = jax.tree.map(lambda z, old: pick(z).reshape(old.shape), slots, store)
    store = jax.tree.map(lambda f, old: jnp.where((i < me).reshape((1,) * old.ndim), f, old), folded, store)
  return store


def _varying(tree: Any, axis_name: str) -> Any:
  """Marks every leaf as varying over ``axis_name`` (a ``shard_map`` type; values unchanged)."""
  def cast(z):
    aval = jax.typeof(z)
    axes = aval.manual_axis_type.varying if hasattr(aval, "manual_axis_type") else aval.vma
    return z if axis_name in axes else jax.lax.pcast(z, (axis_name,), to="varying")
  return jax.tree.map(cast, tree)


def _fold_top_m_store(carried: bmojo_ops.StoreEntries, written: bmojo_ops.StoreEntries,
                      axis_name: str) -> bmojo_ops.StoreEntries:
  """The ``top_m`` store in front of this shard: the carried store merged with what each preceding shard wrote.

  A ``top_m`` store after any run of chunk ends is the ``M`` best entries (by score, then writing order) that the
  last ended chunk's document wrote so far (:func:`~memarch.ops.bmojo.top_m_merge` drops other documents), and the
  ``M`` best of a union are the ``M`` best of the ``M`` best of its parts. So each shard's store after its tokens
  from an empty one (``written``: empty when it ends no chunk) is all-gathered and merged in shard order, earlier
  shards first (they win ties, as stored entries do). One ``all_gather`` of ``M`` entries per shard.
  """
  b = carried.positions.shape[0]
  every = jax.tree.map(lambda z: jax.lax.all_gather(z, axis_name), written)   # [S, b, M, ...]
  me = jax.lax.axis_index(axis_name)
  store = carried
  for i in range(axis_size(axis_name, "_fold_top_m_store") - 1):
    new = jax.tree.map(lambda z: z[i], every)
    merged, _ = bmojo_ops.top_m_merge(store, new, new.segment_ids[:, 0])
    take = (i < me) & jnp.any(new.positions >= 0, axis=1)                  # [b]: shard i ended a chunk
    store = jax.tree.map(lambda f, old: jnp.where(take.reshape((b,) + (1,) * (old.ndim - 1)), f.astype(old.dtype),
                                                  old), merged, store)
  return store


def bmojo_attention_sharded(
    q: Array, k: Array, v: Array, k_fade: Array, v_fade: Array, memory: bmojo_ops.BMojoMemory, *, window: int,
    axis_name: str, segment_ids: Int[Array, "b t"], score: Float[Array, "b t"] | None = None,
    q_fade: Array | None = None, chunk_size: int | None = None, k_sel: int = 1,
    selector_bias: tuple[Array, Array] | None = None, bound: str = "fifo", scale: float | None = None,
    query_block: int | None = None,
) -> tuple[Array, bmojo_ops.BMojoMemory]:
  """One shard of the B'MOJO(-F) read over a sequence split along ``axis_name`` (call inside ``shard_map``).

  B'MOJO-F: the incoming memory is :func:`bmojo_memory_sharded`'s, then :func:`~memarch.ops.bmojo.bmojo_attention`
  runs unchanged. With the eidetic store the store in front of the shard needs the chunks the preceding shards
  write: a first ``bmojo_attention`` call from an empty store gives this shard's written store (only its selection
  is live; the read is dead code under ``jit``), an ``all_gather`` of those ``M`` entries per shard and a fold (the
  FIFO's last ``M / k_sel`` chunks, or ``top_m``'s ``M`` best of the document) give the incoming store, and the
  second call reads with it. Selection does not depend on the store with either bound, so the first call's
  selections are the unsharded ones.

  Args:
    q, k, v, k_fade, v_fade: this shard's queries / keys / values as in :func:`~memarch.ops.bmojo.bmojo_attention`.
    memory: the memory before the global first token (replicated over ``axis_name``).
    window: ``W``.
    axis_name: the sequence mesh axis.
    segment_ids: [b, t] int32 document ids.
    score: [b, t] selection scores (with a store).
    q_fade: fading queries (None: ``q``).
    chunk_size: selection chunk ``C`` (with a store).
    k_sel: entries written per complete chunk.
    selector_bias: ``(γ, τ)`` of the store-logit bias, or None.
    bound: the store's eviction rule, ``"fifo"`` or ``"top_m"``.
    scale: logit scale (None: ``1/sqrt(head_dim)``).
    query_block: sub-block bound of the read (a speed knob).

  Returns:
    ``(out, new_memory)``: this shard's outputs and the memory after its last token (on the last shard: the
    global one).

  Raises:
    ValueError: a store without ``score`` or ``chunk_size`` (from :func:`bmojo_memory_sharded`).
  """
  use_store = memory.store.k.shape[1] > 0
  if use_store and score is not None and selector_bias is None:
    score = jax.lax.stop_gradient(score)  # as bmojo_attention treats its own tokens' scores
  mem_in = bmojo_memory_sharded(memory, k, v, k_fade, v_fade, segment_ids, window=window, axis_name=axis_name,
                                score=score, chunk_size=chunk_size)
  call = lambda mem, fresh: bmojo_ops.bmojo_attention(
      q, k, v, k_fade, v_fade, mem, window=window, segment_ids=segment_ids, score=score, q_fade=q_fade,
      chunk_size=chunk_size, k_sel=k_sel, fresh=fresh, scale=scale, query_block=query_block,
      selector_bias=selector_bias, bound=bound)
  if use_store:
    st = memory.store
    empty = st._replace(k=jnp.zeros_like(st.k), v=jnp.zeros_like(st.v), positions=jnp.full_like(st.positions, -1),
                        segment_ids=jnp.zeros_like(st.segment_ids), chunk=jnp.zeros_like(st.chunk),
                        score=jnp.zeros_like(st.score))
    if bound == "top_m":  # the top_m read scans over the store: its carry must vary over the axis from the start
      empty = _varying(empty, axis_name)
    _, written = call(mem_in._replace(store=empty), True)
    if bound == "fifo":
      store = _fold_store(memory.store, written.store, k_sel, axis_name)
    else:
      store = _varying(_fold_top_m_store(memory.store, written.store, axis_name), axis_name)
    mem_in = mem_in._replace(store=store)
  return call(mem_in, False)


def bmojo_attention_sequence_parallel(
    q: Array, k: Array, v: Array, k_fade: Array, v_fade: Array, memory: bmojo_ops.BMojoMemory, *, window: int,
    axis_name: str, segment_ids: Int[Array, "b t"] | None = None, score: Float[Array, "b t"] | None = None,
    q_fade: Array | None = None, chunk_size: int | None = None, k_sel: int = 1,
    selector_bias: tuple[Array, Array] | None = None, bound: str = "fifo", scale: float | None = None,
    query_block: int | None = None, mesh=None,
) -> tuple[Array, bmojo_ops.BMojoMemory]:
  """The B'MOJO(-F) read on global arrays, sequence-sharded over ``axis_name`` (contract of ``bmojo_attention``).

  Opens a ``jax.shard_map`` manual over ``axis_name`` only and runs :func:`bmojo_attention_sharded` on each
  shard; the returned memory is the last shard's, i.e. the one after the global last token.

  Args:
    q, k, v, k_fade, v_fade, memory, window, segment_ids, score, q_fade, chunk_size, k_sel, selector_bias, bound,
      scale, query_block: as in :func:`memarch.ops.bmojo.bmojo_attention` (global sequence).
    axis_name: the mesh axis the sequence is split over.
    mesh: the mesh (None: the one set by ``jax.set_mesh``).

  Returns:
    ``(out, new_memory)`` as :func:`memarch.ops.bmojo.bmojo_attention`.

  Raises:
    ValueError: no mesh, ``axis_name`` not in it, or ``t`` not divisible by its size.
  """
  b, t = q.shape[:2]
  mesh, _ = _sequence_mesh(mesh, axis_name, t, "bmojo_attention_sequence_parallel")
  segment_ids = jnp.zeros((b, t), jnp.int32) if segment_ids is None else segment_ids.astype(jnp.int32)
  seq = P(None, axis_name)
  opt = lambda z: None if z is None else seq
  rep = lambda tree: jax.tree.map(lambda _: P(), tree)

  def local(q, k, v, k_fade, v_fade, q_fade, seg, score, memory, selector_bias):
    out, new = bmojo_attention_sharded(
        q, k, v, k_fade, v_fade, memory, window=window, axis_name=axis_name, segment_ids=seg, score=score,
        q_fade=q_fade, chunk_size=chunk_size, k_sel=k_sel, selector_bias=selector_bias, bound=bound, scale=scale,
        query_block=query_block)
    return out, jax.tree.map(lambda z: z[None], new)

  in_specs = (seq,) * 5 + (opt(q_fade), seq, opt(score), rep(memory), rep(selector_bias))
  out_specs = (seq, jax.tree.map(lambda _: P(axis_name), memory))
  fn = jax.shard_map(local, mesh=mesh, in_specs=in_specs, out_specs=out_specs, axis_names={axis_name})
  out, new = fn(q, k, v, k_fade, v_fade, q_fade, segment_ids, score, memory, selector_bias)
  return out, jax.tree.map(lambda z: z[-1], new)
