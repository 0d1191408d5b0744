"""Config validation: each bad field gets its own clear message before anything compiles."""

from __future__ import annotations

import pytest

import helpers_training as ht
import train
from configs import common as cc
from configs.mqar import transformer
from memarch.training import validate


def _set(config, dotted, value):
  *parents, leaf = dotted.split(".")
  for p in parents:
    config = config[p]
  config[leaf] = value


@pytest.mark.parametrize("field, value, message", [
    ("model_name", "nope", r"model_name: unknown model 'nope'"),
    ("input.name", "nope", r"input.name: unknown task 'nope'"),
    ("input.batch_size", 6,
     r"input.batch_size=6 is not divisible by the data-parallel size 8 \(mesh data=8 x fsdp=1\)"),
    ("mesh", [("data", 3), ("fsdp", 1), ("tensor", 1)], r"mesh=.* does not match the 8 devices"),
    ("mesh", [("data", -1), ("fsdp", 3), ("tensor", 1)], r"mesh=.* does not match the 8 devices"),
    ("model.vocab_size", 64, r"model.vocab_size=64 is too small for task 'mqar', which needs 128"),
    ("input.seq_len", 33, r"input.seq_len"),
    ("optax.name", "sgd", r"optax.name='sgd' is unknown"),
    ("optax.lr_multipliers", [("([", 2.0)], r"optax.lr_multipliers: bad regex"),
    ("optax.lr_drop_below_loss", -1.0, r"optax.lr_drop_below_loss=-1.0 must be a non-negative number"),
    ("optax.lr_drop_factor", 1.5, r"optax.lr_drop_factor=1.5 must be in \(0, 1\]"),
    ("total_steps", 0, r"total_steps=0 must be a positive int"),
    ("init_from", "no/such/run", r"init_from='no/such/run' must be empty or a run's workdir with a finished checkp"),
])
def test_bad_field_raises_its_message(field, value, message, tmp_path):
  # Given the tiny config with one bad field; When validated; Then the error names that field.
  config = ht.tiny_config(str(tmp_path))
  _set(config, field, value)
  with pytest.raises(ValueError, match=message):
    validate.validate(config)


def test_init_from_needs_a_finished_checkpoint(tmp_path):
  # Given a run that has not saved yet (an empty checkpoints/, or only a save in progress);
  config = ht.tiny_config(str(tmp_path))
  config.init_from = str(tmp_path / "run")
  (tmp_path / "run" / "checkpoints" / "600.orbax-checkpoint-tmp-0").mkdir(parents=True)
  # Then it is rejected before anything compiles, and accepted once a step is saved.
  with pytest.raises(ValueError, match="init_from=.* must be empty or a run's workdir with a finished checkpoint"):
    validate.validate(config)
  (tmp_path / "run" / "checkpoints" / "600").mkdir()
  validate.validate(config)


def test_eval_length_is_validated_too(tmp_path):
  # The tiny task with a vocabulary above 4L gets a test_4x split of length 128, longer than the KV cache.
  config = ht.tiny_config(str(tmp_path))
  config.input.vocab_size = config.model.vocab_size = 512
  config.model.max_len = 64
  with pytest.raises(ValueError, match=r"the test_4x eval split has length 128: model.max_len=64"):
    validate.validate(config)


def test_batch_divisibility_names_fsdp(tmp_path):
  config = ht.tiny_config(str(tmp_path), mesh=[("data", 2), ("fsdp", 2), ("tensor", 2)])
  config.input.batch_size = 6
  with pytest.raises(ValueError, match=r"data-parallel size 4 \(mesh data=2 x fsdp=2\)"):
    validate.validate(config)


def test_several_bad_fields_are_all_listed(tmp_path):
  config = ht.tiny_config(str(tmp_path))
  config.model_name, config.input.batch_size = "nope", 6
  with pytest.raises(ValueError) as err:
    validate.validate(config)
  assert "model_name" in str(err.value) and "input.batch_size" in str(err.value)


def test_train_rejects_bad_config_before_compiling(tmp_path):
  config = ht.tiny_config(str(tmp_path))
  config.input.batch_size = 6
  with pytest.raises(ValueError, match="input.batch_size"):
    train.train_and_evaluate(config, str(tmp_path / "wd"))
  assert not (tmp_path / "wd").exists()


@pytest.mark.parametrize("arg", [None, "runlocal"])
def test_default_configs_validate(arg):
  validate.validate(transformer.get_config(arg))


def test_parse_arg():
  arg = cc.parse_arg("runlocal,steps=5,name=x", runlocal=False, steps=1, name="", lr=0.1)
  assert (arg.runlocal, arg.steps, arg.name, arg.lr) == (True, 5, "x", 0.1)
  with pytest.raises(ValueError, match="unknown key 'bad'"):
    cc.parse_arg("bad=1", runlocal=False)
