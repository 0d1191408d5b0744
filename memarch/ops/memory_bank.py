"""Hierarchical FFN-memory bank: fetch a context's path blocks and add them to an FFN (pure JAX, no Flax).

Pouransari et al., *Pretraining with hierarchical memories* (arXiv 2510.02375; spec ``hmem.md`` §1.2-1.4, §2, §3).
Every node of a ``k``-way tree of depth ``p`` owns one **FFN-memory block** per layer: ``r_l`` extra SwiGLU units at
level ``l``. A context routed to the path ``(i_1, ..., i_p)`` fetches ``R(x; W) = [W_{1,i_1}, ..., W_{p,i_p}]``
(eq. 2.2) and concatenates the blocks to the FFN's inner dimension (§1.3)::

    y = (silu(x [G|Gm]) * (x [U|Um])) [D; Dm] = anchor(x) + (silu(x Gm) * (x Um)) Dm        R = sum_l r_l units

so applying the fetched blocks (:func:`apply_blocks`) is exactly an FFN of width ``d_f + R``. Gm, Um are truncated
normal and **Dm = 0** (the paper's "W3 = 0"): the memory has no effect at step 0.

**Route representation (the interface with the tree / routing code).** A route is an int32 array ``[B, depth]``,
one root-to-leaf path per sequence, in **nested numbering**: column ``l - 1`` holds the level-``l`` node index
``i_l = i_{l-1} * k + c_l`` in ``[0, k^l)``, which is also the block's row in the level-``l`` table. ``depth`` may
exceed the number of levels the bank uses (extra columns are ignored); a level with ``r_l = 0`` has no table and its
column is ignored. **Generic memory** (co-training, §1.5: used with probability ``p_generic = 1/17``): a sequence whose
route row is :data:`GENERIC` (``-1``) in column 0 uses the always-trainable generic block of width ``R`` instead of
its path (write the whole row as ``-1``; :func:`mix_generic` does the 1/17 draw). The route is a side array, never a
token (§2).

**Sharding (§3).** Tables are ``[k^l, *block]`` with rows sharded over a ``memory`` mesh axis and units optionally
over ``tensor``. GSPMD transposes a sharded ``jnp.take`` into a dense, bank-sized scatter buffer plus an all-reduce
(§3.2), so :func:`fetch_blocks` is written with ``jax.shard_map`` (§3.3, the "fallback without co-located routing",
which accepts any global route):

  1. all-gather the small ``[B, depth]`` route over ``memory`` (when the batch is sharded over it);
  2. each device gathers the rows it owns for those sequences, zero for the others (a local gather);
  3. ``psum_scatter`` over ``memory`` along the batch (``psum`` when the batch is not sharded over ``memory``)
     hands each sequence its blocks.

Forward: a reduce-scatter of the fetched size. Backward (derived by JAX): an all-gather of the fetched size and a
**local** scatter-add into the owned shard: no collective scales with the bank. ``tests/ops/test_memory_bank.py``
checks this in the compiled HLO, with plain ``jnp.take`` as the negative control.

**Optimizer state of unfetched blocks.** Only fetched rows receive a non-zero gradient. With AdamW a dense update
would still move every unfetched row (momentum and weight decay), so :func:`memarch.training.optim.lazy_rows`
(config ``optax.lazy_rows = [regex, ...]``) masks the update, the moment updates and the
weight decay of every row whose gradient is exactly zero this step (spec §2 ``bank_adam="lazy"``). Without it
the bank is trained with dense AdamW (``bank_adam="dense"``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from memarch.typing import Array

GENERIC = -1  # route value (column 0) that selects the generic memory block


class Blocks(NamedTuple):
  """FFN-memory blocks: one level's table (leading rows axis) or the fetched blocks (leading batch axis).

  Attributes:
    gate: ``Gm`` [n, *lead, d, r] (``lead`` is e.g. a stacked-layers axis, or empty).
    up: ``Um`` [n, *lead, d, r].
    down: ``Dm`` [n, *lead, r, d] (zero-initialised).
  """
  gate: Array
  up: Array
  down: Array


class BankAxes(NamedTuple):
  """Mesh axes of a sharded bank (resolved from logical names by the layer; ops never guess them).

  Attributes:
    memory: mesh axis (or axes, major first) sharding the table rows (None: rows replicated, a plain gather).
    batch: mesh axes sharding the batch axis of the route and of the fetched blocks. A batch axis that does not
      also shard the rows leaves the bank replicated over it, so the bank's gradient is all-reduced over that
      axis (a dense all-reduce of the local bank shard, spec §3.2 row 4): for no bank-sized collective at all,
      shard the rows over every batch axis (spec §3.3, "rows over all devices").
    tensor: mesh axis sharding the unit axis ``r`` of the tables and the fetched blocks (None: replicated).
  """
  memory: str | tuple[str, ...] | None = "memory"
  batch: tuple[str, ...] = ()
  tensor: str | None = None


def level_rows(branching: int, level: int) -> int:
  """Rows of the level-``level`` table: ``k^l`` (level 1 is the root's children)."""
  return branching ** level


def bank_sizes(d_model: int, num_layers: int, ranks: Sequence[int], branching: int = 16) -> dict[str, int]:
  """Parameter counts of §1.4: ``c0 = 3 L d``, fetched ``c0 sum r_l``, bank ``c0 sum r_l k^l``.

  Args:
    d_model: model width ``d``.
    num_layers: layers carrying memory ``L``.
    ranks: ``(r_1, ..., r_p)`` units per level (0: level unused).
    branching: tree branching ``k``.

  Returns:
    ``{"c0", "units" (R), "fetched", "bank"}``.
  """
  c0 = 3 * num_layers * d_model
  return {"c0": c0, "units": int(sum(ranks)), "fetched": c0 * int(sum(ranks)),
          "bank": c0 * int(sum(r * branching ** (l + 1) for l, r in enumerate(ranks)))}


def init_blocks(key: Array, rows: int, lead: Sequence[int], d_model: int, units: int,
                dtype=jnp.float32) -> Blocks:
  """Initialises ``rows`` blocks: gate/up truncated normal (fan-in ``d``), down zero (§1.3).

  Args:
    key: PRNG key.
    rows: number of blocks (``k^l`` for a level table).
    lead: extra axes between rows and ``d`` (e.g. ``(L,)`` for stacked layers, or ``()``).
    d_model: ``d``.
    units: ``r``.
    dtype: parameter dtype.

  Returns:
    The :class:`Blocks` table.
  """
  init = jax.nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal", in_axis=-2, out_axis=-1)
  kg, ku = jax.random.split(key)
  shape = (rows, *lead, d_model, units)
  return Blocks(init(kg, shape, dtype), init(ku, shape, dtype),
                jnp.zeros((rows, *lead, units, d_model), dtype))


def mix_generic(route: Array, key: Array, p_generic: float = 1.0 / 17.0) -> Array:
  """Replaces each sequence's route by :data:`GENERIC` with probability ``p_generic`` (co-training, §1.5).

  Args:
    route: [B, depth] int32 paths.
    key: PRNG key (fold the step in).
    p_generic: probability of the generic memory per sequence.

  Returns:
    The route with whole rows set to ``-1`` where the generic memory is drawn.
  """
  use = jax.random.bernoulli(key, p_generic, (route.shape[0], 1))
  return jnp.where(use, jnp.asarray(GENERIC, route.dtype), route)


def axes_tuple(a) -> tuple[str, ...]:
  """``None`` / ``"x"`` / ``("x", "y")`` -> a tuple of mesh axis names."""
  return () if a is None else (a,) if isinstance(a, str) else tuple(a)


def _check(levels: Sequence[Blocks | None], route: Array, generic: Blocks | None) -> list[tuple[int, Blocks]]:
  used = [(l, b) for l, b in enumerate(levels) if b is not None]
  if not used:
    raise ValueError("levels: the bank has no level with r_l > 0")
  if route.ndim != 2 or not jnp.issubdtype(route.dtype, jnp.integer):
    raise ValueError(f"route: expected an int [B, depth] array, got {route.dtype}{list(route.shape)}")
  if route.shape[1] < len(levels):
    raise ValueError(f"route: depth {route.shape[1]} < the bank's {len(levels)} levels")
  lead = used[0][1].gate.shape[1:-1]
  for l, b in used:
    if b.gate.shape[1:-1] != lead or b.up.shape != b.gate.shape or b.down.shape[1:-2] != lead[:-1]:
      raise ValueError(f"levels[{l}]: block shapes gate {b.gate.shape} up {b.up.shape} down {b.down.shape} "
                       f"do not match [rows, *lead, d, r] / [rows, *lead, r, d] with d/lead {lead}")
  if generic is not None:
    units = sum(b.gate.shape[-1] for _, b in used)
    if generic.gate.shape != (*lead, units):
      raise ValueError(f"generic: gate shape {generic.gate.shape} != {(*lead, units)} (lead, d, R)")
  return used


def _gather_local(used, ids, offsets_of):
  """Masked local gather of every level's rows for ``ids`` [n, depth]; levels concatenated on the unit axis."""
  outs = {"gate": [], "up": [], "down": []}
  for l, b in used:
    rows = b.gate.shape[0]
    loc = ids[:, l] - offsets_of(rows)
    own = (loc >= 0) & (loc < rows)
    loc = jnp.clip(loc, 0, rows - 1)
    for name in outs:
      t = getattr(b, name)
      g = jnp.take(t, loc, axis=0)
      outs[name].append(jnp.where(own.reshape((-1,) + (1,) * (t.ndim - 1)), g, jnp.zeros((), t.dtype)))
  return Blocks(jnp.concatenate(outs["gate"], -1), jnp.concatenate(outs["up"], -1),
                jnp.concatenate(outs["down"], -2))


def _select_generic(fetched: Blocks, route: Array, generic: Blocks | None) -> Blocks:
  if generic is None:
    return fetched
  use = route[:, 0] < 0
  return Blocks(*(jnp.where(use.reshape((-1,) + (1,) * (f.ndim - 1)), g[None].astype(f.dtype), f)
                  for f, g in zip(fetched, generic)))


def fetch_blocks(levels: Sequence[Blocks | None], route: Array, generic: Blocks | None = None, *,
                 axes: BankAxes | None = None, mesh=None) -> Blocks:
  """Fetches the blocks on each sequence's path and concatenates the levels (eq. 2.2; §2 "fetch and apply").

  Args:
    levels: per level ``l = 1..p`` a :class:`Blocks` table ``[k^l, *lead, d, r_l]`` (None: ``r_l = 0``).
    route: [B, depth] int32 nested-numbering paths (see the module docstring; ``-1`` rows select ``generic``).
    generic: the generic block ``[*lead, d, R]`` / ``[*lead, R, d]`` (None: no generic memory; ``-1`` rows then
      fetch zeros, i.e. no memory).
    axes: mesh axes (None or ``axes.memory`` None: a plain gather, for unsharded banks).
    mesh: mesh for ``shard_map`` (None: the mesh set by ``jax.set_mesh``).

  Returns:
    :class:`Blocks` with leading batch axis: gate/up [B, *lead, d, R], down [B, *lead, R, d]. Units are ordered by
    level on one device; on a ``tensor``-sharded bank they are ordered by tensor shard, then level (gate, up and
    down consistently, so the FFN is the same).

  Raises:
    ValueError: naming ``levels``, ``route``, ``generic`` or ``axes`` on bad shapes or a non-dividing mesh.
  """
  used = _check(levels, route, generic)
  if axes is None or not axes_tuple(axes.memory):
    return _select_generic(_gather_local(used, route, lambda rows: 0), route, generic)

  mesh = mesh if mesh is not None else jax.sharding.get_abstract_mesh()
  mem = axes_tuple(axes.memory)
  batch = axes_tuple(axes.batch)
  missing = [a for a in (*mem, *batch, *axes_tuple(axes.tensor)) if a not in mesh.axis_names]
  if missing:
    raise ValueError(f"axes: {missing} are not axes of the mesh {tuple(mesh.axis_names)}")
  n_mem = math.prod(mesh.shape[a] for a in mem)
  for l, b in used:
    if b.gate.shape[0] % n_mem:
      raise ValueError(f"levels[{l}]: {b.gate.shape[0]} rows not divisible by |{mem}| = {n_mem}")
  t = axes.tensor
  rows_spec = mem if len(mem) > 1 else mem[0]
  lead_none = (None,) * (used[0][1].gate.ndim - 3)
  gu_spec, d_spec = P(rows_spec, *lead_none, None, t), P(rows_spec, *lead_none, t, None)
  table_specs = [Blocks(gu_spec, gu_spec, d_spec) for _ in used]
  batch_spec = (batch if len(batch) > 1 else batch[0]) if batch else None
  out_gu, out_d = P(batch_spec, *lead_none, None, t), P(batch_spec, *lead_none, t, None)
  gen_specs = None if generic is None else Blocks(P(*lead_none, None, t), P(*lead_none, None, t),
                                                   P(*lead_none, t, None))
  scatter = tuple(a for a in batch if a in mem)  # batch axes that also split rows: gather ids, scatter blocks
  reduce = tuple(a for a in mem if a not in batch)  # row axes the batch is replicated over: plain psum

  def local(tables, route_local, gen):
    ids = jax.lax.all_gather(route_local, scatter, axis=0, tiled=True) if scatter else route_local
    m = jax.lax.axis_index(mem)
    part = _gather_local([(l, tb) for (l, _), tb in zip(used, tables)], ids, lambda rows: m * rows)
    if scatter:  # each device keeps its own sequences: a reduce-scatter of the fetched size
      part = Blocks(*(jax.lax.psum_scatter(p_, scatter, scatter_dimension=0, tiled=True) for p_ in part))
    if reduce:
      part = Blocks(*(jax.lax.psum(p_, reduce) for p_ in part))
    return _select_generic(part, route_local, gen)

  fn = jax.shard_map(local, mesh=mesh, in_specs=(table_specs, P(batch_spec, None), gen_specs),
                     out_specs=Blocks(out_gu, out_gu, out_d))
  return fn([b for _, b in used], route, generic)


def apply_blocks(x: Array, blocks: Blocks, layer: int | None = None) -> Array:
  """The memory's FFN contribution ``(silu(x Gm) * (x Um)) Dm`` (§1.3), added by the caller to the anchor FFN.

  Args:
    x: [B, T, d] inputs of the FFN (after its norm).
    blocks: fetched :class:`Blocks`, gate/up [B, d, R] and down [B, R, d], or with a stacked-layers axis
      [B, L, d, R] / [B, L, R, d] (then ``layer`` selects one).
    layer: index into the stacked-layers axis (None: blocks have none).

  Returns:
    [B, T, d] in the promoted dtype of ``x`` and the blocks.

  Raises:
    ValueError: naming ``blocks`` or ``x`` on inconsistent shapes.
  """
  gate, up, down = blocks
  if layer is not None:
    gate, up, down = gate[:, layer], up[:, layer], down[:, layer]
  if gate.ndim != 3 or up.shape != gate.shape or down.shape != (gate.shape[0], gate.shape[2], gate.shape[1]):
    raise ValueError(f"blocks: expected gate/up [B, d, R] and down [B, R, d] (after layer={layer}), got "
                     f"{gate.shape}, {up.shape}, {down.shape}")
  if x.ndim != 3 or x.shape[0] != gate.shape[0] or x.shape[2] != gate.shape[1]:
    raise ValueError(f"x: expected [B={gate.shape[0]}, T, d={gate.shape[1]}], got {list(x.shape)}")
  dtype = jnp.result_type(x.dtype, gate.dtype)
  x, gate, up, down = (a.astype(dtype) for a in (x, gate, up, down))
  h = jax.nn.silu(jnp.einsum("btd,bdr->btr", x, gate)) * jnp.einsum("btd,bdr->btr", x, up)
  return jnp.einsum("btr,brd->btd", h, down)


def fetched_row_mask(route: Array, rows: int, level: int) -> Array:
  """Bool [rows]: which rows of the level-``level`` (1-based) table the route fetches (for lazy updates / tests)."""
  ids = route[:, level - 1]
  return jnp.zeros((rows,), bool).at[jnp.where(ids >= 0, ids, rows)].set(True, mode="drop")


def fetch_flops_per_token(d_model: int, units: int) -> float:
  """Forward FLOPs per token and layer added by ``R`` memory units: ``2 * 3 * d * R`` (§1.4)."""
  return float(2 * 3 * d_model * units)


__all__ = ["GENERIC", "BankAxes", "Blocks", "apply_blocks", "axes_tuple", "bank_sizes", "fetch_blocks",
           "fetch_flops_per_token", "fetched_row_mask", "init_blocks", "level_rows", "mix_generic"]
