"""Product-key memory ops (spec hmem.md §4, §6.4, §6.5)."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from memarch import sharding
from memarch.ops import memory_bank as mb
from memarch.ops import pkm

COLLECTIVE = re.compile(r"\b(all-reduce|all-gather|reduce-scatter|all-to-all|collective-permute)(-start)?\(")


@pytest.mark.parametrize("n,k", [(32, 16), pytest.param(12, 12, marks=pytest.mark.slow)])
def test_product_topk_equals_brute_force_forward_and_gradients(n, k):
  # Given random half scores (ties have probability zero)
  s1, s2 = jax.random.normal(jax.random.key(n + k), (2, 3, 4, n))
  c = jax.random.normal(jax.random.key(1), (k,))
  loss = lambda f: lambda a, b: jnp.sum(jax.nn.softmax(f(a, b, k)[0]) * c)

  @jax.jit
  def both(s1, s2):
    return (pkm.product_topk(s1, s2, k), pkm.brute_force_topk(s1, s2, k),
            jax.grad(loss(pkm.product_topk), (0, 1))(s1, s2), jax.grad(loss(pkm.brute_force_topk), (0, 1))(s1, s2))

  # When the product top-k (k x k candidates) and the n^2 brute force are compared
  (sc, sl), (bsc, bsl), g, bg = both(s1, s2)
  # Then slots, scores and gradients agree exactly (up to float rounding)
  np.testing.assert_array_equal(sl, bsl)
  np.testing.assert_allclose(sc, bsc, atol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), g, bg)
  assert int(jnp.max(sl)) < n * n


def test_lookup_and_read_match_a_naive_loop_and_a_dense_readout():
  # Given queries, sub-keys and values
  b, t, h, dk, n, k, dv = 2, 3, 2, 8, 6, 4, 5
  kq, kk, kv = jax.random.split(jax.random.key(2), 3)
  q = jax.random.normal(kq, (b, t, h, dk))
  keys = jax.random.normal(kk, (h, 2, n, dk // 2))
  values = jax.random.normal(kv, (n * n, dv))
  look = jax.jit(pkm.pkm_lookup, static_argnums=2)(q, keys, k)
  m = jax.jit(pkm.pkm_read)(values, look)
  # Then a per-token loop over all n^2 slots (scores of the full product keys) gives the same read
  full_keys = np.concatenate([np.repeat(np.asarray(keys[:, 0]), n, 1), np.tile(np.asarray(keys[:, 1]), (1, n, 1))],
                             -1)  # [h, n^2, dk]: slot i*n+j = [C1_i; C2_j]
  want = np.zeros((b, t, dv))
  for bi in range(b):
    for ti in range(t):
      for hi in range(h):
        s = full_keys[hi] @ np.asarray(q[bi, ti, hi])
        top = np.argsort(-s)[:k]
        w = np.exp(s[top] - s[top].max())
        want[bi, ti] += (w / w.sum()) @ np.asarray(values)[top]
  np.testing.assert_allclose(m, want, atol=1e-5, rtol=1e-5)

  # And the gradient of the gathered read equals that of a dense [b, t, n^2] weight matrix times V
  def dense(values, w):
    mat = jnp.zeros((b, t, n * n)).at[jnp.arange(b)[:, None, None, None], jnp.arange(t)[None, :, None, None],
                                      look.slots].add(w)
    return jnp.sum(jnp.sin(mat @ values))
  sparse = lambda values, w: jnp.sum(jnp.sin(pkm.pkm_read(values, pkm.Lookup(look.slots, w))))
  g1 = jax.jit(jax.grad(sparse, (0, 1)))(values, look.weights)
  g2 = jax.jit(jax.grad(dense, (0, 1)))(values, look.weights)
  jax.tree.map(lambda a, c: np.testing.assert_allclose(a, c, atol=1e-5, rtol=1e-5), g1, g2)


def test_bad_inputs_raise_naming_the_field():
  with pytest.raises(ValueError, match="k="):
    pkm.product_topk(jnp.zeros((4,)), jnp.zeros((4,)), 5)
  with pytest.raises(ValueError, match="q"):
    pkm.sub_key_scores(jnp.zeros((2, 3, 8)), jnp.zeros((2, 2, 4, 3)))
  with pytest.raises(ValueError, match="lookup"):
    pkm.pkm_read(jnp.zeros((16, 4)), pkm.Lookup(jnp.zeros((2, 3), jnp.int32), jnp.zeros((2, 3))))


def test_slot_usage():
  u = pkm.slot_usage(jnp.array([0, 1, 2, 3]), 4)
  assert float(u["usage"]) == 1.0 and abs(float(u["kl_uniform"])) < 1e-6
  u = pkm.slot_usage(jnp.array([0, 0]), 4)
  assert float(u["usage"]) == 0.25 and abs(float(u["kl_uniform"]) - np.log(4)) < 1e-6


def _setup(rows):
  b, t, h, k, dv = 8, 3, 2, 4, 8
  kv, ks, kw = jax.random.split(jax.random.key(3), 3)
  values = jax.random.normal(kv, (rows, dv))
  slots = jax.random.randint(ks, (b, t, h, k), 0, rows)
  w = jax.nn.softmax(jax.random.normal(kw, (b, t, h, k)))
  return values, slots, w


def _loss(values, slots, w, axes):
  return jnp.sum(jnp.sin(pkm.pkm_read(values, pkm.Lookup(slots, w), axes=axes)))


def _sizes(hlo):
  out = []
  for line in hlo.splitlines():
    if COLLECTIVE.search(line):
      shapes = re.findall(r"\b[a-z]+\d*\[([\d,]*)\]", line.split(" metadata=")[0])
      out.append(max(int(np.prod([int(v) for v in s.split(",") if v])) for s in shapes))
  return sorted(out)


def test_sharded_read_matches_and_has_no_table_sized_collective():
  # Given a value table with rows over (memory, data) and columns over tensor, batch over (memory, data)
  mesh = sharding.make_mesh([("memory", 2), ("data", 2), ("tensor", 2)])
  rows_axes = ("memory", "data")
  axes = mb.BankAxes(rows_axes, rows_axes, "tensor")
  grad = jax.jit(jax.value_and_grad(_loss, (0, 2)), static_argnums=3)
  values, slots, w = _setup(4096)
  want = grad(values, slots, w, None)
  with jax.set_mesh(mesh):
    tab_sh, b_sh = NamedSharding(mesh, P(rows_axes, "tensor")), NamedSharding(mesh, P(rows_axes))
    vals = jax.device_put(values, tab_sh)
    s_, w_ = jax.device_put(slots, b_sh), jax.device_put(w, b_sh)
    # When the read and its gradient run as a shard_map
    got = grad(vals, s_, w_, axes)
    ours = _sizes(grad.lower(vals, s_, w_, axes).compile().as_text())
    take_loss = lambda v, s, w: jnp.sum(jnp.sin(jnp.einsum("bthk,bthkv->btv", w, jnp.take(v, s, axis=0))))
    take = _sizes(jax.jit(jax.grad(take_loss)).lower(vals, s_, w_).compile().as_text())
  # Then values and gradients match the plain read
  jax.tree.map(lambda a, c: np.testing.assert_allclose(a, c, atol=1e-5, rtol=1e-5), got, want)
  # and no collective approaches the local table shard (4096/4 rows x 8/2 columns), while plain take does
  shard = 4096 // 4 * 8 // 2
  assert max(ours) < shard / 4, (ours, shard)
  assert max(take) >= shard, (take, shard)
