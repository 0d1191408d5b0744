"""Global batches from per-process slices (CONVENTIONS.md C11); multi-host correct."""

from __future__ import annotations

import jax
import numpy as np

from memarch.training import step as step_lib

KEYS = ("inputs", "targets", "segment_ids", "positions")
# Fields kept when the batch has them: per-row int32 ``route`` (facts: [b, depth] tree path) and float32
# ``token_scores`` [b, L] (read by B'MOJO with innovation='external'; no built-in task makes them).
OPTIONAL_KEYS = ("route", "token_scores")
_FLOAT_KEYS = ("token_scores",)


def pad_local(local: dict[str, np.ndarray], rows: int) -> dict[str, np.ndarray]:
  """Pads a short (final eval) per-process batch to ``rows`` rows of unlabelled examples.

  Padded rows have no labels, so they count towards no metric.

  Args:
    local: numpy arrays with a leading batch axis of at most ``rows``.
    rows: the per-process batch size.

  Returns:
    The padded arrays.
  """
  n = next(iter(local.values())).shape[0]
  if n == rows:
    return local
  if n > rows:
    raise ValueError(f"per-process batch has {n} rows, expected at most {rows}")
  fill = {"targets": step_lib.IGNORE, "segment_ids": 0}
  return {k: np.concatenate([v, np.full((rows - n,) + v.shape[1:], fill.get(k, 0), v.dtype)]) for k, v in local.items()}


def make_global(local: dict[str, np.ndarray], sharding: jax.sharding.Sharding,
                global_batch_size: int) -> dict[str, jax.Array]:
  """Assembles this process's slice into global arrays sharded over the batch axis.

  Args:
    local: ``{"inputs", "targets", "segment_ids", "positions"}`` int32[b, L] with b = global // process_count;
      float ``inputs`` (features [b, L, F]) stay float32.
    sharding: the batch sharding (batch axis over the data-parallel mesh axes).
    global_batch_size: the global batch size.

  Returns:
    Global ``jax.Array``s of shape [global_batch_size, L] (inputs [global_batch_size, L, F] for features).
  """
  cast = lambda k, v: np.asarray(v, np.float32 if (k == "inputs" and np.issubdtype(v.dtype, np.floating))  # noqa: E731
                                 or k in _FLOAT_KEYS else np.int32)
  keys = KEYS + tuple(k for k in OPTIONAL_KEYS if k in local)
  local = pad_local({k: cast(k, np.asarray(local[k])) for k in keys}, global_batch_size // jax.process_count())
  return {k: jax.make_array_from_process_local_data(sharding, v, (global_batch_size,) + v.shape[1:])
          for k, v in local.items()}
