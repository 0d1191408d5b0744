"""The training loop's data contract on MQAR: batches, determinism, state, sharding."""

from __future__ import annotations

import json
import types

import grain
import ml_collections
import numpy as np
import pytest

from memarch import data
from memarch.data import pipeline

# A small MQAR task: 100 train / 20 test examples, generated once per session.
MQAR_CFG = dict(name="mqar", seq_len=32, vocab_size=256, num_kv_pairs=4,
                num_train=100, num_test=20)


def _take(it, n):
  return [next(it) for _ in range(n)]


def _assert_batches_equal(xs, ys):
  assert len(xs) == len(ys)
  for x, y in zip(xs, ys):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])


def test_batch_contract(data_dir):
  it = data.build_iterator(MQAR_CFG, split="train", seed=0, global_batch_size=8,
                           data_dir=data_dir)
  batch = next(it)
  assert set(batch) == {"inputs", "targets", "segment_ids", "positions"}
  for v in batch.values():
    assert v.shape == (8, 32) and v.dtype == np.int32
  np.testing.assert_array_equal(batch["segment_ids"], 1)
  np.testing.assert_array_equal(batch["positions"], np.broadcast_to(np.arange(32), (8, 32)))
  assert ((batch["targets"] != -100).sum(1) == 4).all()


def test_determinism_and_seed(data_dir):
  make = lambda seed: data.build_iterator(MQAR_CFG, split="train", seed=seed,
                                          global_batch_size=8, data_dir=data_dir)
  # 100 records, batch 8: 20 steps run into the second (reshuffled) epoch.
  a, b = _take(make(0), 20), _take(make(0), 20)
  _assert_batches_equal(a, b)
  c = _take(make(1), 1)
  assert not np.array_equal(a[0]["inputs"], c[0]["inputs"])


def test_state_restore_continues_identically(data_dir):
  make = lambda: data.build_iterator(MQAR_CFG, split="train", seed=3,
                                     global_batch_size=8, data_dir=data_dir)
  it = make()
  _take(it, 7)
  state = json.loads(json.dumps(it.get_state()))  # JSON-serialisable, as grain's handler needs
  rest = _take(it, 9)
  fresh = make()
  fresh.set_state(state)
  _assert_batches_equal(_take(fresh, 9), rest)


def test_orbax_checkpoint_round_trip(data_dir, tmp_path):
  ocp = pytest.importorskip("orbax.checkpoint")
  make = lambda: data.build_iterator(MQAR_CFG, split="train", seed=3,
                                     global_batch_size=8, data_dir=data_dir)
  it = make()
  _take(it, 5)
  state = {"w": np.arange(3.0)}
  # Given a checkpoint of model state and iterator, taken after 5 batches.
  with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
    mngr.save(5, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=grain.checkpoint.CheckpointSave(it)))
    mngr.wait_until_finished()
    rest = _take(it, 4)
    # When restoring both into fresh objects.
    fresh = make()
    restored = mngr.restore(5, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(state), data=grain.checkpoint.CheckpointRestore(fresh)))
  # Then the iterator continues where it was saved.
  np.testing.assert_array_equal(restored["state"]["w"], state["w"])
  _assert_batches_equal(_take(fresh, 4), rest)


@pytest.mark.parametrize("process_count", [2, 4])
def test_global_batch_independent_of_process_count(data_dir, process_count):
  kw = dict(split="train", seed=5, global_batch_size=8, data_dir=data_dir)
  whole = _take(data.build_iterator(MQAR_CFG, **kw), 15)
  parts = [_take(data.build_iterator(MQAR_CFG, process_index=p,
                                     process_count=process_count, **kw), 15)
           for p in range(process_count)]
  for step, batch in enumerate(whole):
    for k in batch:
      np.testing.assert_array_equal(
          np.concatenate([part[step][k] for part in parts]), batch[k])


def test_eval_pass_covers_every_record_once_with_padding(data_dir):
  # 20 test records, global batch 8 over 2 processes: 3 steps, the last padded by 4 rows.
  kw = dict(split="test", seed=0, global_batch_size=8, data_dir=data_dir,
            shuffle=False, num_epochs=1, drop_remainder=False, process_count=2)
  parts = [list(data.build_iterator(MQAR_CFG, process_index=p, **kw)) for p in range(2)]
  assert [len(p) for p in parts] == [3, 3]
  rows = np.concatenate([np.concatenate([p[s]["inputs"] for p in parts]) for s in range(3)])
  seg = np.concatenate([np.concatenate([p[s]["segment_ids"] for p in parts]) for s in range(3)])
  tgt = np.concatenate([np.concatenate([p[s]["targets"] for p in parts]) for s in range(3)])
  real = seg.any(1)
  assert real.sum() == 20 and not real[20:].any()
  assert (tgt[~real] == -100).all() and (rows[~real] == 0).all()
  assert len({tuple(r) for r in rows[real]}) == 20
  # drop_remainder=True keeps only the 2 full global batches.
  kw.update(drop_remainder=True)
  assert len(list(data.build_iterator(MQAR_CFG, **kw))) == 2


def test_test_4x_split(data_dir):
  it = data.build_iterator(MQAR_CFG, split="test_4x", seed=0, global_batch_size=4,
                           data_dir=data_dir, shuffle=False, num_epochs=1)
  batch = next(it)
  assert batch["inputs"].shape == (4, 128)
  assert ((batch["targets"] != -100).sum(1) == 16).all()


def test_config_kinds_and_env(data_dir, monkeypatch):
  monkeypatch.setenv("MEMARCH_DATA_DIR", data_dir)
  as_dict = _take(data.build_iterator(MQAR_CFG, split="train", seed=2, global_batch_size=4), 2)
  for cfg in (ml_collections.ConfigDict(MQAR_CFG), types.SimpleNamespace(**MQAR_CFG)):
    got = _take(data.build_iterator(cfg, split="train", seed=2, global_batch_size=4), 2)
    _assert_batches_equal(got, as_dict)


def test_task_info():
  info = data.get_task_info(MQAR_CFG)
  assert info == data.TaskInfo("mqar", 256, 32, ("test", "test_4x"), (("test_4x", 128),))
  assert (info.seq_len_of("test"), info.seq_len_of("test_4x")) == (32, 128)
  small_vocab = dict(MQAR_CFG, vocab_size=100)
  assert data.get_task_info(small_vocab).eval_splits == ("test",)
  std = data.get_task_info(dict(name="mqar", builder_config="L256_kv16"))
  assert (std.vocab_size, std.seq_len) == (8192, 256)
  text = data.get_task_info(dict(name="tfds_text", dataset="lm1b", seq_len=128))
  assert text == data.TaskInfo("tfds_text", 259, 128, ("test",))


@pytest.mark.parametrize("cfg, message", [
    (dict(name="x"), r"^input\.name: unknown task 'x'; known: .*mqar, .*tfds_text"),
    (dict(name="mqar", seq_len=32, vocab_size=256), r"^input\.num_kv_pairs: required"),
    (dict(MQAR_CFG, num_kv_pairs=9), r"^input\.num_kv_pairs:"),
    (dict(MQAR_CFG, seq_len=31), r"^input\.seq_len:"),
    (dict(MQAR_CFG, vocab_size=32), r"^input\.vocab_size:"),
    (dict(MQAR_CFG, num_train=0), r"^input\.num_train:"),
    (dict(name="mqar", builder_config="nope"), r"^input\.builder_config:"),
    (dict(name="mqar", builder_config="L64_kv4", seq_len=128), r"^input\.seq_len:"),
    (dict(name="tfds_text", seq_len=8), r"^input\.dataset: required"),
    (dict(name="tfds_text", dataset="lm1b", seq_len=0), r"^input\.seq_len:"),
    (dict(name="tfds_text", dataset="lm1b", seq_len=8, tokenizer="/no/such.model"),
     r"^input\.tokenizer:"),
])
def test_task_info_errors(cfg, message):
  with pytest.raises(ValueError, match=message):
    data.get_task_info(cfg)


def test_batching_errors(data_dir):
  with pytest.raises(ValueError, match="^global_batch_size:"):
    data.build_iterator(MQAR_CFG, split="train", seed=0, global_batch_size=6,
                        process_count=4, data_dir=data_dir)
  with pytest.raises(ValueError, match="^split:"):
    data.build_iterator(MQAR_CFG, split="validation", seed=0, global_batch_size=4,
                        data_dir=data_dir)


def test_cfg_get():
  assert pipeline.cfg_get({"a": 1}, "a") == 1
  assert pipeline.cfg_get(ml_collections.ConfigDict({"a": 1}), "b", 2) == 2
  with pytest.raises(ValueError, match=r"^input\.b: required"):
    pipeline.cfg_get(types.SimpleNamespace(a=1), "b")


class _ToySource:
  """An in-memory random-access source: 10 records of 6 float feature frames, 2 segments each, and a route."""

  def __init__(self):
    rng = np.random.default_rng(0)
    self.records = [dict(inputs=rng.normal(size=(6, 3)).astype(np.float32),
                         targets=np.array([-100] * 5 + [i % 4]), segment_ids=np.array([1, 1, 1, 2, 2, 2]),
                         route=np.array([i, 10 + i])) for i in range(10)]

  def __len__(self):
    return len(self.records)

  def __getitems__(self, indices):
    return [self.records[i] for i in indices]


def test_registered_record_task_with_features_segments_and_extra_fields():
  info = data.TaskInfo("toy", vocab_size=4, seq_len=6, eval_splits=("test",), input_features=3)
  data.register_task("toy_features", data.RecordTask(info=lambda cfg: info, source=lambda cfg, split, d: _ToySource()))
  cfg = dict(name="toy_features")
  assert data.get_task_info(cfg) is info and "toy_features" in pipeline.known_tasks()
  it = data.build_iterator(cfg, split="test", seed=0, global_batch_size=4, shuffle=False, num_epochs=1,
                           drop_remainder=False, process_index=1, process_count=2, data_dir="unused")
  batches = list(it)
  assert len(batches) == 3  # 10 records in global batches of 4, the last padded
  first = batches[0]
  assert first["inputs"].shape == (2, 6, 3) and first["inputs"].dtype == np.float32
  np.testing.assert_array_equal(first["inputs"][0], _ToySource().records[2]["inputs"])  # process 1: rows 2, 3
  np.testing.assert_array_equal(first["route"], [[2, 12], [3, 13]])
  np.testing.assert_array_equal(first["positions"][0], [0, 1, 2, 0, 1, 2])
  last = batches[-1]  # global rows 8, 9 (process 0) and two padding rows (process 1)
  np.testing.assert_array_equal(last["segment_ids"], 0)
  np.testing.assert_array_equal(last["targets"], -100)
  np.testing.assert_array_equal(last["inputs"], 0)
