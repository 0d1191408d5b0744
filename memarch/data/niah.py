"""Single needle in a haystack (S-NIAH, pass-key retrieval), as RULER's ``niah_single_1`` in token ids.

Titans (arXiv 2501.00663v1) Table 2 reports S-NIAH from RULER (Hsieh et al., 2024): a long "haystack" of
distractor text hides one "needle" sentence, ``"... the pass key is K ..."``, and the model is asked for K at the
end. This module generates that task directly in token ids (no tokenizer, no text), deterministic per seed::

    BOS  h h h ... h  THE PASS KEY IS d_1 .. d_K DOT  h h ... h  WHAT IS THE PASS KEY QMARK  d_1 .. d_K
         '-- haystack, with the needle at a uniformly random depth --'  '------ question -----'  answer

* **Vocabulary.** Ids ``0 .. 9`` are reserved words (``PAD, BOS, THE, PASS, KEY, IS, DOT, WHAT, QMARK`` and one
  spare), ``10 .. 19`` the digits 0..9 (``DIGIT_BASE``), and ``20 .. V-1`` the haystack (filler) words.
* **Haystack.** ``"noise"`` (RULER's pass-key haystack, a fixed sentence repeated): filler word
  ``FILLER_BASE + (j mod noise_period)`` at haystack position j; ``"random"``: i.i.d. uniform filler words.
  Filler words never equal a digit or a reserved word, so the needle is the only place the digits occur.
* **Needle.** ``THE PASS KEY IS`` followed by the K digits of a uniform pass key and ``DOT``, inserted after
  haystack word ``depth``, with ``depth`` uniform over ``{0, ..., H}`` (H haystack words: every insertion point of
  the haystack, from the very start to the very end, is equally likely).
* **Question and answer.** ``WHAT IS THE PASS KEY QMARK`` followed by the K answer digits, at the very end.
* **Scoring.** A row is the full token string s of length L + 1; ``inputs = s[:L]`` and ``targets = s[1:]`` with
  every target set to -100 (ignored) except the K answer digits, so only the answer is scored (teacher-forced:
  digit i is predicted from the question and digits < i). The metric "accuracy" is then the fraction of correct
  answer digits per example (chance 0.1).

Seeds follow MQAR: train uses ``seed`` in ``[0, 2^31)``, test ``2^31 + seed`` and the 4x-length test
``2^32 + seed``, so no split shares a random stream.
"""

from __future__ import annotations

import numpy as np

IGNORE = -100
TEST_SEED_OFFSET = 2**31
TEST_4X_SEED_OFFSET = 2**32
HAYSTACKS = ("noise", "random")

PAD, BOS, THE, PASS, KEY, IS, DOT, WHAT, QMARK = range(9)
DIGIT_BASE = 10
FILLER_BASE = 20
NEEDLE_PREFIX = (THE, PASS, KEY, IS)
QUESTION = (WHAT, IS, THE, PASS, KEY, QMARK)


def overhead(passkey_len: int) -> int:
  """Tokens of a row that are not haystack: BOS, the needle (prefix, digits, DOT), the question, the answer."""
  return 1 + len(NEEDLE_PREFIX) + passkey_len + 1 + len(QUESTION) + passkey_len


def haystack_len(seq_len: int, passkey_len: int) -> int:
  """H, the haystack words of a row of ``seq_len`` inputs (the token string has seq_len + 1 tokens)."""
  return seq_len + 1 - overhead(passkey_len)


def check_args(vocab_size: int, seq_len: int, passkey_len: int = 5, haystack: str = "noise",
               noise_period: int = 16, prefix: str = "") -> None:
  """Raises a ValueError naming the bad field.

  Args:
    vocab_size: V, including the 20 reserved and digit ids.
    seq_len: L, the input length.
    passkey_len: K, digits of the pass key.
    haystack: "noise" or "random".
    noise_period: words of the repeated "noise" sentence.
    prefix: prepended to the field name in messages (e.g. ``"input."``).

  Raises:
    ValueError: a non-positive field, too few filler words, or no room for a haystack.
  """
  for field, value in (("vocab_size", vocab_size), ("seq_len", seq_len), ("passkey_len", passkey_len),
                       ("noise_period", noise_period)):
    if isinstance(value, bool) or int(value) != value or value < 1:
      raise ValueError(f"{prefix}{field}: must be a positive integer, got {value!r}")
  if haystack not in HAYSTACKS:
    raise ValueError(f"{prefix}haystack: must be one of {HAYSTACKS}, got {haystack!r}")
  if vocab_size <= FILLER_BASE:
    raise ValueError(f"{prefix}vocab_size: must exceed {FILLER_BASE} (reserved words and digits), got {vocab_size}")
  if haystack == "noise" and noise_period > vocab_size - FILLER_BASE:
    raise ValueError(f"{prefix}noise_period: must be <= the {vocab_size - FILLER_BASE} filler words of "
                     f"vocab_size={vocab_size}, got {noise_period}")
  if haystack_len(seq_len, passkey_len) < 1:
    raise ValueError(f"{prefix}seq_len: must be >= {overhead(passkey_len)} to leave room for a haystack with "
                     f"passkey_len={passkey_len}, got {seq_len}")


def niah_from_draws(passkeys: np.ndarray, depths: np.ndarray, haystacks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Builds rows from given draws (no randomness; the golden test uses this).

  Args:
    passkeys: int [n, K] digits 0..9.
    depths: int [n], the needle goes after this many haystack words, in [0, H].
    haystacks: int [n, H] haystack token ids.

  Returns:
    ``(inputs, targets)``, int32 [n, L] with L = H + overhead(K) - 1; targets are -100 except the K positions
    whose next token is an answer digit.
  """
  passkeys, depths, haystacks = (np.asarray(a, dtype=np.int64) for a in (passkeys, depths, haystacks))
  n, k = passkeys.shape
  h = haystacks.shape[1]
  digits = DIGIT_BASE + passkeys
  needle = np.concatenate([np.broadcast_to(NEEDLE_PREFIX, (n, len(NEEDLE_PREFIX))), digits,
                           np.full((n, 1), DOT)], axis=1)
  m = needle.shape[1]
  # Haystack with the needle spliced in after word depths[i]: position j < depth is haystack j, the next m
  # positions the needle, and the rest haystack j - m.
  j = np.arange(h + m)[None, :]
  d = depths[:, None]
  hay = np.take_along_axis(haystacks, np.clip(np.where(j < d, j, j - m), 0, h - 1), axis=1)
  ndl = np.take_along_axis(needle, np.clip(j - d, 0, m - 1), axis=1)
  body = np.where((j >= d) & (j < d + m), ndl, hay)
  full = np.concatenate([np.full((n, 1), BOS), body, np.broadcast_to(QUESTION, (n, len(QUESTION))), digits], axis=1)
  labels = np.full(full.shape, IGNORE, dtype=np.int64)
  labels[:, -k:] = digits
  return full[:, :-1].astype(np.int32), labels[:, 1:].astype(np.int32)


def generate(num_examples: int, *, vocab_size: int, seq_len: int, passkey_len: int = 5, haystack: str = "noise",
             noise_period: int = 16, seed: int = 0) -> dict[str, np.ndarray]:
  """Generates S-NIAH rows, deterministic per ``seed``.

  Args:
    num_examples: n.
    vocab_size: V.
    seq_len: L, the input length.
    passkey_len: K, digits of the pass key.
    haystack: "noise" (a fixed sentence repeated, RULER's pass-key haystack) or "random" (uniform filler words).
    noise_period: words of the repeated sentence.
    seed: the split seed (train: [0, 2^31), test: 2^31 + seed, test_4x: 2^32 + seed).

  Returns:
    ``{"inputs", "targets"}`` int32 [n, L] and ``"depth"`` int32 [n] (haystack words before the needle).
  """
  check_args(vocab_size, seq_len, passkey_len, haystack, noise_period)
  rng = np.random.default_rng(seed)
  h = haystack_len(seq_len, passkey_len)
  passkeys = rng.integers(0, 10, size=(num_examples, passkey_len))
  depths = rng.integers(0, h + 1, size=num_examples)
  if haystack == "noise":
    hay = np.broadcast_to(FILLER_BASE + np.arange(h) % noise_period, (num_examples, h))
  else:
    hay = rng.integers(FILLER_BASE, vocab_size, size=(num_examples, h))
  inputs, targets = niah_from_draws(passkeys, depths, hay)
  return {"inputs": inputs, "targets": targets, "depth": depths.astype(np.int32)}
