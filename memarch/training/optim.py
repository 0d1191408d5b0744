"""The optimizer: AdamW with warmup + cosine decay, clipping, a weight-decay mask and per-group LR multipliers.

Weight decay applies to every weight matrix, **including the embedding table**. With tied embeddings the table is
also the output projection, and exempting it would leave the largest matrix of a small model unregularised. Norm
scales, gains and biases are exempt: decaying them pulls the model towards zero-gain layers. Exempt more with
``optax.wd_exclude``. Per-group rates: ``optax.weight_decay_rules = [(regex, rate), ...]`` gives every decayed
parameter whose path matches a regex that rate (first match wins) instead of ``optax.wd``, e.g. a memory bank at
1e-3 while the anchor keeps 0.1 (spec hmem.md §1.5). The rules only set rates: parameters the mask exempts (norms,
biases, ``wd_exclude``) stay undecayed whatever the rules say.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections as mlc
import optax

# Path patterns (re.search on '/'-joined param paths) that are never weight-decayed.
NO_DECAY_PATTERNS = (r"(^|/)bias$", r"(^|/)[^/]*_bias$", r"(^|/)scale$", r"(^|/)gain", r"(?i)norm")


def param_paths(params: Any) -> Any:
  """Returns a tree shaped like ``params`` whose leaves are their '/'-joined paths, e.g. ``"block_0/mlp/kernel"``.

  Args:
    params: a (nested dict) parameter tree.

  Returns:
    The tree of path strings.
  """
  def name(path):
    return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)
  return jax.tree_util.tree_map_with_path(lambda p, _: name(p), params)


def decay_mask(params: Any, extra_exclude: Sequence[str] = ()) -> Any:
  """Returns a bool tree: True where weight decay applies (see the module docstring).

  Args:
    params: the parameter tree (arrays or ShapeDtypeStructs).
    extra_exclude: more path regexes to exempt from decay.

  Returns:
    A tree of bools shaped like ``params``.
  """
  patterns = [re.compile(p) for p in (*NO_DECAY_PATTERNS, *extra_exclude)]
  return jax.tree.map(lambda path, p: jnp.ndim(p) >= 2 and not any(r.search(path) for r in patterns),
                      param_paths(params), params)


def lr_multipliers(params: Any, rules: Sequence[tuple[str, float]]) -> Any:
  """Returns a float tree: the LR multiplier of each parameter, from the first regex in ``rules`` that matches.

  Args:
    params: the parameter tree.
    rules: ``[(regex, multiplier), ...]``, matched with ``re.search`` against '/'-joined paths; no match gives 1.

  Returns:
    A tree of Python floats shaped like ``params``.
  """
  compiled = [(re.compile(r), float(m)) for r, m in rules]
  def mult(path):
    return next((m for r, m in compiled if r.search(path)), 1.0)
  return jax.tree.map(mult, param_paths(params))


def weight_decay_rates(params: Any, wd: float, rules: Sequence[tuple[str, float]] = (),
                       exclude: Sequence[str] = ()) -> Any:
  """Returns a float tree: each parameter's weight-decay rate (0 where :func:`decay_mask` exempts it).

  Args:
    params: the parameter tree.
    wd: the global rate, for decayed parameters no rule matches.
    rules: ``[(regex, rate), ...]``, matched with ``re.search`` against '/'-joined paths; the first match wins.
    exclude: more path regexes exempt from decay (``wd_exclude``); they win over ``rules``.

  Returns:
    A tree of Python floats shaped like ``params``.
  """
  compiled = [(re.compile(r), float(w)) for r, w in rules]
  def rate(path, decayed):
    return next((w for r, w in compiled if r.search(path)), float(wd)) if decayed else 0.0
  return jax.tree.map(rate, param_paths(params), decay_mask(params, exclude))


def add_decayed_weights_by_rules(wd: float, rules: Sequence[tuple[str, float]] = (),
                                 exclude: Sequence[str] = ()) -> optax.GradientTransformation:
  """Decoupled weight decay ``u + rate * p`` with per-parameter rates from :func:`weight_decay_rates` (stateless).

  With no ``rules`` this is ``optax.add_decayed_weights(wd, mask=decay_mask(., exclude))``.
  """
  def init_fn(params):
    del params
    return optax.EmptyState()
  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError("add_decayed_weights_by_rules: the optimizer update needs params")
    rates = weight_decay_rates(params, wd, rules, exclude)
    return jax.tree.map(lambda u, p, r: u if r == 0.0 else u + jnp.asarray(r, u.dtype) * p.astype(u.dtype),
                        updates, params, rates), state
  return optax.GradientTransformation(init_fn, update_fn)


def scale_by_multipliers(rules: Sequence[tuple[str, float]]) -> optax.GradientTransformation:
  """Scales each parameter's update by its multiplier from :func:`lr_multipliers` (stateless)."""
  def init_fn(params):
    del params
    return optax.EmptyState()
  def update_fn(updates, state, params=None):
    del params
    mults = lr_multipliers(updates, rules)
    return jax.tree.map(lambda u, m: u if m == 1.0 else u * jnp.asarray(m, u.dtype), updates, mults), state
  return optax.GradientTransformation(init_fn, update_fn)


def lazy_rows(inner: optax.GradientTransformation, patterns: Sequence[str]) -> optax.GradientTransformation:
  """Lazy row updates for memory banks (spec hmem.md §2 ``bank_adam="lazy"``): rows not fetched stay untouched.

  For every parameter whose path matches a regex of ``patterns``, a row (index along axis 0) whose gradient is
  exactly zero this step (it was not fetched) gets a zero update, and every optimizer-state leaf of ``inner`` shaped
  like the parameters (Adam's moments) keeps its old value on that row, so neither momentum nor weight decay moves
  an unfetched block. Other parameters are updated by ``inner`` as usual.

  Args:
    inner: the transformation to wrap (e.g. Adam -> weight decay -> -lr -> multipliers).
    patterns: path regexes (``re.search`` on '/'-joined paths) of row-lazy parameters.

  Returns:
    The wrapped transformation (same state as ``inner``).
  """
  compiled = [re.compile(p) for p in patterns]

  def update_fn(updates, state, params=None):
    paths = param_paths(updates)
    treedef = jax.tree.structure(updates)
    def row_mask(path, g):
      if jnp.ndim(g) == 0 or not any(r.search(path) for r in compiled):
        return jnp.ones((), bool)
      return jnp.any(g != 0, axis=tuple(range(1, g.ndim))).reshape((-1,) + (1,) * (g.ndim - 1))
    masks = jax.tree.map(row_mask, paths, updates)
    new_updates, new_state = inner.update(updates, state, params)
    new_updates = jax.tree.map(lambda u, m: jnp.where(m, u, jnp.zeros((), u.dtype)), new_updates, masks)
    def keep(new, old):  # restore unfetched rows of every params-shaped subtree of the state
      if jax.tree.structure(new) == treedef and all(
          jnp.shape(a) == jnp.shape(b) for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(updates))):
        return jax.tree.map(lambda n, o, m: jnp.where(m, n, o), new, old, masks)
      if isinstance(new, (tuple, list)) and type(new) is type(old) and len(new) == len(old):
        items = [keep(n, o) for n, o in zip(new, old)]
        return type(new)(*items) if hasattr(new, "_fields") else type(new)(items)
      if isinstance(new, dict) and isinstance(old, dict) and new.keys() == old.keys():
        return type(new)({k: keep(new[k], old[k]) for k in new})
      return new
    return new_updates, keep(new_state, state)

  return optax.GradientTransformation(inner.init, update_fn)


class LossDropState(NamedTuple):
  """State of :func:`drop_lr_once_loss_below`: ``scale`` is 1 until the loss first falls below the threshold, then
  ``factor`` for good."""
  scale: jax.Array


def drop_lr_once_loss_below(threshold: float, factor: float) -> optax.GradientTransformationExtraArgs:
  """Scales every update by ``factor`` from the first step whose training loss is below ``threshold`` on.

  A one-way switch for tasks that sit on a loss plateau and then solve abruptly (MQAR at its hard points): the
  plateau needs the peak lr to break, the solution found after it does not survive that lr (README, B'MOJO at the
  MQAR target point), and the step at which the plateau breaks varies with the seed. The loss is the batch's, before
  this step's update, passed as ``tx.update(..., value=loss)`` (optax's convention, as for
  ``optax.contrib.reduce_on_plateau``). The switch is in the optimizer state, so a resumed run keeps it.

  Args:
    threshold: the loss below which the lr drops.
    factor: the lr multiplier after the drop, in (0, 1].

  Returns:
    The transformation; its state is a :class:`LossDropState`.
  """
  def init_fn(params):
    del params
    return LossDropState(scale=jnp.ones((), jnp.float32))
  def update_fn(updates, state, params=None, *, value=None, **extra_args):
    del params, extra_args
    if value is None:
      raise ValueError("drop_lr_once_loss_below: the optimizer update needs the loss, as value=loss")
    scale = jnp.where(value < threshold, jnp.float32(factor), state.scale)
    return jax.tree.map(lambda u: u * scale.astype(u.dtype), updates), LossDropState(scale=scale)
  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def lr_scale(opt_state: Any) -> jax.Array:
  """The product of the :class:`LossDropState` scales in an optimizer state (1 when there is none)."""
  states = [s for s in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, LossDropState))
            if isinstance(s, LossDropState)]
  scale = jnp.ones((), jnp.float32)
  for s in states:
    scale = scale * s.scale
  return scale


def make_schedule(cfg: mlc.ConfigDict, total_steps: int) -> optax.Schedule:
  """Linear warmup from 0 to ``cfg.lr``, then cosine decay to ``cfg.lr * cfg.min_lr_ratio`` at ``total_steps``.

  Args:
    cfg: the ``optax`` config (``lr``, ``warmup_steps``, ``min_lr_ratio``).
    total_steps: the length of the run.

  Returns:
    A schedule step -> learning rate.
  """
  warmup = min(int(cfg.warmup_steps), total_steps)
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=cfg.lr, warmup_steps=warmup, decay_steps=max(total_steps, warmup + 1),
      end_value=cfg.lr * cfg.get("min_lr_ratio", 0.0))


def make_optimizer(cfg: mlc.ConfigDict, total_steps: int) -> tuple[optax.GradientTransformation, Callable]:
  """Builds the optimizer of ``config.optax``.

  Order: clip by global norm -> Adam moments -> decoupled weight decay (masked, per-group rates) -> -lr(step) ->
  LR multipliers (-> the one-way lr drop), so a multiplier scales a group's whole step, weight decay included, as a
  per-group LR would (a parameter with multiplier m and rate w shrinks by ``lr * m * w`` per step). Under
  ``lazy_rows`` the decay of an unfetched row is masked with the rest of its update.

  Args:
    cfg: ``config.optax``: name ("adamw"), lr, b1, b2, eps, wd, warmup_steps, min_lr_ratio, clip,
      lr_multipliers, wd_exclude, weight_decay_rules (``[(regex, rate)]``, see :func:`weight_decay_rates`),
      lazy_rows (path regexes of memory banks updated only on fetched rows, see
      :func:`lazy_rows`), lr_drop_below_loss and lr_drop_factor (0 = off; otherwise the lr is multiplied by
      ``lr_drop_factor`` from the first step whose training loss is below ``lr_drop_below_loss``, see
      :func:`drop_lr_once_loss_below`; the update then needs ``value=loss``).
    total_steps: the length of the run (for the cosine decay).

  Returns:
    ``(tx, schedule)``.
  """
  if cfg.name != "adamw":
    raise ValueError(f"optax.name: unknown optimizer {cfg.name!r} (only 'adamw')")
  schedule = make_schedule(cfg, total_steps)
  exclude = tuple(cfg.get("wd_exclude", ()) or ())
  parts = []
  if cfg.get("clip"):
    parts.append(optax.clip_by_global_norm(cfg.clip))
  parts += [
      optax.scale_by_adam(b1=cfg.get("b1", 0.9), b2=cfg.get("b2", 0.999), eps=cfg.get("eps", 1e-8)),
      add_decayed_weights_by_rules(cfg.get("wd", 0.0), [tuple(r) for r in (cfg.get("weight_decay_rules", ()) or ())],
                                   exclude),
      optax.scale_by_learning_rate(schedule),
  ]
  rules = [tuple(r) for r in (cfg.get("lr_multipliers", ()) or ())]
  if rules:
    parts.append(scale_by_multipliers(rules))
  lazy = tuple(cfg.get("lazy_rows", ()) or ())
  if lazy:  # everything after clipping sees the raw zero rows of unfetched bank blocks
    clip = parts[:1] if cfg.get("clip") else []
    parts = [*clip, lazy_rows(optax.chain(*parts[len(clip):]), lazy)]
  if cfg.get("lr_drop_below_loss", 0.0):
    parts.append(drop_lr_once_loss_below(cfg.lr_drop_below_loss, cfg.get("lr_drop_factor", 0.1)))
  return optax.chain(*parts), schedule
