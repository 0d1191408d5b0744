"""Parametric memory layers: HierarchicalMemoryFFN and ProductKeyMemory (spec hmem.md §2, §4, §6)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from memarch import sharding
from memarch.layers.common import SwiGLU
from memarch.layers.memory import HierarchicalMemoryFFN, ProductKeyMemory
from memarch.ops import memory_bank as mb
from memarch.ops import pkm as pkm_ops
from memarch.training import optim

D, HIDDEN, RANKS, K = 16, 32, (8, 4), 8


def _ffn(**kw):
  return HierarchicalMemoryFFN(d_model=D, hidden=HIDDEN, ranks=RANKS, branching=K, **kw)


def _route(c1, c2):
  c1, c2 = jnp.asarray(c1, jnp.int32), jnp.asarray(c2, jnp.int32)
  return jnp.stack([c1, c1 * K + c2], 1)


def _x(b=4, t=5, seed=0):
  return jax.random.normal(jax.random.key(seed), (b, t, D))


def _init(module, x, route):
  return jax.jit(lambda k: nn.meta.unbox(module.init(k, x, route=route)["params"]))(jax.random.key(1))


def test_zero_initialised_memory_has_no_effect():
  # Given a fresh layer and any route (one generic row)
  x, route = _x(), _route([0, 3, 5, 7], [1, 2, 3, 4]).at[2].set(-1)
  params = _init(_ffn(), x, route)
  # When applied, then the output is exactly the anchor SwiGLU's
  y, anchor = jax.jit(lambda p: (_ffn().apply({"params": p}, x, route=route),
                                 SwiGLU(HIDDEN).apply({"params": p["anchor"]}, x)))(params)
  np.testing.assert_array_equal(y, anchor)


def test_ffn_equals_a_dense_swiglu_with_the_fetched_units_concatenated():
  # Given trained-looking parameters (non-zero down blocks and generic block)
  x, route = _x(), _route([0, 3, 5, 7], [1, 2, 3, 4]).at[1].set(-1)
  params = _init(_ffn(), x, route)
  keys = iter(jax.random.split(jax.random.key(2), 8))
  for name in ("down_1", "down_2", "generic_down"):
    params[name] = 0.3 * jax.random.normal(next(keys), params[name].shape)

  @jax.jit
  def both(p):
    y = _ffn().apply({"params": p}, x, route=route)
    # The reference: a SwiGLU of width hidden + R whose extra units are the path's blocks (or the generic block)
    g = jnp.concatenate([p["gate_1"][route[:, 0]], p["gate_2"][route[:, 1]]], -1)
    u = jnp.concatenate([p["up_1"][route[:, 0]], p["up_2"][route[:, 1]]], -1)
    dn = jnp.concatenate([p["down_1"][route[:, 0]], p["down_2"][route[:, 1]]], -2)
    gen = (route[:, 0] < 0)[:, None, None]
    g, u, dn = (jnp.where(gen, p[f"generic_{n}"], a) for n, a in (("gate", g), ("up", u), ("down", dn)))
    def dense(xb, gb, ub, db):
      w_in = jnp.concatenate([p["anchor"]["w_in"], jnp.stack([gb, ub], 1)], -1)
      w_out = jnp.concatenate([p["anchor"]["w_out"], db], 0)
      return SwiGLU(HIDDEN + sum(RANKS)).apply({"params": {"w_in": w_in, "w_out": w_out}}, xb)
    return y, jax.vmap(dense)(x, g, u, dn)

  y, want = both(params)
  np.testing.assert_allclose(y, want, atol=1e-5, rtol=1e-5)


def _opt_cfg(**kw):
  base = dict(name="adamw", lr=1e-2, b1=0.9, b2=0.99, eps=1e-8, wd=0.1, warmup_steps=0, min_lr_ratio=1.0, clip=1.0,
              lr_multipliers=[], wd_exclude=[])
  return mlc.ConfigDict({**base, **kw})


def _changed_rows(a, b):
  return np.asarray(jnp.any(a != b, axis=tuple(range(1, a.ndim))))


@pytest.mark.parametrize("lazy", [True, pytest.param(False, marks=pytest.mark.slow)])
def test_only_fetched_rows_change_under_lazy_adamw(lazy):
  # Given AdamW with weight decay, lazy over the bank tables (or dense, the control), and two steps whose routes
  # share one row per level (level 1: {0, 1} then {0, 5, 6}; level 2: {0, 1, 10, 11} then {1, 46, 55, 48})
  x = _x()
  route_a, route_b = _route([0, 0, 1, 1], [0, 1, 2, 3]), _route([0, 5, 6, 6], [1, 6, 7, 0])
  module = _ffn()
  params = _init(module, x, route_a)
  cfg = _opt_cfg(lazy_rows=[r"(gate|up|down)_\d+$"] if lazy else [])
  tx, _ = optim.make_optimizer(cfg, total_steps=10)
  loss = lambda p, r: jnp.mean(jnp.square(module.apply({"params": p}, x, route=r) - 1.0))

  @jax.jit
  def step(p, s, r):
    g = jax.grad(loss)(p, r)
    u, s = tx.update(g, s, p)
    return optax_apply(p, u), s

  p1, s1 = step(params, tx.init(params), route_a)
  p2, _ = step(p1, s1, route_b)
  hit = {l: {n: np.asarray(mb.fetched_row_mask(r, K ** l, l)) for n, r in (("a", route_a), ("b", route_b))}
         for l in (1, 2)}
  for l in (1, 2):
    # Step 1: down rows (zero at init) change exactly where fetched; gate/up get zero gradient while down = 0, so
    # lazily they keep still, while dense AdamW decays every gate row
    np.testing.assert_array_equal(_changed_rows(params[f"down_{l}"], p1[f"down_{l}"]), hit[l]["a"])
    assert _changed_rows(params[f"gate_{l}"], p1[f"gate_{l}"]).any() != lazy
    if lazy:
      # Step 2: only route b's rows move (gate/up only where down is already non-zero); rows fetched at step 1
      # only keep still despite Adam momentum and weight decay
      np.testing.assert_array_equal(_changed_rows(p1[f"down_{l}"], p2[f"down_{l}"]), hit[l]["b"])
      for n in ("gate", "up"):
        np.testing.assert_array_equal(_changed_rows(p1[f"{n}_{l}"], p2[f"{n}_{l}"]), hit[l]["b"] & hit[l]["a"])
    else:  # dense AdamW: momentum and weight decay move rows that were not fetched
      only_a = hit[l]["a"] & ~hit[l]["b"]
      assert _changed_rows(p1[f"down_{l}"], p2[f"down_{l}"])[only_a].all()
  # The anchor trains normally either way
  assert _changed_rows(params["anchor"]["w_out"], p2["anchor"]["w_out"]).all()


def optax_apply(p, u):
  return jax.tree.map(lambda a, b: a + b, p, u)


def test_pkm_gated_read_and_value_lr_multiplier():
  # Given a Memory+ layer
  x = _x(2, 3)
  module = ProductKeyMemory(d_model=D, n_keys=8, heads=2, knn=4, k_dim=8, v_dim=12)
  params = jax.jit(lambda k: nn.meta.unbox(module.init(k, x)["params"]))(jax.random.key(3))
  assert params["values"].shape == (64, 12)

  @jax.jit
  def both(p):
    y = module.apply({"params": p}, x)
    q = jnp.einsum("btd,dhe->bthe", x, p["query"])
    m = pkm_ops.pkm_read(p["values"], pkm_ops.pkm_lookup(q, p["sub_keys"], 4))
    return y, (m * jax.nn.silu(x @ p["gate"])) @ p["out"]

  # Then the output is (m(x) * silu(x W_g)) W_o
  y, want = both(params)
  np.testing.assert_allclose(y, want, atol=1e-5, rtol=1e-5)
  # And with optax.lr_multipliers = [("values$", 10)] the first Adam step of the values is 10x the others'
  tx, _ = optim.make_optimizer(_opt_cfg(wd=0.0, clip=0.0, lr_multipliers=[("values$", 10.0)]), total_steps=10)
  g = jax.jit(jax.grad(lambda p: jnp.sum(jnp.sin(module.apply({"params": p}, x)))))(params)
  u, _ = jax.jit(tx.update)(g, tx.init(params), params)
  ratio = float(jnp.max(jnp.abs(u["values"]))) / float(jnp.max(jnp.abs(u["query"])))
  assert 9.0 < ratio < 11.0, ratio


def test_pkm_qk_norm_and_ungated_variant():
  x = _x(2, 3)
  normed = ProductKeyMemory(d_model=D, n_keys=8, heads=2, knn=4, k_dim=8, qk_norm=True)
  plain = ProductKeyMemory(d_model=D, n_keys=8, heads=2, knn=4, k_dim=8, gated=False)
  (y1, p1), (y2, p2) = jax.jit(lambda k: (normed.init_with_output(k, x), plain.init_with_output(k, x)))(
      jax.random.key(4))
  assert y1.shape == y2.shape == x.shape and bool(jnp.all(jnp.isfinite(y1)) & jnp.all(jnp.isfinite(y2)))
  assert "gate" in p1["params"] and "gate" not in p2["params"]
  # qk-norm makes the lookup invariant to the scale of the query projection
  p1 = nn.meta.unbox(p1["params"])
  look = lambda p: normed.apply({"params": p}, x, method="fetch")
  a, b = jax.jit(lambda p: (look(p), look({**p, "query": 3.0 * p["query"]})))(p1)
  np.testing.assert_array_equal(a.slots, b.slots)


def test_bad_inputs_raise_naming_the_field():
  x, key = _x(), jax.random.key(0)
  with pytest.raises(ValueError, match="route"):
    jax.eval_shape(lambda: _ffn().init(key, x, route=None))
  with pytest.raises(ValueError, match="route"):
    jax.eval_shape(lambda: _ffn().init(key, x, route=_route([0], [0])))
  with pytest.raises(ValueError, match="ranks"):
    jax.eval_shape(lambda: HierarchicalMemoryFFN(d_model=D, hidden=HIDDEN, ranks=(0, 0)).init(
        key, x, route=_route([0] * 4, [0] * 4)))
  with pytest.raises(ValueError, match="knn"):
    jax.eval_shape(lambda: ProductKeyMemory(d_model=D, n_keys=4, knn=5).init(key, x))
  with pytest.raises(ValueError, match="x"):
    jax.eval_shape(lambda: ProductKeyMemory(d_model=D + 1).init(key, x))


def _mesh_and_layers():
  mesh = sharding.make_mesh([("memory", 2), ("data", 2), ("tensor", 2)])
  rules = sharding.rules_for_mesh(sharding.DEFAULT_RULES, mesh)
  x, route = _x(), _route([0, 3, 5, 7], [1, 2, 3, 4]).at[3].set(-1)
  return mesh, rules, x, route, _ffn(), ProductKeyMemory(d_model=D, n_keys=8, heads=2, knn=4, k_dim=8)


def test_partition_specs_on_a_2x2x2_mesh():
  # Given the (memory=2, data=2, tensor=2) mesh and the default rules (memory_rows -> memory, act_batch -> data)
  mesh, rules, x, route, ffn, pkm = _mesh_and_layers()
  flat = sharding.flat_specs(_shardings(ffn, mesh, rules, x, route=route))
  # Then the bank rows are on memory and its units on tensor (spec §3.3); the generic block is replicated on memory
  expected = {"gate_1": P("memory", None, "tensor"), "up_2": P("memory", None, "tensor"),
              "down_2": P("memory", "tensor", None), "generic_gate": P(None, "tensor"),
              "generic_down": P("tensor", None), "anchor/w_in": P(None, None, "tensor")}
  for name, spec in expected.items():
    assert flat[name] == spec, (name, flat[name])
  flat = sharding.flat_specs(_shardings(pkm, mesh, rules, x))
  assert flat["values"] == P("memory", "tensor") and flat["query"] == P(None, "tensor", None)
  assert flat["sub_keys"] == P("tensor", None, None, None) and flat["out"] == P("tensor", None)
  # And under the mesh and rules the layers resolve the bank axes for their shard_map fetch
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    from memarch.layers.memory import resolve_bank_axes  # pylint: disable=g-import-not-at-top
    assert resolve_bank_axes() == mb.BankAxes(("memory",), ("data",), "tensor")


@pytest.mark.slow
def test_sharded_layers_match_unsharded_forward_and_gradients():
  mesh, rules, x, route, ffn, pkm = _mesh_and_layers()
  # Given sharded parameters, when the layers run under the mesh (shard_map fetch), then values and gradients
  # equal the unsharded ones
  for module, kw in ((ffn, dict(route=route)), (pkm, {})):
    params = jax.jit(lambda k: nn.meta.unbox(module.init(k, x, **kw)["params"]))(jax.random.key(5))
    params = jax.tree.map(lambda a: a + 0.01 * jnp.cos(jnp.arange(a.size).reshape(a.shape)), params)  # down != 0
    f = jax.jit(jax.value_and_grad(lambda p, x: jnp.sum(jnp.sin(module.apply({"params": p}, x, **kw))), (0, 1)))
    want = f(params, x)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
      p_sh = jax.device_put(params, _shardings(module, mesh, rules, x, **kw))
      got = f(p_sh, x)
      assert "shard_map" in str(jax.make_jaxpr(f)(p_sh, x))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5), got, want)


def _shardings(module, mesh, rules, x, **kw):
  abstract = jax.eval_shape(lambda k: module.init(k, x, **kw), jax.random.key(0))
  specs = nn.get_partition_spec(abstract)["params"]
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    return nn.logical_to_mesh_sharding(specs, mesh, rules)
