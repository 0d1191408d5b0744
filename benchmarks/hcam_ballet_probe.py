r"""What a ballet HCAM run's query reads: accuracy by queried dance, and whether each layer's top-k finds that dance.

  python benchmarks/hcam_ballet_probe.py --config_arg=dancers=8,delay=16 --workdir=RUN_DIR
  python benchmarks/hcam_ballet_probe.py --config_arg=dancers=2,delay=16,runlocal      # at initialisation

The script builds ``configs/ballet/hcam.py:<config_arg>``, takes the parameters of the newest checkpoint of
``--workdir`` (a ``train.py`` run of the same config; none: at initialisation), draws ``--rows`` test episodes with
the generator and seed of the run's test split, and runs them once. It prints, for each queried dance (0 = the first
one performed), the test accuracy and, per HCAM layer, at the query frame: ``hit`` the share of episodes whose
top-k holds a chunk of the queried dance, ``top1`` the share where such a chunk has the largest relevance weight,
``w`` the mean relevance weight on the dance's chunks, and ``next`` the share whose top-k holds the chunk right after
the dance (from the second layer on, local attention can carry a dance into the rest frames after it). The top-k is
a read-time choice, so ``top_k`` in ``--config_arg`` may differ from the run's. A model that answers wrongly although
its memory found the dance reads badly; one whose top-k misses the dance retrieves badly.
"""

from __future__ import annotations

import pathlib
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from configs.ballet import hcam as hcam_config  # noqa: E402
from memarch import models  # noqa: E402
from memarch.data import ballet  # noqa: E402
from memarch.training import checkpoint  # noqa: E402


def define_flags() -> None:
  """The command-line flags; defined only when run as a script, so that importing this module (the tests do) never
  clashes with ``train.py``'s ``--workdir`` in the same process."""
  flags.DEFINE_string("config_arg", "dancers=8,delay=16", "the argument of configs/ballet/hcam.py")
  flags.DEFINE_string("workdir", None, "a train.py workdir of the same config (None: parameters at init)")
  flags.DEFINE_integer("rows", 500, "test episodes to run")
  flags.DEFINE_integer("batch", 100, "episodes per forward pass")


def split_episodes(config, rows: int) -> dict[str, np.ndarray]:
  """The first ``rows`` episodes of the config's test split (same generator and seed as its TFDS builder)."""
  i = config.input
  records = ballet.generate(rows, num_dancers=i.num_dancers, delay=i.delay, seed=ballet.TEST_SEED_OFFSET + i.data_seed,
                            n_motions=i.n_motions, library_seed=i.library_seed, noise_p=i.noise_p,
                            phase_offset=i.phase_offset)
  records = list(records)
  return {k: np.stack([r[k] for r in records]) for k in ("inputs", "targets", "dance_index", "phase")}


def selection_stats(weights: np.ndarray, indices: np.ndarray, start: np.ndarray, chunk: int) -> dict[str, np.ndarray]:
  """What one layer's top-k at the query frame holds of the queried dance.

  Args:
    weights: [b, k] relevance weights of the selected chunks (0 for a masked pick).
    indices: [b, k] their chunk numbers.
    start: [b] the queried dance's first frame.
    chunk: the chunk size C.

  Returns:
    ``hit`` (a chunk of the dance is selected with a weight > 0), ``top1`` (the largest weight is on one),
    ``next`` (the chunk after the dance's last one is selected) as bool [b], and ``w`` the weight on the dance's
    chunks, float [b].
  """
  first, last = start // chunk, (start + ballet.DANCE_LEN - 1) // chunk       # the dance's chunks
  on_dance = (indices >= first[:, None]) & (indices <= last[:, None]) & (weights > 0)
  best = np.take_along_axis(indices, np.argmax(weights, -1)[:, None], 1)[:, 0]
  return {"hit": on_dance.any(-1), "top1": (best >= first) & (best <= last) & (weights.max(-1) > 0),
          "w": np.where(on_dance, weights, 0.0).sum(-1),
          "next": ((indices == last[:, None] + 1) & (weights > 0)).any(-1)}


def probe(config, params, rows: int, batch: int) -> dict[str, np.ndarray]:
  """Per episode: ``correct`` [rows] bool, ``dance`` [rows] the queried dance, and per HCAM layer ``name`` the
  :func:`selection_stats` at its query frame as ``hit/name``, ``top1/name``, ``w/name`` and ``next/name``."""
  model = models.get_model(config.model_name, **config.model)
  data = split_episodes(config, rows)
  chunk = dict(dict(config.model.mixer_options)["hcam"])["chunk_size"]
  if params is None:
    params = nn.meta.unbox(model.init(jax.random.key(config.seed), jnp.asarray(data["inputs"][:1])))["params"]

  @jax.jit
  def run(inputs):
    (logits, _), inter = model.apply({"params": params}, inputs, mutable=["intermediates"])
    selection = {name: v["mixer"]["read"]["selection"][0] for name, v in inter["intermediates"].items()
                 if name.startswith("block_") and "read" in v.get("mixer", {})}
    return jnp.argmax(logits[:, -1], -1), {k: (w[:, -1], j[:, -1]) for k, (w, j) in selection.items()}

  period = ballet.DANCE_LEN + config.input.delay
  out: dict[str, list[np.ndarray]] = {"correct": [], "dance": []}
  for lo in range(0, rows, batch):
    sl = slice(lo, min(lo + batch, rows))
    pred, selection = run(jnp.asarray(data["inputs"][sl]))
    out["correct"].append(np.asarray(pred) == data["targets"][sl, -1])
    out["dance"].append(data["dance_index"][sl])
    start = data["phase"][sl] + data["dance_index"][sl] * period               # the queried dance's first frame
    for name, (w, j) in sorted(selection.items()):
      for key, value in selection_stats(np.asarray(w), np.asarray(j), start, chunk).items():
        out.setdefault(f"{key}/{name}", []).append(value)
  return {k: np.concatenate(v) for k, v in out.items()}


def main(argv) -> None:
  del argv
  f = flags.FLAGS
  config = hcam_config.get_config(f.config_arg)
  params = None if f.workdir is None else checkpoint.load_params(f.workdir)
  res = probe(config, params, f.rows, f.batch)
  layers = sorted({k.split("/", 1)[1] for k in res if k.startswith("hit/")})
  source = "init" if f.workdir is None else f.workdir
  print(f"configs/ballet/hcam.py:{f.config_arg} ({source}), {f.rows} test episodes, "
        f"accuracy {res['correct'].mean():.3f}")
  print("per HCAM layer at the query frame: hit (top-k holds the queried dance) / top1 / mean weight on it / next "
        "(top-k holds the chunk after it)")
  head = "dance     n   acc  " + "  ".join(f"{n:>19s}" for n in layers)
  print(head)
  groups = [(str(d), res["dance"] == d) for d in np.unique(res["dance"])] + [("all", np.ones_like(res["correct"]))]
  for label, m in groups:
    cells = "  ".join("/".join(f"{res[f'{q}/{n}'][m].mean():.2f}" for q in ("hit", "top1", "w", "next")).rjust(19)
                      for n in layers)
    print(f"{label:>5s} {m.sum():5d} {res['correct'][m].mean():5.3f}  {cells}")


if __name__ == "__main__":
  define_flags()
  app.run(main)
