"""Hierarchical FFN-memory bank ops (spec hmem.md §1.2-1.4, §2, §3, §6.2, §6.3, §6.5)."""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from memarch import sharding
from memarch.ops import memory_bank as mb

D, RANKS, K = 16, (8, 4), 16
COLLECTIVE = re.compile(r"\b(all-reduce|all-gather|reduce-scatter|all-to-all|collective-permute)(-start)?\(")


@functools.partial(jax.jit, static_argnames=("branching", "ranks", "lead", "random_down"))
def _levels(key, branching=K, ranks=RANKS, lead=(), random_down=True):
  keys = jax.random.split(key, 2 * len(ranks))
  out = []
  for l, r in enumerate(ranks):
    if r == 0:
      out.append(None)
      continue
    b = mb.init_blocks(keys[2 * l], branching ** (l + 1), lead, D, r)
    if random_down:
      b = b._replace(down=0.3 * jax.random.normal(keys[2 * l + 1], b.down.shape))
    out.append(b)
  return out


@functools.partial(jax.jit, static_argnames=("units",))
def _generic(key, units=sum(RANKS)):
  kg, ku, kd = jax.random.split(key, 3)
  return mb.Blocks(jax.random.normal(kg, (D, units)) * D ** -0.5, jax.random.normal(ku, (D, units)) * D ** -0.5,
                   0.3 * jax.random.normal(kd, (units, D)))


@functools.partial(jax.jit, static_argnames=("batch", "branching", "depth"))
def _route(key, batch, branching=K, depth=2):
  cs = jax.random.randint(key, (batch, depth), 0, branching)
  ids, cols = jnp.zeros((batch,), jnp.int32), []
  for l in range(depth):  # nested numbering: i_l = i_{l-1} * k + c_l
    ids = ids * branching + cs[:, l]
    cols.append(ids)
  return jnp.stack(cols, 1).astype(jnp.int32)


def _swiglu(x, g, u, dn):
  return (jax.nn.silu(x @ g) * (x @ u)) @ dn


def _path_blocks(levels, route, layer=None):
  """Reference fetch: index each level's table by its route column and concatenate on the unit axis."""
  pick = lambda t, l: t[route[:, l]] if layer is None else t[route[:, l], layer]
  used = [(l, b) for l, b in enumerate(levels) if b is not None]
  return mb.Blocks(jnp.concatenate([pick(b.gate, l) for l, b in used], -1),
                   jnp.concatenate([pick(b.up, l) for l, b in used], -1),
                   jnp.concatenate([pick(b.down, l) for l, b in used], -2))


def test_sizes_reproduce_the_spec_table():
  # Given the paper's 160M and 410M settings (spec §1.4), when sized, then the table's numbers come out.
  s = mb.bank_sizes(512, 35, (256, 64, 16, 0))
  assert s["c0"] == 53_760 and s["units"] == 336 and s["fetched"] == 18_063_360 and s["bank"] == 4_624_220_160
  s = mb.bank_sizes(1024, 24, (512, 128, 32, 0))
  assert s["c0"] == 73_728 and round(s["fetched"] / 1e6, 1) == 49.5 and round(s["bank"] / 1e9, 1) == 12.7


def test_fetch_gathers_the_path_rows_and_the_generic_block():
  # Given a bank, a route in nested numbering, and one generic (-1) row
  levels, gen = _levels(jax.random.key(0)), _generic(jax.random.key(1))
  route = _route(jax.random.key(2), 5).at[3].set(mb.GENERIC)
  # When fetched
  got, want = jax.jit(lambda lv, r, g: (mb.fetch_blocks(lv, r, g), _path_blocks(lv, r)))(levels, route, gen)
  # Then row b holds [level-1 row i_1 | level-2 row i_2] on the unit axis, and the generic block for row 3
  keep = np.arange(5) != 3
  for g_, w_, gen_ in zip(got, want, gen):
    np.testing.assert_array_equal(g_[keep], w_[keep])
    np.testing.assert_array_equal(g_[3], gen_)


def test_applying_fetched_blocks_equals_a_wider_dense_ffn():
  # Given an anchor SwiGLU (d_f = 32), a bank with non-zero down blocks and a route
  ka, kb, kx, kr = jax.random.split(jax.random.key(3), 4)
  g, u = jax.random.normal(ka, (2, D, 32)) * D ** -0.5
  dn = jax.random.normal(kb, (32, D)) * 32 ** -0.5
  levels = _levels(jax.random.key(4))
  x, route = jax.random.normal(kx, (3, 7, D)), _route(kr, 3)

  @jax.jit
  def both(x, route):
    # When the memory is applied on top of the anchor
    y = _swiglu(x, g, u, dn) + mb.apply_blocks(x, mb.fetch_blocks(levels, route))
    # Then each sequence sees the SwiGLU of width d_f + r1 + r2 with its blocks concatenated into d_f (§1.3)
    p = _path_blocks(levels, route)
    bc = lambda w: jnp.broadcast_to(w, (3, *w.shape))
    dense = jax.vmap(_swiglu)(x, jnp.concatenate([bc(g), p.gate], -1), jnp.concatenate([bc(u), p.up], -1),
                              jnp.concatenate([bc(dn), p.down], -2))
    return y, dense

  y, dense = both(x, route)
  np.testing.assert_allclose(y, dense, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_stacked_layers_axis_and_unused_level():
  # Given the spec's [k^l, L, d, r] layout with r_2 = 0 (no level-2 table)
  levels = _levels(jax.random.key(5), ranks=(8, 0, 4), lead=(3,))
  route = _route(jax.random.key(6), 4, depth=3)
  x = jax.random.normal(jax.random.key(7), (4, 5, D))

  @jax.jit
  def both(levels, route, x):
    f = mb.fetch_blocks(levels, route)
    # When layer 2 is applied, then it equals the FFN of the layer-2 slices of levels 1 and 3
    p = _path_blocks(levels, route, layer=2)
    return f, mb.apply_blocks(x, f, layer=2), jax.vmap(_swiglu)(x, *p)

  f, y, dense = both(levels, route, x)
  assert f.gate.shape == (4, 3, D, 12) and f.down.shape == (4, 3, 12, D)
  np.testing.assert_allclose(y, dense, atol=1e-5, rtol=1e-5)


def test_zero_init_has_no_effect_and_only_fetched_rows_get_gradients():
  # Given a freshly initialised bank (down = 0)
  levels = _levels(jax.random.key(8), random_down=False)
  route = _route(jax.random.key(9), 3)
  x = jax.random.normal(jax.random.key(10), (3, 4, D))
  loss = lambda lv: jnp.sum(jnp.sin(mb.apply_blocks(x, mb.fetch_blocks(lv, route))))
  y, grads = jax.jit(lambda lv: (mb.apply_blocks(x, mb.fetch_blocks(lv, route)), jax.grad(loss)(lv)))(levels)
  # Then the memory adds exactly zero, gate/up get zero gradient, and down gets gradient on fetched rows only
  assert float(jnp.max(jnp.abs(y))) == 0.0
  for l, (lv, g) in enumerate(zip(levels, grads), start=1):
    assert float(jnp.max(jnp.abs(g.gate))) == 0.0 and float(jnp.max(jnp.abs(g.up))) == 0.0
    hit = np.asarray(mb.fetched_row_mask(route, lv.gate.shape[0], l))
    row_norm = np.asarray(jnp.sum(jnp.abs(g.down), axis=(1, 2)))
    assert np.all(row_norm[hit] > 0) and np.all(row_norm[~hit] == 0) and hit.sum() >= 1


def test_mix_generic_frequency_is_one_in_seventeen():
  route = jnp.zeros((34_000, 2), jnp.int32)
  mixed = jax.jit(mb.mix_generic)(route, jax.random.key(11))
  frac = float(jnp.mean(mixed[:, 0] == mb.GENERIC))
  assert abs(frac - 1 / 17) < 4 * np.sqrt((1 / 17) * (16 / 17) / 34_000)
  assert bool(jnp.all((mixed == -1).all(1) | (mixed == 0).all(1)))  # whole rows


def test_bad_inputs_raise_naming_the_field():
  levels = _levels(jax.random.key(12))
  with pytest.raises(ValueError, match="route"):
    mb.fetch_blocks(levels, jnp.zeros((2, 1), jnp.int32))
  with pytest.raises(ValueError, match="route"):
    mb.fetch_blocks(levels, jnp.zeros((2, 2), jnp.float32))
  with pytest.raises(ValueError, match="generic"):
    mb.fetch_blocks(levels, jnp.zeros((2, 2), jnp.int32), _generic(jax.random.key(0), units=5))
  with pytest.raises(ValueError, match="x"):
    mb.apply_blocks(jnp.zeros((3, 4, D)), jax.eval_shape(mb.fetch_blocks, levels, jnp.zeros((2, 2), jnp.int32)))
  mesh = sharding.make_mesh([("memory", 8)])
  small = jax.eval_shape(lambda: _levels(jax.random.key(0), branching=4))
  with pytest.raises(ValueError, match="levels"):  # 4 level-1 rows over 8 memory shards
    mb.fetch_blocks(small, jnp.zeros((8, 2), jnp.int32), axes=mb.BankAxes("memory", ("memory",)), mesh=mesh)
  with pytest.raises(ValueError, match="axes"):
    mb.fetch_blocks(levels, jnp.zeros((8, 2), jnp.int32), axes=mb.BankAxes("mem", ("memory",)), mesh=mesh)


# ---- sharding (spec §3) -------------------------------------------------------------------------------------------


def _mesh():
  return sharding.make_mesh([("memory", 2), ("data", 2), ("tensor", 2)])


def _put(levels, mesh, rows):
  sh = lambda spec: NamedSharding(mesh, spec)
  return [mb.Blocks(jax.device_put(b.gate, sh(P(rows, None, "tensor"))),
                    jax.device_put(b.up, sh(P(rows, None, "tensor"))),
                    jax.device_put(b.down, sh(P(rows, "tensor", None)))) for b in levels]


def _loss(levels, gen, x, route, axes):
  return jnp.sum(jnp.sin(mb.apply_blocks(x, mb.fetch_blocks(levels, route, gen, axes=axes))))


@pytest.mark.parametrize("rows,batch", [(("memory", "data"), ("memory", "data")), ("memory", ("data",))])
def test_shard_map_fetch_matches_the_plain_gather_forward_and_gradients(rows, batch):
  # Given a bank sharded over rows (and units over tensor), and a batch with one generic row
  levels, gen = _levels(jax.random.key(13)), _generic(jax.random.key(14))
  route = _route(jax.random.key(15), 8).at[5].set(-1)
  x = jax.random.normal(jax.random.key(16), (8, 3, D))
  want = jax.jit(jax.value_and_grad(_loss, (0, 1, 2)), static_argnums=4)(levels, gen, x, route, None)
  mesh = _mesh()
  # When fetched with shard_map (a reduce-scatter when the batch shares the row axes, a psum when it does not)
  with jax.set_mesh(mesh):
    got = jax.jit(jax.value_and_grad(_loss, (0, 1, 2)), static_argnums=4)(
        _put(levels, mesh, rows), gen, x, route, mb.BankAxes(rows, batch, "tensor"))
  # Then values and gradients match
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5), got, want)


def collective_sizes(hlo: str) -> list[int]:
  """Element counts of the largest array (operand or result) of every collective in compiled HLO text."""
  sizes = []
  for line in hlo.splitlines():
    if COLLECTIVE.search(line):
      shapes = re.findall(r"\b[a-z]+\d*\[([\d,]*)\]", line.split(" metadata=")[0])
      sizes.append(max(int(np.prod([int(v) for v in s.split(",") if v])) for s in shapes))
  return sorted(sizes)


def _compiled_grad_collectives(branching, use_take):
  mesh = _mesh()
  rows = ("memory", "data")
  levels = _levels(jax.random.key(17), branching=branching)
  route = _route(jax.random.key(18), 8, branching)
  x = jax.random.normal(jax.random.key(19), (8, 3, D))
  sh = NamedSharding(mesh, P(rows))
  x, route = jax.device_put(x, sh), jax.device_put(route, sh)

  def take_loss(levels, x, route):  # what GSPMD does with a plain gather of a row-sharded bank
    f = mb.Blocks(*(jnp.concatenate([jnp.take(getattr(b, n), route[:, l], axis=0) for l, b in enumerate(levels)],
                                    -1 if n != "down" else -2) for n in ("gate", "up", "down")))
    return jnp.sum(jnp.sin(mb.apply_blocks(x, f)))

  with jax.set_mesh(mesh):
    lv = _put(levels, mesh, rows)
    if use_take:
      fn = jax.jit(jax.grad(take_loss))
      hlo = fn.lower(lv, x, route).compile().as_text()
    else:
      fn = jax.jit(jax.grad(_loss), static_argnums=4)
      hlo = fn.lower(lv, None, x, route, mb.BankAxes(rows, rows, "tensor")).compile().as_text()
  shard = max(b.gate[0].size * b.gate.shape[0] // 8 for b in levels)  # largest local table (rows/4, units/2)
  return collective_sizes(hlo), shard


def test_no_collective_scales_with_the_bank():
  # Given the fetch + its gradient compiled on (memory=2, data=2, tensor=2), rows over (memory, data)
  ours_small, shard_small = _compiled_grad_collectives(8, use_take=False)
  ours_big, shard_big = _compiled_grad_collectives(16, use_take=False)
  # Then no collective is as large as a bank shard, and the collectives do not change when the bank grows 3.7x
  assert shard_big > 3 * shard_small
  assert ours_small and max(ours_big) < shard_big / 2, (ours_big, shard_big)
  assert ours_small == ours_big
  # Negative control: a plain jnp.take on the same sharded bank all-reduces a bank-sized gradient (spec §3.2)
  take_big, _ = _compiled_grad_collectives(16, use_take=True)
  assert max(take_big) >= shard_big, (take_big, shard_big)
