"""The bank's tree: numbering, balanced hierarchical k-means, routing, checkpoints."""

from __future__ import annotations

import json

import numpy as np
import orbax.checkpoint as ocp
import pytest

from memarch.hmem import embed as hembed
from memarch.hmem import tree as htree


def _planted(rng, k=4, n=2000, dim=24):
  """k topics x k subtopics of tight Gaussian blobs on the sphere; labels = leaf."""
  centers = rng.standard_normal((k, dim)) * 4.0
  sub = centers[:, None] + rng.standard_normal((k, k, dim))
  leaf = rng.integers(0, k * k, n)
  x = sub.reshape(-1, dim)[leaf] + 0.1 * rng.standard_normal((n, dim))
  return hembed.l2_normalize(x), leaf


def _skewed(rng, n=8000, dim=16):
  """Half of the points in one tight blob, the rest spread out."""
  x = np.concatenate([0.3 * rng.standard_normal((n // 2, dim)) + 3.0,
                      rng.standard_normal((n - n // 2, dim))])
  return hembed.l2_normalize(x)


def test_numbering_paper_sizes():
  # 16 branches x 4 levels: 16 / 256 / 4,096 / 65,536 nodes stored level after level.
  np.testing.assert_array_equal(htree.level_offsets(16, 4), [0, 16, 272, 4368])
  assert htree.num_nodes(16, 4) == 69_904
  leaf = np.array([0, 1, 65_535, 12_345])
  route = htree.path_from_leaf(leaf, 16, 4)
  assert route.dtype == np.int32 and route.shape == (4, 4)
  np.testing.assert_array_equal(route[2], [15, 16 + 255, 272 + 4095, 4368 + 65_535])
  local = htree.local_ids(route, 16)
  # Nested numbering: i_l = i_{l-1} * k + c_l, and global ids round-trip.
  np.testing.assert_array_equal(local[:, 1:] // 16, local[:, :-1])
  np.testing.assert_array_equal(htree.global_ids(local, 16), route)


def test_subtrees_own_contiguous_rows():
  # Every leaf under level-1 node s lies in the local range [s k^{l-1}, (s+1) k^{l-1}).
  k, depth = 3, 4
  local = htree.local_ids(htree.path_from_leaf(np.arange(k ** depth), k, depth), k)
  for l in range(depth):
    np.testing.assert_array_equal(local[:, l] // k ** l, local[:, 0])


def test_kmeans_recovers_planted_clusters():
  # Given 4 x 4 planted clusters.
  x, leaf = _planted(np.random.default_rng(0))
  # When building a 4-way, 2-level tree.
  tree = htree.build_tree(x, htree.TreeConfig(branching=4, depth=2, seed=1))
  route = tree.route(x)
  # Then both levels are pure and the build counts are the routing counts.
  assert htree.purity(route[:, 0], leaf // 4) == 1.0
  assert htree.purity(route[:, 1], leaf) == 1.0
  assert len(np.unique(route[:, 1])) == 16
  np.testing.assert_array_equal(
      np.bincount(route.reshape(-1), minlength=tree.num_nodes), tree.counts)


def test_routing_deterministic():
  x = _skewed(np.random.default_rng(1), n=3000)
  cfg = htree.TreeConfig(branching=8, depth=2, num_iters=10, sample_size=1000, seed=3)
  a, b = htree.build_tree(x, cfg), htree.build_tree(x, cfg)
  np.testing.assert_array_equal(a.centroids, b.centroids)
  np.testing.assert_array_equal(a.route(x), b.route(x, batch_size=77))
  other = htree.build_tree(x, htree.TreeConfig(branching=8, depth=2, num_iters=10,
                                               sample_size=1000, seed=4))
  assert not np.array_equal(a.centroids, other.centroids)
  # Nearest-centroid descent, checked against brute force at each level.
  route = a.route(x[:50])
  for l in range(2):
    off = htree.level_offsets(8, 2)[l]
    parent = np.zeros(50, int) if l == 0 else htree.local_ids(route, 8)[:, l - 1]
    cand = off + parent[:, None] * 8 + np.arange(8)
    d = ((x[:50, None] - a.centroids[cand]) ** 2).sum(-1)
    np.testing.assert_array_equal(cand[np.arange(50), d.argmin(1)], route[:, l])


def test_balancing_caps_clusters():
  # Given data where one blob holds half the points.
  x = _skewed(np.random.default_rng(2))
  base = dict(branching=16, depth=2, num_iters=20, sample_size=6400, seed=0)
  # When building with the paper's rule (cap 1.5/16 = 0.094) and without it.
  bal = htree.build_tree(x, htree.TreeConfig(**base, balance=1.5))
  free = htree.build_tree(x, htree.TreeConfig(**base, balance=None))
  # Then greedy routing gives no child more than ~0.1 of its parent with the rule,
  # while plain k-means leaves the blob in one cluster.
  assert max(bal.child_fractions()) <= 0.11, bal.child_fractions()
  assert free.child_fractions()[0] >= 0.4, free.child_fractions()


def test_balance_assignments_rule():
  rng = np.random.default_rng(0)
  a = np.concatenate([np.zeros(700, int), rng.integers(1, 8, 300)])
  out = htree.balance_assignments(a, 8, 1.5, rng)
  counts = np.bincount(out, minlength=8)
  assert counts.sum() == 1000 and counts.max() <= 1.5 * 1000 / 8
  # Only the over-full cluster and the clusters it was split with changed.
  moved = out != a
  assert set(a[moved]) | set(out[moved]) <= set(range(8)) and (a[moved] == 0).any()
  balanced = np.arange(800) % 8
  np.testing.assert_array_equal(htree.balance_assignments(balanced, 8, 1.5, rng), balanced)


def test_few_points_and_empty_nodes():
  # Fewer points than k: duplicate centroids; routing stays in range and deterministic.
  x = hembed.l2_normalize(np.random.default_rng(0).standard_normal((5, 8)))
  tree = htree.build_tree(x, htree.TreeConfig(branching=4, depth=3))
  route = tree.route(x)
  off, size = htree.level_offsets(4, 3), htree.level_sizes(4, 3)
  assert ((route >= off) & (route < off + size)).all()
  assert tree.counts[:4].sum() == 5
  np.testing.assert_array_equal(route, tree.route(x))


def test_orbax_round_trip(tmp_path):
  # Given a tree saved as arrays (StandardSave) and metadata (JsonSave).
  x, _ = _planted(np.random.default_rng(3), n=600)
  tree = htree.build_tree(x, htree.TreeConfig(branching=4, depth=2, num_iters=5))
  json.dumps(tree.metadata())
  with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
    mngr.save(7, args=ocp.args.Composite(
        tree=ocp.args.StandardSave(tree.arrays()),
        tree_meta=ocp.args.JsonSave(tree.metadata())))
    mngr.wait_until_finished()
  # When restoring into abstract targets built from the metadata alone.
  with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
    meta = mngr.restore(7, args=ocp.args.Composite(tree_meta=ocp.args.JsonRestore()))["tree_meta"]
    arrays = mngr.restore(7, args=ocp.args.Composite(tree=ocp.args.StandardRestore(
        htree.HierTree.abstract_arrays(meta))))["tree"]
  back = htree.HierTree.from_checkpoint(arrays, meta)
  # Then everything, and so every route, is the same.
  assert back.config == tree.config and back.metadata() == tree.metadata()
  np.testing.assert_array_equal(back.centroids, tree.centroids)
  np.testing.assert_array_equal(back.counts, tree.counts)
  np.testing.assert_array_equal(back.route(x), tree.route(x))


def test_bad_inputs_name_the_field():
  tree = htree.build_tree(np.eye(4, dtype=np.float32), htree.TreeConfig(branching=2, depth=1))
  with pytest.raises(ValueError, match="^x:"):
    tree.route(np.zeros((3, 5), np.float32))
  with pytest.raises(ValueError, match="^x:"):
    htree.build_tree(np.zeros((0, 4), np.float32))
  with pytest.raises(ValueError, match="^branching:"):
    htree.TreeConfig(branching=1)
  with pytest.raises(ValueError, match="^balance:"):
    htree.TreeConfig(balance=0.5)
  with pytest.raises(ValueError, match="^centroids:"):
    htree.HierTree.from_checkpoint(
        {"centroids": np.zeros((3, 4)), "counts": np.zeros(2)}, tree.metadata())
  with pytest.raises(ValueError, match="^metadata.format:"):
    htree.HierTree.from_checkpoint(tree.arrays(), {**tree.metadata(), "format": "x"})
