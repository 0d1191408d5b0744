"""Logical axis names used by every memarch layer, and default rules mapping them to mesh axes.

Layers only ever name *logical* axes (CONVENTIONS.md C6); configs map them onto the mesh axes
``data``, ``fsdp`` and ``tensor`` (and ``memory`` for sharded memory banks, ``sequence`` for sequence parallelism:
``act_len`` maps to it, and Mamba-2 / B'MOJO then split their recurrence over it, spec bmojo.md §5.5).

Weights:
  ``embed``        the model width of a weight matrix (FSDP-sharded by default).
  ``mlp``          the hidden width of an MLP (tensor-parallel).
  ``heads``        attention / memory heads (tensor-parallel).
  ``kv``           per-head feature dimension (replicated).
  ``vocab``        the vocabulary axis of embeddings and the output head (tensor-parallel).
  ``memory_rows``  rows of a memory bank or value table (sharded over ``memory``).
  ``layers``       the stacked-layer axis of scanned blocks (replicated).
  ``conv``         the kernel-width axis of a depthwise convolution (replicated).
Activations:
  ``act_batch``, ``act_len``, ``act_emb``, ``act_heads``.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import numpy as np

WEIGHT_AXES = ("embed", "mlp", "heads", "kv", "vocab", "memory_rows", "layers", "conv")
ACTIVATION_AXES = ("act_batch", "act_len", "act_emb", "act_heads")
MESH_AXES = ("data", "fsdp", "tensor")

LogicalRules = Sequence[tuple[str, str | tuple[str, ...] | None]]

# Default rules: batch over data x fsdp; weights FSDP on `embed`; tensor parallel on mlp/heads/vocab.
DEFAULT_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("act_batch", ("data", "fsdp")),
    ("act_len", "sequence"),  # dropped on meshes without a `sequence` axis
    ("act_emb", None),
    ("act_heads", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv", None),
    ("vocab", "tensor"),
    ("memory_rows", "memory"),
    ("layers", None),
    ("conv", None),
)


def make_mesh(axes: Sequence[tuple[str, int]], devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
  """Builds a device mesh from ``[(name, size), ...]``; one size may be -1 (all remaining devices).

  Args:
    axes: mesh axis names and sizes, e.g. ``[("data", -1), ("fsdp", 1), ("tensor", 1)]``.
    devices: devices to use (default: all of ``jax.devices()``).

  Returns:
    A ``Mesh`` with ``AxisType.Auto`` axes (set explicitly, see CONVENTIONS.md C10).

  Raises:
    ValueError: naming the ``mesh`` field when sizes do not multiply to the device count.
  """
  devices = list(jax.devices() if devices is None else devices)
  names = [a for a, _ in axes]
  sizes = [int(s) for _, s in axes]
  if len(set(names)) != len(names):
    raise ValueError(f"mesh: duplicate axis names in {list(axes)}")
  if sizes.count(-1) > 1:
    raise ValueError(f"mesh: at most one axis may have size -1, got {list(axes)}")
  if any(s == 0 or s < -1 for s in sizes):
    raise ValueError(f"mesh: axis sizes must be positive or -1, got {list(axes)}")
  known = int(np.prod([s for s in sizes if s != -1])) if sizes else 1
  if -1 in sizes:
    if len(devices) % known:
      raise ValueError(
          f"mesh: {list(axes)} needs a multiple of {known} devices, but {len(devices)} are present")
    sizes[sizes.index(-1)] = len(devices) // known
  if int(np.prod(sizes)) != len(devices):
    raise ValueError(
        f"mesh: axis sizes {dict(zip(names, sizes))} multiply to {int(np.prod(sizes))}, "
        f"but {len(devices)} devices are present")
  return jax.make_mesh(tuple(sizes), tuple(names), axis_types=(jax.sharding.AxisType.Auto,) * len(names),
                       devices=devices)


def rules_for_mesh(rules: LogicalRules, mesh: jax.sharding.Mesh) -> tuple[tuple[str, object], ...]:
  """Drops mesh axes that ``mesh`` lacks from ``rules`` (e.g. ``memory`` on a data/fsdp/tensor mesh)."""
  out = []
  for name, target in rules:
    if target is None:
      out.append((name, None))
      continue
    targets = (target,) if isinstance(target, str) else tuple(target)
    kept = tuple(t for t in targets if t in mesh.axis_names)
    out.append((name, kept if len(kept) > 1 else (kept[0] if kept else None)))
  return tuple(out)


def param_shardings(module, *sample_args, mesh: jax.sharding.Mesh, rules: LogicalRules | None = None):
  """The mesh sharding of every parameter of ``module`` from its logical names (shapes only, nothing allocated).

  Args:
    module: an unbound linen module whose params carry ``nn.with_logical_partitioning`` names.
    *sample_args: inputs for ``module.init`` (only their shapes matter).
    mesh: the device mesh.
    rules: logical-to-mesh rules (default: :data:`DEFAULT_RULES` restricted to ``mesh``'s axes).

  Returns:
    A tree of ``NamedSharding`` shaped like ``module.init(...)["params"]``; use it as ``out_shardings`` of a jitted
    init, or flatten it with :func:`flat_specs` to check it.
  """
  import flax.linen as nn  # pylint: disable=g-import-not-at-top  (keeps this module importable without flax)

  rules = rules_for_mesh(DEFAULT_RULES if rules is None else rules, mesh)
  abstract = jax.eval_shape(module.init, jax.random.key(0), *sample_args)
  specs = nn.get_partition_spec(abstract)["params"]
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    return nn.logical_to_mesh_sharding(specs, mesh, rules)


def flat_specs(shardings) -> dict[str, jax.sharding.PartitionSpec]:
  """``{"block_0/mixer/q": PartitionSpec(...), ...}``: the partition spec of each leaf, by '/'-joined path."""
  return {"/".join(str(getattr(k, "key", k)) for k in path): s.spec
          for path, s in jax.tree_util.tree_leaves_with_path(shardings)}
