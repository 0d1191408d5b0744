"""The pluggable embedder: default hashed n-grams + projection, and any callable."""

from __future__ import annotations

import numpy as np
import pytest

from memarch.hmem import embed as hembed


def test_default_is_deterministic_and_unit():
  emb = hembed.HashedNgramEmbedder(dim=64, num_buckets=4096)
  texts = ["the cat sat on the mat", "a dog in the fog", "the cat sat on a mat", ""]
  a, b = emb(texts), hembed.HashedNgramEmbedder(dim=64, num_buckets=4096)(texts)
  np.testing.assert_array_equal(a, b)
  assert a.dtype == np.float32 and a.shape == (4, 64)
  np.testing.assert_allclose(np.linalg.norm(a[:3], axis=1), 1.0, rtol=1e-5)
  assert not a[3].any()                           # nothing to hash: a zero row
  # Near-duplicates are closer than unrelated texts.
  assert a[0] @ a[2] > 0.5 > a[0] @ a[1]
  assert not np.array_equal(a, hembed.HashedNgramEmbedder(dim=64, num_buckets=4096, seed=1)(texts))


def test_token_rows_ragged_equals_dense_with_padding():
  emb = hembed.HashedNgramEmbedder(dim=32, num_buckets=1024, ignore_ids=(0,))
  dense = np.array([[5, 6, 7, 0, 0], [9, 9, 9, 9, 1]])
  ragged = [np.array([5, 6, 7]), np.array([9, 9, 9, 9, 1])]
  np.testing.assert_allclose(emb(dense), emb(ragged), atol=1e-6)
  # Sublinear counts: a repeated token weighs 1 + log(count), not count.
  unigrams = hembed.HashedNgramEmbedder(num_buckets=1024, token_orders=(1,))
  bag = unigrams.bags(np.array([[3, 3, 3, 4]]))
  assert sorted(bag.data.tolist()) == pytest.approx([1.0, 1.0 + np.log(3.0)])


def test_idf_zeroes_ubiquitous_ngrams():
  corpus = np.array([[1, 2, 3], [1, 4, 5], [1, 6, 7]])
  emb = hembed.HashedNgramEmbedder(dim=16, num_buckets=512, token_orders=(1,)).fit_idf(corpus)
  only_common = emb(np.array([[1, 1]]))
  assert not only_common.any()


def test_any_callable_is_accepted_and_checked():
  x = hembed.embed(lambda rows: np.ones((len(rows), 3)) * 2.0, ["a", "b"])
  np.testing.assert_allclose(x, np.full((2, 3), 1 / np.sqrt(3)), rtol=1e-6)
  batched = hembed.embed(lambda rows: np.arange(len(rows) * 2.0).reshape(-1, 2) + 1, list("abcde"),
                         batch_size=2)
  assert batched.shape == (5, 2)
  with pytest.raises(ValueError, match="^embedder:"):
    hembed.embed(lambda rows: np.ones(len(rows)), ["a"])
  with pytest.raises(ValueError, match="^embedder:"):
    hembed.embed(lambda rows: np.ones((1, 2)), ["a", "b"])
  with pytest.raises(ValueError, match="^inputs:"):
    hembed.HashedNgramEmbedder()(np.zeros((2, 3), np.float32))
  with pytest.raises(ValueError, match="^dim:"):
    hembed.HashedNgramEmbedder(dim=0)
