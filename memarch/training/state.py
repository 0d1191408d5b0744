"""Sharded train-state creation (CONVENTIONS.md C9): eval_shape -> partition specs -> jit(init, out_shardings).

The state is a plain dict ``{"params", "opt", "step", "rng"}``: unboxed params, the optax state, the number of
steps taken (int32) and the base PRNG key (folded with the step inside the update).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec as P


def _init_params(model: nn.Module, rng: jax.Array, batch_shape: tuple[int, ...]) -> Any:
  """Returns the model's boxed params for a dummy batch: int32 tokens ``(b, L)`` or float32 features ``(b, L, F)``."""
  dtype = jnp.int32 if len(batch_shape) == 2 else jnp.float32
  # Models with a routed memory take an int32 [b, depth] route; zeros (the first node of each level) suffice.
  route = model.dummy_route(batch_shape[0]) if hasattr(model, "dummy_route") else None
  kwargs = {} if route is None else {"route": route}
  if getattr(model, "reads_token_scores", False):  # B'MOJO with innovation='external'
    kwargs["token_scores"] = jnp.zeros(batch_shape[:2], jnp.float32)
  return model.init(rng, jnp.zeros(batch_shape, dtype), **kwargs)["params"]


def state_shardings(model: nn.Module, tx: optax.GradientTransformation, mesh: jax.sharding.Mesh, rules: Any,
                    batch_shape: tuple[int, ...]) -> tuple[Any, Any]:
  """Returns the abstract state (ShapeDtypeStructs carrying shardings) and the matching tree of NamedShardings.

  Args:
    model: the linen model; its params carry logical-partitioning boxes.
    tx: the optimizer.
    mesh: the device mesh.
    rules: logical axis rules, already restricted to ``mesh``'s axes.
    batch_shape: ``(batch, seq_len)`` of a dummy token input for initialisation, or ``(batch, seq_len, F)`` for
      float feature inputs.

  Returns:
    ``(abstract_state, shardings)``, both dicts shaped like the state.
  """
  key = jax.random.key_data(jax.random.key(0))
  boxed = jax.eval_shape(lambda r: _init_params(model, jax.random.wrap_key_data(r), batch_shape), key)
  param_specs = nn.get_partition_spec(boxed)
  params = jax.tree.map(lambda b: b.unbox(apply_constraint=False) if isinstance(b, nn.Partitioned) else b, boxed,
                        is_leaf=lambda x: isinstance(x, nn.Partitioned))
  opt = jax.eval_shape(tx.init, params)
  is_spec = lambda x: isinstance(x, P)  # noqa: E731
  opt_specs = optax.tree_map_params(tx, lambda _, spec: spec, opt, param_specs,
                                    transform_non_params=lambda _: P(), is_leaf=is_spec)
  specs = {"params": param_specs, "opt": opt_specs, "step": P(), "rng": P()}
  shardings = nn.logical_to_mesh_sharding(specs, mesh, rules)
  shapes = {"params": params, "opt": opt, "step": jax.ShapeDtypeStruct((), jnp.int32),
            "rng": jax.ShapeDtypeStruct(key.shape, key.dtype)}
  abstract = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)
  return abstract, shardings


def create_state(model: nn.Module, tx: optax.GradientTransformation, shardings: Any, seed: int,
                 batch_shape: tuple[int, ...]) -> dict[str, Any]:
  """Initialises the train state directly into its shardings (no full copy on any one device).

  Args:
    model: the linen model.
    tx: the optimizer.
    shardings: the state's NamedShardings from :func:`state_shardings`.
    seed: the run seed; params use ``fold_in(key(seed), 0)``, the step key ``fold_in(key(seed), 1)``.
    batch_shape: ``(batch, seq_len)`` of a dummy token input, or ``(batch, seq_len, F)`` for feature inputs.

  Returns:
    The state dict, sharded.
  """
  def init(seed):
    key = jax.random.key(seed)
    params = nn.meta.unbox(_init_params(model, jax.random.fold_in(key, 0), batch_shape))
    return {"params": params, "opt": tx.init(params), "step": jnp.zeros((), jnp.int32),
            "rng": jax.random.key_data(jax.random.fold_in(key, 1))}
  return jax.jit(init, out_shardings=shardings)(jnp.int32(seed))


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
  """Returns the fully replicated sharding on ``mesh``."""
  return NamedSharding(mesh, P())


def warm_start(state: dict[str, Any], source: Any, shardings: Any) -> tuple[dict[str, Any], list[str]]:
  """Copies every parameter of ``source`` whose path and shape match into ``state["params"]``.

  A path of the state with an ``anchor`` component (the base FFN of a memory-augmented FFN) also matches the
  source path without it (``block_0/mlp/anchor/w_in`` <- ``block_0/mlp/w_in``).

  This is the anchor-then-co-train recipe (hmem spec A2): an anchor LM's params seed the same layers of a model
  that adds a memory; the new parameters (the bank) keep their initialisation, the optimizer state stays fresh.

  Args:
    state: a freshly created state (from :func:`create_state`).
    source: a params tree (e.g. :func:`memarch.training.checkpoint.load_params`).
    shardings: the state's shardings (the copied params are placed with them).

  Returns:
    ``(state, copied)``: the new state and the '/'-joined paths that were copied.

  Raises:
    ValueError: a path present in both with different shapes (the source is another architecture).
  """
  flat_src = {"/".join(str(getattr(k, "key", k)) for k in path): leaf
              for path, leaf in jax.tree_util.tree_leaves_with_path(source)}
  copied = []

  def take(path, leaf, sharding):
    name = "/".join(str(getattr(k, "key", k)) for k in path)
    # A memory-augmented FFN keeps its base FFN under "anchor" (HierarchicalMemoryFFN): the source has it bare.
    key = name if name in flat_src else name.replace("/anchor/", "/")
    if key not in flat_src:
      return leaf
    src = flat_src[key]
    if tuple(src.shape) != tuple(leaf.shape):
      raise ValueError(f"parameter {name} has shape {tuple(src.shape)} in the checkpoint and "
                       f"{tuple(leaf.shape)} in the model")
    copied.append(name)
    return jax.device_put(jnp.asarray(src, leaf.dtype), sharding)

  params = jax.tree_util.tree_map_with_path(take, state["params"], shardings["params"])
  return {**state, "params": params}, copied


def exact_params(abstract_params: Any, source: Any, shardings: Any) -> Any:
  """Every parameter of a model, taken from ``source`` and placed with ``shardings`` (an evaluation's params).

  Unlike :func:`warm_start`, nothing may keep its initialisation: each path of ``abstract_params`` must be in
  ``source`` with the same shape.

  Args:
    abstract_params: the model's params as ShapeDtypeStructs (``state_shardings(...)[0]["params"]``).
    source: a params tree (e.g. from :func:`memarch.training.checkpoint.latest_params`).
    shardings: the params' NamedShardings.

  Returns:
    The params tree, sharded.

  Raises:
    ValueError: a parameter missing from ``source`` (the first few are named) or of another shape there.
  """
  state, copied = warm_start({"params": abstract_params}, source, {"params": shardings})
  names = ["/".join(str(getattr(k, "key", k)) for k in path)
           for path, _ in jax.tree_util.tree_leaves_with_path(abstract_params)]
  copied = set(copied)
  missing = [n for n in names if n not in copied]
  if missing:
    raise ValueError(f"the checkpoint lacks {len(missing)} of the model's {len(names)} parameters, e.g. "
                     f"{missing[:3]}: it holds another architecture")
  return state["params"]
