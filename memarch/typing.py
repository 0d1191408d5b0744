"""Shape-typed array aliases and the axis legend used in every signature (CONVENTIONS.md C5).

Axis legend:
  b  batch                  t  query length (tokens in this call)
  s  key length (cache / memory slots)          d  model width
  h  heads                  k  kv heads (GQA)   e  per-head feature width
  v  vocabulary             n  state width      c  chunk length

``typed`` checks annotated shapes at trace time (jaxtyping + beartype), so it is free under ``jit``.
"""

from __future__ import annotations

import beartype
from jaxtyping import Array, Bool, Float, Int, jaxtyped

Activations = Float[Array, "b t d"]
Tokens = Int[Array, "b t"]
SegmentIds = Int[Array, "b t"]
Positions = Int[Array, "b t"]
Logits = Float[Array, "b t v"]
Queries = Float[Array, "b t h e"]
Keys = Float[Array, "b s k e"]
Values = Float[Array, "b s k e"]
Mask = Bool[Array, "b t s"]

typed = jaxtyped(typechecker=beartype.beartype)

__all__ = [
    "Activations", "Array", "Bool", "Float", "Int", "Keys", "Logits", "Mask", "Positions", "Queries",
    "SegmentIds", "Tokens", "Values", "typed",
]
