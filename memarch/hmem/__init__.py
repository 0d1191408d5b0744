"""Hierarchical parametric memories (spec/hmem.md): the bank's tree and its embedder.

* ``memarch.hmem.tree``: balanced hierarchical k-means, greedy root-to-leaf routing and
  the node numbering a route uses (numpy, offline).
* ``memarch.hmem.embed``: the pluggable document embedder (default: hashed n-grams and
  a fixed random projection); ``memarch.hmem.embed.embed`` runs any embedder.
"""

from memarch.hmem.embed import HashedNgramEmbedder
from memarch.hmem.tree import HierTree
from memarch.hmem.tree import TreeConfig
from memarch.hmem.tree import build_tree
from memarch.hmem.tree import global_ids
from memarch.hmem.tree import level_offsets
from memarch.hmem.tree import local_ids

__all__ = ["HashedNgramEmbedder", "HierTree", "TreeConfig", "build_tree", "global_ids",
           "level_offsets", "local_ids"]
