"""S-NIAH: the generator (golden rows, uniform needle depth, only the answer scored), its TFDS builder and the
record-task pipeline (the 4x-length split, a batch through ``build_iterator``, field validation)."""

from __future__ import annotations

import numpy as np
import pytest

from memarch.data import build_iterator
from memarch.data import get_task_info
from memarch.data import niah
from memarch.data import niah_tfds

NEEDLE = list(niah.NEEDLE_PREFIX)
QUESTION = list(niah.QUESTION)


def test_rows_from_draws_golden():
  # Given pass key 4 0 9, a haystack of five words and the needle after word 2.
  inputs, targets = niah.niah_from_draws([[4, 0, 9]], [2], [[20, 21, 22, 23, 24]])
  # Then the token string is BOS h h needle h h h question answer, shifted into inputs / targets.
  full = [niah.BOS, 20, 21, *NEEDLE, 14, 10, 19, niah.DOT, 22, 23, 24, *QUESTION, 14, 10, 19]
  np.testing.assert_array_equal(inputs[0], full[:-1])
  np.testing.assert_array_equal(targets[0], [-100] * (len(full) - 4) + [14, 10, 19])
  assert inputs.dtype == targets.dtype == np.int32
  # Depth 0 and depth H put the needle first and last.
  for depth, body in ((0, [*NEEDLE, 14, 10, 19, niah.DOT, 20, 21, 22, 23, 24]),
                      (5, [20, 21, 22, 23, 24, *NEEDLE, 14, 10, 19, niah.DOT])):
    inputs, _ = niah.niah_from_draws([[4, 0, 9]], [depth], [[20, 21, 22, 23, 24]])
    np.testing.assert_array_equal(inputs[0, 1:1 + len(body)], body)


def test_generate_golden_for_a_fixed_seed():
  # Given seed 7, L = 30, a 3-digit key and the random haystack (V = 32).
  data = niah.generate(2, vocab_size=32, seq_len=30, passkey_len=3, haystack="random", seed=7)
  # Then the rows are exactly these (numpy's PCG64 stream is stable across versions).
  np.testing.assert_array_equal(data["inputs"], [
      [1, 20, 23, 23, 30, 30, 20, 25, 29, 21, 29, 21, 2, 3, 4, 5, 19, 16, 16, 6, 25, 29, 7, 5, 2, 3, 4, 8, 19, 16],
      [1, 23, 24, 23, 2, 3, 4, 5, 18, 15, 17, 6, 28, 23, 31, 25, 25, 26, 26, 26, 26, 31, 7, 5, 2, 3, 4, 8, 18, 15]])
  np.testing.assert_array_equal(data["targets"][:, -4:], [[-100, 19, 16, 16], [-100, 18, 15, 17]])
  np.testing.assert_array_equal(data["depth"], [11, 3])
  # And the same seed gives the same rows, another seed other rows.
  again = niah.generate(2, vocab_size=32, seq_len=30, passkey_len=3, haystack="random", seed=7)
  np.testing.assert_array_equal(again["inputs"], data["inputs"])
  other = niah.generate(2, vocab_size=32, seq_len=30, passkey_len=3, haystack="random", seed=8)
  assert not np.array_equal(other["inputs"], data["inputs"])


@pytest.mark.parametrize("haystack", ["noise", "random"])
def test_only_the_answer_is_scored_and_digits_occur_only_in_needle_and_answer(haystack):
  # Given many rows.
  k, seq_len = 5, 64
  data = niah.generate(500, vocab_size=48, seq_len=seq_len, passkey_len=k, haystack=haystack, seed=3)
  inputs, targets, depth = data["inputs"], data["targets"], data["depth"]
  # Then exactly the last K targets are labelled, with the needle's digits.
  scored = targets != niah.IGNORE
  assert scored[:, -k:].all() and not scored[:, :-k].any()
  rows = np.arange(len(depth))[:, None]
  needle = inputs[rows, 1 + depth[:, None] + np.arange(len(NEEDLE) + k + 1)]
  np.testing.assert_array_equal(needle[:, :len(NEEDLE)], np.broadcast_to(NEEDLE, (len(depth), len(NEEDLE))))
  np.testing.assert_array_equal(needle[:, len(NEEDLE):-1], targets[:, -k:])
  assert (needle[:, -1] == niah.DOT).all()
  assert ((targets[:, -k:] >= niah.DIGIT_BASE) & (targets[:, -k:] < niah.FILLER_BASE)).all()
  # The question precedes the answer, and digits appear nowhere else in the inputs (needle + first K - 1 answer
  # digits per row).
  np.testing.assert_array_equal(inputs[:, -k - len(QUESTION) + 1:-k + 1], np.broadcast_to(QUESTION, (500, 6)))
  is_digit = (inputs >= niah.DIGIT_BASE) & (inputs < niah.FILLER_BASE)
  assert (is_digit.sum(1) == 2 * k - 1).all()
  # Everything else (the haystack) is filler words.
  hay = np.ones(inputs.shape, bool)
  hay[:, 0] = False
  hay[rows, 1 + depth[:, None] + np.arange(len(NEEDLE) + k + 1)] = False
  hay[:, -(len(QUESTION) + k - 1):] = False
  assert (hay.sum(1) == niah.haystack_len(seq_len, k)).all()
  assert (inputs[hay] >= niah.FILLER_BASE).all() and (inputs[hay] < 48).all()


def test_needle_depth_is_uniform():
  # Given a haystack of H = 9 words (10 insertion points) and 20,000 rows.
  seq_len, k = 9 + niah.overhead(2) - 1, 2
  assert niah.haystack_len(seq_len, k) == 9
  depth = niah.generate(20_000, vocab_size=64, seq_len=seq_len, passkey_len=k, seed=11)["depth"]
  # Then every point occurs, and the counts pass a chi-square test against uniform (critical value of 9 degrees
  # of freedom at p = 0.001 is 27.9).
  counts = np.bincount(depth, minlength=10)
  assert counts.shape == (10,) and counts.min() > 0
  chi2 = float(((counts - 2000.0) ** 2 / 2000.0).sum())
  assert chi2 < 27.9, counts
  # And the needle positions spread over the whole haystack at a realistic length too.
  deep = niah.generate(4_000, vocab_size=64, seq_len=256, passkey_len=5, seed=12)["depth"]
  h = niah.haystack_len(256, 5)
  assert deep.min() >= 0 and deep.max() <= h
  assert abs(float(deep.mean()) - h / 2) < 0.05 * h
  np.testing.assert_allclose(np.histogram(deep, bins=4, range=(0, h + 1))[0] / 4_000, 0.25, atol=0.03)


def test_builder_splits_lengths_and_seeds(tmp_path):
  # Given a tiny custom config.
  cfg = niah_tfds.NIAHConfig.from_fields(vocab_size=40, seq_len=32, passkey_len=3, num_train=24, num_test=8,
                                         seed=5)
  # When preparing it as array_record and reading every split.
  builder = niah_tfds.prepare(cfg, str(tmp_path))
  assert set(builder.info.splits) == {"train", "test", "test_4x"}
  # Then each split holds the generator's rows for its seed, test_4x at 4x the length.
  for split, n, length, seed in (("train", 24, 32, 5), ("test", 8, 32, 2**31 + 5), ("test_4x", 8, 128, 2**32 + 5)):
    source = builder.as_data_source(split)
    want = niah.generate(n, vocab_size=40, seq_len=length, passkey_len=3, seed=seed)
    got = [source[i] for i in range(len(source))]
    assert len(got) == n and cfg.split_seq_len(split) == length
    for key in ("inputs", "targets", "depth"):
      np.testing.assert_array_equal(np.stack([g[key] for g in got]), want[key])


def test_task_info_and_a_batch_through_build_iterator(tmp_path):
  # Given the niah record task at L = 48.
  cfg = dict(name="niah", seq_len=48, vocab_size=40, passkey_len=4, num_train=32, num_test=12, data_seed=1)
  info = get_task_info(cfg)
  # Then it is evaluated at L and 4L.
  assert info.eval_splits == ("test", "test_4x")
  assert info.seq_len == 48 and info.seq_len_of("test") == 48 and info.seq_len_of("test_4x") == 192
  assert info.vocab_size == 40 and info.input_features is None
  # When reading a training batch and the padded last test_4x batch.
  batch = next(build_iterator(cfg, split="train", seed=0, global_batch_size=8, data_dir=str(tmp_path)))
  assert batch["inputs"].shape == batch["targets"].shape == (8, 48)
  assert batch["inputs"].dtype == np.int32 and (batch["segment_ids"] == 1).all()
  np.testing.assert_array_equal(batch["positions"], np.broadcast_to(np.arange(48), (8, 48)))
  assert ((batch["targets"] != -100).sum(1) == 4).all()
  evals = list(build_iterator(cfg, split="test_4x", seed=0, global_batch_size=8, data_dir=str(tmp_path),
                              shuffle=False, num_epochs=1, drop_remainder=False))
  assert [b["inputs"].shape for b in evals] == [(8, 192), (8, 192)]
  assert int((evals[1]["targets"] != -100).any(1).sum()) == 4  # 12 rows: 4 real in the padded batch


@pytest.mark.parametrize("field, value, message", [
    ("seq_len", 10, "input.seq_len"),
    ("vocab_size", 20, "input.vocab_size"),
    ("passkey_len", 0, "input.passkey_len"),
    ("haystack", "essay", "input.haystack"),
    ("noise_period", 100, "input.noise_period"),
    ("num_train", 0, "input.num_train"),
    ("data_seed", 2**31, "input.data_seed"),
    ("builder_config", "L3", "input.builder_config"),
])
def test_bad_fields_name_the_field(field, value, message):
  cfg = {"name": "niah", "seq_len": 64, field: value}
  with pytest.raises(ValueError, match=message):
    get_task_info(cfg)


def test_missing_seq_len_and_standard_configs():
  with pytest.raises(ValueError, match="input.seq_len: required"):
    get_task_info(dict(name="niah"))
  # A standard config supplies its fields; a disagreeing field is an error.
  assert get_task_info(dict(name="niah", builder_config="L256")).seq_len_of("test_4x") == 1024
  with pytest.raises(ValueError, match="input.seq_len: 128 disagrees"):
    get_task_info(dict(name="niah", builder_config="L256", seq_len=128))
  assert niah_tfds.NIAHConfig.from_fields(seq_len=64, num_train=2048, num_test=256).name == "L64_tiny"
