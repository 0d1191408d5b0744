"""Helpers shared by the experiment configs (CONVENTIONS.md C7)."""

from __future__ import annotations

import ml_collections as mlc


def _cast(value: str, like: object) -> object:
  """Casts the string ``value`` to the type of the default ``like``."""
  if isinstance(like, bool):
    if value.lower() in ("1", "true", "yes", ""):
      return True
    if value.lower() in ("0", "false", "no"):
      return False
    raise ValueError(f"cannot read {value!r} as a bool")
  if isinstance(like, int):
    return int(value)
  if isinstance(like, float):
    return float(value)
  return value


def parse_arg(arg: str | None, **defaults: object) -> mlc.ConfigDict:
  """Parses a config argument such as ``"runlocal,variant=S"`` against typed defaults.

  A bare name sets a bool to True (``runlocal``); ``key=value`` is cast to the default's type.

  Args:
    arg: the text after ``:`` in ``--config path.py:arg``, or None.
    **defaults: every accepted key with its default value (which fixes its type).

  Returns:
    A ConfigDict with every key of ``defaults``, overridden by ``arg``.

  Raises:
    ValueError: for a key that ``defaults`` lacks or a value of the wrong type.
  """
  out = mlc.ConfigDict(dict(defaults))
  for token in (arg or "").split(","):
    token = token.strip()
    if not token:
      continue
    key, _, value = token.partition("=")
    if key not in defaults:
      raise ValueError(f"config arg: unknown key {key!r}; known keys are {sorted(defaults)}")
    out[key] = _cast(value, defaults[key]) if "=" in token else _cast("", defaults[key])
  return out


def add_sharding(c: mlc.ConfigDict) -> None:
  """Sets the default mesh (all devices data-parallel) and the logical axis rules (CONVENTIONS.md C6, C10).

  Scale out by editing ``c.mesh``, e.g. ``[("data", -1), ("fsdp", 8), ("tensor", 4)]``; the rules already map
  weights to ``fsdp`` / ``tensor`` and the sequence to an optional ``("sequence", n)`` axis (Mamba-2 / B'MOJO layers
  then split their recurrence over it, spec bmojo.md §5.5).
  """
  c.mesh = [("data", -1), ("fsdp", 1), ("tensor", 1)]
  c.logical_axis_rules = [
      ("act_batch", ("data", "fsdp")), ("embed", "fsdp"), ("mlp", "tensor"), ("heads", "tensor"),
      ("vocab", "tensor"), ("act_heads", "tensor"), ("act_len", "sequence")]


def add_warm_start(c: mlc.ConfigDict, init_from: str = "") -> None:
  """Sets ``c.init_from``: a run's workdir whose newest checkpoint seeds the model before its first step.

  Every parameter of that checkpoint found in the model under the same path and shape is copied (a parameter of
  another shape is an error); the rest keep their initialisation, and the optimizer starts fresh. Empty: from
  scratch. A workdir that already holds checkpoints resumes from them instead. Set it on the command line with
  ``--config.init_from=DIR``, e.g. for a curriculum (a short task, then a longer one) or to add a memory to a
  trained model (hmem recipe A2).
  """
  c.init_from = init_from


def adamw(lr: float, *, warmup_steps: int, b2: float = 0.98, wd: float = 0.1) -> mlc.ConfigDict:
  """The ``optax`` section: AdamW, linear warmup then cosine decay to 0.1 lr, global-norm clipping at 1.

  ``lr_multipliers`` is ``[(regex on '/'-joined param path, multiplier)]`` (first match wins; memory layers tune
  their gates there) and ``wd_exclude`` lists regexes exempt from weight decay on top of norms, biases and gains.
  ``lr_drop_below_loss > 0`` multiplies the lr by ``lr_drop_factor`` from the first step whose training loss is
  below it (``memarch.training.optim.drop_lr_once_loss_below``; for tasks that solve abruptly after a plateau).
  """
  return mlc.ConfigDict(dict(name="adamw", lr=lr, b1=0.9, b2=b2, eps=1e-8, wd=wd, warmup_steps=warmup_steps,
                             min_lr_ratio=0.1, clip=1.0, lr_multipliers=[], wd_exclude=[],
                             lr_drop_below_loss=0.0, lr_drop_factor=0.1))
