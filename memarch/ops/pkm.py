"""Product-key memory: exact product top-k lookup and a row-sharded weighted value read (pure JAX, no Flax).

Lample et al., *Large Memory Layers with Product Keys* (NeurIPS 2019), and Berges et al., *Memory Layers at Scale*
(arXiv 2412.09764); spec ``hmem.md`` §4. A query ``q`` in R^{d_k} is split into halves ``[q1; q2]``; two sub-key
sets ``C1, C2`` in R^{n x d_k/2} address ``N = n^2`` slots with values ``V`` in R^{N x d_v}::

    s1 = C1 q1;  s2 = C2 q2                                 O(n d_k) scores, not O(n^2 d_k)
    (S1, I1) = top_k(s1, k);  (S2, I2) = top_k(s2, k)
    (S, J) = top_k({S1_i + S2_j : (i, j) in I1 x I2}, k);  slot = i n + j
    w = softmax(S);  m(x) = sum_r w_r V[slot_r]             per head; heads summed, V shared across heads

The product top-k is **exact**: the true top-k of all ``n^2`` sums lies in ``I1 x I2`` (if ``(i, j)`` is in the top
k but ``i`` is not in ``I1``, the ``k`` entries of ``I1`` paired with ``j`` all score higher: a contradiction).
:func:`brute_force_topk` is the ``n^2`` reference the tests compare with, forward and gradients.

Ours (spec §4.3, §4.4): the lookup weights the **gathered rows**, never the ids; the value table's rows are sharded
over a ``memory`` mesh axis like the hierarchical bank (:mod:`memarch.ops.memory_bank`), and :func:`pkm_read` is a
``jax.shard_map`` masked local gather + weighted sum followed by a reduce-scatter of the **output** ``[B, T, d_v]``:
the backward is a local scatter-add into the owned rows and no collective scales with the table. Value columns may
also be sharded over ``tensor``. The fetch / apply split of the layer is ``pkm_lookup`` (per token: the route is the
query) and ``pkm_read``.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from memarch.ops.memory_bank import BankAxes, axes_tuple
from memarch.typing import Array


class Lookup(NamedTuple):
  """A per-token memory fetch.

  Attributes:
    slots: [..., H, k] int32 slot ids in ``[0, n^2)``.
    weights: [..., H, k] softmax weights over the ``k`` slots of each head.
  """
  slots: Array
  weights: Array


def sub_key_scores(q: Array, sub_keys: Array) -> tuple[Array, Array]:
  """Scores of each query half against its sub-key set: ``s1 = C1 q1``, ``s2 = C2 q2``.

  Args:
    q: [..., H, d_k] queries (``d_k`` even).
    sub_keys: [H, 2, n, d_k / 2] the two sub-key sets per head.

  Returns:
    ``(s1, s2)``, each [..., H, n].

  Raises:
    ValueError: naming ``q`` or ``sub_keys`` on mismatched shapes.
  """
  h, two, _, half = sub_keys.shape
  if two != 2 or q.shape[-2:] != (h, 2 * half):
    raise ValueError(f"q: expected [..., H={h}, d_k={2 * half}] for sub_keys [H, 2, n, d_k/2] = "
                     f"{list(sub_keys.shape)}, got {list(q.shape)}")
  q1, q2 = q[..., :half], q[..., half:]
  return (jnp.einsum("...he,hne->...hn", q1, sub_keys[:, 0]),
          jnp.einsum("...he,hne->...hn", q2, sub_keys[:, 1]))


def product_topk(s1: Array, s2: Array, k: int) -> tuple[Array, Array]:
  """Exact top-``k`` of ``s1_i + s2_j`` over all ``n^2`` pairs, from ``k x k`` candidates (XLM ``pq_fast``).

  Args:
    s1: [..., n] first-half scores.
    s2: [..., n] second-half scores.
    k: number of slots to keep (``k <= n``).

  Returns:
    ``(scores, slots)`` [..., k], sorted by decreasing score; ``slot = i * n + j``.

  Raises:
    ValueError: naming ``k`` when it exceeds ``n``, or ``s2`` on a shape mismatch.
  """
  n = s1.shape[-1]
  if s2.shape != s1.shape:
    raise ValueError(f"s2: shape {list(s2.shape)} != s1 {list(s1.shape)}")
  if not 1 <= k <= n:
    raise ValueError(f"k={k}: must be in [1, n={n}]")
  v1, i1 = jax.lax.top_k(s1, k)
  v2, i2 = jax.lax.top_k(s2, k)
  cand = (v1[..., :, None] + v2[..., None, :]).reshape(*v1.shape[:-1], k * k)
  scores, j = jax.lax.top_k(cand, k)
  rows = jnp.take_along_axis(i1, j // k, axis=-1)
  cols = jnp.take_along_axis(i2, j % k, axis=-1)
  return scores, (rows * n + cols).astype(jnp.int32)


def brute_force_topk(s1: Array, s2: Array, k: int) -> tuple[Array, Array]:
  """Reference: top-``k`` over the full ``n^2`` table of sums (memory ``O(n^2)``; tests only)."""
  n = s1.shape[-1]
  full = (s1[..., :, None] + s2[..., None, :]).reshape(*s1.shape[:-1], n * n)
  scores, slots = jax.lax.top_k(full, k)
  return scores, slots.astype(jnp.int32)


def pkm_lookup(q: Array, sub_keys: Array, k: int) -> Lookup:
  """The fetch: per head, the ``k`` best slots of the product keys and their softmax weights (§4.1).

  Args:
    q: [..., H, d_k] queries.
    sub_keys: [H, 2, n, d_k / 2].
    k: slots per head (``knn``).

  Returns:
    :class:`Lookup` with [..., H, k] slots and float32 weights.
  """
  s1, s2 = sub_key_scores(q, sub_keys)
  scores, slots = product_topk(s1, s2, k)
  return Lookup(slots, jax.nn.softmax(scores.astype(jnp.float32), axis=-1))


def pkm_read(values: Array, lookup: Lookup, *, axes: BankAxes | None = None, mesh=None) -> Array:
  """The read: ``m = sum_h sum_r w_hr V[slot_hr]`` (§4.1; the weights multiply gathered rows, §4.4).

  Args:
    values: [N, d_v] value table (rows over ``axes.memory``, columns over ``axes.tensor``).
    lookup: slots / weights [B, T, H, k].
    axes: mesh axes (None or no memory axis: a plain gather).
    mesh: mesh for ``shard_map`` (None: the one set by ``jax.set_mesh``).

  Returns:
    [B, T, d_v] in the promoted dtype of the values and weights.

  Raises:
    ValueError: naming ``lookup`` or ``values`` on bad shapes or a non-dividing mesh.
  """
  slots, weights = lookup
  if slots.ndim != 4 or weights.shape != slots.shape:
    raise ValueError(f"lookup: expected slots and weights [B, T, H, k], got {slots.shape} and {weights.shape}")
  if values.ndim != 2:
    raise ValueError(f"values: expected [N, d_v], got {list(values.shape)}")
  dtype = jnp.result_type(values.dtype, weights.dtype)

  def gather_sum(table, ids, w, offset):
    rows = table.shape[0]
    loc = ids - offset
    own = (loc >= 0) & (loc < rows)
    g = jnp.take(table, jnp.clip(loc, 0, rows - 1), axis=0).astype(dtype)      # [b, t, h, k, d_v]
    return jnp.einsum("bthk,bthkv->btv", jnp.where(own, w, 0).astype(dtype), g)

  mem = axes_tuple(None if axes is None else axes.memory)
  if not mem:
    return gather_sum(values, slots, weights, 0)
  mesh = mesh if mesh is not None else jax.sharding.get_abstract_mesh()
  batch = axes_tuple(axes.batch)
  missing = [a for a in (*mem, *batch, *axes_tuple(axes.tensor)) if a not in mesh.axis_names]
  if missing:
    raise ValueError(f"axes: {missing} are not axes of the mesh {tuple(mesh.axis_names)}")
  n_mem = math.prod(mesh.shape[a] for a in mem)
  if values.shape[0] % n_mem:
    raise ValueError(f"values: {values.shape[0]} rows not divisible by |{mem}| = {n_mem}")
  scatter = tuple(a for a in batch if a in mem)
  reduce = tuple(a for a in mem if a not in batch)
  batch_spec = (batch if len(batch) > 1 else batch[0]) if batch else None
  rows_spec = mem if len(mem) > 1 else mem[0]

  def local(table, ids, w):
    if scatter:
      ids = jax.lax.all_gather(ids, scatter, axis=0, tiled=True)
      w = jax.lax.all_gather(w, scatter, axis=0, tiled=True)
    out = gather_sum(table, ids, w, jax.lax.axis_index(mem) * table.shape[0])
    if scatter:  # reduce-scatter of the output [B, T, d_v]: activation-sized, not table-sized
      out = jax.lax.psum_scatter(out, scatter, scatter_dimension=0, tiled=True)
    if reduce:
      out = jax.lax.psum(out, reduce)
    return out

  return jax.shard_map(local, mesh=mesh, in_specs=(P(rows_spec, axes.tensor), P(batch_spec), P(batch_spec)),
                       out_specs=P(batch_spec, None, axes.tensor))(values, slots, weights)


def slot_usage(slots: Array, num_slots: int) -> dict[str, Array]:
  """Diagnostics of §4.3: the fraction of slots hit and KL(usage || uniform) over a batch of lookups.

  Args:
    slots: int slot ids of any shape.
    num_slots: ``N``.

  Returns:
    ``{"usage": fraction of slots hit at least once, "kl_uniform": KL of the hit histogram from uniform}``.
  """
  counts = jnp.zeros((num_slots,), jnp.float32).at[slots.reshape(-1)].add(1.0)
  p = counts / jnp.maximum(counts.sum(), 1.0)
  kl = jnp.sum(jnp.where(p > 0, p * (jnp.log(jnp.where(p > 0, p, 1.0)) + jnp.log(float(num_slots))), 0.0))
  return {"usage": jnp.mean(counts > 0), "kl_uniform": kl}


__all__ = ["Lookup", "brute_force_topk", "pkm_lookup", "pkm_read", "product_topk", "slot_usage", "sub_key_scores"]
