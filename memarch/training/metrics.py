"""Metric output (stdout, TensorBoard, ``metrics.jsonl``; process 0 only) and model-FLOPs utilisation."""

from __future__ import annotations

import json
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging


def measure_matmul_peak(n: int | None = None, dtype: str = "float32", iters: int = 5,
                        reps: int | None = None) -> float:
  """Measures the FLOP/s of chained ``n x n`` ``jnp.dot`` s on the first local device (well under a second on a CPU).

  On CPU all simulated devices of a process share the host's cores, so this one number is the whole host's peak.
  On accelerators one small product is dominated by dispatch, so the default there is ``n = 8192`` with ``reps``
  products chained inside one jitted call.

  Args:
    n: matrix size (None: 2048 on CPU, 8192 on accelerators).
    dtype: operand dtype ("float32" or "bfloat16").
    iters: timed repetitions; the best is kept.
    reps: products chained per call (None: 1 on CPU, 10 on accelerators).

  Returns:
    FLOP/s of the fastest repetition.
  """
  device = jax.local_devices()[0]
  accelerator = device.platform != "cpu"
  n = n or (8192 if accelerator else 2048)
  reps = reps or (10 if accelerator else 1)
  # Entries of size 1/sqrt(n) keep chained products at unit scale (no overflow in bf16).
  a = jax.device_put((jax.random.normal(jax.random.key(0), (n, n), jnp.float32) * n ** -0.5).astype(dtype), device)

  @jax.jit
  def chain(x):
    step = lambda _, y: jnp.dot(y, a, preferred_element_type=jnp.float32).astype(y.dtype)
    return jax.lax.fori_loop(0, reps, step, x)

  chain(a).block_until_ready()
  best = float("inf")
  for _ in range(iters):
    t0 = time.perf_counter()
    chain(a).block_until_ready()
    best = min(best, time.perf_counter() - t0)
  return 2.0 * n ** 3 * reps / best


def total_peak(per_device_peak: float) -> float:
  """Peak FLOP/s of all devices: per device for accelerators, once per host for (simulated) CPU devices."""
  if jax.default_backend() == "cpu":
    return per_device_peak * jax.process_count()
  return per_device_peak * jax.device_count()


class MetricWriter:
  """Writes scalars to ``<workdir>/metrics.jsonl`` and TensorBoard event files, on process 0 only.

  Attributes:
    workdir: the run directory.
    enabled: whether this process writes (process 0).
  """

  def __init__(self, workdir: str, enabled: bool | None = None):
    self.workdir = workdir
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self._jsonl = None
    self._tb = None
    if self.enabled:
      import tensorboardX  # pylint: disable=g-import-not-at-top  # only process 0 needs it
      os.makedirs(workdir, exist_ok=True)
      self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a", encoding="utf-8")
      self._tb = tensorboardX.SummaryWriter(os.path.join(workdir, "tensorboard"))

  def write(self, step: int, scalars: dict[str, Any]) -> None:
    """Writes ``scalars`` (host numbers) at ``step``.

    Args:
      step: the number of steps taken.
      scalars: name -> number; names like ``eval/test/loss`` group in TensorBoard.
    """
    if not self.enabled:
      return
    clean = {k: float(v) for k, v in scalars.items()}
    self._jsonl.write(json.dumps({"step": int(step), **clean}) + "\n")
    self._jsonl.flush()
    for k, v in clean.items():
      self._tb.add_scalar(k, v, int(step))
    self._tb.flush()

  def close(self) -> None:
    """Flushes and closes the files."""
    if self.enabled:
      self._jsonl.close()
      self._tb.close()


def check_finite(scalars: dict[str, float], first_step: int, last_step: int) -> None:
  """Raises when a logged metric is NaN or infinite.

  Args:
    scalars: the metrics of the window.
    first_step: first step of the logging window.
    last_step: last step of the logging window.

  Raises:
    FloatingPointError: naming the metrics and the step window.
  """
  bad = sorted(k for k, v in scalars.items() if not np.isfinite(v))
  if bad:
    raise FloatingPointError(
        f"Non-finite {', '.join(bad)} between steps {first_step} and {last_step} "
        f"({', '.join(f'{k}={scalars[k]}' for k in bad)}). Lower optax.lr or check the data; "
        "the last checkpoint before this window is intact.")


def log_param_overview(params: Any) -> None:
  """Logs each parameter's path, shape and sharding once, and the total count."""
  total = 0
  lines = []
  for path, p in jax.tree_util.tree_leaves_with_path(params):
    total += int(np.prod(p.shape))
    spec = getattr(getattr(p, "sharding", None), "spec", None)
    lines.append(f"  {jax.tree_util.keystr(path):60s} {str(tuple(p.shape)):20s} {spec}")
  logging.info("Parameters (%s total):\n%s", f"{total:,}", "\n".join(lines))
