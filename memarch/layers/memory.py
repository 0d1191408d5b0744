"""Parametric memory layers: a hierarchical FFN-memory bank and a product-key memory (thin linen modules).

Both follow one fetch / apply interface (spec ``hmem.md`` §2, "ParametricMemory")::

    fetched = layer.fetch(route)            # hierarchical: route = [B, depth] tree path; PKM: route = the inputs x
    y = layer.read(x, fetched)              # position-wise: [B, T, d] -> [B, T, d]
    y = layer(x, route=route)               # == read(x, fetch(route))

(``read`` is the spec's ``apply``; the name ``apply`` belongs to linen.) They are position-wise (FFN-like) layers
with no recurrent state: the LM puts :class:`HierarchicalMemoryFFN` in place of a block's SwiGLU (it contains the
anchor SwiGLU), and :class:`ProductKeyMemory` in parallel with the FFN (§4.3). The math lives in
:mod:`memarch.ops.memory_bank` and :mod:`memarch.ops.pkm`.

**Sharding.** Parameters carry logical names only (CONVENTIONS.md C6): table rows ``memory_rows``, memory units /
value columns ``mlp``. At call time the layers read the mesh set by ``jax.set_mesh`` and the logical rules in
context: if ``memory_rows`` maps to mesh axes, the fetch runs as a ``jax.shard_map`` over them with the batch on the
axes of ``act_batch`` and the units on those of ``mlp`` (no collective scales with the bank; map ``memory_rows``
to every axis ``act_batch`` uses, e.g. ``("memory", "data")``, to avoid even a dense all-reduce of the local bank
shard over ``data``). Without a mesh or a ``memory_rows`` rule the fetch is a plain gather. The model width of the
bank tensors is deliberately unnamed (replicated): the ``shard_map`` in-specs must match the parameter layout.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from memarch.layers.common import DType, SwiGLU, as_dtype, variance_scaling
from memarch.ops import memory_bank as mb
from memarch.ops import pkm as pkm_ops
from memarch.typing import Array


def resolve_bank_axes() -> mb.BankAxes | None:
  """Mesh axes of the bank from the current mesh and logical rules (None: no mesh / no ``memory_rows`` rule)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return None
  spec = nn.logical_to_mesh_axes(("memory_rows", "act_batch", "mlp"))
  mem, batch, tensor = (tuple(a for a in mb.axes_tuple(s) if a in mesh.axis_names) for s in spec)
  if not mem:
    return None
  if len(tensor) > 1:
    raise ValueError(f"logical_axis_rules: 'mlp' maps to several mesh axes {tensor}; the bank supports one")
  return mb.BankAxes(memory=mem, batch=batch, tensor=tensor[0] if tensor else None)


class HierarchicalMemoryFFN(nn.Module):
  """Anchor SwiGLU FFN plus the FFN-memory blocks fetched on the context's tree path (spec §1.2-1.4, §2).

  ``y = SwiGLU_anchor(x) + (silu(x Gm) * (x Um)) Dm`` with ``[Gm, Um, Dm]`` the path's blocks concatenated over
  levels (eq. 2.2): an FFN of width ``hidden + sum(ranks)``. Down-projections of the bank and of the generic block are
  zero-initialised (no effect at step 0). Parameters (per instance, i.e. per LM layer): ``anchor`` (the SwiGLU),
  ``gate_l``/``up_l`` [k^l, d, r_l] and ``down_l`` [k^l, r_l, d] for each level ``l`` with ``r_l > 0``, and
  ``generic_gate``/``generic_up`` [d, R], ``generic_down`` [R, d].

  Route: int32 [B, depth] in nested numbering; a row of ``-1`` (:data:`memarch.ops.memory_bank.GENERIC`) selects
  the generic block (see :mod:`memarch.ops.memory_bank`).

  Attributes:
    d_model: model width ``d``.
    hidden: the anchor FFN's hidden width ``d_f``.
    ranks: ``(r_1, ..., r_p)`` memory units per level (0: the level is unused and has no table).
    branching: tree branching ``k`` (16 in the paper).
    use_generic: create the generic block (co-training with ``p_generic``, §1.5); without it, ``-1`` rows fetch
      zeros (anchor only).
    w_init_variance_scale: variance multiplier of the gate/up initialisers (anchor and memory).
    dtype: computation dtype (None: promoted input dtype).
    param_dtype: parameter dtype.
  """
  d_model: int
  hidden: int
  ranks: tuple[int, ...] = (64, 32)
  branching: int = 16
  use_generic: bool = True
  w_init_variance_scale: float = 1.0
  dtype: DType = None
  param_dtype: DType = jnp.float32

  def setup(self):
    if not self.ranks or any(r < 0 for r in self.ranks) or sum(self.ranks) == 0:
      raise ValueError(f"ranks={self.ranks}: need non-negative units per level with a positive sum")
    if self.branching < 2:
      raise ValueError(f"branching={self.branching}: must be >= 2")
    pd, d = as_dtype(self.param_dtype), self.d_model
    gu_init = variance_scaling(self.w_init_variance_scale, in_axis=-2, out_axis=-1)
    gu = lambda: nn.with_logical_partitioning(gu_init, ("memory_rows", None, "mlp"))
    dn = lambda: nn.with_logical_partitioning(nn.initializers.zeros_init(), ("memory_rows", "mlp", None))
    self.anchor = SwiGLU(self.hidden, w_init_variance_scale=self.w_init_variance_scale, dtype=self.dtype,
                         param_dtype=self.param_dtype)
    levels = []
    for l, r in enumerate(self.ranks, start=1):
      if r == 0:
        levels.append(None)
        continue
      rows = mb.level_rows(self.branching, l)
      levels.append(mb.Blocks(self.param(f"gate_{l}", gu(), (rows, d, r), pd),
                              self.param(f"up_{l}", gu(), (rows, d, r), pd),
                              self.param(f"down_{l}", dn(), (rows, r, d), pd)))
    self.levels = levels
    if self.use_generic:
      units = sum(self.ranks)
      g_init = nn.with_logical_partitioning(gu_init, (None, "mlp"))
      self.generic = mb.Blocks(
          self.param("generic_gate", g_init, (d, units), pd), self.param("generic_up", g_init, (d, units), pd),
          self.param("generic_down", nn.with_logical_partitioning(nn.initializers.zeros_init(), ("mlp", None)),
                     (units, d), pd))
    else:
      self.generic = None

  def fetch(self, route: Array) -> mb.Blocks:
    """Gathers the path blocks of every sequence (a ``shard_map`` on a mesh with a ``memory_rows`` rule).

    Args:
      route: [B, depth] int32 nested-numbering paths, ``depth >= len(ranks)``; ``-1`` rows: generic block.

    Returns:
      :class:`memarch.ops.memory_bank.Blocks`: gate/up [B, d, R], down [B, R, d].
    """
    return mb.fetch_blocks(self.levels, route, self.generic, axes=resolve_bank_axes())

  def read(self, x: Array, fetched: mb.Blocks) -> Array:
    """``anchor(x) + (silu(x Gm) * (x Um)) Dm``.

    Args:
      x: [B, T, d] normalised inputs.
      fetched: the output of :meth:`fetch`.

    Returns:
      [B, T, d].
    """
    y = self.anchor(x)
    dtype = as_dtype(self.dtype) or jnp.result_type(x.dtype, self.param_dtype)
    mem = mb.apply_blocks(x.astype(dtype), mb.Blocks(*(f.astype(dtype) for f in fetched)))
    return y + mem.astype(y.dtype)

  def __call__(self, x: Array, *, route: Array) -> Array:
    """Applies the FFN with the memory fetched for ``route`` (see :meth:`fetch` / :meth:`read`)."""
    if route is None:
      raise ValueError("route: HierarchicalMemoryFFN needs a [B, depth] int32 route (use -1 rows for generic)")
    if x.ndim != 3 or x.shape[-1] != self.d_model:
      raise ValueError(f"x: expected [B, T, d_model={self.d_model}], got {list(x.shape)}")
    if route.shape[0] != x.shape[0]:
      raise ValueError(f"route: batch {route.shape[0]} != x batch {x.shape[0]}")
    return self.read(x, self.fetch(route))


def _rms(x: Array, eps: float = 1e-6) -> Array:
  x32 = x.astype(jnp.float32)
  return (x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)).astype(x.dtype)


class ProductKeyMemory(nn.Module):
  """Product-key memory (Lample et al. 2019) with the Memory+ gated output (Berges et al. 2024; spec §4).

  ``q = x W_q`` (one linear query per head, no BatchNorm, §4.4); per head the exact product top-``knn`` of the two
  sub-key sets; ``m = sum_h sum_r softmax(S)_hr V[slot_hr]``; then ``y = (m * silu(x W_g)) W_o`` (Memory+,
  ``gated=True``) or ``y = m`` (PKM, requires ``v_dim == d_model``). Parameters: ``query`` [d, H, d_k], ``sub_keys``
  [H, 2, n, d_k/2], ``values`` [n^2, d_v] (rows ``memory_rows``, columns ``mlp``; init N(0, d_v^-1/2) as in the
  official code), and with ``gated`` ``gate`` [d, d_v], ``out`` [d_v, d]. Give ``values`` its LR multiplier (10x in
  the papers) with ``optax.lr_multipliers = [("values$", 10.0)]`` (:mod:`memarch.training.optim`).

  Attributes:
    d_model: model width ``d``.
    n_keys: sub-keys per half ``n`` (``n^2`` slots).
    heads: lookup heads ``H`` (values shared across heads).
    knn: slots per head ``k`` (``<= n_keys``).
    k_dim: query / key width ``d_k`` (even).
    v_dim: value width ``d_v`` (None: ``d_model``).
    gated: Memory+ gated output with ``W_g``, ``W_o`` (False: the 2019 PKM, output = the value sum).
    qk_norm: RMS-normalise (no gain) query halves and sub-keys before scoring (Memory+; ours as a flag, §4.2).
    dtype: computation dtype (None: promoted input dtype).
    param_dtype: parameter dtype.
  """
  d_model: int
  n_keys: int = 128
  heads: int = 4
  knn: int = 16
  k_dim: int = 64
  v_dim: int | None = None
  gated: bool = True
  qk_norm: bool = False
  dtype: DType = None
  param_dtype: DType = jnp.float32

  def setup(self):
    if self.k_dim % 2:
      raise ValueError(f"k_dim={self.k_dim}: must be even (two halves)")
    if not 1 <= self.knn <= self.n_keys:
      raise ValueError(f"knn={self.knn}: must be in [1, n_keys={self.n_keys}]")
    dv = self.v_dim or self.d_model
    if not self.gated and dv != self.d_model:
      raise ValueError(f"v_dim={dv}: an ungated PKM needs v_dim == d_model={self.d_model}")
    pd, d, half = as_dtype(self.param_dtype), self.d_model, self.k_dim // 2
    self.query = self.param("query", nn.with_logical_partitioning(
        variance_scaling(1.0, in_axis=0, out_axis=(1, 2)), ("embed", "heads", "kv")), (d, self.heads, self.k_dim), pd)
    self.sub_keys = self.param("sub_keys", nn.with_logical_partitioning(
        nn.initializers.normal(half ** -0.5), ("heads", None, None, "kv")), (self.heads, 2, self.n_keys, half), pd)
    self.values = self.param("values", nn.with_logical_partitioning(
        nn.initializers.normal(dv ** -0.5), ("memory_rows", "mlp")), (self.n_keys ** 2, dv), pd)
    if self.gated:
      self.gate = self.param("gate", nn.with_logical_partitioning(variance_scaling(1.0), ("embed", "mlp")), (d, dv), pd)
      self.out = self.param("out", nn.with_logical_partitioning(variance_scaling(1.0), ("mlp", "embed")), (dv, d), pd)

  def fetch(self, x: Array) -> pkm_ops.Lookup:
    """Per-token fetch: the query network and the exact product top-k (the route of a PKM is its input).

    Args:
      x: [B, T, d].

    Returns:
      :class:`memarch.ops.pkm.Lookup` with [B, T, H, knn] slots and float32 weights.
    """
    if x.ndim != 3 or x.shape[-1] != self.d_model:
      raise ValueError(f"x: expected [B, T, d_model={self.d_model}], got {list(x.shape)}")
    dtype = as_dtype(self.dtype)
    x, wq, keys = nn.dtypes.promote_dtype(x, self.query, self.sub_keys, dtype=dtype)
    q = jnp.einsum("btd,dhe->bthe", x, wq)
    if self.qk_norm:
      half = self.k_dim // 2
      q = jnp.concatenate([_rms(q[..., :half]), _rms(q[..., half:])], axis=-1)
      keys = _rms(keys)
    return pkm_ops.pkm_lookup(q.astype(jnp.float32), keys.astype(jnp.float32), self.knn)

  def read(self, x: Array, fetched: pkm_ops.Lookup) -> Array:
    """The (gated) weighted value read.

    Args:
      x: [B, T, d] the same inputs as :meth:`fetch`.
      fetched: the output of :meth:`fetch`.

    Returns:
      [B, T, d].
    """
    dtype = as_dtype(self.dtype) or jnp.result_type(x.dtype, self.param_dtype)
    m = pkm_ops.pkm_read(self.values.astype(dtype), pkm_ops.Lookup(fetched.slots, fetched.weights.astype(dtype)),
                         axes=resolve_bank_axes())
    if not self.gated:
      return m.astype(dtype)
    x, wg, wo = nn.dtypes.promote_dtype(x, self.gate, self.out, dtype=dtype)
    return (m.astype(x.dtype) * nn.silu(x @ wg)) @ wo

  def __call__(self, x: Array, *, route: Array | None = None) -> Array:
    """``read(x, fetch(x))``; ``route`` is accepted for interface symmetry and ignored (the query routes)."""
    del route
    return self.read(x, self.fetch(x))


__all__ = ["HierarchicalMemoryFFN", "ProductKeyMemory", "resolve_bank_axes"]
