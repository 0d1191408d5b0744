"""Orbax checkpoints of the train state and the data iterator (CONVENTIONS.md C12).

A checkpoint holds two items: ``state`` (params, optimizer, step, rng; restored into sharded abstract targets) and
``data`` (the grain iterator's position, one JSON file per process, via grain's own orbax handler).
"""

from __future__ import annotations

import os
import shutil
from typing import Any

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.experimental import multihost_utils


def checkpoint_dir(workdir: str) -> epath.Path:
  """``<workdir>/checkpoints`` as an absolute path (orbax refuses relative ones; ``gs://...`` is kept as is).

  Args:
    workdir: the run directory, relative to the current directory or absolute, local or a cloud URL.

  Returns:
    The checkpoints directory.
  """
  root = workdir if "://" in workdir else os.path.abspath(workdir)
  return epath.Path(root) / "checkpoints"


def make_manager(workdir: str, keep: int) -> ocp.CheckpointManager:
  """Returns an async CheckpointManager over ``<workdir>/checkpoints`` keeping the newest ``keep`` checkpoints.

  Args:
    workdir: the run directory.
    keep: how many checkpoints to keep.

  Returns:
    The manager.
  """
  options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                         enable_async_checkpointing=True)
  return ocp.CheckpointManager(
      checkpoint_dir(workdir), options=options, item_names=("state", "data"),
      item_handlers={"state": ocp.StandardCheckpointHandler(), "data": grain.checkpoint.CheckpointHandler()})


def save(manager: ocp.CheckpointManager, step: int, state: dict[str, Any], iterator: Any) -> bool:
  """Starts an async save of ``state`` and the iterator position at ``step`` (the caller picks the steps).

  Arrays are copied to host before this returns, so the state may be donated right after.

  Args:
    manager: from :func:`make_manager`.
    step: the number of steps taken.
    state: the train state.
    iterator: the train grain iterator, positioned after the last batch consumed.

  Returns:
    Whether a save was started.
  """
  args = ocp.args.Composite(state=ocp.args.StandardSave(state), data=grain.checkpoint.CheckpointSave(iterator))
  return manager.save(step, args=args, force=True)


def _set_aside(manager: ocp.CheckpointManager, step: int) -> None:
  """Moves an unreadable checkpoint out of the way so that the run can save that step again."""
  src = epath.Path(manager.directory) / str(step)
  dst = epath.Path(manager.directory).parent / "checkpoints_unreadable" / str(step)
  if jax.process_index() == 0 and src.exists():
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.exists():
      shutil.rmtree(os.fspath(dst))
    shutil.move(os.fspath(src), os.fspath(dst))
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(f"checkpoint_set_aside_{step}")
  manager.reload()


def restore_latest(manager: ocp.CheckpointManager, abstract_state: Any, iterator: Any) -> dict[str, Any] | None:
  """Restores the newest readable checkpoint; an unreadable one is set aside with a warning and the next is tried.

  Args:
    manager: from :func:`make_manager`.
    abstract_state: ShapeDtypeStructs with shardings, shaped like the state.
    iterator: the train grain iterator; its position is restored in place.

  Returns:
    The restored (sharded) state, or None when no checkpoint could be read.
  """
  for step in sorted(manager.all_steps(), reverse=True):
    try:
      restored = manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_state), data=grain.checkpoint.CheckpointRestore(iterator)))
    except Exception as e:  # pylint: disable=broad-except  # orbax raises many types for damaged files
      logging.warning("Checkpoint at step %d in %s is unreadable (%s: %s); falling back to the previous one.",
                      step, manager.directory, type(e).__name__, e)
      _set_aside(manager, step)
      continue
    logging.info("Restored checkpoint at step %d from %s.", step, manager.directory)
    return restored["state"]
  return None


def load_params(workdir: str) -> Any:
  """The params of the newest checkpoint under ``workdir`` (another run's), as host arrays, for a warm start.

  Args:
    workdir: a run's workdir (its ``checkpoints/`` holds the steps).

  Returns:
    The nested params dict of that checkpoint's ``state``.

  Raises:
    ValueError: no checkpoint under ``workdir``.
  """
  return latest_params(workdir)[1]


def _params_manager(workdir: str) -> ocp.CheckpointManager:
  return ocp.CheckpointManager(checkpoint_dir(workdir), item_names=("state", "data"),
                               item_handlers={"state": ocp.PyTreeCheckpointHandler(),
                                              "data": grain.checkpoint.CheckpointHandler()})


def checkpoint_steps(workdir: str) -> list[int]:
  """The steps of the checkpoints under ``workdir``, ascending (empty when there are none)."""
  manager = _params_manager(workdir)
  steps = sorted(manager.all_steps())
  manager.close()
  return steps


def latest_params(workdir: str) -> tuple[int, Any]:
  """The step and params of the newest checkpoint under ``workdir``: :func:`params_at` with ``step=None``."""
  return params_at(workdir)


def params_at(workdir: str, step: int | None = None) -> tuple[int, Any]:
  """The step and params of the checkpoint of ``step`` (None: the newest) under ``workdir``, read to host memory as
  numpy arrays.

  Only the ``params`` subtree is read (a partial restore): the optimizer state, often twice the params, is never
  loaded, and nothing is placed on a device, so a model trained on a pod can seed or be scored by a smaller one.

  Args:
    workdir: a run's workdir (its ``checkpoints/`` holds the steps).
    step: the checkpoint to read (None: the newest).

  Returns:
    ``(step, params)``: the checkpoint's step and the nested params dict of its ``state``.

  Raises:
    ValueError: no checkpoint under ``workdir``, or none of ``step`` (naming the steps there are).
  """
  manager = _params_manager(workdir)
  steps = sorted(manager.all_steps())
  if not steps or (step is not None and step not in steps):
    manager.close()
    if not steps:
      raise ValueError(f"no checkpoint under {workdir}/checkpoints")
    raise ValueError(f"no checkpoint of step {step} under {workdir}/checkpoints (steps: {steps})")
  step = steps[-1] if step is None else step
  meta = manager.item_metadata(step)["state"]["params"]
  target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), meta)
  restore_args = jax.tree.map(lambda m: ocp.RestoreArgs(restore_type=np.ndarray), meta)
  restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
      item={"params": target}, restore_args={"params": restore_args}, partial_restore=True)))
  manager.close()
  logging.info("Params of step %d from %s.", step, workdir)
  return step, restored["state"]["params"]
