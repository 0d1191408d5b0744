"""Synthetic long-tail facts (spec/hmem.md §5): world, Zipf exposures, held-out questions,
routes and the TFDS builder."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from memarch.data import facts
from memarch.data import facts_tfds
from memarch.data import pipeline
from memarch.hmem import tree as htree

# The default world (world_seed=0): a change of this hash changes every experiment's data.
WORLD0_SHA256 = "4a80858f7fa5e54b4571f1fdf076a806398c7b252fc04afc6d83879558929109"


@pytest.fixture(scope="module")
def tiny():
  """The ``tiny`` standard config's generated data."""
  return facts.generate(_standard("tiny"))


def _standard(name: str) -> facts.FactsConfig:
  return {c.name: c for c in facts_tfds.STANDARD_CONFIGS}[name].facts


def _count_statements(tokens: np.ndarray, pattern: np.ndarray) -> int:
  """Occurrences of the token sequence ``pattern`` in the rows of ``tokens``."""
  n = len(pattern)
  windows = np.lib.stride_tricks.sliding_window_view(tokens, n, axis=1)
  return int((windows == pattern).all(-1).sum())


def test_world_golden():
  cfg = facts.FactsConfig()
  world = facts.make_world(cfg)
  assert facts.world_hash(world) == WORLD0_SHA256
  # Golden sizes of spec §5.1.
  v = facts.vocab(cfg)
  assert v.size == 3 + 5 + 256 + 64 + 16 * 16 + 256 * 8 == 2632
  assert world.names.shape == (256 * 136, 3) and world.facts.shape == (256 * 136, 4)
  assert len(np.unique(world.names, axis=0)) == 256 * 136            # names are unique
  assert world.seen.sum() == 256 * 128
  assert cfg.statements_per_doc == 19 and cfg.question_len == 16
  # The world depends on world_seed only.
  assert facts.world_hash(facts.make_world(facts.FactsConfig(num_train=7, data_seed=3))) == \
      WORLD0_SHA256
  assert facts.world_hash(facts.make_world(facts.FactsConfig(world_seed=1))) != WORLD0_SHA256


def test_document_format_and_targets():
  cfg = facts.FactsConfig(num_train=64)
  world = facts.make_world(cfg)
  docs = facts.sample_documents(cfg, world)
  v = facts.vocab(cfg)
  t = docs.tokens
  assert t.shape == (64, 128) and t.dtype == np.int32
  assert (t[:, 0] == facts.BOS).all()
  header = t[:, 1:9]
  assert ((header >= v.words[0]) & (header < v.size)).all()
  # 4 words from the leaf's own list and 4 from its topic's.
  leaf_words = world.topic_words[1][docs.leaf]
  topic_words = world.topic_words[0][docs.leaf // 16]
  for i in range(64):
    assert np.isin(header[i], leaf_words[i]).sum() == 4
    assert np.isin(header[i], topic_words[i]).sum() == 4
  stmts = t[:, 9:9 + 19 * 6].reshape(64, 19, 6)
  assert (stmts[..., 5] == facts.SEP).all() and (t[:, 9 + 19 * 6:] == facts.PAD).all()
  ent, rel = docs.entity, docs.relation
  np.testing.assert_array_equal(stmts[..., :3], v.syllable + world.names[ent])
  np.testing.assert_array_equal(stmts[..., 3], v.relation + rel)
  rule = rel == cfg.num_relations
  want = np.where(rule, world.rule_map[world.names[ent, 0]],
                  world.facts[ent, np.minimum(rel, 3)])
  np.testing.assert_array_equal(stmts[..., 4], v.value + want)
  assert world.leaf[ent].tolist() == np.repeat(docs.leaf[:, None], 19, 1).tolist()
  assert world.seen[ent].all()
  # Targets: next token, ignoring padding; "values" scores only the values.
  tg = facts.document_targets(cfg, t)
  np.testing.assert_array_equal(tg[:, :9 + 19 * 6 - 1], t[:, 1:9 + 19 * 6])
  assert (tg[:, 9 + 19 * 6 - 1:] == facts.IGNORE).all()
  tv = facts.document_targets(facts.FactsConfig(loss_on="values"), t)
  scored = tv != facts.IGNORE
  assert scored.sum() == 64 * 19
  assert ((tv[scored] >= v.value) & (tv[scored] < v.syllable)).all()


def test_zipf_frequencies():
  # Given 4,096 documents of the default world (78k statements).
  cfg = facts.FactsConfig(num_train=4096)
  world = facts.make_world(cfg)
  docs = facts.sample_documents(cfg, world)
  # When counting statements by the entity's Zipf rank within its leaf.
  rank_of = np.zeros(cfg.num_entities, int)
  rank_of[world.zipf_order.reshape(-1)] = np.tile(np.arange(128), 256)
  freq = np.bincount(rank_of[docs.entity].reshape(-1), minlength=128) / docs.entity.size
  # Then they follow p(r) ∝ (r + 1)^-1.1: head within 4 sigma, log-log slope -1.1.
  p = np.arange(1, 129.0) ** -1.1
  p /= p.sum()
  sigma = np.sqrt(p * (1 - p) / docs.entity.size)
  assert (np.abs(freq[:8] - p[:8]) < 4 * sigma[:8]).all(), (freq[:8], p[:8])
  ranks = np.arange(1, 33)
  slope = np.polyfit(np.log(ranks), np.log(freq[:32]), 1)[0]
  assert slope == pytest.approx(-1.1, abs=0.1)
  # Exposures are the per-fact statement counts; the rule relation never counts.
  assert docs.exposures.sum() == (docs.relation < cfg.num_relations).sum()
  assert docs.exposures[~world.seen].sum() == 0
  rel_share = np.bincount(docs.relation.reshape(-1), minlength=5) / docs.relation.size
  assert rel_share[4] == pytest.approx(0.1, abs=0.01)


def test_tail_facts_are_rare(tiny):
  # Exposures decay with Zipf rank: the tail quarter of a leaf is seen ~10x less.
  cfg, world, docs = tiny.config, tiny.world, tiny.docs
  per_rank = docs.exposures[world.zipf_order].sum(-1).mean(0)      # [entities_per_leaf]
  q = cfg.entities_per_leaf // 4
  assert per_rank[-q:].mean() < per_rank[0] / 8
  # Questions: head buckets >= 33 exposures, tail buckets <= 32, and a non-empty 0 bucket.
  head, tail = tiny.questions["test_head"], tiny.questions["test_tail"]
  assert head.exposures.min() >= 33 and tail.exposures.max() <= 32
  assert (tail.exposures == 0).sum() == cfg.num_test_per_bucket
  assert set(facts.bucket_of(tail.exposures)) == {0, 1, 2, 3}
  np.testing.assert_array_equal(facts.bucket_of([0, 1, 2, 3, 8, 9, 32, 33, 128, 129]),
                                [0, 1, 1, 2, 2, 3, 3, 4, 4, 5])


def test_questions_are_held_out(tiny):
  cfg, world, docs = tiny.config, tiny.world, tiny.docs
  v = facts.vocab(cfg)
  for split, q in tiny.questions.items():
    n_real = 1 + sum(cfg.words_per_doc) + cfg.name_len + 1
    assert (q.inputs[:, n_real:] == facts.PAD).all()
    # Exactly one scored target: the fact's value, at the relation token.
    scored = q.targets != facts.IGNORE
    assert (scored.sum(1) == 1).all() and scored[:, n_real - 1].all()
    value = q.targets[:, n_real - 1] - v.value
    rule = q.relation == cfg.num_relations
    want = np.where(rule, world.rule_map[world.names[q.entity, 0]],
                    world.facts[q.entity, np.minimum(q.relation, cfg.num_relations - 1)])
    np.testing.assert_array_equal(value, want)
    assert (q.inputs[:, n_real - 1] == v.relation + q.relation).all()
    # The recorded exposures are exactly how often "name rel val" appears in training.
    for i in range(len(q.entity)):
      stmt = np.concatenate([v.syllable + world.names[q.entity[i]],
                             [v.relation + q.relation[i], q.targets[i, n_real - 1]]])
      if split == "test_rule":
        # Rule probes ask about entities no training document mentions.
        assert not world.seen[q.entity[i]]
        assert _count_statements(docs.tokens, stmt[:cfg.name_len]) == 0
      else:
        assert _count_statements(docs.tokens, stmt) == q.exposures[i]
  # No question is a training record.
  train = {r.tobytes() for r in docs.tokens[:, :cfg.question_len]}
  assert not any(r.tobytes() in train for q in tiny.questions.values() for r in q.inputs)


def test_routes(tiny):
  cfg = tiny.config
  k, levels = cfg.branching, cfg.levels
  off, size = htree.level_offsets(k, levels), htree.level_sizes(k, levels)
  for split, route in tiny.routes.items():
    assert route.dtype == np.int32 and route.shape[1] == levels
    assert ((route >= off) & (route < off + size)).all()
    local = htree.local_ids(route, k)
    np.testing.assert_array_equal(local[:, 1:] // k, local[:, :-1])     # nested paths
  # k-means over the embedded documents recovers the generator's tree, and questions
  # (routed from their own tokens) mostly land where their leaf's documents went.
  assert tiny.stats["train_purity"] >= 0.8, tiny.stats
  assert tiny.stats["test_tail_route_agreement"] >= 0.8, tiny.stats
  assert max(tiny.stats["tree_child_fractions"]) <= 1.5 / k + 0.05
  # Blocked routes share no node with the real ones.
  blocked = facts.blocked_routes(cfg, tiny.routes["test_tail"])
  assert (blocked != tiny.routes["test_tail"]).all()
  # The oracle route is the generator's path.
  oracle = facts.generate(facts.FactsConfig(**{**dataclasses.asdict(cfg), "routing": "oracle"}))
  np.testing.assert_array_equal(oracle.routes["train"],
                                htree.path_from_leaf(oracle.docs.leaf, k, levels))
  np.testing.assert_array_equal(oracle.routes["test_tail"],
                                htree.path_from_leaf(oracle.questions["test_tail"].leaf, k, levels))


def test_tfds_builder_and_pipeline(tmp_path, tiny):
  # Given the tiny config prepared as array_record.
  builder = facts_tfds.prepare("tiny", str(tmp_path))
  assert set(builder.info.splits) == set(facts.SPLITS)
  assert builder.info.metadata["train_purity"] == tiny.stats["train_purity"]
  # Then every split holds exactly the generator's records.
  for split in facts.SPLITS:
    source = builder.as_data_source(split)
    got = sorted((np.asarray(r["inputs"]).tobytes(), np.asarray(r["route"]).tolist(),
                  np.asarray(r["targets"]).tobytes(), int(r["exposures"]))
                 for r in (source[i] for i in range(len(source))))
    want = sorted((r["inputs"].tobytes(), r["route"].tolist(), r["targets"].tobytes(),
                   int(r["exposures"])) for r in tiny.records(split))
    assert got == want
  # And the training pipeline reads it as the "facts" task, routes included.
  cfg = dict(name="facts", builder_config="tiny")
  info = pipeline.get_task_info(cfg)
  assert info.vocab_size == facts.vocab(tiny.config).size and info.seq_len == 64
  assert info.eval_splits == ("test_head", "test_tail", "test_rule")
  it = pipeline.build_iterator(cfg, split="test_tail", seed=0, global_batch_size=8,
                               data_dir=str(tmp_path), shuffle=False)
  batch = next(it)
  assert batch["inputs"].shape == (8, tiny.config.question_len)
  assert batch["route"].shape == (8, 2) and batch["route"].dtype == np.int32
  assert ((batch["targets"] != facts.IGNORE).sum(1) == 1).all()
  train = next(pipeline.build_iterator(cfg, split="train", seed=0, global_batch_size=4,
                                       data_dir=str(tmp_path)))
  assert train["inputs"].shape == (4, 64) and train["route"].shape == (4, 2)


def test_bad_configs_name_the_field():
  for kwargs, field in ((dict(levels=3), "words_per_node"),
                        (dict(words_per_doc=(17, 4)), "words_per_doc"),
                        (dict(num_syllables=8), "num_syllables"),
                        (dict(seq_len=10), "seq_len"),
                        (dict(loss_on="x"), "loss_on"),
                        (dict(routing="x"), "routing"),
                        (dict(branching=1), "branching")):
    with pytest.raises(ValueError, match=f"^{field}:"):
      facts.FactsConfig(**kwargs).validate()
  with pytest.raises(ValueError, match="^input.builder_config:"):
    pipeline.get_task_info(dict(name="facts", builder_config="nope"))
  with pytest.raises(ValueError, match="^input.p_rule:"):
    pipeline.get_task_info(dict(name="facts", p_rule=2.0))
  fields = dataclasses.asdict(_standard("tiny"))
  assert facts_tfds.FactsBuilderConfig.from_fields(**fields).name == "tiny"
  assert facts_tfds.FactsBuilderConfig.from_fields(**{**fields, "p_rule": 0.2}).name != "tiny"


@pytest.mark.slow
def test_runlocal_routing_quality():
  # The runlocal config (2^20 tokens): k-means recovers the 16 x 16 topic tree.
  data = facts.generate(_standard("runlocal"))
  assert data.stats["train_purity"] >= 0.95, data.stats
  for split in ("test_head", "test_tail", "test_rule"):
    assert data.stats[f"{split}_route_agreement"] >= 0.95, data.stats
  assert max(data.stats["tree_child_fractions"]) <= 0.1, data.stats
