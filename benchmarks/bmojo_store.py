r"""What B'MOJO's eidetic store holds on MQAR: the share of store entries that are context tokens (keys / values).

  python benchmarks/bmojo_store.py --config_arg=memory_size=16,k_sel=8,chunk_size=8,bound=top_m,innovation=key_novelty
  python benchmarks/bmojo_store.py --config_arg=memory_size=16,k_sel=8,chunk_size=8,bound=top_m --workdir=RUN_DIR

With ``random_non_queries=False`` (the MQAR configs' setting) the filler token 0 is predictable and repeated, so a
working selector (spec bmojo.md §4.11) fills the store with the ``2 kv`` context tokens. The script builds
``configs/mqar/bmojo.py:<config_arg>``, takes its parameters at initialisation or from the newest checkpoint of
``--workdir`` (a ``train.py`` run of the same config), runs one batch of the test split and prints, per B'MOJO
layer, the share of valid store entries (after the last token) whose position lies in the context
``[0, 2 kv)``. With ``M = 2 kv`` and ``bound=top_m`` a perfect selector scores 1.0. It also prints the share of
the context's keys and of its values that the store holds: with ``k_sel = C / 2`` a selector that keeps every
value (or every key) of each context chunk scores 1.0 on one of them.
"""

from __future__ import annotations

import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from configs.mqar import bmojo as bmojo_config  # noqa: E402
from memarch import models  # noqa: E402
from memarch.data import pipeline  # noqa: E402
from memarch.training import checkpoint  # noqa: E402

_ARG = flags.DEFINE_string("config_arg", "memory_size=16,k_sel=8,chunk_size=8,bound=top_m",
                           "the argument of configs/mqar/bmojo.py (without runlocal: the 20,000-example data)")
_WORKDIR = flags.DEFINE_string("workdir", None, "a train.py workdir of the same config (None: parameters at init)")
_ROWS = flags.DEFINE_integer("rows", 64, "test rows to run")


def store_context_share(config, params, rows: int) -> list[dict[str, float]]:
  """Per B'MOJO layer, over ``rows`` test rows: ``share``, the share of valid store entries that are context tokens,
  and ``keys`` / ``values``, the share of the context's ``kv`` keys (even positions) / values (odd positions) that
  the store holds after the last token (what the selector kept, less any entry evicted by then)."""
  model = models.get_model(config.model_name, **config.model)
  batches = pipeline.build_iterator(config.input, split="test", seed=0, global_batch_size=rows, shuffle=False,
                                    num_epochs=1)
  batch = next(iter(batches))
  tokens = jnp.asarray(batch["inputs"])
  if params is None:
    params = model.init(jax.random.key(config.seed), tokens)["params"]
  _, states = jax.jit(model.apply)({"params": params}, tokens, segment_ids=jnp.asarray(batch["segment_ids"]))
  context = 2 * config.input.num_kv_pairs
  shares = []
  for name in sorted(states):
    memory = getattr(states[name], "memory", None)
    if memory is None or not memory.store.positions.shape[-1]:
      continue
    pos = np.asarray(memory.store.positions).reshape(rows, -1)
    valid = pos >= 0
    held = [set(p[(p >= 0) & (p < context)].tolist()) for p in pos]  # a position stored twice counts once
    kv = config.input.num_kv_pairs
    shares.append({"share": float(((pos < context) & valid).sum() / max(valid.sum(), 1)),
                   "keys": float(np.mean([sum(q % 2 == 0 for q in h) for h in held])) / kv,
                   "values": float(np.mean([sum(q % 2 == 1 for q in h) for h in held])) / kv})
  return shares


def main(argv) -> None:
  del argv
  config = bmojo_config.get_config(_ARG.value)
  params = None if _WORKDIR.value is None else checkpoint.load_params(_WORKDIR.value)
  shares = store_context_share(config, params, _ROWS.value)
  source = "init" if _WORKDIR.value is None else _WORKDIR.value
  print(f"configs/mqar/bmojo.py:{_ARG.value} ({source}), per layer:")
  print("  share of store entries that are context tokens: " + " / ".join(f"{s['share']:.3f}" for s in shares))
  print("  share of the context's keys / values held:      " +
        " / ".join(f"{s['keys']:.3f}, {s['values']:.3f}" for s in shares))


if __name__ == "__main__":
  app.run(main)
