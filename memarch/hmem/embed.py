"""Document embedders for routing (spec/hmem.md §1.2, §2).

The paper embeds each 2,048-token window with Sentence-BERT all-MiniLM-L6-v2 (384
dims) and L2-normalises it [paper]. memarch makes the embedder pluggable [ours]: any
callable ``inputs -> float [N, D]`` works (``embed`` validates and L2-normalises its
output), and the default, ``HashedNgramEmbedder``, is offline and deterministic:

1. Each input becomes a bag of hashed n-grams:

   * a row of token ids (an int array): token n-grams of the orders ``token_orders``;
   * a string: byte n-grams of the orders ``char_orders`` of its UTF-8 encoding, plus
     word n-grams of the orders ``word_orders`` of its lower-cased ``\\w+`` words.

   An n-gram's bucket is a splitmix64 hash of (kind, order, ids) modulo
   ``num_buckets``: a fixed integer function, so the same input gives the same bucket
   in every process and on every machine (Python's ``hash`` is salted; it is not used).
2. Counts get sublinear weights ``1 + log(count)``, so a token repeated in every
   statement (a separator) does not swamp the rare topical ones. Optionally
   (``fit_idf``) each bucket is also weighted by its inverse document frequency in a
   reference corpus, ``log((1 + N) / (1 + df))``, which zeroes n-grams present in
   every document.
3. The weighted bag [N, num_buckets] is multiplied by a fixed Gaussian projection
   [num_buckets, dim] drawn from ``seed`` (a Johnson-Lindenstrauss sketch: inner
   products of bags are kept up to O(1/sqrt(dim))) and L2-normalised.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
import dataclasses
import functools
import re
from typing import Any
import zlib

import numpy as np
from scipy import sparse

Embedder = Callable[[Any], np.ndarray]

_TOKENS, _CHARS, _WORDS = 1, 2, 3     # n-gram kinds, part of the hash
_WORD_RE = re.compile(r"\w+")


def _mix(h: np.ndarray) -> np.ndarray:
  """The splitmix64 finaliser on uint64 arrays (wraps mod 2^64 by design)."""
  h = h ^ (h >> np.uint64(30))
  h = h * np.uint64(0xBF58476D1CE4E5B9)
  h = h ^ (h >> np.uint64(27))
  h = h * np.uint64(0x94D049BB133111EB)
  return h ^ (h >> np.uint64(31))


def ngram_hashes(ids: np.ndarray, order: int, kind: int, seed: int = 0) -> np.ndarray:
  """Hashes every n-gram of the last axis of ``ids``.

  Args:
    ids: integer [..., n] ids (any non-negative integers below 2^64).
    order: the n-gram order.
    kind: a small integer separating families of n-grams (tokens, bytes, words).
    seed: mixed into every hash.

  Returns:
    uint64 [..., n - order + 1] hashes (empty when n < order).
  """
  ids = np.asarray(ids).astype(np.uint64)
  n = ids.shape[-1]
  m = max(n - order + 1, 0)
  start = _mix(np.array([(seed * 1000 + kind) * 64 + order], np.uint64))[0]
  h = np.full(ids.shape[:-1] + (m,), start, np.uint64)
  for j in range(order):
    h = _mix(h ^ ids[..., j:j + m])
  return h


@dataclasses.dataclass(frozen=True, eq=False)
class HashedNgramEmbedder:
  """Hashed n-gram features and a fixed random projection, L2-normalised [ours].

  Call it on an int array [N, L] of token ids, a list of 1-D int arrays (ragged
  rows) or a list of strings; it returns float32 [N, dim] unit rows (an input with no
  n-gram left gives a zero row).

  Attributes:
    dim: D, the embedding size.
    num_buckets: hash buckets of the bag of n-grams.
    token_orders: n-gram orders for token-id rows.
    char_orders: byte n-gram orders for strings.
    word_orders: word n-gram orders for strings.
    ignore_ids: token ids dropped before hashing (e.g. padding); an n-gram never spans
      a dropped id, because rows are cut there.
    seed: seeds the hash and the projection.
    idf: None, or float32 [num_buckets] per-bucket weights (``fit_idf``).
  """

  dim: int = 256
  num_buckets: int = 2**15
  token_orders: tuple[int, ...] = (1, 2)
  char_orders: tuple[int, ...] = (3, 4)
  word_orders: tuple[int, ...] = (1, 2)
  ignore_ids: tuple[int, ...] = ()
  seed: int = 0
  idf: np.ndarray | None = None

  def __post_init__(self):
    for field in ("dim", "num_buckets"):
      if getattr(self, field) < 1:
        raise ValueError(f"{field}: must be positive, got {getattr(self, field)}")
    for field in ("token_orders", "char_orders", "word_orders"):
      if any(int(o) < 1 for o in getattr(self, field)):
        raise ValueError(f"{field}: orders must be positive, got {getattr(self, field)}")
    if self.idf is not None and np.shape(self.idf) != (self.num_buckets,):
      raise ValueError(f"idf: expected shape ({self.num_buckets},), got {np.shape(self.idf)}")

  def fit_idf(self, corpus: Any) -> HashedNgramEmbedder:
    """Returns a copy weighting buckets by ``log((1 + N) / (1 + df))`` over ``corpus``.

    Args:
      corpus: N inputs, in any form ``__call__`` accepts.

    Returns:
      The embedder with ``idf`` set (the corpus itself is not kept).
    """
    bag = dataclasses.replace(self, idf=None).bags(corpus)
    df = np.bincount(bag.indices, minlength=self.num_buckets)
    idf = np.log((1.0 + bag.shape[0]) / (1.0 + df)).astype(np.float32)
    return dataclasses.replace(self, idf=idf)

  @functools.cached_property
  def projection(self) -> np.ndarray:
    """The fixed float32 [num_buckets, dim] Gaussian projection (N(0, 1/dim)), cached."""
    rng = np.random.default_rng([self.seed, 0x5EED])
    p = rng.standard_normal((self.num_buckets, self.dim), dtype=np.float32)
    return p / np.float32(np.sqrt(self.dim))

  def _row_buckets(self, row: Any) -> np.ndarray:
    if isinstance(row, str):
      parts = []
      data = np.frombuffer(row.encode("utf-8"), np.uint8)
      parts += [ngram_hashes(data, o, _CHARS, self.seed) for o in self.char_orders]
      words = np.array([zlib.crc32(w.encode("utf-8")) for w in _WORD_RE.findall(row.lower())],
                       np.uint64)
      parts += [ngram_hashes(words, o, _WORDS, self.seed) for o in self.word_orders]
    else:
      row = np.asarray(row)
      if row.ndim != 1 or not np.issubdtype(row.dtype, np.integer):
        raise ValueError(f"inputs: each row must be a 1-D int array or a str, got "
                         f"{row.dtype} of shape {row.shape}")
      parts = [self._token_hashes(row[None])[0]]
    return np.concatenate(parts) % np.uint64(self.num_buckets)

  def _token_hashes(self, rows: np.ndarray) -> list[np.ndarray]:
    """Per row, the hashes of its token n-grams that avoid ``ignore_ids``."""
    rows = np.asarray(rows)
    if (rows < 0).any():
      raise ValueError("inputs: token ids must be non-negative")
    keep = ~np.isin(rows, np.asarray(self.ignore_ids, rows.dtype))
    hashes, valid = [], []
    for o in self.token_orders:
      hashes.append(ngram_hashes(rows, o, _TOKENS, self.seed))
      m = hashes[-1].shape[1]
      ok = np.ones((rows.shape[0], m), bool)
      for j in range(o):
        ok &= keep[:, j:j + m]
      valid.append(ok)
    h, ok = np.concatenate(hashes, axis=1), np.concatenate(valid, axis=1)
    return [h[i][ok[i]] for i in range(rows.shape[0])]

  def bags(self, inputs: Any) -> sparse.csr_matrix:
    """The weighted bags of n-grams, a float32 CSR matrix [N, num_buckets]."""
    if isinstance(inputs, np.ndarray) and inputs.ndim == 2:
      if not np.issubdtype(inputs.dtype, np.integer):
        raise ValueError(f"inputs: a 2-D array must hold int token ids, got {inputs.dtype}")
      buckets = [h % np.uint64(self.num_buckets) for h in self._token_hashes(inputs)]
    elif isinstance(inputs, (str, bytes)) or not isinstance(inputs, Sequence | np.ndarray):
      raise ValueError("inputs: expected an int array [N, L], a list of 1-D int arrays or a "
                       f"list of strings, got {type(inputs).__name__}")
    else:
      buckets = [self._row_buckets(row) for row in inputs]
    lengths = np.array([len(b) for b in buckets], np.int64)
    rows = np.repeat(np.arange(len(buckets)), lengths)
    cols = np.concatenate(buckets).astype(np.int64) if buckets else np.zeros(0, np.int64)
    bag = sparse.csr_matrix((np.ones(len(cols), np.float32), (rows, cols)),
                            shape=(len(buckets), self.num_buckets))
    bag.sum_duplicates()
    bag.data = 1.0 + np.log(bag.data)
    if self.idf is not None:
      bag.data *= np.asarray(self.idf, np.float32)[bag.indices]
    return bag

  def __call__(self, inputs: Any) -> np.ndarray:
    """Embeds ``inputs`` (see the class docstring); float32 [N, dim], unit rows."""
    x = np.asarray(self.bags(inputs) @ self.projection, np.float32)
    return l2_normalize(x)


def l2_normalize(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
  """Rows of ``x`` divided by their L2 norm (zero rows stay zero)."""
  norm = np.linalg.norm(x, axis=-1, keepdims=True)
  return (x / np.maximum(norm, eps)).astype(np.float32)


def embed(embedder: Embedder, inputs: Any, *, batch_size: int | None = None) -> np.ndarray:
  """Runs any embedder, checks its output and L2-normalises it (as the paper does).

  Args:
    embedder: a callable ``inputs -> float [N, D]`` (e.g. ``HashedNgramEmbedder()`` or
      a sentence-embedding model wrapped in a function).
    inputs: a list of strings, a list of token-id rows, or an int array [N, L].
    batch_size: if set, the embedder is called on slices of this many inputs.

  Returns:
    float32 [N, D] with unit (or zero) rows.

  Raises:
    ValueError: the embedder returned a wrong shape or non-finite values.
  """
  n = len(inputs)
  if batch_size is None or n <= batch_size:
    parts = [embedder(inputs)]
  else:
    parts = [embedder(inputs[i:i + batch_size]) for i in range(0, n, batch_size)]
  parts = [np.asarray(p) for p in parts]
  for p in parts:
    if p.ndim != 2 or not np.issubdtype(p.dtype, np.floating):
      raise ValueError(f"embedder: must return float [N, D], got {p.dtype} {p.shape}")
  x = np.concatenate(parts).astype(np.float32)
  if x.shape[0] != n:
    raise ValueError(f"embedder: returned {x.shape[0]} rows for {n} inputs")
  if not np.isfinite(x).all():
    raise ValueError("embedder: returned non-finite values")
  return l2_normalize(x)
