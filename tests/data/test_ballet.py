"""The supervised ballet task: golden generator facts, the TFDS builder, the registered record task."""

from __future__ import annotations

import numpy as np
import pytest

from memarch import data
from memarch.data import ballet
from memarch.data import ballet_tfds

# sha256 of make_library(13, library_seed=0) as int64 direction indices; pins the walk procedure and its RNG use.
GOLDEN_LIBRARY_HASH = "10f9d611971ed28fd1fb2f71d7e5ba6d62dd4b7dbbc331198753bad99790725d"


def _decode_offsets(board: np.ndarray) -> np.ndarray:
  """Inverse of ``ballet.render`` for clean frames: [T, 80] -> [T, 8, 2] offsets, -9 for an absent slot."""
  cells = board.reshape(board.shape[0], ballet.NUM_SLOTS, ballet.SLOT_DIMS)
  assert np.all(cells.sum(-1) == 1)  # one hot per slot
  cell = cells.argmax(-1)
  offsets = np.stack([cell // 3 - 1, cell % 3 - 1], axis=-1)
  return np.where((cell == ballet.SLOT_DIMS - 1)[..., None], -9, offsets)


def test_library_is_golden_closed_in_the_box_and_distinct():
  library = ballet.make_library(13, library_seed=0)
  assert library.shape == (13, 16)
  assert ballet.library_hash(library) == GOLDEN_LIBRARY_HASH
  assert ballet.library_hash(ballet.make_library(13, library_seed=1)) != GOLDEN_LIBRARY_HASH
  traj = ballet.trajectories(library)
  assert np.abs(traj).max() <= 1                       # every position in the 3x3 box
  np.testing.assert_array_equal(traj[:, -1], 0)        # every walk returns home
  assert np.all(np.abs(np.diff(np.concatenate([np.zeros((13, 1, 2), int), traj], 1), axis=1)).max(-1) == 1)
  assert len({tuple(w) for w in library.tolist()}) == 13  # distinct direction sequences
  np.testing.assert_array_equal(ballet.make_library(5, library_seed=0), ballet.make_library(5, library_seed=0))


@pytest.mark.parametrize("n,delay,length", [(2, 16, 65), (4, 16, 129), (8, 16, 257),
                                            (2, 48, 129), (4, 48, 257), (8, 48, 513)])
def test_frame_count_and_shapes_of_the_six_levels(n, delay, length):
  assert ballet.seq_len(n, delay) == length == n * (16 + delay) + 1
  library = ballet.make_library()
  ep = ballet.episode(np.random.default_rng(n * delay), library, n, delay)
  assert ep.inputs.shape == (length, 93) and ep.inputs.dtype == np.float32
  assert ep.slots.shape == ep.motions.shape == (n,) and 0 <= ep.target < n
  record = ballet.to_record(ep)
  assert record["targets"].shape == (length,) and record["targets"].dtype == np.int32
  np.testing.assert_array_equal(record["targets"][:-1], -100)
  assert record["targets"][-1] == ep.label


@pytest.mark.parametrize("seed", range(5))
def test_label_is_the_slot_that_performed_the_queried_motion(seed):
  # Given an episode decoded back from its frames alone
  library = ballet.make_library()
  traj = ballet.trajectories(library)
  n, delay = 4, 5
  ep = ballet.episode(np.random.default_rng(seed), library, n, delay)
  x = ep.inputs
  query = x[-1]
  assert np.all(query[:80] == 0) and query[80:].sum() == 1
  motion = int(query[80:].argmax())
  offsets = _decode_offsets(x[:-1, :80])
  assert np.all(x[:-1, 80:] == 0)                       # motion dims only on the query frame
  # Then absent slots are flagged in every frame, and exactly one slot moves in each dance window
  present = offsets[0, :, 0] != -9
  assert present.sum() == n and np.all((offsets[:, :, 0] == -9) == ~present)
  movers = []
  for i in range(n):
    window = offsets[i * (16 + delay):i * (16 + delay) + 16]
    rest = offsets[i * (16 + delay) + 16:(i + 1) * (16 + delay)]
    moving = [s for s in range(8) if present[s] and np.any(window[:, s] != 0)]
    assert len(moving) == 1 and np.all(rest[:, present] == 0)  # everyone is home after the dance
    movers.append((moving[0], window[:, moving[0]]))
  # And the label is the slot whose trajectory is the queried motion's
  matches = [slot for slot, path in movers if np.array_equal(path, traj[motion])]
  assert matches == [ep.label]
  assert motion == ep.motions[ep.target] and ep.label == ep.slots[ep.target]


def test_phase_offset_and_noise_knobs():
  library = ballet.make_library()
  ep = ballet.episode(np.random.default_rng(3), library, 2, 16, phase_offset=15)
  assert ep.inputs.shape[0] == ballet.seq_len(2, 16, 15) == 80 and 0 <= ep.phase <= 15
  offsets = _decode_offsets(ep.inputs[:-1, :80])
  moving = np.flatnonzero(np.any(offsets[:, ep.slots[0]] != 0, axis=-1))
  assert moving.min() >= ep.phase and moving.max() < ep.phase + 16
  phases = {ballet.episode(np.random.default_rng(s), library, 2, 16, phase_offset=15).phase for s in range(40)}
  assert len(phases) > 5
  clean = ballet.episode(np.random.default_rng(4), library, 8, 16)
  noisy = ballet.episode(np.random.default_rng(4), library, 8, 16, noise_p=0.2)
  diff = noisy.inputs != clean.inputs
  assert 0.1 < diff[:-1, :80].mean() * 10 / 9 < 0.3   # flips hit cell dims at about noise_p
  assert not diff[:, 9::10][:, :8].any() and not diff[-1].any() and not diff[:, 80:].any()


def test_bad_arguments_name_the_field():
  for kwargs, field in [(dict(num_dancers=9), "num_dancers"), (dict(delay=-1), "delay"),
                        (dict(n_motions=3, num_dancers=4), "n_motions"), (dict(noise_p=1.0), "noise_p"),
                        (dict(phase_offset=-2), "phase_offset")]:
    args = dict(num_dancers=2, delay=16) | kwargs
    with pytest.raises(ValueError, match=f"input.{field}"):
      ballet.check_args(prefix="input.", **args)


def test_tfds_builder_on_a_tiny_config(tmp_path):
  # Given a tiny custom config with phase offsets, prepared as array_record
  cfg = ballet_tfds.BalletConfig.from_fields(num_dancers=2, delay=3, num_train=12, num_test=5, seed=7,
                                             phase_offset=2)
  assert ballet_tfds.BalletConfig.from_fields(num_dancers=8, delay=48).name == "n8_delay48"  # standard name
  builder = ballet_tfds.prepare(cfg, str(tmp_path))
  assert set(builder.info.splits) == {"train", "test", "test_delay48", "test_n8"}
  # Then the records are the generator's, in order, with the right lengths per split
  train = builder.as_data_source("train")
  assert len(train) == 12
  expected = list(ballet.generate(12, num_dancers=2, delay=3, seed=7, phase_offset=2))
  got = train.__getitems__(list(range(12)))
  for e, g in zip(expected, got):
    np.testing.assert_array_equal(g["inputs"], e["inputs"])
    np.testing.assert_array_equal(g["targets"], e["targets"])
    assert g["inputs"].dtype == np.float32 and g["dance_index"] == e["dance_index"] and g["phase"] == e["phase"]
  for split, length in [("test", 41), ("test_delay48", 2 * 64 + 3), ("test_n8", 8 * 19 + 3)]:
    source = builder.as_data_source(split)
    assert len(source) == 5 and source[0]["inputs"].shape == (length, 93) == (cfg.split_seq_len(split), 93)
  test0 = builder.as_data_source("test")[0]
  first = next(ballet.generate(1, num_dancers=2, delay=3, seed=2**31 + 7, phase_offset=2))
  np.testing.assert_array_equal(test0["inputs"], first["inputs"])


def test_registered_task_reads_float_frames(tmp_path):
  cfg = dict(name="ballet", num_dancers=2, delay=2, num_train=10, num_test=6, extrapolation=True)
  info = data.get_task_info(cfg)
  assert (info.vocab_size, info.seq_len, info.input_features) == (8, 37, 93)
  assert info.eval_splits == ("test", "test_delay48", "test_n8")
  assert info.seq_len_of("test_delay48") == 129 and info.seq_len_of("test_n8") == 145
  it = data.build_iterator(cfg, split="train", seed=0, global_batch_size=4, data_dir=str(tmp_path))
  batch = next(it)
  assert batch["inputs"].shape == (4, 37, 93) and batch["inputs"].dtype == np.float32
  assert batch["targets"].shape == (4, 37) and np.all(batch["targets"][:, :-1] == -100)
  assert np.all((batch["targets"][:, -1] >= 0) & (batch["targets"][:, -1] < 8))
  assert batch["dance_index"].shape == (4,)
  batches = list(data.build_iterator(cfg, split="test_n8", seed=0, global_batch_size=4, data_dir=str(tmp_path),
                                     shuffle=False, num_epochs=1, drop_remainder=False))
  assert len(batches) == 2 and batches[1]["inputs"].shape == (4, 145, 93)
  assert data.get_task_info(dict(name="ballet", builder_config="n8_delay48")).seq_len == 513


@pytest.mark.parametrize("cfg,field", [
    (dict(delay=16), "num_dancers"), (dict(num_dancers=0, delay=16), "num_dancers"),
    (dict(num_dancers=2, delay=16, num_train=0), "num_train"), (dict(num_dancers=2, delay=16, seq_len=64), "seq_len"),
    (dict(num_dancers=2, delay=16, data_seed=-1), "data_seed"),
    (dict(builder_config="n2_delay16", delay=48), "delay"), (dict(builder_config="nope"), "builder_config")])
def test_task_fields_are_validated_naming_them(cfg, field):
  with pytest.raises(ValueError, match=f"input.({field})"):
    data.get_task_info(dict(name="ballet", **cfg))


def test_model_input_features_must_match_the_task():
  from configs.ballet import hcam  # pylint: disable=g-import-not-at-top
  from memarch.training import validate  # pylint: disable=g-import-not-at-top

  config = hcam.get_config("runlocal")
  config.unlock()
  config.model.input_features = None
  with pytest.raises(ValueError, match="model.input_features=None does not match task 'ballet'"):
    validate.validate(config)


def test_hcam_config_sg_arg_sets_the_blocks_stop_gradient():
  from configs.ballet import hcam  # pylint: disable=g-import-not-at-top
  from memarch.models import get_model  # pylint: disable=g-import-not-at-top

  def block_option(arg):
    config = hcam.get_config(arg)
    return dict(dict(get_model(config.model_name, **config.model).config.mixer_options)["hcam"])["stop_gradient_memory"]

  assert block_option("runlocal") is True  # the paper's and the reference's choice
  assert block_option("runlocal,sg=0") is False
