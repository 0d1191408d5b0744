"""Multi-query associative recall (MQAR), as zoology defines it (spec/bmojo.md §6.1).

Each example is a context of key-value pairs ``k0 v0 k1 v1 ...`` followed by a query
region of filler tokens (0) in which every key appears once more; the target at the
position of a queried key is its value, every other target is -100 (ignored).

* Keys are distinct tokens from ``[1, V/2)``, values distinct tokens from ``[V/2, V)``.
* The context block is repeated ``num_passes`` times (JRT-style).
* Key ``i`` (context order) is queried at offset ``2 * gaps[i]`` of the query region;
  the gaps are distinct draws from ``{0..space-1}`` with ``P(g) ∝ a (g+1)^(a-1)``.
* ``random_non_queries`` replaces every filler 0 of the inputs by a uniform token from
  ``[0, V)`` (which may collide with keys: distractors).

Our RNG is numpy's, not zoology's, so the data differ draw by draw but not in
distribution. Seeds follow the spec: train segments use seeds in ``[0, 2^31)``, test
segments ``2^31 + seed``.
"""

from __future__ import annotations

import numpy as np

IGNORE = -100
TEST_SEED_OFFSET = 2**31


def check_args(
    vocab_size: int,
    seq_len: int,
    num_kv_pairs: int,
    num_passes: int = 1,
    power_a: float = 0.01,
    prefix: str = "",
) -> None:
  """Checks zoology's asserts, raising a ValueError that names the field.

  Args:
    vocab_size: V.
    seq_len: L, the input length.
    num_kv_pairs: kv, key-value pairs per example.
    num_passes: how many times the context block is written.
    power_a: the power-law exponent a, in (0, 1].
    prefix: prepended to the field name in messages (e.g. ``"input."``).

  Raises:
    ValueError: L odd, V <= L, 2*kv*passes + 2*kv > L, or a non-positive field.
  """
  for field, value in (("seq_len", seq_len), ("vocab_size", vocab_size),
                       ("num_kv_pairs", num_kv_pairs), ("num_passes", num_passes)):
    if int(value) != value or value < 1:
      raise ValueError(f"{prefix}{field}: must be a positive integer, got {value!r}")
  if seq_len % 2:
    raise ValueError(f"{prefix}seq_len: must be even, got {seq_len}")
  if vocab_size <= seq_len:
    raise ValueError(
        f"{prefix}vocab_size: must exceed seq_len={seq_len}, got {vocab_size}")
  if 2 * num_kv_pairs * num_passes + 2 * num_kv_pairs > seq_len:
    raise ValueError(
        f"{prefix}num_kv_pairs: 2*kv*num_passes + 2*kv must be <= seq_len={seq_len},"
        f" got kv={num_kv_pairs}, num_passes={num_passes}")
  if not 0.0 < power_a <= 1.0:
    raise ValueError(f"{prefix}power_a: must be in (0, 1], got {power_a}")


def num_gap_slots(seq_len: int, num_kv_pairs: int, num_passes: int = 1) -> int:
  """Returns ``space``, the number of query slots a key can be placed at."""
  return (seq_len - 2 * num_kv_pairs * num_passes) // 2


def mqar_from_draws(
    keys: np.ndarray,
    values: np.ndarray,
    gaps: np.ndarray,
    *,
    seq_len: int,
    num_passes: int = 1,
) -> tuple[np.ndarray, np.ndarray]:
  """Builds examples from given draws (no randomness; the golden test uses this).

  Args:
    keys: int [n, kv], the keys in context order.
    values: int [n, kv], the value of each key.
    gaps: int [n, kv], distinct query slots; key i is written at query offset 2*gaps[i].
    seq_len: L.
    num_passes: how many times the context block is written.

  Returns:
    ``(inputs, targets)``, both int32 [n, L]; targets are -100 except at the input
    positions that hold a queried key, where they are that key's value.
  """
  keys, values, gaps = (np.asarray(a, dtype=np.int64) for a in (keys, values, gaps))
  n, kv = keys.shape
  ctx = np.empty((n, 2 * kv), dtype=np.int64)
  ctx[:, 0::2], ctx[:, 1::2] = keys, values
  ctx = np.tile(ctx, (1, num_passes))
  ctx_len = ctx.shape[1]
  queries = np.zeros((n, seq_len - ctx_len + 1), dtype=np.int64)
  np.put_along_axis(queries, 2 * gaps, keys, axis=1)
  full = np.concatenate([ctx, queries], axis=1)
  labels = np.full((n, seq_len + 1), IGNORE, dtype=np.int64)
  np.put_along_axis(labels, ctx_len + 2 * gaps + 1, values, axis=1)
  return full[:, :-1].astype(np.int32), labels[:, 1:].astype(np.int32)


def _distinct_uniform(
    rng: np.random.Generator, n: int, k: int, low: int, high: int
) -> np.ndarray:
  """Draws [n, k] ints from [low, high), distinct within a row, uniformly ordered.

  Redraws every entry equal to an earlier entry of its row until none is left. The rule
  only compares values for equality, so it commutes with any relabelling of the
  alphabet, which makes every ordered tuple of distinct values equally likely.
  """
  if k > high - low:
    raise ValueError(f"cannot draw {k} distinct values from [{low}, {high})")
  out = rng.integers(low, high, size=(n, k))
  rows = np.arange(n)
  while rows.size:
    sub = out[rows]
    order = np.argsort(sub, axis=1, kind="stable")
    srt = np.take_along_axis(sub, order, axis=1)
    dup = np.zeros_like(sub, dtype=bool)
    np.put_along_axis(dup, order[:, 1:], srt[:, 1:] == srt[:, :-1], axis=1)
    bad = dup.any(axis=1)
    sub[dup] = rng.integers(low, high, size=int(dup.sum()))
    out[rows] = sub
    rows = rows[bad]
  return out


def sample_draws(
    rng: np.random.Generator,
    num_examples: int,
    *,
    vocab_size: int,
    seq_len: int,
    num_kv_pairs: int,
    power_a: float = 0.01,
    num_passes: int = 1,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Draws keys, values and gaps for ``num_examples`` examples.

  Gaps are weighted draws without replacement (successive sampling), done with the
  Gumbel-top-k trick: sorting ``log p + Gumbel`` gives exactly that distribution.

  Args:
    rng: the numpy generator.
    num_examples: n.
    vocab_size: V.
    seq_len: L.
    num_kv_pairs: kv.
    power_a: a, the power-law exponent.
    num_passes: how many times the context block is written.

  Returns:
    ``(keys, values, gaps)``, each int64 [n, kv].
  """
  half = vocab_size // 2
  keys = _distinct_uniform(rng, num_examples, num_kv_pairs, 1, half)
  values = _distinct_uniform(rng, num_examples, num_kv_pairs, half, vocab_size)
  space = num_gap_slots(seq_len, num_kv_pairs, num_passes)
  log_p = (power_a - 1.0) * np.log(np.arange(1, space + 1))
  scores = log_p + rng.gumbel(size=(num_examples, space))
  gaps = np.argsort(-scores, axis=1)[:, :num_kv_pairs]
  return keys, values, gaps


def generate(
    num_examples: int,
    *,
    vocab_size: int,
    seq_len: int,
    num_kv_pairs: int,
    power_a: float = 0.01,
    random_non_queries: bool = False,
    num_passes: int = 1,
    seed: int = 0,
) -> dict[str, np.ndarray]:
  """Generates one MQAR segment.

  Args:
    num_examples: n.
    vocab_size: V.
    seq_len: L.
    num_kv_pairs: kv.
    power_a: a, the power-law exponent of the query gaps.
    random_non_queries: replace the filler zeros of the inputs by uniform tokens.
    num_passes: how many times the context block is written.
    seed: the segment seed (train: [0, 2^31), test: [2^31, 2^32)).

  Returns:
    ``{"inputs": int32 [n, L], "targets": int32 [n, L]}``.
  """
  check_args(vocab_size, seq_len, num_kv_pairs, num_passes, power_a)
  rng = np.random.default_rng(seed)
  keys, values, gaps = sample_draws(
      rng, num_examples, vocab_size=vocab_size, seq_len=seq_len,
      num_kv_pairs=num_kv_pairs, power_a=power_a, num_passes=num_passes)
  inputs, targets = mqar_from_draws(
      keys, values, gaps, seq_len=seq_len, num_passes=num_passes)
  if random_non_queries:
    noise = rng.integers(0, vocab_size, size=inputs.shape, dtype=np.int32)
    inputs = np.where(inputs == 0, noise, inputs)
  return {"inputs": inputs, "targets": targets}
