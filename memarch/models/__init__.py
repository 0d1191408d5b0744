"""Models chosen by name: ``get_model("lm", **config.model)`` imports ``memarch.models.lm`` and builds ``Model``."""

from __future__ import annotations

import importlib
from typing import Any

KNOWN_MODELS = ("lm",)


def get_model(name: str, **kwargs: Any):
  """Builds ``memarch.models.<name>.Model(**kwargs)``.

  Args:
    name: model module name (``config.model_name``).
    **kwargs: the model's fields (``config.model``).

  Returns:
    The (unbound) linen model.

  Raises:
    ValueError: naming ``model_name`` for an unknown model, or ``model.<field>`` for an unknown field.
  """
  if name not in KNOWN_MODELS:
    raise ValueError(f"model_name: unknown model {name!r}; known: {list(KNOWN_MODELS)}")
  module = importlib.import_module(f"memarch.models.{name}")
  fields = set(module.Model.__dataclass_fields__) - {"parent", "name"}
  unknown = sorted(set(kwargs) - fields)
  if unknown:
    raise ValueError(f"model: unknown field(s) {unknown} for model {name!r}; fields: {sorted(fields)}")
  # Sequences become tuples and dicts sorted item tuples, so the model is hashable (a static jit argument).
  hashable = lambda v: (tuple(v) if isinstance(v, (list, tuple)) else
                        tuple((k, hashable(x)) for k, x in sorted(v.items())) if isinstance(v, dict) else v)
  model = module.Model(**{k: hashable(v) for k, v in dict(kwargs).items()})
  _ = model.config  # resolve the preset now, so bad values raise before anything compiles
  return model
