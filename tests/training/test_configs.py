"""Every experiment config loads, validates, and its runlocal variant trains a few steps end to end."""

from __future__ import annotations

import importlib
import pathlib

import numpy as np
import pytest
from absl import flags
from ml_collections import config_flags

import train
from memarch.training import validate

ROOT = pathlib.Path(__file__).resolve().parents[2]
CONFIGS = sorted(str(p.relative_to(ROOT).with_suffix("")).replace("/", ".")
                 for p in (ROOT / "configs").glob("*/*.py") if p.name != "__init__.py")


def test_there_are_configs():
  assert "configs.mqar.transformer" in CONFIGS and "configs.text.transformer" in CONFIGS


@pytest.mark.parametrize("name", CONFIGS)
def test_config_validates_in_both_variants(name):
  module = importlib.import_module(name)
  assert "python train.py --config" in module.__doc__  # the launch command is documented
  for arg in (None, "runlocal"):
    validate.validate(module.get_config(arg))


@pytest.mark.parametrize("name", CONFIGS)
def test_init_from_is_settable_on_the_command_line(name):
  # Given the flag train.py defines; When a config file is parsed with --config.init_from;
  argv = ["train.py", f"--config={ROOT / name.replace('.', '/')}.py:runlocal", "--config.init_from=some/run"]
  values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, flag_values=values, sys_argv=argv)
  values(argv)
  # Then the config holds it (the warm start of train.py reads it), and it is empty by default.
  assert values.config.init_from == "some/run"
  assert importlib.import_module(name).get_config(None).init_from == ""


# The heaviest compiles, run with ``-m slow``: the Titans blocks' LM streaming is tested in tests/models/test_lm.py
# (MAC, MAL) and their layers in tests/layers/test_titans_*.py, a Titans memory trains through train.py in
# configs.mqar.titans_lmm, and the NIAH task and its 4x-length eval in configs.niah.transformer_window.
# Also run with ``-m slow``: configs whose model and task a default sibling already trains (B'MOJO-F is B'MOJO's
# config without the store, dense2x the anchor at twice the depth, the ballet window transformer the NIAH one).
_SLOW_RUNS = ("configs.text.titans_mac", "configs.niah.titans_mac", "configs.niah.titans_mag",
              "configs.niah.titans_mal", "configs.mqar.bmojo_f", "configs.facts.dense2x",
              "configs.ballet.transformer_window")


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in _SLOW_RUNS else n
                                  for n in CONFIGS])
def test_runlocal_trains_two_steps(name, tmp_path):
  config = importlib.import_module(name).get_config("runlocal")
  config.total_steps, config.log_every, config.eval_every, config.ckpt_every = 2, 1, 2, 2
  config.input.data_dir = str(tmp_path / "tfds")
  if config.input.name == "mqar":  # keep generation tiny; the model is the config's own
    config.input.num_train, config.input.num_test = 64, 64
  history = train.train_and_evaluate(config, str(tmp_path / "work"))
  assert [h["step"] for h in history] == [1, 2]


def test_sweep_model_spec_passes_several_keys_to_the_layer():
  # Given the MQAR sweep's model spec with two config keys (';' separates them inside the comma-split flag)
  import sys  # pylint: disable=g-import-not-at-top
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from memarch import models  # pylint: disable=g-import-not-at-top
  sys.path.insert(0, str(ROOT / "benchmarks"))
  import mqar_sweep  # pylint: disable=g-import-not-at-top
  shapes = {}
  for spec in ("bmojo:memory_size=128;qk_norm=True", "bmojo:memory_size=128"):
    c = mqar_sweep.point_config(spec, 64, 256, 64, 3e-3, steps=10, batch=8, vocab=512, num_train=8, num_test=8,
                                data_dir=None)
    validate.validate(c)
    model = models.get_model(c.model_name, **c.model.to_dict())
    params = nn.meta.unbox(jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 8), jnp.int32)))["params"]
    shapes[spec] = {jax.tree_util.keystr(p): x.shape for p, x in jax.tree_util.tree_leaves_with_path(params)}
  # Then both keys reach every B'MOJO layer: the store of M = 128 and the per-head q / k gains of qk_norm
  with_norm, without = shapes.values()
  gains = sorted(k for k in with_norm if k.endswith("_norm']"))
  assert len(gains) == 4 and all(with_norm[k] == (32,) for k in gains), gains
  assert set(with_norm) - set(without) == set(gains)
  assert dict(dict(c.model.mixer_options)["bmojo"])["memory_size"] == 128


def test_sweep_point_records_its_eval_and_train_curves(tmp_path):
  # Given one tiny sweep point (20 steps, two evaluations);
  import sys  # pylint: disable=g-import-not-at-top
  sys.path.insert(0, str(ROOT / "benchmarks"))
  import mqar_sweep  # pylint: disable=g-import-not-at-top
  c = mqar_sweep.point_config("transformer", 32, 32, 4, 3e-3, steps=20, batch=16, vocab=128, num_train=64,
                              num_test=32, data_dir=str(tmp_path), evals=2)
  # When it runs;
  r = mqar_sweep.run_point(c)
  # Then the record keeps the test accuracy of both evaluations (the last one is the point's) and the train
  # metrics of every step (log_every = steps / 100, at least 1), finite.
  assert [s for s, _ in r["curve"]] == [10, 20] and r["curve"][-1][1] == r["accuracy"]
  assert [row[0] for row in r["train_curve"]] == list(range(1, 21))
  assert all(len(row) == 5 and all(np.isfinite(row)) for row in r["train_curve"])
  assert r["train_curve"][-1][1] < r["train_curve"][0][1]  # the loss fell


def test_bmojo_probe_lr_scales_the_innovation_probes_alone():
  # Given the MQAR B'MOJO config with probe_lr=0.1, and the default;
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from configs.mqar import bmojo  # pylint: disable=g-import-not-at-top
  from memarch import models  # pylint: disable=g-import-not-at-top
  from memarch.training import optim  # pylint: disable=g-import-not-at-top
  c = bmojo.get_config("runlocal,probe_lr=0.1")
  validate.validate(c)
  model = models.get_model(c.model_name, **c.model.to_dict())
  params = nn.meta.unbox(jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 8), jnp.int32)))["params"]
  # When the optimizer's multipliers are resolved on the model's parameters;
  mults = optim.lr_multipliers(params, c.optax.lr_multipliers)
  scaled = {jax.tree_util.keystr(p): m for p, m in jax.tree_util.tree_leaves_with_path(mults) if m != 1.0}
  # Then exactly the two layers' probes get 0.1, the default scales nothing, and a score without a probe refuses it.
  assert scaled == {f"['block_{i}']['mixer']['innovation_probe']": 0.1 for i in range(2)}
  assert not list(bmojo.get_config("runlocal").optax.lr_multipliers)
  with pytest.raises(ValueError, match="probe_lr=0.1: only innovation=ssm_residual has a probe"):
    bmojo.get_config("probe_lr=0.1,innovation=key_novelty")


def test_bmojo_lr_drop_sets_the_optimizer_switch():
  # Given the MQAR B'MOJO config with lr_drop=0.1, and the default;
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from configs.mqar import bmojo  # pylint: disable=g-import-not-at-top
  from memarch.training import optim  # pylint: disable=g-import-not-at-top
  c = bmojo.get_config("runlocal,lr_drop=0.1")
  validate.validate(c)
  params = {"w": jnp.ones((2, 2))}
  # When their optimizers see a batch loss of 0.05;
  scales = []
  for config in (c, bmojo.get_config("runlocal")):
    tx, _ = optim.make_optimizer(config.optax, total_steps=10)
    _, state = tx.update(params, tx.init(params), params, value=jnp.float32(0.05))
    scales.append(float(optim.lr_scale(state)))
  # Then only the lr_drop config switches, by the default factor 0.1.
  assert c.optax.lr_drop_below_loss == 0.1
  np.testing.assert_allclose(scales, [0.1, 1.0], rtol=1e-6)
