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
