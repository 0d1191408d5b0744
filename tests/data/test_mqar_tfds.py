"""The MQAR TFDS builder: array_record round trip, configs, process-safe preparation."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from memarch.data import mqar
from memarch.data import mqar_tfds


def _rows(a):
  return sorted(map(tuple, np.asarray(a).tolist()))


def test_build_and_read_back(tmp_path):
  # Given a small custom config.
  cfg = mqar_tfds.MQARConfig.from_fields(
      vocab_size=256, seq_len=32, num_kv_pairs=4, num_train=64, num_test=16, seed=9)
  # When preparing it as array_record and reading every split.
  builder = mqar_tfds.prepare(cfg, str(tmp_path))
  assert set(builder.info.splits) == {"train", "test", "test_4x"}
  # Then each split holds exactly the generator's examples for its segment seed.
  expected = {
      "train": mqar.generate(64, vocab_size=256, seq_len=32, num_kv_pairs=4, seed=9),
      "test": mqar.generate(16, vocab_size=256, seq_len=32, num_kv_pairs=4, seed=2**31 + 9),
      "test_4x": mqar.generate(16, vocab_size=256, seq_len=128, num_kv_pairs=16,
                               seed=2**31 + 9),
  }
  for split, want in expected.items():
    source = builder.as_data_source(split)
    got = [source[i] for i in range(len(source))]
    assert all(g["inputs"].dtype == np.int32 for g in got)
    pairs = [np.concatenate([g["inputs"], g["targets"]]) for g in got]
    assert _rows(pairs) == _rows(np.concatenate([want["inputs"], want["targets"]], 1))


def test_standard_configs():
  names = {c.name for c in mqar_tfds.STANDARD_CONFIGS}
  assert {"L64_kv4", "L128_kv8", "L256_kv16", "L256_kv32", "L256_kv64", "L512_kv64",
          "L256_kv16_rnq", "L64_kv4_tiny"} <= names
  for c in mqar_tfds.STANDARD_CONFIGS:
    c.validate()
    assert c.vocab_size == 8192 and c.power_a == 0.01
  # Fields equal to a standard config give that config (and its data dir).
  assert mqar_tfds.MQARConfig.from_fields(seq_len=256, num_kv_pairs=16).name == "L256_kv16"


def test_test_4x_needs_vocab_above_4l():
  assert mqar_tfds.MQARConfig.from_fields(vocab_size=8192, seq_len=2048,
                                          num_kv_pairs=64).split_names == ("train", "test")
  with pytest.raises(ValueError, match="^num_kv_pairs:"):
    mqar_tfds.MQARConfig.from_fields(seq_len=64, num_kv_pairs=17).validate()


def test_concurrent_prepare(tmp_path):
  # Two processes prepare the same config at once: one generates under the lock, the other reads its data.
  script = (
      "import sys\n"
      "from memarch.data import mqar_tfds\n"
      "cfg = mqar_tfds.MQARConfig.from_fields(vocab_size=128, seq_len=16, num_kv_pairs=2, num_train=32,"
      " num_test=8)\n"
      "print(len(mqar_tfds.prepare(cfg, sys.argv[1]).as_data_source('train')))\n")
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  procs = [subprocess.Popen([sys.executable, "-c", script, str(tmp_path)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env) for _ in range(2)]
  outs = [p.communicate(timeout=300) for p in procs]
  assert [p.returncode for p in procs] == [0, 0], [err[-2000:] for _, err in outs]
  assert [out.split()[-1] for out, _ in outs] == ["32", "32"]
