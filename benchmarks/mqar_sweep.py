r"""MQAR sweep (zoology style): best test accuracy over a learning-rate sweep, against recurrent state size.

  python benchmarks/mqar_sweep.py --quick                                  # seconds: a smoke run of the grid
  python benchmarks/mqar_sweep.py --models=bmojo:memory_size=128,mamba2 --d_model=64 --seq_len=256 \
      --num_kv_pairs=64 --out=sweep/target.jsonl --plot=sweep/target.png  # the B'MOJO target point (issue 6)
  python benchmarks/mqar_sweep.py --out=sweep/full.jsonl --shard=0/4       # the full grid, split over 4 machines

Every point trains ``configs/mqar/<model>.py`` through ``train.train_and_evaluate`` with the task and width
overridden, and records the final ``test`` accuracy. A point is ``(model, d_model, seq_len, num_kv_pairs, lr)``; the
table reports, per ``(model, d_model, seq_len, num_kv_pairs)``, the best accuracy over the learning rates (zoology's
rule) and the state size of one sequence in floats (``Model.state_size``, the x-axis of zoology's plots). Results are
appended to ``--out`` as JSON lines, so an interrupted sweep resumes where it stopped and shards can be concatenated.
Models whose config file does not exist are skipped with a note (e.g. before B'MOJO lands).
"""

from __future__ import annotations

import collections
import importlib.util
import json
import os
import pathlib
import sys
import tempfile
import time

from absl import app, flags, logging

ROOT = pathlib.Path(__file__).resolve().parents[1]

_MODELS = flags.DEFINE_list("models", ["transformer", "mamba2", "titans_lmm", "bmojo_f", "bmojo"],
                            "Config names under configs/mqar/, each optionally with its config argument after a "
                            "colon, e.g. bmojo:memory_size=128; the list splits on commas, so separate several keys "
                            "of one model with ';': bmojo:memory_size=128;qk_norm=True.")
_D = flags.DEFINE_list("d_model", ["64", "128"], "Model widths.")
_T = flags.DEFINE_list("seq_len", ["128", "256", "512"], "Sequence lengths.")
_KV = flags.DEFINE_list("num_kv_pairs", ["16", "32", "64"], "Key-value pairs per example.")
_LRS = flags.DEFINE_list("lrs", ["3e-4", "1e-3", "3e-3", "1e-2"], "Learning rates (best one reported).")
_STEPS = flags.DEFINE_integer("steps", 2000, "Training steps per point.")
_BATCH = flags.DEFINE_integer("batch_size", 64, "Sequences per step.")
_VOCAB = flags.DEFINE_integer("vocab_size", 8192, "MQAR vocabulary (zoology: 8192).")
_TRAIN = flags.DEFINE_integer("num_train", 20_000, "Training examples per point.")
_TEST = flags.DEFINE_integer("num_test", 1_000, "Test examples per point.")
_OUT = flags.DEFINE_string("out", "mqar_sweep.jsonl", "JSON-lines results file (appended; finished points skip).")
_PLOT = flags.DEFINE_string("plot", None, "Write the accuracy-against-state-size plot here (needs matplotlib).")
_SHARD = flags.DEFINE_string("shard", "0/1", "i/n: run every n-th point starting at i (split a sweep over hosts).")
_EVALS = flags.DEFINE_integer("evals", 1, "Test evaluations per point, evenly spaced (the last one is reported; "
                              "the others are kept as its learning curve).")
_QUICK = flags.DEFINE_bool("quick", False, "Tiny smoke grid: one width, T=64, kv=4, one lr, 20 steps.")


def _config_path(name: str) -> pathlib.Path:
  """``configs/mqar/<file>.py`` of a model name ``file`` or ``file:arg``."""
  return ROOT / "configs" / "mqar" / f"{name.partition(':')[0]}.py"


def _load_config(name: str):
  """``get_config(arg)`` of ``configs/mqar/<file>.py`` for ``name = file[:arg]`` (None: no such file); ``;`` in
  ``arg`` separates keys, as ``,`` does in a config argument."""
  file, _, arg = name.partition(":")
  arg = arg.replace(";", ",")
  path = _config_path(name)
  if not path.exists():
    return None
  if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
  spec = importlib.util.spec_from_file_location(f"_sweep_cfg_{file}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg or None)


def point_config(name: str, d_model: int, seq_len: int, kv: int, lr: float, *, steps: int, batch: int,
                 vocab: int, num_train: int, num_test: int, data_dir: str | None, evals: int = 1):
  """The config of one sweep point: ``configs/mqar/<name>.py`` with the task, width and schedule overridden."""
  c = _load_config(name)
  if c is None:
    return None
  c.total_steps = steps
  c.input.seq_len = seq_len
  c.input.num_kv_pairs = kv
  c.labels_per_row = kv  # MQAR labels exactly kv positions per row: the head runs only there
  c.input.vocab_size = vocab
  c.input.num_train = num_train
  c.input.num_test = num_test
  c.input.batch_size = batch
  if data_dir is not None:
    c.input.data_dir = data_dir
  c.model.vocab_size = vocab
  c.model.d_model = d_model
  c.model.max_len = 4 * seq_len
  c.optax.lr = lr
  c.optax.warmup_steps = max(1, steps // 20)
  c.log_every = max(1, steps // 100)  # the record keeps this train curve (a late loss spike shows in it)
  c.eval_every = max(1, steps // max(1, evals))  # evals = 1: once, at the end
  c.ckpt_every = steps
  c.keep_ckpts = 1
  return c


def run_point(config) -> dict[str, float]:
  """Trains one point in a throw-away workdir; returns its final test accuracy, state size and wall time, the test
  accuracy at each evaluation (``curve``: ``[step, accuracy]``) and the train metrics averaged over each logging
  window (``train_curve``: ``[step, loss, accuracy, l2_grads, l2_params]``)."""
  import jax  # pylint: disable=g-import-not-at-top

  import train  # pylint: disable=g-import-not-at-top
  from memarch import models  # pylint: disable=g-import-not-at-top

  # State at the training length (attention's KV cache is sized by max_len, which is 4T for the test_4x split).
  model = models.get_model(config.model_name, **{**config.model.to_dict(), "max_len": config.input.seq_len})
  start = time.perf_counter()
  with tempfile.TemporaryDirectory() as workdir:
    train.train_and_evaluate(config, workdir)
    records = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8")]
  evals = [e for e in records if "eval/test/accuracy" in e]
  train_keys = ("train/loss", "train/accuracy", "train/l2_grads", "train/l2_params")
  jax.clear_caches()
  return {"accuracy": evals[-1]["eval/test/accuracy"], "state_size": int(model.state_size()),
          "seconds": time.perf_counter() - start,
          "curve": [[e["step"], e["eval/test/accuracy"]] for e in evals],
          "train_curve": [[r["step"]] + [r[k] for k in train_keys] for r in records if "train/loss" in r]}


def _key(r: dict) -> tuple:
  return (r["model"], r["d_model"], r["seq_len"], r["num_kv_pairs"], r["lr"])


def best_table(results: list[dict]) -> list[dict]:
  """Per (model, d_model, seq_len, kv): the best accuracy over learning rates and its lr."""
  groups = collections.defaultdict(list)
  for r in results:
    groups[_key(r)[:4]].append(r)
  rows = []
  for (model, d, t, kv), rs in sorted(groups.items()):
    best = max(rs, key=lambda r: r["accuracy"])
    rows.append(dict(model=model, d_model=d, seq_len=t, num_kv_pairs=kv, accuracy=best["accuracy"],
                     lr=best["lr"], state_size=best["state_size"], lrs_run=len(rs)))
  return rows


def print_table(rows: list[dict]) -> None:
  print(f"{'model':<22} {'d':>4} {'T':>5} {'kv':>4} {'state floats':>13} {'best acc':>9} {'at lr':>8} {'lrs':>4}")
  for r in rows:
    print(f"{r['model']:<22} {r['d_model']:>4} {r['seq_len']:>5} {r['num_kv_pairs']:>4} {r['state_size']:>13,} "
          f"{r['accuracy']:>9.4f} {r['lr']:>8.1e} {r['lrs_run']:>4}")


def plot(rows: list[dict], path: str) -> None:
  """Zoology-style: one panel per (T, kv), best accuracy against state size (log x), one line per model."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  panels = sorted({(r["seq_len"], r["num_kv_pairs"]) for r in rows})
  fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.5), squeeze=False)
  for ax, (t, kv) in zip(axes[0], panels):
    for model in sorted({r["model"] for r in rows}):
      pts = sorted((r["state_size"], r["accuracy"]) for r in rows
                   if r["model"] == model and (r["seq_len"], r["num_kv_pairs"]) == (t, kv))
      if pts:
        ax.plot(*zip(*pts), marker="o", label=model)
    ax.set_xscale("log")
    ax.set_ylim(0, 1.02)
    ax.set_title(f"T={t}, kv={kv}")
    ax.set_xlabel("state size (floats / sequence)")
    ax.axhline(0.99, ls="--", c="gray", lw=0.8)
  axes[0][0].set_ylabel("best MQAR accuracy")
  axes[0][-1].legend(fontsize=8)
  fig.tight_layout()
  pathlib.Path(path).parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, dpi=120)
  print(f"wrote {path}")


def main(argv: list[str]) -> None:
  del argv
  logging.set_verbosity(logging.WARNING)
  if _QUICK.value:
    grid_d, grid_t, grid_kv, lrs = [64], [64], [4], [3e-3]
    steps, batch, vocab, num_train, num_test = 20, 16, 512, 320, 64
  else:
    grid_d, grid_t, grid_kv = map(int, _D.value), map(int, _T.value), map(int, _KV.value)
    grid_d, grid_t, grid_kv = list(grid_d), list(grid_t), list(grid_kv)
    lrs = [float(x) for x in _LRS.value]
    steps, batch, vocab, num_train, num_test = (_STEPS.value, _BATCH.value, _VOCAB.value, _TRAIN.value,
                                                _TEST.value)
  shard, num_shards = (int(x) for x in _SHARD.value.split("/"))
  if not 0 <= shard < num_shards:
    raise app.UsageError(f"--shard={_SHARD.value}: expected i/n with 0 <= i < n")

  out = pathlib.Path(_OUT.value)
  out.parent.mkdir(parents=True, exist_ok=True)
  done = {}
  if out.exists():
    for line in out.read_text().splitlines():
      r = json.loads(line)
      done[_key(r)] = r

  points = [(m, d, t, kv, lr) for m in _MODELS.value for d in grid_d for t in grid_t for kv in grid_kv
            for lr in lrs]
  missing = [m for m in _MODELS.value if not _config_path(m).exists()]
  if missing:
    print(f"skipping models without a config in configs/mqar/: {', '.join(missing)}")
  for i, (m, d, t, kv, lr) in enumerate(points):
    if i % num_shards != shard or m in missing or (m, d, t, kv, lr) in done:
      continue
    if 2 * kv * 2 > t:  # zoology: the context block (2 kv tokens) and the queries must fit in L
      continue
    config = point_config(m, d, t, kv, lr, steps=steps, batch=batch, vocab=vocab, num_train=num_train,
                          num_test=num_test, data_dir=os.environ.get("MEMARCH_DATA_DIR"), evals=_EVALS.value)
    print(f"[{i + 1}/{len(points)}] {m} d={d} T={t} kv={kv} lr={lr:g}", flush=True)
    r = dict(model=m, d_model=d, seq_len=t, num_kv_pairs=kv, lr=lr, steps=steps, batch_size=batch,
             **run_point(config))
    print(f"    accuracy {r['accuracy']:.4f}, state {r['state_size']:,} floats, {r['seconds']:.0f} s", flush=True)
    done[_key(r)] = r
    with out.open("a", encoding="utf-8") as f:
      f.write(json.dumps(r) + "\n")

  rows = best_table([r for r in done.values() if r["model"] in _MODELS.value])
  print_table(rows)
  if _PLOT.value:
    plot(rows, _PLOT.value)


if __name__ == "__main__":
  app.run(main)
