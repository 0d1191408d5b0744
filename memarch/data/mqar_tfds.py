"""MQAR as a TFDS dataset stored as array_record (no TensorFlow needed).

Usage::

  builder = MQAR(data_dir=d, file_format="array_record", config="L256_kv16")
  builder.download_and_prepare()
  source = builder.as_data_source("train")   # random access, dicts of numpy arrays

Splits (all from ``memarch.data.mqar.generate``):

* ``train``: ``num_train`` examples of length L with kv pairs, segment seed ``seed``.
* ``test``: ``num_test`` examples of the same L and kv, seed ``2^31 + seed``.
* ``test_4x``: ``num_test`` examples of length 4L with 4kv pairs (the same query
  density, so it tests length extrapolation at equal difficulty per token), seed
  ``2^31 + seed`` (a different segment, since the shape differs). Scaling L and kv by 4
  keeps ``2*kv*passes + 2*kv <= L``, so the only check it can fail is ``V > 4L``; then
  the split is left out (see ``MQARConfig.has_test_4x``).

Features: ``inputs`` and ``targets``, int32 of length L (4L for ``test_4x``).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import tensorflow_datasets as tfds

from memarch.data import mqar
from memarch.data import tfds_util

_FIG2 = ((64, 4), (128, 8), (256, 16))        # zoology ICLR'24 Fig. 2
_EXTRA = ((256, 32), (256, 64), (512, 64))   # Based Fig. 2 train mix; B'MOJO target


@dataclasses.dataclass(eq=False)
class MQARConfig(tfds.core.BuilderConfig):
  """One MQAR setting; every field is part of the data.

  Attributes:
    vocab_size: V; keys come from [1, V/2), values from [V/2, V).
    seq_len: L, the training (and ``test``) input length.
    num_kv_pairs: kv, key-value pairs per example.
    power_a: a, the power-law exponent of the query gaps (zoology: 0.01).
    random_non_queries: replace filler zeros of the inputs by uniform tokens.
    num_passes: how many times the context block is written.
    num_train: examples in ``train``.
    num_test: examples in ``test`` and ``test_4x``.
    seed: the train segment seed, in [0, 2^31); test splits use 2^31 + seed.
  """

  vocab_size: int = 8192
  seq_len: int = 64
  num_kv_pairs: int = 4
  power_a: float = 0.01
  random_non_queries: bool = False
  num_passes: int = 1
  num_train: int = 100_000
  num_test: int = 3_000
  seed: int = 0

  def validate(self, prefix: str = "") -> None:
    """Raises a ValueError naming the bad field (``prefix`` is prepended)."""
    mqar.check_args(self.vocab_size, self.seq_len, self.num_kv_pairs,
                    self.num_passes, self.power_a, prefix=prefix)
    for field in ("num_train", "num_test"):
      if getattr(self, field) < 1:
        raise ValueError(f"{prefix}{field}: must be positive, got {getattr(self, field)}")
    if not 0 <= self.seed < mqar.TEST_SEED_OFFSET:
      raise ValueError(f"{prefix}seed: must be in [0, 2^31), got {self.seed}")

  @property
  def has_test_4x(self) -> bool:
    """Whether 4L with 4kv pairs passes zoology's asserts (it needs V > 4L)."""
    try:
      mqar.check_args(self.vocab_size, 4 * self.seq_len, 4 * self.num_kv_pairs,
                      self.num_passes, self.power_a)
    except ValueError:
      return False
    return True

  @property
  def split_names(self) -> tuple[str, ...]:
    """The splits this config generates."""
    return ("train", "test") + (("test_4x",) if self.has_test_4x else ())

  @classmethod
  def from_fields(cls, **fields) -> MQARConfig:
    """Makes a config whose name encodes every field, e.g. for custom sweeps.

    Args:
      **fields: any of the dataclass fields above except ``name``.

    Returns:
      The config; if its fields equal a standard config's, that one is returned, so
      both share the prepared data.
    """
    cfg = cls(name="custom", **fields)
    for std in STANDARD_CONFIGS:
      if _fields(std) == _fields(cfg):
        return std
    a = f"{cfg.power_a:g}".replace(".", "p").replace("-", "m")
    name = (f"V{cfg.vocab_size}_L{cfg.seq_len}_kv{cfg.num_kv_pairs}_a{a}"
            f"_rnq{int(cfg.random_non_queries)}_p{cfg.num_passes}"
            f"_n{cfg.num_train}_t{cfg.num_test}_s{cfg.seed}")
    return dataclasses.replace(cfg, name=name)


def _fields(cfg: MQARConfig) -> dict:
  return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(MQARConfig)
          if f.name not in {f0.name for f0 in dataclasses.fields(tfds.core.BuilderConfig)}}


def _standard_configs() -> list[MQARConfig]:
  out = []
  for seq_len, kv in _FIG2 + _EXTRA:
    for rnq in (False, True):
      name = f"L{seq_len}_kv{kv}" + ("_rnq" if rnq else "")
      out.append(MQARConfig(
          name=name, seq_len=seq_len, num_kv_pairs=kv, random_non_queries=rnq,
          description=f"V=8192, L={seq_len}, kv={kv}, random_non_queries={rnq}, "
                      "100k train / 3k test."))
  # Small enough to generate in a second on 2 CPU cores (runlocal configs, tests).
  out.append(MQARConfig(name="L64_kv4_tiny", seq_len=64, num_kv_pairs=4,
                        num_train=4096, num_test=512,
                        description="V=8192, L=64, kv=4, 4096 train / 512 test."))
  return out


STANDARD_CONFIGS: list[MQARConfig] = _standard_configs()


class MQAR(tfds_util.FileCodePath, tfds.core.GeneratorBasedBuilder):
  """MQAR generated from ``memarch.data.mqar`` (zoology semantics, numpy RNG)."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  BUILDER_CONFIGS = STANDARD_CONFIGS

  def _info(self) -> tfds.core.DatasetInfo:
    seq = tfds.features.Tensor(shape=(None,), dtype=np.int32)
    return tfds.core.DatasetInfo(
        builder=self,
        description="Multi-query associative recall (zoology), see spec/bmojo.md §6.",
        features=tfds.features.FeaturesDict({"inputs": seq, "targets": seq}),
        homepage="https://github.com/HazyResearch/zoology",
    )

  def _split_generators(self, dl_manager):
    del dl_manager
    cfg = self.builder_config
    cfg.validate()
    test_seed = mqar.TEST_SEED_OFFSET + cfg.seed
    splits = {
        "train": self._generate_examples(cfg.num_train, cfg.seq_len, cfg.num_kv_pairs, cfg.seed),
        "test": self._generate_examples(cfg.num_test, cfg.seq_len, cfg.num_kv_pairs, test_seed),
    }
    if cfg.has_test_4x:
      splits["test_4x"] = self._generate_examples(
          cfg.num_test, 4 * cfg.seq_len, 4 * cfg.num_kv_pairs, test_seed)
    return splits

  def _generate_examples(self, num_examples, seq_len, num_kv_pairs, seed):
    cfg = self.builder_config
    data = mqar.generate(
        num_examples, vocab_size=cfg.vocab_size, seq_len=seq_len,
        num_kv_pairs=num_kv_pairs, power_a=cfg.power_a,
        random_non_queries=cfg.random_non_queries, num_passes=cfg.num_passes, seed=seed)
    for i in range(num_examples):
      yield i, {"inputs": data["inputs"][i], "targets": data["targets"][i]}


def make_builder(config: MQARConfig | str, data_dir: str) -> MQAR:
  """Returns the array_record MQAR builder for ``config`` under ``data_dir``."""
  return MQAR(data_dir=data_dir, file_format="array_record", config=config)


def prepare(config: MQARConfig | str, data_dir: str) -> MQAR:
  """Generates the data once (process-safe, see ``tfds_util.prepare_once``).

  Args:
    config: an ``MQARConfig`` or the name of a standard one.
    data_dir: the TFDS data directory.

  Returns:
    A builder whose ``as_data_source(split)`` works.
  """
  return tfds_util.prepare_once(lambda: make_builder(config, data_dir), data_dir)
