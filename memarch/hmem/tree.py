"""The bank's tree: balanced hierarchical k-means and greedy routing (spec/hmem.md §1.2, §2).

**Method** [paper, Pouransari et al. 2025, §2 and App. C]:

* Documents are embedded (``memarch.hmem.embed``) and clustered by a tree of k-means
  with ``branching`` k children per node and ``depth`` p levels (paper: k = 16, p = 4,
  i.e. 16 / 256 / 4,096 / 65,536 clusters). Levels are built root to leaves: each
  node's k children are a k-means of the points routed to that node.
* Each k-means is EM with k-means++ initialisation, ``num_iters`` steps (paper: 20), each
  on ``sample_size`` fresh random points of the node (paper: 6,400; all points when the
  node has fewer).
* **Balancing** (the paper's rule): in every EM step, after the nearest-centroid
  assignment, while the largest cluster holds more than ``balance / k`` of the
  assignments (paper: 0.094 ≈ 1.5/16, so ``balance = 1.5``), the assignments of the
  largest and the smallest cluster are pooled and split randomly and evenly between the
  two (our reading of the paper's "split randomly and evenly with the smallest
  cluster"). Each such split strictly lowers the sum of squared cluster sizes, so it ends; it
  also stops when the two differ by at most one. The centroids are then the means of
  the balanced assignments, which pulls a starved centroid into an over-full region and
  splits it. Routing itself is the plain nearest-centroid descent, so balance is
  enforced through the centroids, not at routing time; ``HierTree.child_fractions``
  reports what it achieves.
* **Routing**: greedy descent; at each level pick the closest (L2) of the k children of
  the node chosen at the level above (k·p comparisons). Ties go to the lowest child.
  Build-time paths use the same descent, so a training document and a query with the
  same embedding get the same path. Routing distances are computed in float64 (EM
  assignments during the build in float32).

**Node numbering** (nested, spec §2) [ours]. Levels are l = 1..p (the root, level 0,
has no block). Level l has k^l nodes with *local* ids ``i_l`` in [0, k^l), nested as
``i_l = i_{l-1} * k + c_l`` (``c_l`` in [0, k) the child chosen at level l, ``i_0 = 0``),
so a level-1 subtree s owns the contiguous local range [s·k^{l-1}, (s+1)·k^{l-1}) at
level l. The *global* node id is ``offset_l + i_l`` with ``offset_l = k + k^2 + ... +
k^{l-1}`` (``offset_1 = 0``), i.e. levels are stored one after the other, root side
first; there are ``k + k^2 + ... + k^p`` nodes. For k = 16, p = 4 the offsets are
0, 16, 272, 4,368 and there are 69,904 nodes.

**A route** is int32 [B, p]: the global ids of the path's nodes at levels 1..p, one row
per sequence (``local_ids`` turns it into per-level rows of a level's block table).

**Checkpointing**: ``HierTree.arrays()`` is a dict of numpy arrays (a PyTree for
``ocp.args.StandardSave``) and ``HierTree.metadata()`` a JSON-able dict (for
``ocp.args.JsonSave``); ``HierTree.from_checkpoint`` rebuilds the tree from both, and
``HierTree.abstract_arrays(metadata)`` gives a ``StandardRestore`` target.

Everything is numpy and deterministic given ``TreeConfig.seed``: the generator of the
k-means at level l under parent p is seeded with ``(seed, l, p)``, so the result does not
depend on visiting order.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

FORMAT = "memarch.hmem.tree/1"


def level_sizes(branching: int, depth: int) -> np.ndarray:
  """int64 [depth]: k^l nodes at levels l = 1..depth."""
  return branching ** np.arange(1, depth + 1, dtype=np.int64)


def level_offsets(branching: int, depth: int) -> np.ndarray:
  """int64 [depth]: the global id of local node 0 of each level, k + ... + k^{l-1}."""
  sizes = level_sizes(branching, depth)
  return np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)


def num_nodes(branching: int, depth: int) -> int:
  """k + k^2 + ... + k^depth, the number of nodes with a block."""
  return int(level_sizes(branching, depth).sum())


def global_ids(local: np.ndarray, branching: int) -> np.ndarray:
  """Local per-level ids [..., depth] -> global node ids (int32), see the module docstring."""
  local = np.asarray(local)
  return (local + level_offsets(branching, local.shape[-1])).astype(np.int32)


def local_ids(route: np.ndarray, branching: int) -> np.ndarray:
  """Global node ids [..., depth] -> local per-level ids ``i_l`` (int32)."""
  route = np.asarray(route)
  return (route - level_offsets(branching, route.shape[-1])).astype(np.int32)


def path_from_leaf(leaf: np.ndarray, branching: int, depth: int) -> np.ndarray:
  """The route (global ids, int32 [..., depth]) ending at local leaf ids ``leaf``."""
  leaf = np.asarray(leaf, np.int64)[..., None]
  local = leaf // branching ** np.arange(depth - 1, -1, -1, dtype=np.int64)
  return global_ids(local, branching)


@dataclasses.dataclass(frozen=True)
class TreeConfig:
  """How the tree is built.

  Attributes:
    branching: k, children per node (paper: 16).
    depth: p, levels with blocks (paper: 4).
    num_iters: EM steps per k-means (paper: 20).
    sample_size: fresh random points per EM step (paper: 6,400); a node with fewer
      points uses all of them in every step.
    balance: a cluster may hold at most ``balance / k`` of a step's assignments
      (paper: 0.094 for k = 16, i.e. 1.5); None disables balancing.
    seed: seeds every k-means.
  """

  branching: int = 16
  depth: int = 4
  num_iters: int = 20
  sample_size: int = 6400
  balance: float | None = 1.5
  seed: int = 0

  def __post_init__(self):
    for field, low in (("branching", 2), ("depth", 1), ("num_iters", 1), ("sample_size", 1)):
      if int(getattr(self, field)) != getattr(self, field) or getattr(self, field) < low:
        raise ValueError(f"{field}: must be an integer >= {low}, got {getattr(self, field)!r}")
    if self.balance is not None and not self.balance > 1.0:
      raise ValueError(f"balance: must be > 1 (a cap above the mean size) or None, got "
                       f"{self.balance!r}")


def _sq_dists(x: np.ndarray, c: np.ndarray, dtype=np.float64) -> np.ndarray:
  """Squared L2 distances up to a per-row constant: ||c||^2 - 2 x.c, [n, k] in ``dtype``."""
  x, c = x.astype(dtype), c.astype(dtype)
  return (c * c).sum(-1) - 2.0 * x @ c.T


def _kmeans_pp(x: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
  """k-means++ seeding on the rows of ``x`` (repeats rows when they run out)."""
  n = x.shape[0]
  chosen = [int(rng.integers(n))]
  d2 = ((x - x[chosen[0]]) ** 2).sum(-1).astype(np.float64)
  for _ in range(1, k):
    total = d2.sum()
    i = int(rng.choice(n, p=d2 / total)) if total > 0 else int(rng.integers(n))
    chosen.append(i)
    d2 = np.minimum(d2, ((x - x[i]) ** 2).sum(-1))
  return x[chosen].astype(np.float32)


def balance_assignments(assign: np.ndarray, k: int, balance: float,
                        rng: np.random.Generator) -> np.ndarray:
  """The paper's rule: split an over-full cluster evenly with the smallest, repeatedly.

  Args:
    assign: int [m] cluster of each point.
    k: the number of clusters.
    balance: the cap is ``balance * m / k`` points per cluster.
    rng: draws the random splits.

  Returns:
    The balanced assignment (a new array).
  """
  a = np.array(assign, copy=True)
  counts = np.bincount(a, minlength=k)
  cap = balance * a.size / k
  while True:
    big, small = int(np.argmax(counts)), int(np.argmin(counts))
    if counts[big] <= cap or counts[big] - counts[small] <= 1:
      return a
    members = rng.permutation(np.flatnonzero((a == big) | (a == small)))
    half = members.size // 2
    a[members[:half]], a[members[half:]] = small, big
    counts[small], counts[big] = half, members.size - half


def kmeans(x: np.ndarray, k: int, rng: np.random.Generator, *, num_iters: int = 20,
           sample_size: int = 6400, balance: float | None = 1.5) -> np.ndarray:
  """Balanced EM k-means with k-means++ seeding and fresh samples per step.

  Args:
    x: float [n, D] points, n >= 1.
    k: the number of clusters.
    rng: the generator (the only source of randomness).
    num_iters: EM steps.
    sample_size: points drawn (without replacement) for each step.
    balance: see ``balance_assignments``; None: plain k-means.

  Returns:
    float32 [k, D] centroids. With fewer distinct points than k some centroids
    coincide; routing breaks the tie to the lowest index, so the others stay empty.
  """
  x = np.asarray(x, np.float32)
  n = x.shape[0]
  draw = lambda: x if n <= sample_size else x[rng.choice(n, sample_size, replace=False)]
  c = _kmeans_pp(draw(), k, rng)
  for _ in range(num_iters):
    s = draw()
    a = np.argmin(_sq_dists(s, c, np.float32), axis=1)
    if balance is not None:
      a = balance_assignments(a, k, balance, rng)
    counts = np.bincount(a, minlength=k)
    onehot = np.zeros((k, s.shape[0]), np.float32)
    onehot[a, np.arange(s.shape[0])] = 1.0
    sums = onehot @ s
    full = counts > 0
    c = c.copy()
    c[full] = (sums[full] / counts[full, None]).astype(np.float32)
    empty = np.flatnonzero(~full)
    if empty.size:   # only without balancing: re-seed at random points of the sample
      c[empty] = s[rng.choice(s.shape[0], empty.size, replace=s.shape[0] < empty.size)]
  return c


@dataclasses.dataclass(frozen=True, eq=False)
class HierTree:
  """A built tree: the centroids of every node and the build points' counts.

  Attributes:
    config: how it was built (``branching``, ``depth``, ...).
    centroids: float32 [num_nodes, D], row = global node id (module docstring).
    counts: int64 [num_nodes], build points routed through each node.
  """

  config: TreeConfig
  centroids: np.ndarray
  counts: np.ndarray

  @property
  def branching(self) -> int:
    """k."""
    return self.config.branching

  @property
  def depth(self) -> int:
    """p."""
    return self.config.depth

  @property
  def dim(self) -> int:
    """D, the embedding size."""
    return int(self.centroids.shape[1])

  @property
  def num_nodes(self) -> int:
    """k + ... + k^p."""
    return num_nodes(self.branching, self.depth)

  def route(self, x: np.ndarray, *, batch_size: int = 8192) -> np.ndarray:
    """Greedy root-to-leaf descent.

    Args:
      x: float [N, D] embeddings (the embedder's output, L2-normalised).
      batch_size: rows routed at once (bounds memory).

    Returns:
      int32 [N, depth], the global node ids of each path (module docstring).

    Raises:
      ValueError: ``x`` is not [N, D] with this tree's D.
    """
    x = np.asarray(x)
    if x.ndim != 2 or x.shape[1] != self.dim:
      raise ValueError(f"x: expected [N, {self.dim}] embeddings, got shape {x.shape}")
    out = np.zeros((x.shape[0], self.depth), np.int32)
    for lo in range(0, x.shape[0], batch_size):
      local = np.zeros(x[lo:lo + batch_size].shape[0], np.int64)
      for l, offset in enumerate(level_offsets(self.branching, self.depth)):
        local = _step(self.centroids, x[lo:lo + batch_size], local, int(offset), self.branching)
        out[lo:lo + batch_size, l] = offset + local
    return out

  def child_fractions(self) -> list[float]:
    """Per level l, the largest share of a node's build points that one child receives.

    A perfectly balanced tree gives 1/k at every level; the paper's rule targets at most
    about ``balance / k`` during EM.
    """
    k, out = self.branching, []
    parent = np.array([self.counts[:k].sum()])
    for l, off in enumerate(level_offsets(k, self.depth)):
      child = self.counts[off:off + k ** (l + 1)].reshape(-1, k)
      ok = parent > 0
      out.append(float((child[ok].max(1) / parent[ok]).max()) if ok.any() else 0.0)
      parent = child.reshape(-1)
    return out

  def arrays(self) -> dict[str, np.ndarray]:
    """The tree's arrays, a PyTree for ``ocp.args.StandardSave``."""
    return {"centroids": self.centroids, "counts": self.counts}

  def metadata(self) -> dict[str, Any]:
    """The tree's JSON-able description, for ``ocp.args.JsonSave``."""
    return {"format": FORMAT, "dim": self.dim, "num_nodes": self.num_nodes,
            **dataclasses.asdict(self.config)}

  @staticmethod
  def abstract_arrays(metadata: dict[str, Any]) -> dict[str, Any]:
    """``jax.ShapeDtypeStruct`` targets of ``arrays()`` for ``ocp.args.StandardRestore``."""
    import jax  # pylint: disable=g-import-not-at-top  (only checkpointing needs jax)

    n, d = int(metadata["num_nodes"]), int(metadata["dim"])
    return {"centroids": jax.ShapeDtypeStruct((n, d), np.float32),
            "counts": jax.ShapeDtypeStruct((n,), np.int64)}

  @classmethod
  def from_checkpoint(cls, arrays: dict[str, Any], metadata: dict[str, Any]) -> HierTree:
    """Rebuilds a tree from ``arrays()`` and ``metadata()`` (e.g. restored by Orbax).

    Raises:
      ValueError: naming the field that does not fit.
    """
    if metadata.get("format") != FORMAT:
      raise ValueError(f"metadata.format: expected {FORMAT!r}, got {metadata.get('format')!r}")
    fields = {f.name for f in dataclasses.fields(TreeConfig)}
    config = TreeConfig(**{k: v for k, v in metadata.items() if k in fields})
    centroids = np.asarray(arrays["centroids"], np.float32)
    counts = np.asarray(arrays["counts"]).astype(np.int64)
    n = num_nodes(config.branching, config.depth)
    if centroids.shape != (n, int(metadata["dim"])):
      raise ValueError(f"centroids: expected shape {(n, metadata['dim'])}, got {centroids.shape}")
    if counts.shape != (n,):
      raise ValueError(f"counts: expected shape {(n,)}, got {counts.shape}")
    return cls(config, centroids, counts)


def _step(centroids: np.ndarray, x: np.ndarray, parent: np.ndarray, offset: int,
          k: int) -> np.ndarray:
  """One level of the descent: local ids ``parent * k + argmin_c ||x - c||`` over children c.

  Rows are grouped by parent, so each group is one float64 matrix product.
  """
  out = np.empty_like(parent)
  order = np.argsort(parent, kind="stable")
  groups, starts = np.unique(parent[order], return_index=True)
  for p, lo, hi in zip(groups, starts, np.append(starts[1:], order.size)):
    rows = order[lo:hi]
    c = centroids[offset + p * k:offset + (p + 1) * k]
    out[rows] = p * k + np.argmin(_sq_dists(x[rows], c), axis=1)
  return out


def build_tree(x: np.ndarray, config: TreeConfig = TreeConfig()) -> HierTree:
  """Builds the balanced hierarchical k-means tree over embeddings ``x``.

  Args:
    x: float [N, D] document embeddings (L2-normalised, as ``embed`` returns), N >= 1.
    config: branching, depth, EM steps, sample size, balance and seed.

  Returns:
    The tree; ``tree.route(x)`` gives the build points' paths, and ``tree.counts`` how
    many build points pass through each node. A node that receives no build point gets
    k copies of its own centroid as children (any query reaching it then descends
    through child 0).

  Raises:
    ValueError: ``x`` is not a non-empty float [N, D] array.
  """
  x = np.asarray(x)
  if x.ndim != 2 or x.shape[0] < 1 or not np.issubdtype(x.dtype, np.floating):
    raise ValueError(f"x: expected non-empty float [N, D] embeddings, got {x.dtype} {x.shape}")
  x = x.astype(np.float32)
  k, depth = config.branching, config.depth
  offsets = level_offsets(k, depth)
  centroids = np.zeros((num_nodes(k, depth), x.shape[1]), np.float32)
  counts = np.zeros(num_nodes(k, depth), np.int64)
  parent = np.zeros(x.shape[0], np.int64)          # local id at the level above
  parent_centroid = np.zeros((1, x.shape[1]), np.float32)
  for l in range(depth):
    order = np.argsort(parent, kind="stable")
    bounds = np.searchsorted(parent[order], np.arange(k ** l + 1))
    for p in range(k ** l):
      rows = order[bounds[p]:bounds[p + 1]]
      lo = offsets[l] + p * k
      if rows.size:
        rng = np.random.default_rng([config.seed, l + 1, p])
        centroids[lo:lo + k] = kmeans(
            x[rows], k, rng, num_iters=config.num_iters,
            sample_size=config.sample_size, balance=config.balance)
      else:
        centroids[lo:lo + k] = parent_centroid[p]
    parent = _step(centroids, x, parent, offsets[l], k)
    counts[offsets[l]:offsets[l] + k ** (l + 1)] = np.bincount(parent, minlength=k ** (l + 1))
    parent_centroid = centroids[offsets[l]:offsets[l] + k ** (l + 1)]
  return HierTree(config, centroids, counts)


def purity(pred: np.ndarray, truth: np.ndarray) -> float:
  """Cluster purity: the share of points whose cluster's majority label is their label.

  Args:
    pred: int [N] predicted cluster ids (e.g. leaf global ids).
    truth: int [N] reference labels (e.g. the generator's leaves).

  Returns:
    A value in (0, 1]; 1 means every cluster is pure.
  """
  pred, truth = np.asarray(pred).ravel(), np.asarray(truth).ravel()
  _, p = np.unique(pred, return_inverse=True)
  _, t = np.unique(truth, return_inverse=True)
  table = np.zeros((p.max() + 1, t.max() + 1), np.int64)
  np.add.at(table, (p, t), 1)
  return float(table.max(1).sum() / pred.size)

