"""The routed-memory plumbing of the training loop: facts routes in per-level ids, generic mixing in train_step."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from memarch.data import facts, facts_tfds, pipeline
from memarch.hmem import tree
from memarch.models.lm import Model
from memarch.training import batches
from memarch.training import step as step_lib


def test_facts_task_batches_carry_per_level_routes(tmp_path):
  # Given the tiny facts data (k = 4, 2 levels) as the training-loop task.
  cfg = dict(name="facts", builder_config="tiny")
  builder = facts_tfds.prepare("tiny", str(tmp_path))
  stored = builder.as_data_source("test_tail")
  # When the pipeline reads the first batch in order.
  batch = next(pipeline.build_iterator(cfg, split="test_tail", seed=0, global_batch_size=8,
                                       data_dir=str(tmp_path), shuffle=False))
  # Then its routes are the stored global ids converted to nested per-level ids, in [0, k^l) at level l.
  want = np.stack([tree.local_ids(np.asarray(stored[i]["route"]), 4) for i in range(8)])
  np.testing.assert_array_equal(batch["route"], want)
  assert not np.array_equal(want, np.stack([np.asarray(stored[i]["route"]) for i in range(8)]))
  assert (batch["route"] >= 0).all() and (batch["route"][:, 0] < 4).all() and (batch["route"][:, 1] < 16).all()
  # And the level-2 node is a child of the level-1 node (nested numbering).
  np.testing.assert_array_equal(batch["route"][:, 1] // 4, batch["route"][:, 0])
  assert batch["route"].dtype == np.int32 and facts.SPLITS[0] == "train"


def _state_and_batch():
  model = Model(vocab_size=16, variant=None, d_model=16, num_layers=1, num_heads=2, mlp_hidden=32, mlp="hmem",
                memory_options={"branching": 4, "ranks": (4, 2)})
  tokens = jax.random.randint(jax.random.key(0), (4, 6), 0, 16)
  batch = {"inputs": tokens, "targets": jnp.roll(tokens, -1, axis=1), "segment_ids": jnp.ones_like(tokens),
           "positions": jnp.broadcast_to(jnp.arange(6), (4, 6)), "route": jnp.array([[0, 1], [1, 5], [2, 9], [3, 12]])}
  params = nn.meta.unbox(jax.jit(model.init)(jax.random.key(1), tokens, route=model.dummy_route(4)))["params"]
  tx = optax.adam(1e-2)
  state = {"params": params, "opt": tx.init(params), "step": jnp.zeros((), jnp.int32),
           "rng": jax.random.key_data(jax.random.key(2))}
  return model, tx, state, batch


def test_train_step_routes_and_mixes_in_the_generic_memory():
  model, tx, state, batch = _state_and_batch()
  run = jax.jit(lambda s, b, p: step_lib.train_step(s, b, model=model, tx=tx, schedule=lambda _: 0.0, p_generic=p),
                static_argnums=2)
  mlp = lambda s: s["params"]["block_0"]["mlp"]  # noqa: E731
  changed = lambda a, b, k: bool(jnp.any(mlp(a)[k] != mlp(b)[k]))  # noqa: E731
  # p_generic = 0: the fetched blocks train (down first: gate/up get no gradient through a zero down) ...
  new, _ = run(dict(state), batch, 0.0)
  assert changed(new, state, "down_1") and changed(new, state, "down_2")
  assert not changed(new, state, "generic_down")
  # ... only on the fetched rows of level 2 (rows 1, 5, 9, 12).
  rows = np.flatnonzero(np.asarray(jnp.any(mlp(new)["down_2"] != mlp(state)["down_2"], axis=(1, 2))))
  np.testing.assert_array_equal(rows, [1, 5, 9, 12])
  # p_generic = 1: every row uses the generic block, the bank gets no gradient.
  new, _ = run(dict(state), batch, 1.0)
  assert changed(new, state, "generic_down")
  assert not changed(new, state, "down_1") and not changed(new, state, "down_2")
  # Evaluation never mixes: eval_step uses the batch's routes as they are.
  stats = jax.jit(lambda s, b: step_lib.eval_step(s, b, model=model))(state, batch)
  assert float(stats["tokens"]) == 24.0


def test_generic_draw_depends_on_the_step():
  model, tx, state, batch = _state_and_batch()
  run = jax.jit(lambda s, b: step_lib.train_step(s, b, model=model, tx=tx, schedule=lambda _: 0.0, p_generic=0.5))
  grads = []
  for step in range(12):
    new, _ = run(dict(state, step=jnp.int32(step)), batch)
    grads.append(bool(jnp.any(new["params"]["block_0"]["mlp"]["generic_down"] != state["params"]["block_0"]["mlp"]
                              ["generic_down"])))
  assert 0 < sum(grads) < 12  # some steps draw the generic memory for some row, some for none


def test_make_global_keeps_the_route():
  mesh = jax.make_mesh((1,), ("data",), devices=jax.devices()[:1])
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  local = {"inputs": np.zeros((2, 3)), "targets": np.zeros((2, 3)), "segment_ids": np.ones((2, 3)),
           "positions": np.zeros((2, 3)), "route": np.array([[1, 5], [2, 9]])}
  out = batches.make_global(local, sharding, 4)
  np.testing.assert_array_equal(np.asarray(out["route"]), [[1, 5], [2, 9], [0, 0], [0, 0]])
