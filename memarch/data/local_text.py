"""An offline text dataset: memarch's own source files and docs, as a TFDS builder (``memarch_local_text``).

It needs no download, so the text pipeline and ``configs/text/transformer.py`` run anywhere; point
``input.dataset`` at any TFDS text dataset (e.g. ``lm1b``) for real work. Each ``.py`` / ``.md`` file of the installed
``memarch`` package is one document; a stable hash of its relative path puts about 10 % of them in ``test``.
"""

from __future__ import annotations

import hashlib
import pathlib

import tensorflow_datasets as tfds

from memarch.data import tfds_util

_PACKAGE = pathlib.Path(__file__).resolve().parents[1]


def _documents() -> list[tuple[str, str]]:
  """(relative path, text) of every source and doc file of the package, sorted by path."""
  files = sorted(p for p in _PACKAGE.rglob("*") if p.suffix in (".py", ".md") and "__pycache__" not in p.parts)
  return [(str(p.relative_to(_PACKAGE)), p.read_text(encoding="utf-8")) for p in files]


def _is_test(path: str) -> bool:
  return int(hashlib.sha256(path.encode()).hexdigest(), 16) % 10 == 0


class MemarchLocalText(tfds_util.FileCodePath, tfds.core.GeneratorBasedBuilder):
  """memarch's own source files as documents; splits ``train`` and ``test``; feature ``text``."""

  VERSION = tfds.core.Version("1.0.0")

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({"text": tfds.features.Text()}))

  def _split_generators(self, dl_manager):
    del dl_manager
    docs = _documents()
    return {"train": self._generate_examples([d for d in docs if not _is_test(d[0])]),
            "test": self._generate_examples([d for d in docs if _is_test(d[0])])}

  def _generate_examples(self, docs):
    for path, text in docs:
      yield path, {"text": text}
