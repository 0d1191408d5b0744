"""A tiny MQAR config shared by the training tests and the multi-process worker."""

from __future__ import annotations

import json
import os

import ml_collections as mlc

from configs.mqar import transformer


def subprocess_env() -> dict[str, str]:
  """This environment less the 8-device flag (a subprocess picks its own devices); other XLA flags carry over."""
  flags = os.environ.get("XLA_FLAGS", "").replace("--xla_force_host_platform_device_count=8", "").strip()
  return {**os.environ, "XLA_FLAGS": flags}


def tiny_config(data_dir: str, **overrides: object) -> mlc.ConfigDict:
  """Returns the default MQAR config shrunk to a few seconds of compile and run on CPU.

  Args:
    data_dir: where TFDS prepares the MQAR data (share it between tests).
    **overrides: top-level fields to replace, e.g. ``mesh=[...]``.

  Returns:
    An unlocked ConfigDict.
  """
  c = transformer.get_config("runlocal")
  c.total_steps, c.log_every, c.eval_every, c.ckpt_every, c.keep_ckpts = 4, 1, 4, 2, 3
  c.input.update(seq_len=32, vocab_size=128, num_kv_pairs=4, num_train=256, num_test=32, batch_size=16,
                 data_dir=data_dir)
  c.model.update(vocab_size=128, d_model=32, num_heads=2, max_len=32)
  c.optax.warmup_steps = 2
  for k, v in overrides.items():
    c[k] = v
  return c


def read_jsonl(workdir: str) -> list[dict]:
  """Returns the records of ``<workdir>/metrics.jsonl``."""
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    return [json.loads(line) for line in f]


def losses(history: list[dict]) -> dict[int, float]:
  """Maps step -> train loss of a ``train_and_evaluate`` history."""
  return {h["step"]: h["loss"] for h in history}
