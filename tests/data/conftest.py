"""Shared fixtures: a session TFDS data dir and a tiny TFDS text dataset."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow_datasets as tfds

from memarch.data import tfds_util

def _tiny_docs() -> list[str]:
  """Documents of 1-40 characters, some non-ASCII, so packing splits some of them."""
  rng = np.random.default_rng(0)
  words = ["memory", "héllo", "scan", "ünïcode", "a", "state", "日本", "key", "value"]
  return [f"doc{i}: " + " ".join(rng.choice(words, size=rng.integers(0, 7)))
          for i in range(30)]


class MemarchTinyText(tfds_util.FileCodePath, tfds.core.GeneratorBasedBuilder):
  """30 short documents in ``train`` and 10 in ``test``, feature ``text``."""

  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self, features=tfds.features.FeaturesDict({"text": tfds.features.Text()}))

  def _split_generators(self, dl_manager):
    del dl_manager
    docs = _tiny_docs()
    return {"train": self._generate_examples(docs), "test": self._generate_examples(docs[:10])}

  def _generate_examples(self, docs):
    for i, doc in enumerate(docs):
      yield i, {"text": doc}


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
  """A TFDS data dir shared by the session's tests."""
  return str(tmp_path_factory.mktemp("tfds"))


@pytest.fixture(scope="session")
def tiny_docs():
  """The documents of the tiny text dataset's ``train`` split, in order."""
  return _tiny_docs()


@pytest.fixture(scope="session")
def text_cfg(data_dir):
  """An input config for the tiny text dataset, prepared as array_record."""
  builder = MemarchTinyText(data_dir=data_dir, file_format="array_record")
  builder.download_and_prepare()
  return dict(name="tfds_text", dataset="memarch_tiny_text", seq_len=16)
