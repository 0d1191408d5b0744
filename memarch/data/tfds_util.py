"""Small helpers for TFDS builders that live inside a Python package."""

from __future__ import annotations

from collections.abc import Callable
import fcntl
import inspect
import os

from etils import epath
import tensorflow_datasets as tfds


class FileCodePath:
  """Mixin that points a builder's ``code_path`` at its source file.

  For a builder defined in a package module, TFDS 4.9 resolves ``code_path`` through
  ``importlib_resources``, which is not a dependency of TFDS and is often missing.
  Builders here download nothing, so the plain file path (where TFDS would look for a
  checksums file) is all that is needed. Put it before ``GeneratorBasedBuilder``.
  """

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    """The path of the module that defines the builder."""
    return epath.Path(inspect.getfile(cls))


def prepare_once(
    make_builder: Callable[[], tfds.core.DatasetBuilder], data_dir: str
) -> tfds.core.DatasetBuilder:
  """Runs ``download_and_prepare`` once, even when several processes start at once.

  TFDS writes into a temporary directory and renames it at the end. On local or NFS
  paths we also take an exclusive ``fcntl`` lock on
  ``<data_dir>/<builder name>/.<config>.lock``, so only one process generates and the
  others wait, then read its data. Where file locks do not work (``scheme://`` paths,
  e.g. ``gs://``) a process that loses the rename race re-reads the winner's data; to
  avoid duplicate work there, prepare once before launching.

  Args:
    make_builder: returns a fresh builder (a builder made before the data existed
      does not see it, so this is called again after preparing).
    data_dir: the TFDS data directory the builder uses.

  Returns:
    A builder whose data is prepared.
  """
  builder = make_builder()
  if builder.data_path.exists():
    return builder
  if "://" in data_dir:
    try:
      builder.download_and_prepare()
    except OSError:
      if not make_builder().data_path.exists():
        raise
    return make_builder()
  lock_dir = os.path.join(data_dir, builder.name)
  os.makedirs(lock_dir, exist_ok=True)
  config = builder.builder_config.name if builder.builder_config else "default"
  with open(os.path.join(lock_dir, f".{config}.lock"), "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    try:
      builder = make_builder()
      if not builder.data_path.exists():
        builder.download_and_prepare()
    finally:
      fcntl.flock(lock, fcntl.LOCK_UN)
  return make_builder()
