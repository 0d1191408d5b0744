"""Config validation: every bad field gets one clear line, before anything is compiled (CONVENTIONS.md C15)."""

from __future__ import annotations

import inspect
import math
import re

import jax
import ml_collections as mlc
from etils import epath

from memarch import data, models, sharding

_REQUIRED = ("seed", "total_steps", "model_name", "model", "input", "mesh", "logical_axis_rules", "optax",
             "log_every", "eval_every", "ckpt_every", "keep_ckpts")


def data_parallel_axes(config: mlc.ConfigDict) -> tuple[str, ...]:
  """Returns the mesh axes the batch is split over (the ``act_batch`` rule), e.g. ``("data", "fsdp")``."""
  for name, target in config.logical_axis_rules:
    if name == "act_batch":
      return () if target is None else ((target,) if isinstance(target, str) else tuple(target))
  return ()


def validate(config: mlc.ConfigDict, num_devices: int | None = None, process_count: int | None = None) -> None:
  """Checks ``config`` against the registries and the devices.

  Args:
    config: the experiment config.
    num_devices: the global device count (default ``jax.device_count()``).
    process_count: the number of processes (default ``jax.process_count()``).

  Raises:
    ValueError: listing one line per bad field, each starting with the field's name.
  """
  num_devices = jax.device_count() if num_devices is None else num_devices
  process_count = jax.process_count() if process_count is None else process_count
  missing = [f for f in _REQUIRED if f not in config]
  if missing:
    raise ValueError("\n".join(f"{f}: missing from the config" for f in missing))
  errors = []

  for field in ("total_steps", "log_every", "eval_every", "ckpt_every", "keep_ckpts"):
    if not isinstance(config[field], int) or config[field] <= 0:
      errors.append(f"{field}={config[field]!r} must be a positive int")

  init_from = config.get("init_from")
  if init_from and not (isinstance(init_from, str) and (epath.Path(init_from) / "checkpoints").is_dir()
                        and any(p.name.isdigit() for p in (epath.Path(init_from) / "checkpoints").iterdir())):
    errors.append(f"init_from={init_from!r} must be empty or a run's workdir with a finished checkpoint "
                  "(checkpoints/<step>)")

  info = None
  try:
    info = data.get_task_info(config.input)
  except ValueError as e:
    errors.append(str(e) if str(e).startswith("input") else f"input.name: {e}")

  model = None
  try:
    model = models.get_model(config.model_name, **config.model)
  except ValueError as e:
    errors.append(str(e) if str(e).startswith(("model", "model_name")) else f"model_name: {e}")
  except TypeError as e:
    errors.append(f"model: {e}")

  sizes = {}
  try:
    mesh_sizes = [(n, int(s)) for n, s in config.mesh]
    known = math.prod(s for _, s in mesh_sizes if s != -1)
    sizes = {n: (s if s != -1 else num_devices // max(known, 1)) for n, s in mesh_sizes}
    optional = ("memory", "sequence")
    unknown_axes = [n for n, _ in mesh_sizes if n not in sharding.MESH_AXES + optional]
    if unknown_axes:
      errors.append(f"mesh: unknown axes {unknown_axes}; known are {sharding.MESH_AXES + optional}")
    elif [s for _, s in mesh_sizes].count(-1) > 1 or math.prod(sizes.values()) != num_devices:
      errors.append(f"mesh={list(map(tuple, config.mesh))} does not match the {num_devices} devices present "
                    f"(sizes multiply to {math.prod(sizes.values())}; at most one -1)")
      sizes = {}
  except (TypeError, ValueError) as e:
    errors.append(f"mesh: cannot read {config.mesh!r} as [(axis, size), ...] ({e})")

  for name, _ in config.logical_axis_rules:
    if name not in sharding.WEIGHT_AXES + sharding.ACTIVATION_AXES:
      errors.append(f"logical_axis_rules: unknown logical axis {name!r}")

  labels = config.get("labels_per_row")
  if labels is not None and (not isinstance(labels, int) or labels < 1):
    errors.append(f"labels_per_row={labels!r} must be a positive int or None")
  elif labels is not None and model is not None and "logit_positions" not in inspect.signature(
      type(model).__call__).parameters:
    errors.append(f"labels_per_row={labels}: model {config.model_name!r} cannot compute logits at selected "
                  "positions (no `logit_positions` argument); set it to None")

  batch = config.input.get("batch_size")
  if not isinstance(batch, int) or batch <= 0:
    errors.append(f"input.batch_size={batch!r} must be a positive int")
  elif sizes:
    axes = [a for a in data_parallel_axes(config) if a in sizes]
    dp = math.prod(sizes[a] for a in axes)
    if batch % dp:
      detail = " x ".join(f"{a}={sizes[a]}" for a in axes)
      errors.append(f"input.batch_size={batch} is not divisible by the data-parallel size {dp} (mesh {detail})")
    elif batch % process_count:
      errors.append(f"input.batch_size={batch} is not divisible by the process count {process_count}")

  if info is not None:
    seq_len = config.input.get("seq_len", info.seq_len)
    if model is not None:
      try:
        model.validate(seq_len)
      except ValueError as e:
        errors.append(f"input.seq_len={seq_len}: {e}")
      else:
        for split in info.eval_splits:  # e.g. length-generalisation splits run longer sequences
          length = info.seq_len_of(split)
          if length == seq_len:
            continue
          try:
            model.validate(length)
          except ValueError as e:
            errors.append(f"input.seq_len={seq_len}: the {split} eval split has length {length}: {e}")
    target = dict((n, t) for n, t in config.logical_axis_rules).get("act_len")
    seq_axes = [a for a in ((target,) if isinstance(target, str) else (target or ())) if a in sizes]
    shards = math.prod(sizes[a] for a in seq_axes)
    if shards > 1:  # sequence parallelism (spec bmojo.md §5.5): every length must split evenly
      for split, length in [("train", seq_len)] + [(s, info.seq_len_of(s)) for s in info.eval_splits]:
        if length % shards:
          errors.append(f"mesh: the sequence axes {seq_axes} split sequences into {shards} shards, but the {split} "
                        f"sequences have length {length} (input.seq_len={seq_len}); use a divisor")
          break
    features = config.model.get("input_features")
    if features != info.input_features:
      errors.append(f"model.input_features={features!r} does not match task {info.name!r}, whose inputs are "
                    + (f"{info.input_features}-dim feature vectors" if info.input_features else "token ids (None)"))
    if model is not None and getattr(model, "reads_token_scores", False):
      errors.append(f"model.mixer_options: innovation='external' needs per-token token_scores in every batch, and "
                    f"task {info.name!r} has none (no built-in task does): use 'ssm_residual' or 'key_novelty' "
                    "with train.py, or pass token_scores to train_step / Model in your own loop")
    depth = getattr(model, "route_depth", 0) if model is not None else 0
    if depth:  # a routed memory: the task's routes must reach every level of the bank, on a tree of its branching
      memory = model.config.memory()
      if info.route_depth < depth:
        errors.append(f"model.memory_options: ranks={memory['ranks']} has {depth} levels but task {info.name!r} "
                      f"routes have depth {info.route_depth} (need route depth >= the number of levels)")
      elif memory["branching"] != info.route_branching:
        errors.append(f"model.memory_options: branching={memory['branching']} does not match the "
                      f"{info.route_branching}-way tree of task {info.name!r}'s routes")
    vocab = config.model.get("vocab_size")
    if not isinstance(vocab, int) or vocab < info.vocab_size:
      errors.append(f"model.vocab_size={vocab!r} is too small for task {info.name!r}, which needs "
                    f"{info.vocab_size} tokens")

  opt = config.optax
  if opt.get("name") != "adamw":
    errors.append(f"optax.name={opt.get('name')!r} is unknown (only 'adamw')")
  if not opt.get("lr", 0) > 0:
    errors.append(f"optax.lr={opt.get('lr')!r} must be positive")
  drop_at, drop_factor = opt.get("lr_drop_below_loss", 0.0), opt.get("lr_drop_factor", 0.1)
  if isinstance(drop_at, bool) or not isinstance(drop_at, (int, float)) or not drop_at >= 0:
    errors.append(f"optax.lr_drop_below_loss={drop_at!r} must be a non-negative number (0 = no drop)")
  if isinstance(drop_factor, bool) or not isinstance(drop_factor, (int, float)) or not 0 < drop_factor <= 1:
    errors.append(f"optax.lr_drop_factor={drop_factor!r} must be in (0, 1]")
  for field in ("lr_multipliers", "wd_exclude", "weight_decay_rules"):
    for item in opt.get(field, ()) or ():
      paired = field != "wd_exclude"
      if paired and (isinstance(item, str) or len(item) != 2):
        errors.append(f"optax.{field}: {item!r} is not a (regex, number) pair")
        continue
      pattern = item[0] if paired else item
      try:
        re.compile(pattern)
      except (re.error, TypeError) as e:
        errors.append(f"optax.{field}: bad regex {pattern!r} ({e})")
      if paired and (isinstance(item[1], bool) or not isinstance(item[1], (int, float)) or not item[1] >= 0):
        errors.append(f"optax.{field}: {item[1]!r} (for {pattern!r}) must be a non-negative number")
  if errors:
    raise ValueError("invalid config:\n  " + "\n  ".join(errors))
