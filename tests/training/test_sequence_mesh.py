"""train.py with a `sequence` mesh axis (spec bmojo.md §5.5): validation, and the same losses as data parallelism."""

from __future__ import annotations

import numpy as np
import pytest

import helpers_training as ht
import train
from memarch.training import validate

MIXERS = dict(mixers=("mamba2", "bmojo"), window=4,
              mixer_options=(("mamba2", (("chunk_size", 8), ("d_state", 8), ("head_dim", 16))),
                             ("bmojo", (("chunk_size", 4), ("d_state", 8), ("k_sel", 2), ("memory_size", 4),
                                        ("ssm_chunk_size", 8), ("ssm_head_dim", 16)))))


def test_sequence_axis_is_accepted_and_lengths_must_split(tmp_path):
  config = ht.tiny_config(str(tmp_path), mesh=[("data", 2), ("sequence", 4)])
  config.model.update(MIXERS)
  validate.validate(config)
  config.input.seq_len = 30  # 30 (and the 4x eval split's 120) do not split into 4 shards
  with pytest.raises(ValueError, match=r"mesh: the sequence axes \['sequence'\] split sequences into 4 shards"):
    validate.validate(config)


@pytest.mark.slow  # two short train.py runs with Mamba-2 / B'MOJO compiles on 8 simulated devices
def test_sequence_parallel_run_matches_the_data_parallel_run(tmp_path):
  # Given the tiny MQAR task with a Mamba-2 and a B'MOJO layer
  runs = {}
  for name, mesh in (("data", [("data", 8)]), ("sequence", [("data", 2), ("sequence", 4)])):
    config = ht.tiny_config(str(tmp_path / "tfds"), mesh=mesh, total_steps=3, eval_every=3, ckpt_every=3)
    config.model.update(MIXERS)
    # When training 3 steps on (data 8) and on (data 2, sequence 4)
    runs[name] = ht.losses(train.train_and_evaluate(config, str(tmp_path / name)))
  # Then the losses agree
  steps = sorted(runs["data"])
  np.testing.assert_allclose([runs["sequence"][s] for s in steps], [runs["data"][s] for s in steps], rtol=1e-5)
