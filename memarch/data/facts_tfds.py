"""The long-tail facts task (``memarch.data.facts``) as a TFDS dataset in array_record.

Usage::

  builder = facts_tfds.prepare("runlocal", data_dir)       # or a FactsBuilderConfig
  source = builder.as_data_source("test_tail")              # random access, dicts of numpy

Splits: ``train`` (documents), ``test_head``, ``test_tail``, ``test_rule`` (questions; see
``memarch.data.facts``). Every record holds:

* ``inputs``, ``targets`` (-100 = ignore), ``segment_ids`` (1 on tokens, 0 on PAD): int32
  [seq_len] for ``train``, [question_len] for the question splits, whose only scored
  target is the answer value;
* ``route``, ``oracle_route``: int32 [levels] global tree-node ids (``memarch.hmem.tree``
  numbering), the path the memory fetches and the generator's own path;
* ``exposures``, ``bucket``, ``entity``, ``relation``: int32 scalars describing a
  question's fact (-1 in ``train``).

``builder.info.metadata`` holds the routing statistics of ``FactsData.stats`` (cluster
purity, question route agreement, bucket counts).

As a training-loop task (``memarch.data.pipeline``, ``input.name = "facts"``): field
``builder_config`` (a standard config name, default ``"runlocal"``) and any field of
``FactsConfig`` to override it; eval splits ``test_head``, ``test_tail``, ``test_rule``. The task's
source (:func:`task_source`) converts ``route`` and ``oracle_route`` to per-level (nested) ids
with ``memarch.hmem.tree.local_ids``, the format the memory bank consumes
(``memarch.ops.memory_bank``); the stored records keep global ids.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from memarch.data import facts
from memarch.data import tfds_util
from memarch.hmem import tree


@dataclasses.dataclass(eq=False)
class FactsBuilderConfig(tfds.core.BuilderConfig):
  """One facts setting.

  Attributes:
    facts: the task config; every field is part of the data.
  """

  facts: facts.FactsConfig = facts.FactsConfig()

  @classmethod
  def from_fields(cls, **fields) -> FactsBuilderConfig:
    """A config from ``FactsConfig`` fields; a standard config if they match one.

    Args:
      **fields: ``FactsConfig`` fields (the rest keep their defaults).

    Returns:
      The standard config with these fields, else one named ``custom_<hash>``.
    """
    cfg = facts.FactsConfig(**fields)
    cfg.validate()
    for std in STANDARD_CONFIGS:
      if std.facts == cfg:
        return std
    digest = hashlib.sha1(json.dumps(dataclasses.asdict(cfg), sort_keys=True).encode())
    return cls(name=f"custom_{digest.hexdigest()[:12]}", facts=cfg,
               description=f"Custom facts config {dataclasses.asdict(cfg)}.")


def _standard_configs() -> list[FactsBuilderConfig]:
  return [
      FactsBuilderConfig(
          name="default", facts=facts.FactsConfig(),
          description="spec/hmem.md §5: 16x16 topics, 128 entities per leaf, 2^25 tokens."),
      FactsBuilderConfig(
          name="runlocal", facts=facts.FactsConfig(num_train=8192, num_test_per_bucket=256),
          description="As default with 2^20 training tokens (8,192 documents)."),
      FactsBuilderConfig(
          name="tiny", facts=facts.FactsConfig(
              branching=4, words_per_node=(8, 4), words_per_doc=(2, 2), entities_per_leaf=16,
              unseen_per_leaf=2, num_syllables=16, num_values=32, seq_len=64, num_train=2048,
              num_test_per_bucket=16, embed_dim=256),
          description="4x4 topics, 16 entities per leaf, 2,048 documents (tests)."),
  ]


STANDARD_CONFIGS: list[FactsBuilderConfig] = _standard_configs()


class Facts(tfds_util.FileCodePath, tfds.core.GeneratorBasedBuilder):
  """Synthetic long-tail facts with routes (spec/hmem.md §5)."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  BUILDER_CONFIGS = STANDARD_CONFIGS

  def _info(self) -> tfds.core.DatasetInfo:
    levels = self.builder_config.facts.levels
    seq = tfds.features.Tensor(shape=(None,), dtype=np.int32)
    path = tfds.features.Tensor(shape=(levels,), dtype=np.int32)
    scalar = tfds.features.Tensor(shape=(), dtype=np.int32)
    return tfds.core.DatasetInfo(
        builder=self,
        description="Synthetic long-tail facts for routed memories, see spec/hmem.md §5.",
        features=tfds.features.FeaturesDict({
            "inputs": seq, "targets": seq, "segment_ids": seq, "route": path,
            "oracle_route": path, "exposures": scalar, "bucket": scalar, "entity": scalar,
            "relation": scalar}),
        metadata=tfds.core.MetadataDict(),
    )

  def _split_generators(self, dl_manager):
    del dl_manager
    data = facts.generate(self.builder_config.facts)
    self.info.metadata.update(data.stats)
    return {split: self._generate_examples(data, split) for split in facts.SPLITS}

  def _generate_examples(self, data: facts.FactsData, split: str):
    for i, record in enumerate(data.records(split)):
      yield i, record


def make_builder(config: FactsBuilderConfig | str, data_dir: str) -> Facts:
  """Returns the array_record facts builder for ``config`` under ``data_dir``."""
  return Facts(data_dir=data_dir, file_format="array_record", config=config)


def prepare(config: FactsBuilderConfig | str, data_dir: str) -> Facts:
  """Generates the data once (process-safe, see ``tfds_util.prepare_once``).

  Args:
    config: a ``FactsBuilderConfig`` or the name of a standard one.
    data_dir: the TFDS data directory.

  Returns:
    A builder whose ``as_data_source(split)`` works.
  """
  return tfds_util.prepare_once(lambda: make_builder(config, data_dir), data_dir)


def config_from_input(input_cfg: Any) -> FactsBuilderConfig:
  """The builder config of a ``name="facts"`` input config.

  Args:
    input_cfg: dict, ConfigDict or object with ``builder_config`` (default
      ``"runlocal"``) and optional ``FactsConfig`` field overrides.

  Returns:
    The builder config.

  Raises:
    ValueError: naming the bad field (``input.<field>: ...``).
  """
  from memarch.data import pipeline  # pylint: disable=g-import-not-at-top

  std_name = pipeline.cfg_get(input_cfg, "builder_config", "runlocal")
  by_name = {c.name: c for c in STANDARD_CONFIGS}
  if std_name not in by_name:
    raise ValueError(f"input.builder_config: unknown {std_name!r}; known: {', '.join(by_name)}")
  fields = dataclasses.asdict(by_name[std_name].facts)
  for field, value in list(fields.items()):
    given = pipeline.cfg_get(input_cfg, field, None)
    if given is not None:
      fields[field] = tuple(given) if isinstance(value, tuple) else given
  cfg = facts.FactsConfig(**fields)
  cfg.validate(prefix="input.")
  return FactsBuilderConfig.from_fields(**fields)


def task_info(input_cfg: Any):
  """``pipeline.RecordTask.info`` of the facts task."""
  from memarch.data import pipeline  # pylint: disable=g-import-not-at-top

  cfg = config_from_input(input_cfg).facts
  tests = tuple(s for s in facts.SPLITS if s != "train")
  return pipeline.TaskInfo("facts", facts.vocab(cfg).size, cfg.seq_len, tests,
                           tuple((s, cfg.question_len) for s in tests), route_depth=cfg.levels,
                           route_branching=cfg.branching)


class LocalRouteSource:
  """A facts data source whose ``route`` / ``oracle_route`` are per-level ids (``tree.local_ids``).

  Attributes:
    source: the wrapped random-access source (records with global-id routes).
    branching: the tree's branching ``k``.
  """

  ROUTE_FIELDS = ("route", "oracle_route")

  def __init__(self, source: Any, branching: int):
    self.source = source
    self.branching = branching

  def __len__(self) -> int:
    return len(self.source)

  def _convert(self, record: dict[str, Any]) -> dict[str, Any]:
    record = dict(record)
    for key in self.ROUTE_FIELDS:
      if key in record:
        record[key] = tree.local_ids(record[key], self.branching)
    return record

  def __getitem__(self, index: int) -> dict[str, Any]:
    return self._convert(self.source[index])

  def __getitems__(self, indices) -> list[dict[str, Any]]:
    return [self._convert(r) for r in self.source.__getitems__(indices)]

  def __repr__(self) -> str:
    return f"LocalRouteSource({self.source!r}, branching={self.branching})"


def task_source(input_cfg: Any, split: str, data_dir: str):
  """``pipeline.RecordTask.source`` of the facts task: the split's source, routes in per-level ids.

  Returns:
    A :class:`LocalRouteSource` over the split's array_record source.
  """
  if split not in facts.SPLITS:
    raise ValueError(f"split: {split!r} not in {facts.SPLITS} for the facts task")
  config = config_from_input(input_cfg)
  return LocalRouteSource(prepare(config, data_dir).as_data_source(split), config.facts.branching)
