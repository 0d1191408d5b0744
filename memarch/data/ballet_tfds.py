"""The supervised ballet task (``memarch.data.ballet``) as a TFDS dataset stored as array_record (no TensorFlow).

Usage::

  builder = Ballet(data_dir=d, file_format="array_record", config="n8_delay48")
  builder.download_and_prepare()
  source = builder.as_data_source("train")   # random access, dicts of numpy arrays

Splits (all from :func:`memarch.data.ballet.generate`, one motion library per ``library_seed``):

* ``train``: ``num_train`` episodes of the config's level, episode seed ``seed``.
* ``test``: ``num_test`` episodes of the same level, seed ``2^31 + seed``.
* Extrapolation (spec §11.2), ``num_test`` episodes each, seed ``2^31 + seed``, present only when they differ
  from ``test``: ``test_delay48`` (the same N with delay 48; train on delay 16, test on 48) and ``test_n8``
  (8 dancers at the same delay; train on fewer, test on 8).

Features: ``inputs`` float32 [L, 93] (zlib-compressed on disk: the frames are one-hot, so an 8-dancer delay-48
episode takes ~2.3 KB instead of 191 KB), ``targets`` int32 [L] (-100 except the last, query position: the slot
label 0..7), and the scalars ``dance_index`` (which dance was queried) and ``phase`` (rest frames before the first
dance), e.g. to locate the queried dance in a plot.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import tensorflow_datasets as tfds

from memarch.data import ballet
from memarch.data import tfds_util


@dataclasses.dataclass(eq=False)
class BalletConfig(tfds.core.BuilderConfig):
  """One ballet setting; every field is part of the data.

  Attributes:
    num_dancers: N, dancers per episode (1..8).
    delay: rest frames after each dance.
    n_motions: motions in the library (N..13).
    library_seed: seed of the motion library.
    noise_p: cell-flip probability on watch frames.
    phase_offset: most extra rest frames (see ``memarch.data.ballet``).
    num_train: episodes in ``train``.
    num_test: episodes in each test split.
    seed: the train episode seed, in [0, 2^31); test splits use 2^31 + seed.
  """

  num_dancers: int = 2
  delay: int = 16
  n_motions: int = ballet.MAX_MOTIONS
  library_seed: int = 0
  noise_p: float = 0.0
  phase_offset: int = 0
  num_train: int = 100_000
  num_test: int = 2_000
  seed: int = 0

  def validate(self, prefix: str = "") -> None:
    """Raises a ValueError naming the bad field (``prefix`` is prepended)."""
    ballet.check_args(self.num_dancers, self.delay, self.n_motions, self.noise_p, self.phase_offset, prefix)
    for field in ("num_train", "num_test"):
      if int(getattr(self, field)) < 1:
        raise ValueError(f"{prefix}{field}: must be positive, got {getattr(self, field)}")
    if not 0 <= self.seed < ballet.TEST_SEED_OFFSET:
      raise ValueError(f"{prefix}seed: must be in [0, 2^31), got {self.seed}")
    if not 0 <= self.library_seed < 2**63:
      raise ValueError(f"{prefix}library_seed: must be in [0, 2^63), got {self.library_seed}")

  def split_levels(self) -> dict[str, tuple[int, int]]:
    """``split -> (num_dancers, delay)`` for every split this config generates."""
    levels = {"train": (self.num_dancers, self.delay), "test": (self.num_dancers, self.delay)}
    if self.delay != 48:
      levels["test_delay48"] = (self.num_dancers, 48)
    if self.num_dancers != ballet.NUM_SLOTS and self.n_motions >= ballet.NUM_SLOTS:
      levels["test_n8"] = (ballet.NUM_SLOTS, self.delay)
    return levels

  def split_seq_len(self, split: str) -> int:
    """The episode length of ``split``."""
    n, delay = self.split_levels()[split]
    return ballet.seq_len(n, delay, self.phase_offset)

  @property
  def split_names(self) -> tuple[str, ...]:
    """The splits this config generates."""
    return tuple(self.split_levels())

  @classmethod
  def from_fields(cls, **fields) -> BalletConfig:
    """Makes a config whose name encodes every field (a standard config is returned when the fields match one).

    Args:
      **fields: any of the dataclass fields above except ``name``.

    Returns:
      The config.
    """
    cfg = cls(name="custom", **fields)
    for std in STANDARD_CONFIGS:
      if _fields(std) == _fields(cfg):
        return std
    p = f"{cfg.noise_p:g}".replace(".", "p").replace("-", "m")
    name = (f"n{cfg.num_dancers}_delay{cfg.delay}_m{cfg.n_motions}_lib{cfg.library_seed}_noise{p}"
            f"_ph{cfg.phase_offset}_tr{cfg.num_train}_t{cfg.num_test}_s{cfg.seed}")
    return dataclasses.replace(cfg, name=name)


def _fields(cfg: BalletConfig) -> dict:
  base = {f.name for f in dataclasses.fields(tfds.core.BuilderConfig)}
  return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(BalletConfig) if f.name not in base}


def _standard_configs() -> list[BalletConfig]:
  out = [BalletConfig(name=f"n{n}_delay{delay}", num_dancers=n, delay=delay,
                      description=f"{n} dancers, delay {delay}, 13 motions, 100k train / 2k test.")
         for n, delay in ballet.LEVELS]
  # Small enough to generate in a second on 2 CPU cores (runlocal configs, tests).
  out.append(BalletConfig(name="n2_delay16_tiny", num_dancers=2, delay=16, num_train=2048, num_test=256,
                          description="2 dancers, delay 16, 2048 train / 256 test."))
  return out


STANDARD_CONFIGS: list[BalletConfig] = _standard_configs()


class Ballet(tfds_util.FileCodePath, tfds.core.GeneratorBasedBuilder):
  """Ballet-like recall episodes generated by ``memarch.data.ballet`` (numpy RNG)."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  BUILDER_CONFIGS = STANDARD_CONFIGS

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description="Supervised ballet-like recall (spec hcam.md §11.2): watch N dances, name the dancer of one.",
        features=tfds.features.FeaturesDict({
            "inputs": tfds.features.Tensor(shape=(None, ballet.NUM_FEATURES), dtype=np.float32,
                                           encoding=tfds.features.Encoding.ZLIB),
            "targets": tfds.features.Tensor(shape=(None,), dtype=np.int32),
            "dance_index": tfds.features.Scalar(dtype=np.int32),
            "phase": tfds.features.Scalar(dtype=np.int32),
        }),
        # Record i is episode i of its split's stream (the training pipeline shuffles indices itself).
        disable_shuffling=True,
    )

  def _split_generators(self, dl_manager):
    del dl_manager
    cfg = self.builder_config
    cfg.validate()
    return {split: self._generate_examples(split, n, delay) for split, (n, delay) in cfg.split_levels().items()}

  def _generate_examples(self, split, num_dancers, delay):
    cfg = self.builder_config
    train = split == "train"
    records = ballet.generate(
        cfg.num_train if train else cfg.num_test, num_dancers=num_dancers, delay=delay,
        seed=cfg.seed if train else ballet.TEST_SEED_OFFSET + cfg.seed, n_motions=cfg.n_motions,
        library_seed=cfg.library_seed, noise_p=cfg.noise_p, phase_offset=cfg.phase_offset)
    for i, record in enumerate(records):
      yield i, record


def make_builder(config: BalletConfig | str, data_dir: str) -> Ballet:
  """Returns the array_record ballet builder for ``config`` under ``data_dir``."""
  return Ballet(data_dir=data_dir, file_format="array_record", config=config)


def prepare(config: BalletConfig | str, data_dir: str) -> Ballet:
  """Generates the data once (process-safe, see ``tfds_util.prepare_once``).

  Args:
    config: a ``BalletConfig`` or the name of a standard one.
    data_dir: the TFDS data directory.

  Returns:
    A builder whose ``as_data_source(split)`` works.
  """
  return tfds_util.prepare_once(lambda: make_builder(config, data_dir), data_dir)


# The record task ``input.name = "ballet"`` (registered in ``memarch.data.pipeline``).
_TASK_FIELDS = (("num_dancers", None), ("delay", None), ("n_motions", ballet.MAX_MOTIONS), ("library_seed", 0),
                ("noise_p", 0.0), ("phase_offset", 0), ("num_train", 100_000), ("num_test", 2_000),
                ("data_seed", 0))


def config_from_input(input_cfg) -> BalletConfig:
  """The ``BalletConfig`` of a ``name="ballet"`` input config.

  Fields: ``num_dancers`` and ``delay`` (required unless ``builder_config`` names a standard config, e.g.
  ``"n8_delay48"``, whose fields then apply; any field also given must agree), ``n_motions=13``,
  ``library_seed=0``, ``noise_p=0.0``, ``phase_offset=0``, ``num_train=100_000``, ``num_test=2_000``,
  ``data_seed=0``; and, read by :func:`task_info` only, ``extrapolation=False`` (also evaluate on the
  ``test_delay48`` / ``test_n8`` splits) and ``seq_len`` (optional; must equal the episode length).

  Args:
    input_cfg: the ``input`` section of the experiment config.

  Returns:
    The validated config.

  Raises:
    ValueError: naming the bad field as ``input.<field>``.
  """
  from memarch.data import pipeline  # pylint: disable=g-import-not-at-top

  fields = pipeline.resolve_fields(input_cfg, _TASK_FIELDS, STANDARD_CONFIGS)
  if not 0 <= fields["seed"] < ballet.TEST_SEED_OFFSET:
    raise ValueError(f"input.data_seed: must be in [0, 2^31), got {fields['seed']}")
  cfg = BalletConfig.from_fields(**fields)
  cfg.validate(prefix="input.")
  return cfg


def task_info(input_cfg):
  """``TaskInfo`` of the ballet task: 8 slot classes, 93 input features, per-split lengths."""
  from memarch.data import pipeline  # pylint: disable=g-import-not-at-top

  cfg = config_from_input(input_cfg)
  length = cfg.split_seq_len("train")
  given = pipeline.cfg_get(input_cfg, "seq_len", None)
  if given is not None and given != length:
    raise ValueError(f"input.seq_len: {given!r} disagrees with the episode length {length} "
                     f"(num_dancers * (16 + delay) + phase_offset + 1); leave it unset")
  splits = ("test",)
  if pipeline.cfg_get(input_cfg, "extrapolation", False):
    splits += tuple(s for s in cfg.split_names if s not in ("train", "test"))
  return pipeline.TaskInfo("ballet", ballet.NUM_SLOTS, length, splits,
                           tuple((s, cfg.split_seq_len(s)) for s in splits if cfg.split_seq_len(s) != length),
                           input_features=ballet.NUM_FEATURES)


def data_source(input_cfg, split: str, data_dir: str):
  """The random-access source of ``split`` (generated under ``data_dir`` on first use)."""
  cfg = config_from_input(input_cfg)
  if split not in cfg.split_names:
    raise ValueError(f"split: {split!r} not in {cfg.split_names} for ballet config {cfg.name}")
  return prepare(cfg, data_dir).as_data_source(split)
