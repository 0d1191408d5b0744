"""Per-group weight decay (``optax.weight_decay_rules``) and the routed-memory checks of config validation."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
import pytest

from configs.facts import hmem as hmem_config
from configs.facts import pkm as pkm_config
from memarch.training import optim, validate

BANK = hmem_config.BANK
LR = 1e-2


def _params():
  return {"embedding": jnp.full((8, 4), 2.0),
          "block_0": {"mlp": {"anchor": {"gate": jnp.full((4, 6), 2.0)}, "down_1": jnp.full((5, 3, 4), 2.0),
                              "generic_down": jnp.full((3, 4), 2.0)},
                      "mlp_norm": {"scale": jnp.full((4,), 2.0)}}}


def _cfg(**kw):
  base = dict(name="adamw", lr=LR, b1=0.9, b2=0.99, eps=1e-8, wd=0.1, warmup_steps=0, min_lr_ratio=0.1, clip=0.0,
              lr_multipliers=[], wd_exclude=[])
  return mlc.ConfigDict({**base, **kw})


def _grads(params, rows=None):
  """Non-zero gradients; for ``down_1`` only on ``rows`` (the fetched blocks), all rows when None."""
  grads = jax.tree.map(lambda p: 0.1 * jnp.arange(1, p.size + 1, dtype=jnp.float32).reshape(p.shape), params)
  if rows is not None:
    keep = jnp.zeros((5, 1, 1), bool).at[jnp.asarray(rows)].set(True)
    grads["block_0"]["mlp"]["down_1"] = jnp.where(keep, grads["block_0"]["mlp"]["down_1"], 0.0)
  return grads


def _decay_per_step(cfg, rows=None):
  """One step's update with ``cfg`` minus the same step with no weight decay, divided by ``-lr * p``."""
  params, grads = _params(), _grads(_params(), rows)
  updates = {}
  for key, c in (("wd", cfg), ("none", mlc.ConfigDict({**cfg.to_dict(), "wd": 0.0, "weight_decay_rules": []}))):
    tx, _ = optim.make_optimizer(c, total_steps=10)
    updates[key], _ = jax.jit(tx.update)(grads, tx.init(params), params)
  return jax.tree.map(lambda a, b, p: np.asarray((a - b) / (-LR * p)), updates["wd"], updates["none"], params), updates


def test_rates_first_matching_rule_wins_and_the_mask_still_exempts():
  rates = optim.weight_decay_rates(_params(), 0.1, [(r"down_\d+$", 1e-3), (r"mlp/", 0.5), (r"norm", 0.7)])
  mlp = rates["block_0"]["mlp"]
  assert mlp["down_1"] == 1e-3 and mlp["generic_down"] == 0.5 and mlp["anchor"]["gate"] == 0.5
  assert rates["embedding"] == 0.1  # no rule: the global rate
  assert rates["block_0"]["mlp_norm"]["scale"] == 0.0  # exempt by the mask even though a rule matches
  assert optim.weight_decay_rates(_params(), 0.1, [(r"down_1", 1e-3)], exclude=[r"down_1"])["block_0"]["mlp"][
      "down_1"] == 0.0  # wd_exclude wins over a rule


def test_one_step_decays_the_bank_at_its_rule_rate_and_the_anchor_at_the_global_rate():
  # Given AdamW with wd 0.1 and a 1e-3 rule for the bank;
  decay, _ = _decay_per_step(_cfg(weight_decay_rules=[(BANK, 1e-3), (r"generic_", 1e-3)]))
  # Then after one step the bank lost lr * 1e-3 of its weights and the anchor lr * 0.1 (the update difference with
  # and without decay, so Adam's own step cancels).
  mlp = decay["block_0"]["mlp"]
  np.testing.assert_allclose(mlp["down_1"], 1e-3, rtol=1e-4)
  np.testing.assert_allclose(mlp["generic_down"], 1e-3, rtol=1e-4)
  np.testing.assert_allclose(mlp["anchor"]["gate"], 0.1, rtol=1e-4)
  np.testing.assert_allclose(decay["embedding"], 0.1, rtol=1e-4)
  np.testing.assert_allclose(decay["block_0"]["mlp_norm"]["scale"], 0.0, atol=1e-6)


def test_rule_decay_is_scaled_by_the_lr_multiplier():
  decay, _ = _decay_per_step(_cfg(weight_decay_rules=[(BANK, 1e-3)], lr_multipliers=[(BANK, 4.0)]))
  np.testing.assert_allclose(decay["block_0"]["mlp"]["down_1"], 4e-3, rtol=1e-4)
  np.testing.assert_allclose(decay["block_0"]["mlp"]["anchor"]["gate"], 0.1, rtol=1e-4)


def test_lazy_rows_decay_fetched_rows_at_the_rule_rate_and_leave_unfetched_rows_alone():
  # Given a lazy bank whose rows 1 and 3 were fetched (non-zero gradient) and a 1e-3 rule;
  cfg = _cfg(weight_decay_rules=[(BANK, 1e-3)], lazy_rows=[BANK])
  decay, updates = _decay_per_step(cfg, rows=[1, 3])
  # Then the fetched rows decay at 1e-3, the unfetched rows get no update at all (no decay, no momentum step),
  down = np.asarray(updates["wd"]["block_0"]["mlp"]["down_1"])
  np.testing.assert_allclose(decay["block_0"]["mlp"]["down_1"][[1, 3]], 1e-3, rtol=1e-4)
  np.testing.assert_array_equal(down[[0, 2, 4]], 0.0)
  assert np.all(down[[1, 3]] != 0.0)
  # and the anchor still decays at the global rate.
  np.testing.assert_allclose(decay["block_0"]["mlp"]["anchor"]["gate"], 0.1, rtol=1e-4)


def test_facts_configs_use_the_bank_rate():
  c = hmem_config.get_config("runlocal")
  assert c.optax.wd == 0.1
  assert [tuple(r) for r in c.optax.weight_decay_rules] == [(hmem_config.BANK, 1e-3), (hmem_config.GENERIC, 1e-3)]
  assert not c.optax.get("wd_exclude")
  assert [tuple(r) for r in pkm_config.get_config("runlocal").optax.weight_decay_rules] == [(r"/pkm/values$", 1e-3)]
  assert hmem_config.get_config("runlocal,bank_wd=0.01").optax.weight_decay_rules[0][1] == 0.01


@pytest.mark.parametrize("rules, message", [
    ([("([", 1e-3)], r"optax.weight_decay_rules: bad regex"),
    ([("bank", -1.0)], r"optax.weight_decay_rules: -1.0 \(for 'bank'\) must be a non-negative number"),
    ([("bank", "big")], r"optax.weight_decay_rules: 'big' \(for 'bank'\) must be a non-negative number"),
    (["bank"], r"optax.weight_decay_rules: 'bank' is not a \(regex, number\) pair"),
])
def test_bad_weight_decay_rules_are_named(rules, message):
  config = hmem_config.get_config("runlocal")
  config.optax.weight_decay_rules = rules
  with pytest.raises(ValueError, match=message):
    validate.validate(config)


def test_the_hmem_config_validates():
  validate.validate(hmem_config.get_config("runlocal"))
  validate.validate(pkm_config.get_config("runlocal"))


def test_route_depth_below_the_bank_levels_is_one_clear_error():
  # Given the 2-level tiny facts data and a 3-level bank;
  config = hmem_config.get_config("runlocal")
  config.model.memory_options = (("branching", 4), ("ranks", (16, 8, 4)), ("use_generic", True))
  # When validated, Then one line names the field, the levels and the route depth.
  with pytest.raises(ValueError, match=r"model.memory_options: ranks=\(16, 8, 4\) has 3 levels but task 'facts' "
                                       r"routes have depth 2") as err:
    validate.validate(config)
  assert str(err.value).count("\n") == 1  # "invalid config:" and exactly one error line


def test_bank_branching_must_match_the_routes_tree():
  config = hmem_config.get_config("runlocal")
  config.model.memory_options = (("branching", 16), ("ranks", (16, 8)), ("use_generic", True))
  with pytest.raises(ValueError, match=r"model.memory_options: branching=16 does not match the 4-way tree"):
    validate.validate(config)


def test_a_routed_memory_on_a_task_without_routes_is_rejected(tmp_path):
  import helpers_training as ht  # pylint: disable=g-import-not-at-top
  config = ht.tiny_config(str(tmp_path))
  config.model.mlp = "hmem"
  config.model.memory_options = (("branching", 4), ("ranks", (4,)))
  with pytest.raises(ValueError, match=r"has 1 levels but task 'mqar' routes have depth 0"):
    validate.validate(config)


def test_hmem_config_ranks_arg():
  assert dict(hmem_config.get_config("runlocal,ranks=16x48").model.memory_options)["ranks"] == (16, 48)
  with pytest.raises(ValueError, match=r"config arg ranks='a': expected units per level joined by 'x'"):
    hmem_config.get_config("runlocal,ranks=a")
