r"""Trains a memarch model: config -> validate -> mesh -> data -> model -> sharded state -> restore -> loop -> exit.

  python train.py --config configs/mqar/transformer.py --workdir workdir/mqar
  python train.py --config configs/mqar/transformer.py:runlocal --workdir workdir/mqar_local
  python train.py --config configs/mqar/transformer.py:runlocal --workdir workdir/mqar_local --mode=eval  # no training

Multi-process (one command per host; on a cluster jax finds the coordinator itself):
  python train.py --config ... --workdir ... --multiprocess \
      [--coordinator_address=host:port --num_processes=N --process_id=i]

Interrupt with SIGTERM or Ctrl-C: the run saves a checkpoint and exits; rerunning the same command resumes it.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import time
from typing import Any

import flax.linen as nn
import jax
import tqdm
from absl import app, flags, logging
from jax.experimental import multihost_utils
from ml_collections import config_flags

from memarch import data, models, sharding
from memarch.training import batches, checkpoint, evaluate, metrics, optim, validate
from memarch.training import state as state_lib
from memarch.training import step as step_lib

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file[:args].", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints and metrics.")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "eval"],
                          "train: train (or resume) in --workdir. eval: score the newest checkpoint of --workdir on "
                          "every eval split of the config's task, which may differ from the training task (e.g. "
                          "longer sequences); appends to eval.jsonl there and changes nothing else.")
_MULTIPROCESS = flags.DEFINE_bool("multiprocess", False, "Call jax.distributed.initialize() first.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (with --multiprocess).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes (with --multiprocess).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index (with --multiprocess).")


def initialize_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None) -> None:
  """Starts jax's multi-process runtime; CPU collectives go over gloo.

  Args:
    coordinator_address: ``host:port`` of process 0; None lets jax detect the cluster.
    num_processes: the number of processes; None to detect.
    process_id: this process's index; None to detect.
  """
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                             process_id=process_id)


class StopRequest:
  """Turns SIGTERM and the first Ctrl-C into a request to checkpoint and stop (a second Ctrl-C kills).

  Attributes:
    requested: whether a stop was requested on this process.
  """

  def __init__(self):
    self.requested = False
    self._previous = {}

  def __enter__(self) -> StopRequest:
    for sig in (signal.SIGTERM, signal.SIGINT):
      try:
        self._previous[sig] = signal.signal(sig, self._handle)
      except ValueError:  # not the main thread: leave signals alone
        pass
    return self

  def __exit__(self, *exc: Any) -> None:
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)

  def _handle(self, signum: int, frame: Any) -> None:
    del frame
    if self.requested and signum == signal.SIGINT:
      raise KeyboardInterrupt
    logging.warning("Signal %d received: saving a checkpoint and stopping.", signum)
    self.requested = True

  def agreed(self) -> bool:
    """Whether any process asked to stop (a collective when several processes run)."""
    if jax.process_count() == 1:
      return self.requested
    return bool(multihost_utils.process_allgather(self.requested).any())


def generic_probability(config: Any, model: Any) -> float:
  """``config.memory.p_generic``: per-row probability of the generic memory in training (spec hmem.md §1.5).

  Defaults to 1/17 for a model with a routed memory (``model.mlp="hmem"``) and 0 otherwise.
  """
  default = 1.0 / 17.0 if getattr(model, "route_depth", 0) else 0.0
  memory = config.get("memory") or {}
  p = memory.get("p_generic", default)
  p = default if p is None else float(p)
  if not 0.0 <= p <= 1.0:
    raise ValueError(f"memory.p_generic={p} must be in [0, 1]")
  return p


@jax.jit
def _add(acc: dict[str, jax.Array], new: dict[str, jax.Array]) -> dict[str, jax.Array]:
  return jax.tree.map(lambda a, b: a + b, acc, new)


def _task(config: Any) -> tuple[Any, int, int, dict[str, Any]]:
  """The task's info, its sequence length, the global batch size and the per-process iterator arguments."""
  info = data.get_task_info(config.input)
  iterator_args = dict(global_batch_size=config.input.batch_size, process_index=jax.process_index(),
                       process_count=jax.process_count(), data_dir=config.input.get("data_dir"))
  return info, config.input.get("seq_len", info.seq_len), config.input.batch_size, iterator_args


def _eval_splits(config: Any, info: Any, iterator_args: dict[str, Any]) -> dict[str, Any]:
  """Split name -> a function building a fresh one-epoch, unshuffled iterator of that split."""
  return {s: functools.partial(data.build_iterator, config.input, split=s, seed=config.seed, shuffle=False,
                               num_epochs=1, drop_remainder=False, **iterator_args) for s in info.eval_splits}


def _batch_shape(info: Any, seq_len: int, batch_size: int) -> tuple[int, ...]:
  """Token ids (b, L) or float feature vectors (b, L, F); validate() checked model.input_features against the task."""
  return (batch_size, seq_len) + ((info.input_features,) if info.input_features else ())


def train_and_evaluate(config: Any, workdir: str, *, interrupt_at_step: int | None = None) -> list[dict[str, float]]:
  """Runs (or resumes) the training job of ``config`` in ``workdir``.

  Args:
    config: the experiment ConfigDict (see ``configs/``).
    workdir: where checkpoints, ``metrics.jsonl`` and TensorBoard files go.
    interrupt_at_step: behave as if SIGTERM arrived after this step (for tests).

  Returns:
    The logged train metrics of this invocation, one dict per logging step (with ``step``), on every process.
  """
  validate.validate(config)
  mesh = sharding.make_mesh(config.mesh)
  rules = sharding.rules_for_mesh(config.logical_axis_rules, mesh)
  is_main = jax.process_index() == 0

  info, seq_len, batch_size, iterator_args = _task(config)
  train_iter = data.build_iterator(config.input, split="train", seed=config.seed, shuffle=True, num_epochs=None,
                                   **iterator_args)
  eval_splits = _eval_splits(config, info, iterator_args)

  model = models.get_model(config.model_name, **config.model)
  tx, schedule = optim.make_optimizer(config.optax, config.total_steps)
  p_generic = generic_probability(config, model)
  labels_per_row = config.get("labels_per_row")  # head only at labelled positions (MQAR); None: everywhere

  # Both outside the mesh context: the peak runs on one device, and the FLOP count traces the model unsharded.
  peak = metrics.total_peak(metrics.measure_matmul_peak(dtype=config.model.get("dtype") or "float32"))
  flops_per_step = model.flops_per_token(seq_len) * batch_size * seq_len
  if labels_per_row is not None:  # the head runs at labels_per_row of the seq_len positions
    head = 6.0 * model.config.d_model * model.config.vocab_size * batch_size
    flops_per_step -= head * max(seq_len - labels_per_row, 0)

  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    batch_sharding = nn.logical_to_mesh_sharding(jax.sharding.PartitionSpec("act_batch", None), mesh, rules)
    batch_shape = _batch_shape(info, seq_len, batch_size)
    abstract, shardings = state_lib.state_shardings(model, tx, mesh, rules, batch_shape)
    manager = checkpoint.make_manager(workdir, config.keep_ckpts)
    state = checkpoint.restore_latest(manager, abstract, train_iter)
    if state is None:
      state = state_lib.create_state(model, tx, shardings, config.seed, batch_shape)
      if config.get("init_from"):  # warm start (e.g. hmem A2: a trained anchor, then co-training)
        state, copied = state_lib.warm_start(state, checkpoint.load_params(config.init_from), shardings)
        logging.info("Warm start: %d of %d parameter arrays from %s.", len(copied),
                     len(jax.tree.leaves(state["params"])), config.init_from)
    if is_main:
      metrics.log_param_overview(state["params"])

    replicated = state_lib.replicated(mesh)
    traces = []

    def train_step(state, batch):
      # The body runs only while tracing: a second trace means a recompile (e.g. a changed shape or dtype).
      traces.append(1)
      if len(traces) > 1:
        raise RuntimeError("train step traced again: the state or batch changed shape/dtype/sharding between steps")
      return step_lib.train_step(state, batch, model=model, tx=tx, schedule=schedule, p_generic=p_generic,
                                 labels_per_row=labels_per_row)

    step_fn = jax.jit(train_step,
                      in_shardings=(shardings, batch_sharding), out_shardings=(shardings, replicated),
                      donate_argnums=(0,))
    eval_fn = jax.jit(functools.partial(step_lib.eval_step, model=model),
                      in_shardings=(shardings, batch_sharding), out_shardings=replicated)

    writer = metrics.MetricWriter(workdir)
    start = int(jax.device_get(state["step"]))
    history = []
    pbar = tqdm.tqdm(total=config.total_steps, initial=start, disable=not is_main, dynamic_ncols=True)
    acc, acc_steps, window_first, timer, timed_steps = None, 0, start + 1, None, 0

    with StopRequest() as stop:
      for step in range(start + 1, config.total_steps + 1):  # `step` counts the updates done after this one
        host_batch = next(train_iter)
        step_lib.check_labels_per_row(host_batch["targets"], labels_per_row)
        batch = batches.make_global(host_batch, batch_sharding, batch_size)
        with jax.transfer_guard("disallow"):
          state, step_metrics = step_fn(state, batch)
          acc = step_metrics if acc is None else _add(acc, step_metrics)
        acc_steps += 1
        if timer is None:  # the first step compiles; time from its end
          jax.block_until_ready(step_metrics)
          timer = time.perf_counter()
        else:
          timed_steps += 1
        pbar.update(1)

        # Checkpoint steps log too, so that a non-finite state is caught before it is saved.
        if step % config.log_every == 0 or step % config.ckpt_every == 0 or step == config.total_steps:
          scalars = {k: float(v) / acc_steps for k, v in jax.device_get(acc).items()}
          metrics.check_finite(scalars, window_first, step)
          elapsed = time.perf_counter() - timer
          if timed_steps:
            scalars["steps_per_s"] = timed_steps / elapsed
            scalars["tokens_per_s"] = timed_steps * batch_size * seq_len / elapsed
            scalars["mfu"] = timed_steps * flops_per_step / elapsed / peak
          writer.write(step, {f"train/{k}": v for k, v in scalars.items()})
          history.append({"step": step, **scalars})
          pbar.set_postfix(loss=f"{scalars['loss']:.4f}", acc=f"{scalars['accuracy']:.3f}")
          acc, acc_steps, window_first, timer, timed_steps = None, 0, step + 1, time.perf_counter(), 0

        if step % config.eval_every == 0 or step == config.total_steps:
          results = evaluate.evaluate(eval_fn, state, eval_splits, batch_sharding, batch_size)
          writer.write(step, results)
          if is_main:
            pbar.write(f"step {step}: " + ", ".join(f"{k}={v:.4f}" for k, v in sorted(results.items())))
          if timer is not None:  # eval time is not training throughput
            timer, timed_steps = time.perf_counter(), 0

        # With several processes the stop flag is agreed on (a collective) only on logging steps.
        check_stop = jax.process_count() == 1 or step % config.log_every == 0
        stopping = step == interrupt_at_step or (check_stop and stop.agreed())
        if stopping or step % config.ckpt_every == 0 or step == config.total_steps:
          checkpoint.save(manager, step, state, train_iter)
        if stopping:
          logging.warning("Stopped after step %d; rerun the same command to resume.", step)
          break
    pbar.close()
    manager.wait_until_finished()
    manager.close()
    writer.close()
  return history


def evaluate_checkpoint(config: Any, workdir: str) -> dict[str, float]:
  """Scores the newest checkpoint of ``workdir`` on every eval split of ``config``'s task (``--mode=eval``).

  The config may differ from the one that trained the checkpoint in anything that leaves the parameters' shapes
  alone: the task's lengths (S-NIAH at 16L), test sizes, batch size, mesh. Nothing in ``workdir`` changes but
  ``eval.jsonl``, which gets one line: the step, the config's ``input`` section and the results.

  Args:
    config: the experiment ConfigDict (its ``optax`` section is only used to lay out the state).
    workdir: a run's workdir.

  Returns:
    ``eval/<split>/<metric>`` scalars, as ``train_and_evaluate`` logs them, plus ``step``.

  Raises:
    ValueError: no checkpoint in ``workdir``, or a model parameter that the checkpoint lacks or holds in another
      shape (naming it).
  """
  validate.validate(config)
  mesh = sharding.make_mesh(config.mesh)
  rules = sharding.rules_for_mesh(config.logical_axis_rules, mesh)
  info, seq_len, batch_size, iterator_args = _task(config)
  model = models.get_model(config.model_name, **config.model)
  tx, _ = optim.make_optimizer(config.optax, config.total_steps)
  step, source = checkpoint.latest_params(workdir)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    batch_sharding = nn.logical_to_mesh_sharding(jax.sharding.PartitionSpec("act_batch", None), mesh, rules)
    abstract, shardings = state_lib.state_shardings(model, tx, mesh, rules, _batch_shape(info, seq_len, batch_size))
    params = state_lib.exact_params(abstract["params"], source, shardings["params"])
    eval_fn = jax.jit(functools.partial(step_lib.eval_step, model=model),
                      in_shardings=({"params": shardings["params"]}, batch_sharding),
                      out_shardings=state_lib.replicated(mesh))
    results = evaluate.evaluate(eval_fn, {"params": params}, _eval_splits(config, info, iterator_args),
                                batch_sharding, batch_size)
  if jax.process_index() == 0:
    logging.info("Checkpoint of step %d in %s: %s", step, workdir,
                 ", ".join(f"{k}={v:.4f}" for k, v in sorted(results.items())))
    with open(os.path.join(workdir, "eval.jsonl"), "a", encoding="utf-8") as f:
      f.write(json.dumps({"step": step, "input": config.input.to_dict(), **results}, default=str) + "\n")
  return {"step": step, **results}


def main(argv: list[str]) -> None:
  """Entry point: ``python train.py --config ... --workdir ...``."""
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if _MULTIPROCESS.value:
    initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  logging.info("Process %d of %d, %d local / %d global devices.", jax.process_index(), jax.process_count(),
               jax.local_device_count(), jax.device_count())
  if _MODE.value == "eval":
    evaluate_checkpoint(_CONFIG.value, _WORKDIR.value)
  else:
    train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("train_end")


if __name__ == "__main__":
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main)
