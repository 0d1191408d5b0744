"""The jitted train and eval steps, the loss and the metrics.

Batches with a ``route`` (int32 [B, depth] per-level tree paths, e.g. the facts task) pass it to the model's
memory; at training time each row's route is replaced by the generic memory's (-1) with probability ``p_generic``
(co-training, spec hmem.md §1.5) using the state's key folded with the step. Evaluation never mixes.

Loss: cross-entropy averaged over labelled tokens (targets != -100), plus, for a model with ``recon_weight > 0``
(feature inputs; spec hcam.md §7), ``recon_weight`` times the mean squared error of its frame reconstructions over
the real (segment id > 0) positions, logged as ``recon_loss`` (train and eval); the train metric ``loss`` stays the
cross-entropy and ``total_loss`` is the objective. Accuracy is measured at labelled positions
only, two ways: ``accuracy`` is zoology's (the mean over labelled positions within each example, then the mean over
examples that have labels) and ``token_accuracy`` pools all labelled tokens of the batch.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from memarch.ops import memory_bank
from memarch.training import optim

IGNORE = -100


def batch_stats(logits: jax.Array, targets: jax.Array) -> dict[str, jax.Array]:
  """Sums from which loss and accuracies follow; sums add up across batches (used by eval).

  Args:
    logits: float32[B, T, V].
    targets: int32[B, T], IGNORE where unlabelled.

  Returns:
    Dict of float32 scalars: ``nll`` (summed over labelled tokens), ``tokens`` (labelled), ``correct`` (tokens),
    ``example_acc`` (sum over labelled examples of their accuracy), ``examples`` (with at least one label).
  """
  mask = targets != IGNORE
  safe = jnp.where(mask, targets, 0)
  logits = logits.astype(jnp.float32)
  nll = optax.softmax_cross_entropy_with_integer_labels(logits, safe)
  correct = (jnp.argmax(logits, -1) == safe) & mask
  per_tokens = mask.sum(-1)
  per_acc = correct.sum(-1) / jnp.maximum(per_tokens, 1)
  f32 = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
  return {"nll": f32(jnp.where(mask, nll, 0.0).sum()), "tokens": f32(mask.sum()), "correct": f32(correct.sum()),
          "example_acc": f32(jnp.where(per_tokens > 0, per_acc, 0.0).sum()), "examples": f32((per_tokens > 0).sum())}


def reconstruction_stats(reconstruction: jax.Array, frames: jax.Array, segment_ids: jax.Array) -> dict[str, jax.Array]:
  """Sums of the reconstruction loss: squared error per frame (mean over features) at real positions.

  Args:
    reconstruction: float32[B, T, F], the model's ``("aux", "reconstruction")``.
    frames: float[B, T, F], the input frames.
    segment_ids: int32[B, T]; 0 marks padding (no frame to reconstruct).

  Returns:
    ``recon_sq`` (summed per-frame mean squared error) and ``recon_frames`` (real frames), float32 scalars.
  """
  err = jnp.mean(jnp.square(reconstruction.astype(jnp.float32) - frames.astype(jnp.float32)), axis=-1)
  real = segment_ids > 0
  return {"recon_sq": jnp.where(real, err, 0.0).sum(), "recon_frames": real.sum().astype(jnp.float32)}


def summarize(stats: dict[str, Any]) -> dict[str, float]:
  """Turns summed :func:`batch_stats` into ``loss``, ``accuracy`` and ``token_accuracy`` (and ``recon_loss``).

  Args:
    stats: the sums (host floats or arrays), with :func:`reconstruction_stats` for a reconstructing model.

  Returns:
    The metrics.
  """
  out = {"loss": stats["nll"] / jnp.maximum(stats["tokens"], 1.0),
         "accuracy": stats["example_acc"] / jnp.maximum(stats["examples"], 1.0),
         "token_accuracy": stats["correct"] / jnp.maximum(stats["tokens"], 1.0)}
  if "recon_sq" in stats:
    out["recon_loss"] = stats["recon_sq"] / jnp.maximum(stats["recon_frames"], 1.0)
  return out


def recon_weight(model: nn.Module) -> float:
  """The model's reconstruction-loss weight (``config.recon_weight``; 0 for models without one)."""
  return float(getattr(getattr(model, "config", None), "recon_weight", 0.0) or 0.0)


def labelled_positions(targets: jax.Array, labels_per_row: int) -> jax.Array:
  """int32 [b, n]: the first ``n = labels_per_row`` labelled positions of each row, then unlabelled ones.

  Rows with fewer labels are filled with unlabelled positions (their targets are IGNORE, so they add nothing);
  rows with more would lose the rest: the train loop checks every batch on the host first.
  """
  n = min(labels_per_row, targets.shape[1])
  order = jnp.argsort((targets == IGNORE).astype(jnp.int32), axis=1, stable=True)
  return order[:, :n].astype(jnp.int32)


def check_labels_per_row(targets: Any, labels_per_row: int | None) -> None:
  """Host-side check of one batch's targets against ``labels_per_row`` (None: nothing to check).

  Raises:
    ValueError: naming ``labels_per_row`` when a row has more labelled targets, whose loss would be dropped.
  """
  if labels_per_row is None:
    return
  most = int(np.max(np.sum(np.asarray(targets) != IGNORE, axis=-1), initial=0))
  if most > labels_per_row:
    raise ValueError(f"labels_per_row={labels_per_row}: a training row has {most} labelled targets; set it to at "
                     "least that (MQAR: input.num_kv_pairs) or to None")


def _forward(model: nn.Module, params: Any, batch: dict[str, jax.Array], route: jax.Array | None = None,
             stats: dict[str, jax.Array] | None = None, logit_positions: jax.Array | None = None) -> jax.Array:
  """The logits; with ``stats`` (a dict) and ``recon_weight(model) > 0`` it also adds the reconstruction sums.

  With ``logit_positions`` [b, n] only the logits at those positions, [b, n, vocab].
  """
  kwargs = {"segment_ids": batch["segment_ids"]}
  accepted = inspect.signature(type(model).__call__).parameters
  if logit_positions is not None:
    if "logit_positions" not in accepted:
      raise ValueError(f"labels_per_row: {type(model).__name__} cannot compute logits at selected positions "
                       "(no `logit_positions` argument); set labels_per_row=None")
    kwargs["logit_positions"] = logit_positions
  # Models that derive positions from segment_ids take no `positions` argument.
  if "positions" in accepted:
    kwargs["positions"] = batch["positions"]
  route = batch.get("route") if route is None else route
  if route is not None and "route" in accepted:
    kwargs["route"] = route
  if "token_scores" in batch and "token_scores" in accepted:  # per-token scores (B'MOJO innovation='external')
    kwargs["token_scores"] = batch["token_scores"]
  if stats is not None and recon_weight(model) > 0:
    (logits, _), aux = model.apply({"params": params}, batch["inputs"], mutable=["aux"], **kwargs)
    stats.update(reconstruction_stats(aux["aux"]["reconstruction"][0], batch["inputs"], batch["segment_ids"]))
    return logits
  logits, _ = model.apply({"params": params}, batch["inputs"], **kwargs)
  return logits


def train_step(state: dict[str, Any], batch: dict[str, jax.Array], *, model: nn.Module,
               tx: optax.GradientTransformation, schedule: Callable,
               p_generic: float = 0.0, labels_per_row: int | None = None
               ) -> tuple[dict[str, Any], dict[str, jax.Array]]:
  """One optimizer step (jit it with the state donated).

  Args:
    state: ``{"params", "opt", "step", "rng"}``.
    batch: global arrays ``inputs``, ``targets``, ``segment_ids``, ``positions`` and optionally ``route`` and
      ``token_scores`` (float32 [B, L], for B'MOJO with ``innovation="external"``).
    model: the linen model.
    tx: the optimizer.
    schedule: step -> learning rate (for the ``lr`` metric).
    p_generic: probability per row of routing to the generic memory (``config.memory.p_generic``); the key is
      ``fold_in(state["rng"], step)``.
    labels_per_row: ``config.labels_per_row``: no row has more labelled targets than this, so the head runs only
      at the first ``labels_per_row`` labelled positions of each row (spec bmojo.md §6.5: MQAR labels ``kv`` of
      ``T`` positions). The loss and accuracies are the same as with every position; None: every position.

  Returns:
    ``(new_state, metrics)`` with metrics ``loss``, ``accuracy``, ``token_accuracy``, ``l2_grads``, ``l2_params``,
    ``l2_updates``, ``lr`` (and ``recon_loss``, ``total_loss`` when the model reconstructs its inputs).
  """
  route = batch.get("route")
  if route is not None and p_generic > 0:
    key = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"])
    route = memory_bank.mix_generic(route, key, p_generic)

  weight = recon_weight(model)

  targets, logit_positions = batch["targets"], None
  if labels_per_row is not None:
    logit_positions = labelled_positions(targets, labels_per_row)
    targets = jnp.take_along_axis(targets, logit_positions, axis=1)

  def loss_fn(params):
    recon = {}
    stats = batch_stats(_forward(model, params, batch, route, recon, logit_positions), targets)
    loss = stats["nll"] / jnp.maximum(stats["tokens"], 1.0)
    if recon:  # spec hcam.md §7: the auxiliary frame reconstruction
      loss = loss + weight * recon["recon_sq"] / jnp.maximum(recon["recon_frames"], 1.0)
    return loss, {**stats, **recon}

  (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
  updates, opt = tx.update(grads, state["opt"], state["params"], value=loss)
  params = optax.apply_updates(state["params"], updates)
  summary = summarize(stats)
  if "recon_loss" in summary:
    summary["total_loss"] = loss
  else:
    summary["loss"] = loss
  metrics = {**summary, "l2_grads": optax.tree.norm(grads),
             "l2_params": optax.tree.norm(params), "l2_updates": optax.tree.norm(updates),
             "lr": jnp.asarray(schedule(state["step"]), jnp.float32) * optim.lr_scale(opt)}
  new_state = {"params": params, "opt": opt, "step": state["step"] + 1, "rng": state["rng"]}
  return new_state, metrics


def eval_step(state: dict[str, Any], batch: dict[str, jax.Array], *, model: nn.Module) -> dict[str, jax.Array]:
  """Returns :func:`batch_stats` of one eval batch (sums, to be added across batches).

  Args:
    state: the train state (only ``params`` is read).
    batch: global arrays as for :func:`train_step`.
    model: the linen model.

  Returns:
    The summed stats (with :func:`reconstruction_stats` for a reconstructing model).
  """
  recon = {}
  stats = batch_stats(_forward(model, state["params"], batch, stats=recon), batch["targets"])
  return {**stats, **recon}
