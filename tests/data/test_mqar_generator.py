"""MQAR generator: zoology semantics (spec/bmojo.md §6.1)."""

from __future__ import annotations

import numpy as np
import pytest

from memarch.data import mqar

V, L = 8192, 256


def _value_of_key(inputs_row, kv):
  """Maps each key of the context block to its value."""
  return {int(inputs_row[2 * i]): int(inputs_row[2 * i + 1]) for i in range(kv)}


def test_golden_worked_example():
  # Given the spec's draws for V=64, L=32, kv=4.
  keys, values, gaps = [[3, 30, 14, 11]], [[54, 59, 48, 45]], [[1, 0, 11, 3]]
  # When building the example from them.
  inputs, targets = mqar.mqar_from_draws(keys, values, gaps, seq_len=32)
  # Then it is exactly the worked example.
  expected_inputs = np.zeros(32, np.int32)
  expected_inputs[:8] = [3, 54, 30, 59, 14, 48, 11, 45]
  expected_inputs[[8, 10, 14, 30]] = [30, 3, 11, 14]
  expected_targets = np.full(32, -100, np.int32)
  expected_targets[[8, 10, 14, 30]] = [59, 54, 45, 48]
  np.testing.assert_array_equal(inputs[0], expected_inputs)
  np.testing.assert_array_equal(targets[0], expected_targets)
  assert inputs.dtype == targets.dtype == np.int32


@pytest.mark.parametrize("kwargs, field", [
    (dict(vocab_size=64, seq_len=33, num_kv_pairs=4), "seq_len"),
    (dict(vocab_size=32, seq_len=32, num_kv_pairs=4), "vocab_size"),
    (dict(vocab_size=64, seq_len=32, num_kv_pairs=9), "num_kv_pairs"),
    (dict(vocab_size=64, seq_len=32, num_kv_pairs=4, num_passes=4), "num_kv_pairs"),
    (dict(vocab_size=64, seq_len=32, num_kv_pairs=0), "num_kv_pairs"),
    (dict(vocab_size=64, seq_len=32, num_kv_pairs=4, power_a=0.0), "power_a"),
])
def test_asserts_name_the_field(kwargs, field):
  with pytest.raises(ValueError, match=f"^{field}:"):
    mqar.generate(4, **kwargs)


def test_assert_boundary_is_allowed():
  # 2*kv*passes + 2*kv == L is allowed (one pass: 4*kv == L).
  data = mqar.generate(8, vocab_size=64, seq_len=32, num_kv_pairs=8)
  assert (data["targets"] != -100).sum(axis=1).tolist() == [8] * 8


@pytest.mark.parametrize("num_passes", [1, 2])
def test_label_shift_semantics(num_passes):
  # Given random examples.
  kv = 16
  data = mqar.generate(500, vocab_size=V, seq_len=L, num_kv_pairs=kv,
                       num_passes=num_passes, seed=3)
  inputs, targets = data["inputs"], data["targets"]
  assert inputs.shape == targets.shape == (500, L)
  ctx_len = 2 * kv * num_passes
  for x, y in zip(inputs, targets):
    table = _value_of_key(x, kv)
    # Then keys are distinct in [1, V/2), values distinct in [V/2, V).
    assert len(table) == kv and all(1 <= k < V // 2 for k in table)
    assert len(set(table.values())) == kv and all(V // 2 <= v < V for v in table.values())
    # The context block is repeated num_passes times.
    np.testing.assert_array_equal(x[:ctx_len], np.tile(x[:2 * kv], num_passes))
    # Every labelled target is the value of the key at that input position.
    pos = np.flatnonzero(y != -100)
    assert len(pos) == kv and pos.min() >= ctx_len
    assert [table[int(x[p])] for p in pos] == y[pos].tolist()
    # Each key is queried once, at an even offset of the query region; the rest is 0.
    assert sorted(int(x[p]) for p in pos) == sorted(table)
    assert np.all((pos - ctx_len) % 2 == 0)
    rest = np.ones(L, bool)
    rest[:ctx_len] = False
    rest[pos] = False
    assert np.all(x[rest] == 0)


def test_random_non_queries():
  kw = dict(vocab_size=V, seq_len=L, num_kv_pairs=16, seed=5)
  plain = mqar.generate(200, **kw)
  noisy = mqar.generate(200, random_non_queries=True, **kw)
  # False leaves the filler zeros; True replaces them with uniform tokens.
  assert (plain["inputs"] == 0).sum() == 200 * (L - 32 - 16)
  filler = plain["inputs"] == 0
  assert (noisy["inputs"][filler] == 0).mean() < 10 / V
  assert len(np.unique(noisy["inputs"][filler])) > V // 2
  # Non-filler positions and the targets are the same draws.
  np.testing.assert_array_equal(noisy["inputs"][~filler], plain["inputs"][~filler])
  np.testing.assert_array_equal(noisy["targets"], plain["targets"])


def test_power_law_gaps():
  # Spec: for L=256, kv=16 the median query offset is 32 and the 90th percentile 154.
  data = mqar.generate(4000, vocab_size=V, seq_len=L, num_kv_pairs=16, seed=7)
  offsets = np.argwhere(data["targets"] != -100)[:, 1] - 32
  assert 26 <= np.median(offsets) <= 38
  assert 140 <= np.percentile(offsets, 90) <= 168
  # Larger a flattens the law: the median offset grows.
  flat = mqar.generate(4000, vocab_size=V, seq_len=L, num_kv_pairs=16, power_a=1.0, seed=7)
  flat_offsets = np.argwhere(flat["targets"] != -100)[:, 1] - 32
  assert np.median(flat_offsets) > 80


def test_seeds_are_deterministic_and_distinct():
  kw = dict(vocab_size=V, seq_len=64, num_kv_pairs=4)
  a, b = mqar.generate(50, seed=1, **kw), mqar.generate(50, seed=1, **kw)
  c = mqar.generate(50, seed=mqar.TEST_SEED_OFFSET + 1, **kw)
  np.testing.assert_array_equal(a["inputs"], b["inputs"])
  assert not np.array_equal(a["inputs"], c["inputs"])


def test_distinct_draws_are_uniform():
  # Draw 3 distinct values from 4 many times: each of the 24 ordered tuples ~ 1/24.
  rng = np.random.default_rng(0)
  out = mqar._distinct_uniform(rng, 48_000, 3, 0, 4)  # pylint: disable=protected-access
  assert all(len(set(r)) == 3 for r in out[:1000])
  codes = out[:, 0] * 16 + out[:, 1] * 4 + out[:, 2]
  counts = np.unique(codes, return_counts=True)[1]
  assert len(counts) == 24 and counts.min() > 1800 and counts.max() < 2200
