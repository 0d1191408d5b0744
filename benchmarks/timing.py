"""Timing shared by the benchmark scripts (each script runs as ``python benchmarks/<name>.py``)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import jax


def time_all(calls: dict[str, tuple[Callable, tuple]], *, repeats: int, budget_s: float) -> dict[str, tuple]:
  """Times jitted calls, interleaved so that load changes on a shared machine hit every variant alike.

  Each call is compiled (its first call) and warmed up (a second call); then ``repeats`` rounds call every variant
  once, in order, each ended by ``jax.block_until_ready``. Fewer rounds (at least 3) are run when ``repeats``
  rounds would take longer than ``budget_s`` by the warm-up times.

  Args:
    calls: name -> (jitted function, arguments).
    repeats: timed rounds.
    budget_s: seconds the timed rounds should take at most (soft).

  Returns:
    name -> (median s, min s, compile + first call s).
  """
  first, warm = {}, {}
  for name, (fn, args) in calls.items():
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    first[name] = time.perf_counter() - t0
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    warm[name] = time.perf_counter() - t0
  rounds = max(3, min(repeats, int(budget_s / max(sum(warm.values()), 1e-9))))
  ts = {name: [] for name in calls}
  for _ in range(rounds):
    for name, (fn, args) in calls.items():
      t0 = time.perf_counter()
      jax.block_until_ready(fn(*args))
      ts[name].append(time.perf_counter() - t0)
  return {n: (statistics.median(ts[n]), min(ts[n]), first[n]) for n in calls}
