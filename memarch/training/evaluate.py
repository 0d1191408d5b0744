"""Evaluation over every eval split of a task."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import jax
import numpy as np

from memarch.training import batches
from memarch.training import step as step_lib


def evaluate(eval_fn: Callable, state: dict[str, Any], splits: dict[str, Callable[[], Iterable]],
             batch_sharding: jax.sharding.Sharding, global_batch_size: int) -> dict[str, float]:
  """Runs ``eval_fn`` over one pass of each split and returns ``eval/<split>/<metric>`` scalars.

  Args:
    eval_fn: jitted ``(state, batch) -> summed stats`` (see ``step.eval_step``).
    state: the train state.
    splits: split name -> a function building a fresh one-epoch iterator of per-process numpy batches.
    batch_sharding: the batch sharding.
    global_batch_size: global eval batch size (a short final batch is padded with unlabelled rows).

  Returns:
    ``eval/<split>/{loss,accuracy,token_accuracy}`` and ``eval/<split>/examples`` as host floats.
  """
  out = {}
  for split, make_iter in splits.items():
    total = None
    for local in make_iter():
      stats = eval_fn(state, batches.make_global(local, batch_sharding, global_batch_size))
      total = stats if total is None else jax.tree.map(lambda a, b: a + b, total, stats)
    if total is None:
      continue
    host = {k: float(np.asarray(v)) for k, v in jax.device_get(total).items()}
    out.update({f"eval/{split}/{k}": float(v) for k, v in step_lib.summarize(host).items()})
    out[f"eval/{split}/examples"] = host["examples"]
  return out
