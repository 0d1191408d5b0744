"""Synthetic long-tail facts (spec/hmem.md §5) [ours]: does a routed memory learn rare facts?

**World** (fixed by ``world_seed``; ``make_world``):

* A topic tree with ``branching`` children per node and ``levels`` levels (default 16 x
  16 = 256 leaves). Every node of level l owns ``words_per_node[l]`` topic words
  (default 16 per level-1 topic, 8 per leaf).
* ``entities_per_leaf`` entities per leaf that documents talk about, plus
  ``unseen_per_leaf`` entities per leaf that no training document mentions (the rule
  probe and a guaranteed 0-exposure bucket). Each entity has a unique name of
  ``name_len`` syllables out of ``num_syllables``; multi-token names keep the embedding
  table from storing the facts.
* Facts: f(e, r) for the ``num_relations`` relations, uniform over the ``num_values``
  values, or, with ``value_topic_bias = m > 0``, uniform over an m-value subset per leaf.
* A rule relation: f(e, r_rule) = g(first syllable of e), g a fixed random map from
  syllables to values; it can be learned from any document and generalises to unseen
  entities (common-knowledge probe).

**Vocabulary** (``Vocab``): PAD 0, BOS 1, SEP 2, the relations, the rule relation, the
values, the syllables, then the topic words level by level (2,632 tokens by default).

**Training documents** (``data_seed``; ``sample_documents``), ``seq_len`` tokens each::

  BOS, topic words (words_per_doc[l] of each level-l ancestor's words, shuffled),
  then statements  name_1 .. name_n rel val SEP  while they fit, then PAD.

* The leaf is uniform, or Zipf(``topic_zipf``) over a random order of the level-1
  topics and uniform below.
* Each statement's entity is Zipf(``entity_zipf``) over a random permutation of the
  leaf's seen entities; its relation is the rule relation with probability ``p_rule``
  and otherwise uniform.
* Targets are the next token (-100 at padding and at the last token); with
  ``loss_on="values"`` only the values after a relation are scored.

**Questions** (held out: they are never training records)::

  BOS, topic words of the entity's leaf (drawn as in documents), name, rel   -> val

The only scored target is the value (at the position of ``rel``). A fact's *exposures*
are the training statements that state it; questions are grouped into ``BUCKETS`` by
exposures: {0, 1-2, 3-8, 9-32, 33-128, >128}. Splits:

* ``test_head``: up to ``num_test_per_bucket`` facts from each of the buckets 33-128 and
  >128; ``test_tail``: likewise from 0, 1-2, 3-8, 9-32 (the 0 bucket must sit at chance);
* ``test_rule``: the rule relation on unseen entities (up to
  ``num_test_per_bucket * len(BUCKETS)``).

**Routes**: every record carries ``route`` int32 [levels], global tree-node ids in the
numbering of ``memarch.hmem.tree`` (level l has branching^l nodes after an offset of
branching + ... + branching^{l-1}), and ``oracle_route``, the generator's own path in the
same numbering. With ``routing="kmeans"`` (default) ``route`` comes from a balanced
hierarchical k-means (branching, levels) over ``HashedNgramEmbedder`` embeddings of
the training documents, and questions are routed from their own tokens (no value);
with ``routing="oracle"`` it is ``oracle_route``.
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Any, NamedTuple

import numpy as np

from memarch.hmem import embed as hembed
from memarch.hmem import tree as htree

IGNORE = -100
PAD, BOS, SEP = 0, 1, 2
#: Exposure buckets as inclusive (low, high) ranges; the last is open.
BUCKETS = ((0, 0), (1, 2), (3, 8), (9, 32), (33, 128), (129, np.iinfo(np.int32).max))
HEAD_BUCKETS, TAIL_BUCKETS = (4, 5), (0, 1, 2, 3)
SPLITS = ("train", "test_head", "test_tail", "test_rule")


@dataclasses.dataclass(frozen=True)
class FactsConfig:
  """Every knob of the task; the defaults are spec/hmem.md §5.

  Attributes:
    world_seed: fixes the world (names, facts, topic words, Zipf orders).
    data_seed: fixes the documents, the question draws and the tree's k-means.
    branching: children per topic node (16).
    levels: topic levels (2: 256 leaves; 3: 4,096, e.g. with ``words_per_node=(16, 8,
      8)`` and ``words_per_doc=(4, 2, 2)``).
    words_per_node: topic words owned by each node of level 1..levels.
    words_per_doc: topic words each document draws from its level-l ancestor.
    entities_per_leaf: entities per leaf that documents mention (128).
    unseen_per_leaf: further entities per leaf never mentioned in training.
    num_syllables: name syllables (64).
    name_len: syllables per name (3).
    num_relations: R, ordinary relations (4); the rule relation comes on top.
    num_values: values a fact can take (256).
    value_topic_bias: 0, or m: each leaf's facts take values from its own m-subset.
    entity_zipf: Zipf exponent of entity frequencies within a leaf (1.1).
    topic_zipf: Zipf exponent of level-1 topic popularity (0: uniform leaves).
    p_rule: probability that a statement uses the rule relation (0.1).
    seq_len: T, tokens per training document (128).
    num_train: training documents (2^25 tokens / 128 = 262,144).
    num_test_per_bucket: questions drawn per exposure bucket.
    loss_on: "all" (next token everywhere) or "values".
    routing: "kmeans" (embedder + tree) or "oracle" (the generator's path).
    embed_dim: D of the default embedder used for routing.
    tree_iters: EM steps per k-means of the routing tree.
  """

  world_seed: int = 0
  data_seed: int = 0
  branching: int = 16
  levels: int = 2
  words_per_node: tuple[int, ...] = (16, 8)
  words_per_doc: tuple[int, ...] = (4, 4)
  entities_per_leaf: int = 128
  unseen_per_leaf: int = 8
  num_syllables: int = 64
  name_len: int = 3
  num_relations: int = 4
  num_values: int = 256
  value_topic_bias: int = 0
  entity_zipf: float = 1.1
  topic_zipf: float = 0.0
  p_rule: float = 0.1
  seq_len: int = 128
  num_train: int = 262_144
  num_test_per_bucket: int = 512
  loss_on: str = "all"
  routing: str = "kmeans"
  embed_dim: int = 512
  tree_iters: int = 20

  @property
  def num_leaves(self) -> int:
    """branching^levels."""
    return self.branching ** self.levels

  @property
  def entities_per_leaf_total(self) -> int:
    """Seen plus unseen entities per leaf."""
    return self.entities_per_leaf + self.unseen_per_leaf

  @property
  def num_entities(self) -> int:
    """E, all entities."""
    return self.num_leaves * self.entities_per_leaf_total

  @property
  def statement_len(self) -> int:
    """Tokens per statement: name, rel, val, SEP."""
    return self.name_len + 3

  @property
  def statements_per_doc(self) -> int:
    """Statements that fit after BOS and the topic words."""
    return (self.seq_len - 1 - sum(self.words_per_doc)) // self.statement_len

  @property
  def question_len(self) -> int:
    """Length of question records: BOS, topic words, name, rel, rounded up to 8."""
    n = 1 + sum(self.words_per_doc) + self.name_len + 1
    return -(-n // 8) * 8

  def validate(self, prefix: str = "") -> None:
    """Raises a ValueError naming the first bad field (``prefix`` is prepended)."""
    ints = ("branching", "levels", "entities_per_leaf", "num_syllables", "name_len",
            "num_relations", "num_values", "seq_len", "num_train", "num_test_per_bucket",
            "embed_dim", "tree_iters")
    for field in ints:
      v = getattr(self, field)
      if int(v) != v or v < (2 if field == "branching" else 1):
        raise ValueError(f"{prefix}{field}: must be a positive integer"
                         f"{' >= 2' if field == 'branching' else ''}, got {v!r}")
    if self.unseen_per_leaf < 0:
      raise ValueError(f"{prefix}unseen_per_leaf: must be >= 0, got {self.unseen_per_leaf}")
    for field in ("words_per_node", "words_per_doc"):
      if len(getattr(self, field)) != self.levels:
        raise ValueError(f"{prefix}{field}: needs one entry per level ({self.levels}), got "
                         f"{getattr(self, field)!r}")
    for l, (have, take) in enumerate(zip(self.words_per_node, self.words_per_doc)):
      if not 0 <= take <= have or have < 1:
        raise ValueError(f"{prefix}words_per_doc: level {l + 1} takes {take} of "
                         f"{have} words")
    if self.num_syllables ** self.name_len < self.num_entities:
      raise ValueError(f"{prefix}num_syllables: {self.num_syllables}^{self.name_len} names "
                       f"cannot name {self.num_entities} entities")
    if not 0 <= self.value_topic_bias <= self.num_values:
      raise ValueError(f"{prefix}value_topic_bias: must be in [0, num_values], got "
                       f"{self.value_topic_bias}")
    if not 0.0 <= self.p_rule <= 1.0:
      raise ValueError(f"{prefix}p_rule: must be in [0, 1], got {self.p_rule}")
    for field in ("entity_zipf", "topic_zipf"):
      if getattr(self, field) < 0:
        raise ValueError(f"{prefix}{field}: must be >= 0, got {getattr(self, field)}")
    if self.statements_per_doc < 1:
      raise ValueError(f"{prefix}seq_len: {self.seq_len} leaves no room for a statement")
    if self.loss_on not in ("all", "values"):
      raise ValueError(f"{prefix}loss_on: must be 'all' or 'values', got {self.loss_on!r}")
    if self.routing not in ("kmeans", "oracle"):
      raise ValueError(f"{prefix}routing: must be 'kmeans' or 'oracle', got {self.routing!r}")


class Vocab(NamedTuple):
  """Token id layout.

  Attributes:
    relation: id of relation 0 (relation r is ``relation + r``).
    rule: id of the rule relation.
    value: id of value 0.
    syllable: id of syllable 0.
    words: id of the first topic word of each level.
    size: the vocabulary size.
  """

  relation: int
  rule: int
  value: int
  syllable: int
  words: tuple[int, ...]
  size: int


def vocab(cfg: FactsConfig) -> Vocab:
  """The token layout of ``cfg`` (module docstring)."""
  rel = 3
  rule = rel + cfg.num_relations
  val = rule + 1
  syl = val + cfg.num_values
  start, words = syl + cfg.num_syllables, []
  for l, w in enumerate(cfg.words_per_node):
    words.append(start)
    start += cfg.branching ** (l + 1) * w
  return Vocab(rel, rule, val, syl, tuple(words), start)


class World(NamedTuple):
  """A generated world (all arrays are numpy; ids are local, not tokens).

  Attributes:
    names: int32 [E, name_len] syllables of each entity's name.
    leaf: int32 [E] the entity's leaf (local id in [0, branching^levels)).
    seen: bool [E] whether documents may mention the entity.
    zipf_order: int32 [leaves, entities_per_leaf] seen entities of each leaf by
      decreasing frequency (Zipf rank 0 first).
    facts: int32 [E, R] value of f(e, r).
    rule_map: int32 [num_syllables] the rule's value per first syllable.
    topic_words: per level l, int32 [branching^l, words_per_node[l]] token ids.
    topic_order: int32 [branching] level-1 topics by decreasing popularity.
  """

  names: np.ndarray
  leaf: np.ndarray
  seen: np.ndarray
  zipf_order: np.ndarray
  facts: np.ndarray
  rule_map: np.ndarray
  topic_words: tuple[np.ndarray, ...]
  topic_order: np.ndarray


def make_world(cfg: FactsConfig) -> World:
  """Generates the world of ``cfg.world_seed`` (deterministic)."""
  cfg.validate()
  rng = np.random.default_rng([cfg.world_seed, 1])
  e, per = cfg.num_entities, cfg.entities_per_leaf_total
  code = rng.choice(cfg.num_syllables ** cfg.name_len, size=e, replace=False)
  names = (code[:, None] // cfg.num_syllables ** np.arange(cfg.name_len - 1, -1, -1)
           % cfg.num_syllables).astype(np.int32)
  leaf = (np.arange(e) // per).astype(np.int32)
  seen = np.arange(e) % per < cfg.entities_per_leaf
  base = np.arange(cfg.num_leaves)[:, None] * per
  zipf_order = (base + rng.permuted(np.tile(np.arange(cfg.entities_per_leaf),
                                            (cfg.num_leaves, 1)), axis=1)).astype(np.int32)
  if cfg.value_topic_bias:
    subsets = np.argsort(rng.random((cfg.num_leaves, cfg.num_values)), axis=1)
    subsets = subsets[:, :cfg.value_topic_bias]
    pick = rng.integers(0, cfg.value_topic_bias, size=(e, cfg.num_relations))
    facts = np.take_along_axis(subsets[leaf], pick, axis=1)
  else:
    facts = rng.integers(0, cfg.num_values, size=(e, cfg.num_relations))
  rule_map = rng.integers(0, cfg.num_values, size=cfg.num_syllables)
  v = vocab(cfg)
  topic_words = tuple(
      (v.words[l] + np.arange(cfg.branching ** (l + 1) * w).reshape(-1, w)).astype(np.int32)
      for l, w in enumerate(cfg.words_per_node))
  topic_order = rng.permutation(cfg.branching).astype(np.int32)
  return World(names, leaf, seen, zipf_order, facts.astype(np.int32),
               rule_map.astype(np.int32), topic_words, topic_order)


def world_hash(world: World) -> str:
  """SHA-256 of every array of the world (shapes, dtypes and bytes), hex."""
  h = hashlib.sha256()
  for a in (*world[:6], *world.topic_words, world.topic_order):
    a = np.ascontiguousarray(a)
    h.update(f"{a.dtype.str}{a.shape}".encode())
    h.update(a.tobytes())
  return h.hexdigest()


def _zipf_probs(n: int, s: float) -> np.ndarray:
  p = (np.arange(1, n + 1, dtype=np.float64)) ** -s
  return p / p.sum()


def _topic_words(cfg: FactsConfig, world: World, leaf: np.ndarray,
                 rng: np.random.Generator) -> np.ndarray:
  """int32 [n, sum(words_per_doc)]: each row's ancestors' words, drawn and shuffled."""
  parts = []
  for l, (have, take) in enumerate(zip(cfg.words_per_node, cfg.words_per_doc)):
    node = leaf // cfg.branching ** (cfg.levels - 1 - l)
    pick = np.argsort(rng.random((leaf.size, have)), axis=1)[:, :take]
    parts.append(np.take_along_axis(world.topic_words[l][node], pick, axis=1))
  words = np.concatenate(parts, axis=1)
  return np.take_along_axis(words, np.argsort(rng.random(words.shape), axis=1), axis=1)


def oracle_routes(cfg: FactsConfig, leaf: np.ndarray) -> np.ndarray:
  """int32 [n, levels] the generator's path to local leaves ``leaf`` (global node ids)."""
  return htree.path_from_leaf(leaf, cfg.branching, cfg.levels)


def blocked_routes(cfg: FactsConfig, route: np.ndarray) -> np.ndarray:
  """The "blocked" variant (spec §5.3): each route moved to a leaf in another topic.

  Args:
    cfg: the task config.
    route: int32 [n, levels] routes (global node ids).

  Returns:
    int32 [n, levels]: the path to leaf ``(leaf + num_leaves / 2) mod num_leaves``, whose
    level-1 node differs from the original one (so no block on the path is shared).
  """
  leaf = htree.local_ids(route, cfg.branching)[:, -1]
  return htree.path_from_leaf((leaf + cfg.num_leaves // 2) % cfg.num_leaves,
                              cfg.branching, cfg.levels)


class Documents(NamedTuple):
  """Training documents.

  Attributes:
    tokens: int32 [n, seq_len] (PAD after the last statement).
    leaf: int32 [n] each document's leaf.
    entity: int32 [n, S] each statement's entity.
    relation: int32 [n, S] each statement's relation (R = the rule relation).
    exposures: int64 [E, R] how many statements state each ordinary fact.
  """

  tokens: np.ndarray
  leaf: np.ndarray
  entity: np.ndarray
  relation: np.ndarray
  exposures: np.ndarray


def sample_documents(cfg: FactsConfig, world: World, num: int | None = None) -> Documents:
  """Draws the training documents (``data_seed``; module docstring).

  Args:
    cfg: the task config.
    world: ``make_world(cfg)``.
    num: documents to draw (default ``cfg.num_train``).

  Returns:
    The documents and the exposure count of every fact.
  """
  num = cfg.num_train if num is None else num
  rng = np.random.default_rng([cfg.data_seed, 2])
  v = vocab(cfg)
  below = cfg.num_leaves // cfg.branching
  topic = world.topic_order[rng.choice(cfg.branching, num, p=_zipf_probs(cfg.branching,
                                                                          cfg.topic_zipf))]
  leaf = (topic * below + rng.integers(0, below, num)).astype(np.int32)
  s = cfg.statements_per_doc
  rank = rng.choice(cfg.entities_per_leaf, (num, s), p=_zipf_probs(cfg.entities_per_leaf,
                                                                    cfg.entity_zipf))
  entity = world.zipf_order[leaf[:, None], rank]
  rule = rng.random((num, s)) < cfg.p_rule
  relation = np.where(rule, cfg.num_relations,
                      rng.integers(0, cfg.num_relations, (num, s))).astype(np.int32)
  value = np.where(rule, world.rule_map[world.names[entity, 0]],
                   world.facts[entity, np.minimum(relation, cfg.num_relations - 1)])
  stmt = np.concatenate([
      v.syllable + world.names[entity],
      (v.relation + relation)[..., None],
      (v.value + value)[..., None],
      np.full((num, s, 1), SEP)], axis=-1).reshape(num, -1)
  tokens = np.full((num, cfg.seq_len), PAD, np.int32)
  header = np.concatenate([np.full((num, 1), BOS), _topic_words(cfg, world, leaf, rng)], 1)
  tokens[:, :header.shape[1]] = header
  tokens[:, header.shape[1]:header.shape[1] + stmt.shape[1]] = stmt
  ordinary = ~rule
  exposures = np.bincount(entity[ordinary] * cfg.num_relations + relation[ordinary],
                          minlength=cfg.num_entities * cfg.num_relations)
  return Documents(tokens, leaf, entity.astype(np.int32), relation,
                   exposures.reshape(cfg.num_entities, cfg.num_relations))


def document_targets(cfg: FactsConfig, tokens: np.ndarray) -> np.ndarray:
  """int32 targets of documents: the next token, or only values (``loss_on``)."""
  v = vocab(cfg)
  nxt = np.concatenate([tokens[:, 1:], np.full((tokens.shape[0], 1), PAD)], 1)
  keep = nxt != PAD
  if cfg.loss_on == "values":
    keep &= (tokens >= v.relation) & (tokens <= v.rule)
  return np.where(keep, nxt, IGNORE).astype(np.int32)


def bucket_of(exposures: np.ndarray) -> np.ndarray:
  """int32 bucket index (into ``BUCKETS``) of each exposure count."""
  lows = np.array([lo for lo, _ in BUCKETS])
  return (np.searchsorted(lows, np.asarray(exposures), side="right") - 1).astype(np.int32)


class Questions(NamedTuple):
  """Held-out questions of one split.

  Attributes:
    inputs: int32 [n, question_len]: BOS, topic words, name, rel, PAD...
    targets: int32 [n, question_len]: -100 except the value token at ``rel``.
    entity: int32 [n].
    relation: int32 [n] (R = the rule relation).
    exposures: int32 [n] training statements of the fact (0 for rule questions on
      unseen entities, which are never mentioned).
    leaf: int32 [n] the entity's leaf.
  """

  inputs: np.ndarray
  targets: np.ndarray
  entity: np.ndarray
  relation: np.ndarray
  exposures: np.ndarray
  leaf: np.ndarray


def _questions(cfg: FactsConfig, world: World, entity: np.ndarray, relation: np.ndarray,
               exposures: np.ndarray, rng: np.random.Generator) -> Questions:
  v = vocab(cfg)
  n = entity.size
  leaf = world.leaf[entity]
  rule = relation == cfg.num_relations
  value = np.where(rule, world.rule_map[world.names[entity, 0]],
                   world.facts[entity, np.minimum(relation, cfg.num_relations - 1)])
  q = np.concatenate([np.full((n, 1), BOS), _topic_words(cfg, world, leaf, rng),
                      v.syllable + world.names[entity], (v.relation + relation)[:, None]], 1)
  inputs = np.full((n, cfg.question_len), PAD, np.int32)
  inputs[:, :q.shape[1]] = q
  targets = np.full((n, cfg.question_len), IGNORE, np.int32)
  targets[:, q.shape[1] - 1] = v.value + value
  return Questions(inputs, targets, entity.astype(np.int32), relation.astype(np.int32),
                   exposures.astype(np.int32), leaf.astype(np.int32))


def sample_questions(cfg: FactsConfig, world: World, docs: Documents) -> dict[str, Questions]:
  """Draws the ``test_head``, ``test_tail`` and ``test_rule`` questions (module docstring).

  Facts are drawn without replacement, uniformly within each exposure bucket, so every
  bucket is represented however rare it is.
  """
  rng = np.random.default_rng([cfg.data_seed, 3])
  flat = docs.exposures.reshape(-1)
  buckets = bucket_of(flat)
  out = {}
  for split, which in (("test_head", HEAD_BUCKETS), ("test_tail", TAIL_BUCKETS)):
    ids = []
    for b in which:
      pool = np.flatnonzero(buckets == b)
      ids.append(np.sort(rng.choice(pool, min(pool.size, cfg.num_test_per_bucket),
                                    replace=False)))
    ids = np.concatenate(ids)
    out[split] = _questions(cfg, world, ids // cfg.num_relations, ids % cfg.num_relations,
                            flat[ids], rng)
  unseen = np.flatnonzero(~world.seen)
  pick = np.sort(rng.choice(unseen, min(unseen.size, cfg.num_test_per_bucket * len(BUCKETS)),
                            replace=False))
  out["test_rule"] = _questions(cfg, world, pick, np.full(pick.size, cfg.num_relations),
                                np.zeros(pick.size, np.int64), rng)
  return out


def make_embedder(cfg: FactsConfig, corpus: np.ndarray) -> hembed.HashedNgramEmbedder:
  """The default routing embedder: token unigrams with IDF from ``corpus``, PAD ignored.

  Unigrams with IDF, because bigrams of names and values are many, rare and topic-free
  (noise), and IDF zeroes the separators and relations every document holds.
  """
  return hembed.HashedNgramEmbedder(dim=cfg.embed_dim, token_orders=(1,), ignore_ids=(PAD,),
                                    seed=cfg.world_seed).fit_idf(corpus)


def fit_router(cfg: FactsConfig, doc_tokens: np.ndarray,
               embedder: hembed.Embedder | None = None) -> tuple[hembed.Embedder, htree.HierTree]:
  """Builds the routing tree over the training documents (deterministic).

  Args:
    cfg: the task config (branching, levels, tree_iters, data_seed).
    doc_tokens: int32 [n, seq_len] training documents.
    embedder: any embedder; default ``make_embedder(cfg, doc_tokens)``.

  Returns:
    ``(embedder, tree)``; route a batch of token rows with
    ``tree.route(embed.embed(embedder, rows))``.
  """
  embedder = make_embedder(cfg, doc_tokens) if embedder is None else embedder
  x = hembed.embed(embedder, doc_tokens, batch_size=8192)
  tree = htree.build_tree(x, htree.TreeConfig(
      branching=cfg.branching, depth=cfg.levels, num_iters=cfg.tree_iters,
      seed=cfg.data_seed))
  return embedder, tree


@dataclasses.dataclass(frozen=True)
class FactsData:
  """Everything the task generates.

  Attributes:
    config: the config.
    world: the world.
    docs: the training documents.
    questions: ``{"test_head", "test_tail", "test_rule"} -> Questions``.
    routes: split -> int32 [n, levels] routes used by the records.
    stats: JSON-able numbers: ``train_purity`` (leaf purity of the k-means routes against
      the generator's leaves), ``question_route_agreement`` per test split (share of
      questions routed to the leaf most of their leaf's training documents go to), and
      per-split bucket counts.
    tree: the routing tree (None with ``routing="oracle"``).
  """

  config: FactsConfig
  world: World
  docs: Documents
  questions: dict[str, Questions]
  routes: dict[str, np.ndarray]
  stats: dict[str, Any]
  tree: htree.HierTree | None

  def records(self, split: str):
    """Yields the records of ``split`` as dicts of numpy arrays (see facts_tfds)."""
    cfg = self.config
    route = self.routes[split]
    if split == "train":
      tokens = self.docs.tokens
      targets = document_targets(cfg, tokens)
      oracle = oracle_routes(cfg, self.docs.leaf)
      seg = (tokens != PAD).astype(np.int32)
      for i in range(tokens.shape[0]):
        yield {"inputs": tokens[i], "targets": targets[i], "segment_ids": seg[i],
               "route": route[i], "oracle_route": oracle[i], "exposures": np.int32(-1),
               "bucket": np.int32(-1), "entity": np.int32(-1), "relation": np.int32(-1)}
      return
    q = self.questions[split]
    oracle = oracle_routes(cfg, q.leaf)
    seg = (q.inputs != PAD).astype(np.int32)
    buckets = bucket_of(q.exposures)
    for i in range(q.inputs.shape[0]):
      yield {"inputs": q.inputs[i], "targets": q.targets[i], "segment_ids": seg[i],
             "route": route[i], "oracle_route": oracle[i], "exposures": q.exposures[i],
             "bucket": buckets[i], "entity": q.entity[i], "relation": q.relation[i]}


def generate(cfg: FactsConfig, embedder: hembed.Embedder | None = None) -> FactsData:
  """Generates the world, documents, questions and routes of ``cfg``.

  Args:
    cfg: the task config (validated).
    embedder: routing embedder for ``routing="kmeans"`` (default ``make_embedder``).

  Returns:
    The ``FactsData``.
  """
  cfg.validate()
  world = make_world(cfg)
  docs = sample_documents(cfg, world)
  questions = sample_questions(cfg, world, docs)
  stats: dict[str, Any] = {
      f"{s}_bucket_counts": np.bincount(bucket_of(q.exposures), minlength=len(BUCKETS)).tolist()
      for s, q in questions.items()}
  if cfg.routing == "oracle":
    tree = None
    routes = {"train": oracle_routes(cfg, docs.leaf),
              **{s: oracle_routes(cfg, q.leaf) for s, q in questions.items()}}
  else:
    embedder, tree = fit_router(cfg, docs.tokens, embedder)
    routes = {"train": tree.route(hembed.embed(embedder, docs.tokens, batch_size=8192))}
    for s, q in questions.items():
      routes[s] = tree.route(hembed.embed(embedder, q.inputs, batch_size=8192))
    stats["train_purity"] = htree.purity(routes["train"][:, -1], docs.leaf)
    # The route most training documents of each generator leaf take.
    table = np.zeros((cfg.num_leaves, htree.num_nodes(cfg.branching, cfg.levels)), np.int64)
    np.add.at(table, (docs.leaf, routes["train"][:, -1]), 1)
    majority = table.argmax(1)
    for s, q in questions.items():
      stats[f"{s}_route_agreement"] = float((routes[s][:, -1] == majority[q.leaf]).mean())
    stats["tree_child_fractions"] = tree.child_fractions()
  return FactsData(cfg, world, docs, questions, routes, stats, tree)
