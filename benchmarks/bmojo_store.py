r"""What B'MOJO's eidetic store holds on MQAR: the share of store entries that are context tokens (keys / values).

  python benchmarks/bmojo_store.py --config=configs/mqar/bmojo.py:memory_size=16,k_sel=8,chunk_size=8,bound=top_m,innovation=key_novelty
  python benchmarks/bmojo_store.py --config=configs/mqar/bmojo.py:memory_size=16,k_sel=8,chunk_size=8,bound=top_m --workdir=RUN_DIR
  python benchmarks/bmojo_store.py --config=configs/mqar/bmojo.py:memory_size=192,k_sel=6 $F --workdir=RUN_DIR --steps=all

With ``random_non_queries=False`` (the MQAR configs' setting) the filler token 0 is predictable and repeated, so a
working selector (spec bmojo.md §4.11) fills the store with the ``2 kv`` context tokens. The script takes the
config as ``train.py`` does (``--config=FILE:ARGS`` and ``--config.FIELD=VALUE`` overrides, e.g. the MQAR target
point's task flags ``$F`` of the README), the parameters at initialisation or from the newest checkpoint of
``--workdir`` (a ``train.py`` run of the same config; ``--steps=all`` or ``--steps=1750,3000``: those checkpoints in
turn), runs one batch of the test split and prints, per B'MOJO layer, the share of valid store entries (after the
last token) whose position lies in the context ``[0, 2 kv)``. With ``M = 2 kv`` and ``bound=top_m`` a perfect
selector scores 1.0. It also prints the share of the context's keys and of its values that the store holds (with
``k_sel = C / 2`` a selector that keeps every value, or every key, of each context chunk scores 1.0 on one of
them), and the share of the ``kv`` pairs of which it holds the key, the value or both.
"""

from __future__ import annotations

import os
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from ml_collections import config_flags

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # configs/ and memarch/

from memarch import models  # noqa: E402
from memarch.data import pipeline  # noqa: E402
from memarch.training import checkpoint  # noqa: E402

_ROOT = pathlib.Path(__file__).resolve().parents[1]


def position_shares(positions: np.ndarray, kv: int) -> dict[str, float]:
  """The store statistics of one layer from its entries' positions ``[rows, entries]`` (-1: an empty slot) on MQAR
  rows whose context is ``kv`` pairs at ``[0, 2 kv)``, key at the even and value at the odd position: ``share``, the
  share of valid entries that are context tokens; ``keys`` / ``values``, the share of the ``kv`` keys / values held;
  ``pairs``, the share of the pairs of which the key or the value or both are held (means over rows; a position
  stored twice counts once)."""
  context = 2 * kv
  valid = positions >= 0
  held = [set(p[(p >= 0) & (p < context)].tolist()) for p in positions]
  return {"share": float(((positions < context) & valid).sum() / max(valid.sum(), 1)),
          "keys": float(np.mean([sum(q % 2 == 0 for q in h) for h in held])) / kv,
          "values": float(np.mean([sum(q % 2 == 1 for q in h) for h in held])) / kv,
          "pairs": float(np.mean([len({q // 2 for q in h}) for h in held])) / kv}


def store_context_share(config, params, rows: int) -> list[dict[str, float]]:
  """Per B'MOJO layer, :func:`position_shares` of its store after the last token of ``rows`` test rows (what the
  selector kept, less any entry evicted by then), with ``params`` (None: at initialisation)."""
  model = models.get_model(config.model_name, **config.model)
  batches = pipeline.build_iterator(config.input, split="test", seed=0, global_batch_size=rows, shuffle=False,
                                    num_epochs=1)
  batch = next(iter(batches))
  tokens = jnp.asarray(batch["inputs"])
  if params is None:
    params = model.init(jax.random.key(config.seed), tokens)["params"]
  _, states = jax.jit(model.apply)({"params": params}, tokens, segment_ids=jnp.asarray(batch["segment_ids"]))
  shares = []
  for name in sorted(states):
    memory = getattr(states[name], "memory", None)
    if memory is None or not memory.store.positions.shape[-1]:
      continue
    shares.append(position_shares(np.asarray(memory.store.positions).reshape(rows, -1), config.input.num_kv_pairs))
  return shares


def _steps(workdir: str, spec: str) -> list[int | None]:
  """The checkpoint steps ``--steps`` names: ``newest`` (None), ``all``, or a comma-separated list."""
  if spec == "newest":
    return [None]
  if spec == "all":
    return checkpoint.checkpoint_steps(workdir)
  return [int(x) for x in spec.split(",")]


def main(argv) -> None:
  del argv
  config, workdir = flags.FLAGS.config, flags.FLAGS.workdir
  config_file = os.path.relpath(config_flags.get_config_filename(flags.FLAGS["config"]), _ROOT)
  if workdir is None and flags.FLAGS.steps != "newest":
    raise app.UsageError("--steps reads the checkpoints of --workdir; without it the parameters are at init")
  for step in [None] if workdir is None else _steps(workdir, flags.FLAGS.steps):
    params = None
    if workdir is not None:
      step, params = checkpoint.params_at(workdir, step)
    shares = store_context_share(config, params, flags.FLAGS.rows)
    source = "init" if workdir is None else f"{workdir}, step {step}"
    print(f"{config_file} ({source}), per layer:")
    print("  share of store entries that are context tokens: " + " / ".join(f"{s['share']:.3f}" for s in shares))
    print("  share of the context's keys / values held:      " +
          " / ".join(f"{s['keys']:.3f}, {s['values']:.3f}" for s in shares))
    print("  share of the context's pairs held (key or value): " + " / ".join(f"{s['pairs']:.3f}" for s in shares))


if __name__ == "__main__":
  # Defined here, not on import, so that tests can import this module next to train.py (same flag names).
  config_flags.DEFINE_config_file(
      "config", str(_ROOT / "configs/mqar/bmojo.py") + ":memory_size=16,k_sel=8,chunk_size=8,bound=top_m",
      "an MQAR B'MOJO config file[:args], as train.py takes it (without runlocal: the 20,000-example data)",
      lock_config=True)
  flags.DEFINE_string("workdir", None, "a train.py workdir of the same config (None: parameters at init)")
  flags.DEFINE_integer("rows", 64, "test rows to run")
  flags.DEFINE_string("steps", "newest", "with --workdir, which checkpoints: newest, all, or steps like 1750,3000")
  app.run(main)
