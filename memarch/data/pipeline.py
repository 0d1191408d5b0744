"""The data contract of the training loop: ``get_task_info`` and ``build_iterator``.

Tasks (``input_cfg.name``):

* ``"mqar"``: fields ``seq_len, vocab_size, num_kv_pairs, power_a=0.01,
  random_non_queries=False, num_passes=1, num_train=100_000, num_test=3_000,
  data_seed=0`` or ``builder_config`` (the name of a standard ``MQARConfig``, whose
  fields then apply; any field also given must agree). Splits ``train``, ``test`` and,
  when ``vocab_size > 4 * seq_len``, ``test_4x`` (4L, 4kv).
* ``"tfds_text"``: fields ``dataset`` (a TFDS name, e.g. ``"lm1b"`` or a registered
  builder), ``seq_len``, ``tokenizer="byte"`` (or a SentencePiece ``.model`` path),
  ``text_key="text"``, ``train_split="train"``, ``eval_split="test"``, ``data_dir``.
  ``split="train"`` reads ``train_split``; any other split name is passed to TFDS.
* ``"ballet"``: supervised ballet-like recall (float32 [L, 93] frames, 8 slot classes), fields
  in ``memarch.data.ballet_tfds.config_from_input``.
* ``"facts"``: synthetic long-tail facts with a per-row ``route`` [levels] (spec/hmem.md §5),
  fields in ``memarch.data.facts_tfds.config_from_input``.
* Every other task is a *record task* (``register_task``): fixed-length records of a
  random-access source (a TFDS array_record builder), read by index like MQAR. Its
  module documents its fields.

Batches are dicts of numpy arrays for this process only, ``b = global_batch_size //
process_count`` rows: ``inputs`` (int32 [b, L] token ids, or float32 [b, L, F] features
when ``TaskInfo.input_features = F``), ``targets`` (-100 = ignore), ``segment_ids``,
``positions``, all int32 [b, L]; record tasks may add per-row fields (e.g. ``route``).

How the global batch stays the same for any ``process_count``: every process builds
the same global stream of examples (the same shuffle of record indices, seeded by
``seed``); global batch ``s`` is stream elements ``[s*B, (s+1)*B)``, and process ``p``
takes rows ``[p*b, (p+1)*b)`` of it. For MQAR this is an index map, so each process
reads only its own records (disjoint across processes). Text packing is sequential, so
every process tokenises and packs the whole stream and keeps its rows; it reads every
record (cheap for byte tokenisation, and it keeps packing exact).

With ``drop_remainder=False`` (evaluation) the last global batch is padded to ``B``
with empty rows (``inputs`` 0, ``targets`` -100, ``segment_ids`` 0), so every process
gets full ``b``-row batches and the same number of steps; padded rows carry no label.

The iterator is a ``grain.DatasetIterator``; its ``get_state()`` is a JSON-serialisable
dict, checkpointed with ``grain.checkpoint.CheckpointSave/CheckpointRestore`` in an
Orbax ``CheckpointManager`` (one JSON file per process, named by ``jax.process_index()``
and ``jax.process_count()``, so restore with the same process count)::

  mngr.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(state), data=grain.checkpoint.CheckpointSave(it)))
  mngr.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract), data=grain.checkpoint.CheckpointRestore(it)))
"""

from __future__ import annotations

from collections.abc import Mapping
from collections.abc import Callable
import dataclasses
import importlib
import os
import sys
from typing import Any

import grain
import numpy as np

from memarch.data import mqar
from memarch.data import text

_MISSING = object()
_READ = grain.ReadOptions(num_threads=4, prefetch_buffer_size=8)


@dataclasses.dataclass(frozen=True)
class TaskInfo:
  """What the training loop needs to know about a task before reading data.

  Attributes:
    name: the task name (``input.name``).
    vocab_size: classes the targets range over, and the token ids the inputs use unless
      ``input_features`` is set (the model vocabulary must be >= this).
    seq_len: the training sequence length.
    eval_splits: the splits to evaluate on, e.g. ``("test", "test_4x")``.
    split_seq_lens: ``(split, length)`` pairs for splits whose length is not ``seq_len``
      (e.g. ``("test_4x", 4 * seq_len)``).
    input_features: None when ``inputs`` are token ids; F when they are float32 [L, F]
      feature vectors (the model then embeds them with a linear map).
    route_depth: columns of the records' int32 ``route`` (tree levels; 0: no route).
    route_branching: the branching of the tree the routes index (0: no route).
  """

  name: str
  vocab_size: int
  seq_len: int
  eval_splits: tuple[str, ...]
  split_seq_lens: tuple[tuple[str, int], ...] = ()
  input_features: int | None = None
  route_depth: int = 0
  route_branching: int = 0

  def seq_len_of(self, split: str) -> int:
    """The sequence length of ``split``."""
    return dict(self.split_seq_lens).get(split, self.seq_len)


@dataclasses.dataclass(frozen=True)
class RecordTask:
  """A task read by record index from a random-access source (a TFDS array_record builder).

  Attributes:
    info: ``input_cfg -> TaskInfo``; validates the fields, raising ValueError naming one.
    source: ``(input_cfg, split, data_dir) -> data source`` with ``len`` and
      ``__getitems__``; each record is a dict with ``inputs`` ([L] int or [L, F] float),
      ``targets`` [L] int (-100 = ignore) and optionally ``segment_ids`` [L] (default: one
      segment) and other fixed-shape fields, which are batched as they are.
  """

  info: Callable[[Any], TaskInfo]
  source: Callable[[Any, str, str], Any]


_RECORD_TASKS: dict[str, RecordTask] = {}


def register_task(name: str, task: RecordTask) -> None:
  """Makes ``input.name = name`` read records through ``task`` (re-registering replaces)."""
  _RECORD_TASKS[name] = task


def lazy(module: str, attr: str) -> Callable[..., Any]:
  """A callable that imports ``module`` on first use and calls its ``attr`` (keeps imports light)."""
  def call(*args):
    return getattr(importlib.import_module(module), attr)(*args)
  return call


def known_tasks() -> tuple[str, ...]:
  """Every accepted ``input.name``."""
  return tuple(sorted({"tfds_text", *_RECORD_TASKS}))


def cfg_get(cfg: Any, field: str, default: Any = _MISSING) -> Any:
  """Reads ``field`` from a dict, ConfigDict or attribute object.

  Args:
    cfg: the input config.
    field: the field name.
    default: returned when the field is missing; without it, missing raises.

  Returns:
    The value.

  Raises:
    ValueError: the field is missing and has no default.
  """
  if isinstance(cfg, Mapping):
    value = cfg.get(field, _MISSING)
  else:
    value = getattr(cfg, field, _MISSING)
  if value is _MISSING:
    if default is _MISSING:
      raise ValueError(f"input.{field}: required")
    return default
  return value


def resolve_fields(input_cfg: Any, task_fields: tuple[tuple[str, Any], ...], standard_configs: Any,
                   required: Any = None) -> dict[str, Any]:
  """Reads a record task's fields, with ``builder_config`` naming a standard config whose fields then apply.

  Args:
    input_cfg: the ``input`` section of the experiment config.
    task_fields: ``(field, default)`` pairs; a default equal to ``required`` means the field must be given (by
      the input config or the standard config).
    standard_configs: the task's standard builder configs (attributes named like the fields; ``data_seed`` is
      read from ``seed``).
    required: the sentinel default that marks a required field.

  Returns:
    ``{field: value}``, with ``data_seed`` returned as ``seed``.

  Raises:
    ValueError: ``input.builder_config`` unknown, a required field missing, or a field that disagrees with the
      named standard config.
  """
  std_name = cfg_get(input_cfg, "builder_config", None)
  std = {}
  if std_name is not None:
    by_name = {c.name: c for c in standard_configs}
    if std_name not in by_name:
      raise ValueError(f"input.builder_config: unknown {std_name!r}; known: {', '.join(by_name)}")
    std = {f: getattr(by_name[std_name], "seed" if f == "data_seed" else f) for f, _ in task_fields}
  fields = {}
  for field, default in task_fields:
    value = cfg_get(input_cfg, field, std.get(field, default))
    if field in std and value != std[field]:
      raise ValueError(f"input.{field}: {value!r} disagrees with builder_config {std_name!r} ({std[field]!r})")
    if value is required:
      raise ValueError(f"input.{field}: required")
    fields["seed" if field == "data_seed" else field] = value
  return fields


def _task_name(input_cfg: Any) -> str:
  name = cfg_get(input_cfg, "name")
  if name not in known_tasks():
    raise ValueError(f"input.name: unknown task {name!r}; known: {', '.join(known_tasks())}")
  return name


_MQAR_FIELDS = (
    ("vocab_size", _MISSING), ("seq_len", _MISSING), ("num_kv_pairs", _MISSING),
    ("power_a", 0.01), ("random_non_queries", False), ("num_passes", 1),
    ("num_train", 100_000), ("num_test", 3_000), ("data_seed", 0))


def mqar_fields(input_cfg: Any) -> dict[str, Any]:
  """Returns the MQAR generator fields of ``input_cfg`` (``data_seed`` as ``seed``).

  Args:
    input_cfg: a ``name="mqar"`` input config.

  Returns:
    Keyword arguments for ``MQARConfig.from_fields``, validated.

  Raises:
    ValueError: naming the bad or missing field.
  """
  from memarch.data import mqar_tfds  # pylint: disable=g-import-not-at-top

  fields = resolve_fields(input_cfg, _MQAR_FIELDS, mqar_tfds.STANDARD_CONFIGS, required=_MISSING)
  mqar.check_args(fields["vocab_size"], fields["seq_len"], fields["num_kv_pairs"],
                  fields["num_passes"], fields["power_a"], prefix="input.")
  for field in ("num_train", "num_test"):
    if int(fields[field]) < 1:
      raise ValueError(f"input.{field}: must be positive, got {fields[field]}")
  if not 0 <= int(fields["seed"]) < mqar.TEST_SEED_OFFSET:
    raise ValueError(f"input.data_seed: must be in [0, 2^31), got {fields['seed']}")
  return fields


def get_task_info(input_cfg: Any) -> TaskInfo:
  """Describes the task without generating or reading data.

  Args:
    input_cfg: the ``input`` section of the experiment config.

  Returns:
    The task's ``TaskInfo``.

  Raises:
    ValueError: naming the field, e.g. ``"input.name: unknown task 'x'; known: ..."``.
  """
  name = _task_name(input_cfg)
  if name in _RECORD_TASKS:
    return _RECORD_TASKS[name].info(input_cfg)
  cfg_get(input_cfg, "dataset")
  seq_len = cfg_get(input_cfg, "seq_len")
  if int(seq_len) != seq_len or seq_len < 1:
    raise ValueError(f"input.seq_len: must be a positive integer, got {seq_len!r}")
  tokenizer = cfg_get(input_cfg, "tokenizer", "byte")
  if tokenizer == "byte":
    vocab_size = text.BYTE_VOCAB_SIZE
  else:
    if not os.path.exists(tokenizer):
      raise ValueError(f"input.tokenizer: no such SentencePiece model {tokenizer!r}")
    vocab_size = text.make_tokenizer(tokenizer).vocab_size
  return TaskInfo(name, vocab_size, int(seq_len),
                  (cfg_get(input_cfg, "eval_split", "test"),))


def resolve_data_dir(data_dir: str | None, input_cfg: Any = None) -> str:
  """Picks the TFDS data directory.

  Args:
    data_dir: an explicit directory; wins when given.
    input_cfg: the input config, whose optional ``data_dir`` comes next.

  Returns:
    ``data_dir``, else ``input.data_dir``, else ``$MEMARCH_DATA_DIR``, else
    ``~/tensorflow_datasets``.
  """
  if data_dir is None and input_cfg is not None:
    data_dir = cfg_get(input_cfg, "data_dir", None)
  if data_dir is None:
    data_dir = os.environ.get("MEMARCH_DATA_DIR") or os.path.join(
        os.path.expanduser("~"), "tensorflow_datasets")
  return os.fspath(data_dir)


class _ProcessRowsMapDataset(grain.MapDataset):
  """This process's rows of each global batch of ``parent``, as a flat dataset.

  Element ``j`` is row ``r = j % b`` of global batch ``s = j // b``, i.e. parent element
  ``s*B + p*b + r``. Past the parent's end (only with ``drop_remainder=False``) it is
  ``pad``, so the last global batch is padded to ``B``.
  """

  def __init__(self, parent: grain.MapDataset, *, global_batch_size: int,
               process_index: int, process_count: int, drop_remainder: bool,
               pad: Any):
    super().__init__(parent)
    self._global = global_batch_size
    self._local = global_batch_size // process_count
    self._offset = process_index * self._local
    self._pad = pad
    n = len(parent)
    num_batches = n // self._global if drop_remainder else -(-n // self._global)
    self._length = min(num_batches * self._local, sys.maxsize)

  def __len__(self) -> int:
    return self._length

  def __str__(self) -> str:
    return f"_ProcessRowsMapDataset(B={self._global}, b={self._local}, at={self._offset})"

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    step, row = divmod(index, self._local)
    i = step * self._global + self._offset + row
    return self._parent[i] if i < len(self._parent) else self._pad


def _check_batching(global_batch_size: int, process_index: int, process_count: int):
  if global_batch_size < 1 or global_batch_size % process_count:
    raise ValueError(f"global_batch_size: {global_batch_size} must be a positive "
                     f"multiple of process_count={process_count}")
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index: {process_index} not in [0, {process_count})")


class _ReadRecordBatch:
  """Reads a batch of record indices (-1 = padding row) with one source call.

  Fields other than ``inputs`` / ``targets`` / ``segment_ids`` are stacked as they are;
  ``positions`` count from 0 at each segment start. Padding rows are zeros with targets
  -100 and segment 0; their shapes come from record 0, read once.
  """

  def __init__(self, source: Any, seq_len: int):
    self._source = source
    self._seq_len = seq_len
    self._template = None

  def _pad_row(self) -> dict[str, np.ndarray]:
    if self._template is None:
      first = self._source.__getitems__([0])[0]
      self._template = {k: np.zeros_like(np.asarray(v)) for k, v in first.items()}
      self._template["targets"] = np.full_like(self._template["targets"], mqar.IGNORE)
    return self._template

  def __call__(self, indices: np.ndarray) -> dict[str, np.ndarray]:
    real = indices >= 0
    records = self._source.__getitems__([int(i) for i in indices[real]]) if real.any() else []
    it = iter(records)
    rows = [{k: np.asarray(v) for k, v in next(it).items()} if r else self._pad_row() for r in real]
    out = {k: np.stack([row[k] for row in rows]) for k in rows[0]}
    for key in ("inputs", "targets"):
      if out[key].shape[1] != self._seq_len:
        raise ValueError(f"record field {key!r} has length {out[key].shape[1]}, expected {self._seq_len}")
    out["targets"] = out["targets"].astype(np.int32)
    if np.issubdtype(out["inputs"].dtype, np.integer):
      out["inputs"] = out["inputs"].astype(np.int32)
    else:
      out["inputs"] = out["inputs"].astype(np.float32)
    seg = out.get("segment_ids")
    seg = np.ones(out["targets"].shape, np.int32) if seg is None else seg.astype(np.int32)
    seg = np.where(real[:, None], seg, 0).astype(np.int32)
    out["segment_ids"] = seg
    out["positions"] = _segment_positions(seg)
    return out


def _segment_positions(segment_ids: np.ndarray) -> np.ndarray:
  """0, 1, 2, ... restarting wherever the segment id changes; 0 on padding (segment 0)."""
  t = np.arange(segment_ids.shape[1])
  starts = np.ones_like(segment_ids, bool)
  starts[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
  start_index = np.maximum.accumulate(np.where(starts, t, 0), axis=1)
  return np.where(segment_ids > 0, t - start_index, 0).astype(np.int32)


def _mqar_info(input_cfg: Any) -> TaskInfo:
  f = mqar_fields(input_cfg)
  four_x = f["vocab_size"] > 4 * f["seq_len"]   # MQARConfig.has_test_4x
  return TaskInfo("mqar", int(f["vocab_size"]), int(f["seq_len"]),
                  ("test", "test_4x") if four_x else ("test",),
                  (("test_4x", 4 * int(f["seq_len"])),) if four_x else ())


def _mqar_source(input_cfg: Any, split: str, data_dir: str):
  from memarch.data import mqar_tfds  # pylint: disable=g-import-not-at-top

  config = mqar_tfds.MQARConfig.from_fields(**mqar_fields(input_cfg))
  if split not in config.split_names:
    raise ValueError(f"split: {split!r} not in {config.split_names} for MQAR "
                     f"config {config.name}")
  return mqar_tfds.prepare(config, data_dir).as_data_source(split)


register_task("mqar", RecordTask(_mqar_info, _mqar_source))
# Single-needle pass-key retrieval (RULER S-NIAH, Titans Table 2); fields in niah_tfds.config_from_input.
register_task("niah", RecordTask(lazy("memarch.data.niah_tfds", "task_info"),
                                 lazy("memarch.data.niah_tfds", "data_source")))
# Supervised ballet-like recall (spec hcam.md §11.2); fields in ballet_tfds.config_from_input.
register_task("ballet", RecordTask(lazy("memarch.data.ballet_tfds", "task_info"),
                                   lazy("memarch.data.ballet_tfds", "data_source")))
# Synthetic long-tail facts with routes (spec hmem.md §5); fields in facts_tfds.config_from_input.
register_task("facts", RecordTask(lazy("memarch.data.facts_tfds", "task_info"),
                                  lazy("memarch.data.facts_tfds", "task_source")))


def _text_source(input_cfg: Any, split: str, data_dir: str):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  from memarch.data import local_text  # pylint: disable=g-import-not-at-top,unused-import  (registers it)
  from memarch.data import tfds_util  # pylint: disable=g-import-not-at-top

  name = cfg_get(input_cfg, "dataset")
  if split == "train":
    split = cfg_get(input_cfg, "train_split", "train")
  make = lambda: tfds.builder(name, data_dir=data_dir, file_format="array_record")
  return tfds_util.prepare_once(make, data_dir).as_data_source(split)


def build_iterator(
    input_cfg: Any,
    *,
    split: str,
    seed: int,
    global_batch_size: int,
    process_index: int = 0,
    process_count: int = 1,
    data_dir: str | None = None,
    shuffle: bool = True,
    num_epochs: int | None = None,
    drop_remainder: bool = True,
) -> grain.DatasetIterator:
  """Returns this process's batch iterator (see the module docstring).

  Args:
    input_cfg: the ``input`` section of the experiment config.
    split: ``"train"`` or one of ``get_task_info(input_cfg).eval_splits``.
    seed: the shuffle seed, in [0, 2^32); the same seed gives the same batches.
    global_batch_size: B, rows per step over all processes.
    process_index: this process, in [0, process_count).
    process_count: number of processes; must divide B.
    data_dir: TFDS data directory (default: ``input.data_dir``, then
      ``$MEMARCH_DATA_DIR``, then ``~/tensorflow_datasets``). MQAR is generated there
      on first use.
    shuffle: shuffle records (a fresh permutation per epoch).
    num_epochs: passes over the split; None repeats forever.
    drop_remainder: drop the last partial global batch; if False it is padded with
      empty rows instead (targets -100).

  Returns:
    A ``grain.DatasetIterator`` of dicts ``inputs, targets, segment_ids, positions``
    (see the module docstring), [B // process_count, seq_len, ...].
  """
  name = _task_name(input_cfg)
  info = get_task_info(input_cfg)
  _check_batching(global_batch_size, process_index, process_count)
  data_dir = resolve_data_dir(data_dir, input_cfg)
  local = global_batch_size // process_count
  if name in _RECORD_TASKS:
    # Shuffle and shard record indices, then read each local batch in one call.
    source = _RECORD_TASKS[name].source(input_cfg, split, data_dir)
    ds = grain.MapDataset.range(len(source))
    if shuffle:
      ds = ds.shuffle(seed=seed)
    ds = _ProcessRowsMapDataset(
        ds.repeat(num_epochs), global_batch_size=global_batch_size,
        process_index=process_index, process_count=process_count,
        drop_remainder=drop_remainder, pad=-1)
    ds = ds.batch(local, drop_remainder=True).map(_ReadRecordBatch(source, info.seq_len_of(split)))
    return iter(ds.to_iter_dataset(_READ))

  tokenizer = text.make_tokenizer(cfg_get(input_cfg, "tokenizer", "byte"))
  text_key = cfg_get(input_cfg, "text_key", "text")
  ds = grain.MapDataset.source(_text_source(input_cfg, split, data_dir))
  if shuffle:
    ds = ds.shuffle(seed=seed)
  ds = ds.repeat(num_epochs).map(
      lambda ex: {"tokens": text.document_tokens(tokenizer, ex[text_key])})
  rows = text.pack_documents(ds.to_iter_dataset(_READ), info.seq_len)
  batches = rows.batch(global_batch_size, drop_remainder=drop_remainder)
  lo = process_index * local
  return iter(batches.map(lambda b: _local_rows(b, global_batch_size, lo, local)))


def _local_rows(batch: dict[str, np.ndarray], global_batch_size: int, lo: int,
                local: int) -> dict[str, np.ndarray]:
  """Pads a (last, partial) global batch to B rows and slices this process's rows."""
  out = {}
  for k, v in batch.items():
    if v.shape[0] < global_batch_size:
      pad = np.full((global_batch_size - v.shape[0],) + v.shape[1:],
                    mqar.IGNORE if k == "targets" else 0, v.dtype)
      v = np.concatenate([v, pad])
    out[k] = v[lo:lo + local]
  return out
