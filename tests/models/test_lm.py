"""The composable LM: streaming generate, protocol tests for every registered mixer, presets, sharding."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from memarch import sharding
from memarch.models import get_model, mixers
from memarch.models.lm import LMConfig, Model, generate

SMALL = dict(vocab_size=37, variant=None, d_model=32, num_heads=2, window=3, num_persistent=2, max_len=40)


def _model(mixer_names, **kw):
  return get_model("lm", **{**SMALL, "mixers": list(mixer_names), **kw})


def test_generate_equals_argmax_of_full_forward():
  # Given a hybrid LM and a prompt
  model = _model(["attention", "sliding_window"])
  prompt = jax.random.randint(jax.random.key(0), (2, 5), 0, 37)
  variables = model.init(jax.random.key(1), prompt)
  # When generating greedily with carried states
  out = generate(model, variables, prompt, 9)
  # Then each generated token is the argmax of the full forward over prompt + generated prefix
  full = jnp.concatenate([prompt, out[:, :-1]], axis=1)
  logits, _ = model.apply(variables, full)
  np.testing.assert_array_equal(jnp.argmax(logits[:, 4:], -1), out)
  sampled = generate(model, variables, prompt, 4, rng=jax.random.key(3), temperature=1.0)
  assert sampled.shape == (2, 4) and int(sampled.max()) < 37
  with pytest.raises(ValueError, match="max_len"):
    generate(model, variables, prompt, 40)


@pytest.mark.parametrize("name", sorted(mixers.MIXERS))
def test_every_mixer_follows_the_protocol(name):
  # Given the mixer as the LM would build it
  fields = {k: v for k, v in SMALL.items() if k != "variant"}
  cfg = LMConfig.from_preset(None, **{**fields, "mixers": (name,)})
  mixer = mixers.get_mixer_spec(name).build(cfg, 0, parent=None)
  x = jax.random.normal(jax.random.key(0), (2, 9, cfg.d_model))
  params = mixer.init(jax.random.key(1), x)
  apply = jax.jit(mixer.apply)
  # When run whole, token by token, and with packed documents
  y, _ = apply(params, x)
  state, ys = mixer.init_state(2), []
  for t in range(9):
    yt, state = apply(params, x[:, t:t + 1], state=state)
    ys.append(yt)
  np.testing.assert_allclose(jnp.concatenate(ys, 1), y, atol=1e-5, rtol=1e-5)
  seg = jnp.array([[1] * 4 + [2] * 5] * 2)
  y_packed, _ = apply(params, x, segment_ids=seg)
  np.testing.assert_allclose(y_packed[:, 4:], apply(params, x[:, 4:])[0], atol=1e-4)
  # Then outputs never depend on later inputs (causality)
  jac = jax.jit(jax.jacfwd(lambda z: apply(params, z)[0][0]))(x)
  for t in range(9):
    np.testing.assert_array_equal(jac[t, :, :, t + 1:], 0.0)
  assert mixer.state_size() > 0


def test_lm_causality_and_segment_isolation():
  model = _model(["attention", "sliding_window"])
  tokens = jax.random.randint(jax.random.key(0), (1, 10), 0, 37)
  variables = model.init(jax.random.key(1), tokens)
  apply = jax.jit(model.apply)
  # Causality through embeddings: perturbing token j changes no logit before j.
  base, _ = apply(variables, tokens)
  for j in (3, 7):
    changed, _ = apply(variables, tokens.at[0, j].set((tokens[0, j] + 1) % 37))
    np.testing.assert_allclose(changed[0, :j], base[0, :j], atol=1e-6)
    assert np.abs(np.asarray(changed[0, j:] - base[0, j:])).max() > 0
  seg = jnp.array([[1] * 4 + [2] * 6])
  packed, _ = apply(variables, tokens, segment_ids=seg)
  alone, _ = apply(variables, tokens[:, 4:])
  np.testing.assert_allclose(packed[:, 4:], alone, atol=1e-4)


def test_bf16_activations_keep_fp32_params_and_state():
  model = _model(["attention", "sliding_window"], dtype="bfloat16")
  tokens = jax.random.randint(jax.random.key(0), (2, 6), 0, 37)
  variables = model.init(jax.random.key(1), tokens)
  logits, states = model.apply(variables, tokens)
  assert logits.dtype == jnp.float32
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(nn.meta.unbox(variables)))
  assert all(s.k.dtype == jnp.float32 for s in states.values())
  ref, _ = _model(["attention", "sliding_window"]).apply(variables, tokens)
  np.testing.assert_allclose(logits, ref, atol=5e-2)


def test_remat_gives_the_same_gradients():
  tokens = jax.random.randint(jax.random.key(0), (2, 6), 0, 37)
  plain, remat = _model(["attention"] * 2), _model(["attention"] * 2, remat=True)
  variables = plain.init(jax.random.key(1), tokens)
  loss = lambda m: jax.jit(jax.grad(lambda v: jnp.sum(m.apply(v, tokens)[0] ** 2)))(variables)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), loss(plain), loss(remat))


@pytest.mark.parametrize("variant,low,high", [("tiny", 0.1e6, 3.5e6), ("small", 2e6, 30e6),
                                               ("125M", 115e6, 135e6), ("350M", 330e6, 380e6)])
def test_size_presets_by_shape_only(variant, low, high):
  model = get_model("lm", vocab_size=50_257, variant=variant)
  n = model.param_count()  # jax.eval_shape: nothing is allocated
  assert low <= n <= high, n
  cfg = model.config
  assert model.flops_per_token(1024) > 6 * n
  assert model.state_size() == cfg.num_layers * 2 * cfg.max_len * cfg.d_model


def test_partition_specs_on_a_2x2x2_mesh():
  # Given the (data=2, fsdp=2, tensor=2) mesh of 8 simulated devices and the default rules
  mesh = sharding.make_mesh([("data", 2), ("fsdp", 2), ("tensor", 2)])
  rules = sharding.rules_for_mesh(sharding.DEFAULT_RULES, mesh)
  model = get_model("lm", vocab_size=64, variant="tiny", mixers=["attention", "sliding_window"], window=4,
                    num_persistent=2, tie_embeddings=False)
  tokens = jnp.zeros((4, 8), jnp.int32)
  mesh_shardings = sharding.param_shardings(model, tokens, mesh=mesh, rules=rules)
  flat = sharding.flat_specs(mesh_shardings)
  expected = {
      "embedding": P("tensor", "fsdp"), "head": P("fsdp", "tensor"), "final_norm/scale": P("fsdp"),
      "block_0/mixer/q": P("fsdp", "tensor", None), "block_0/mixer/k": P("fsdp", "tensor", None),
      "block_0/mixer/v": P("fsdp", "tensor", None), "block_0/mixer/o": P("tensor", None, "fsdp"),
      "block_0/mixer/persistent": P(None, "fsdp"), "block_0/mixer_norm/scale": P("fsdp"),
      "block_0/mlp/w_in": P("fsdp", None, "tensor"), "block_0/mlp/w_out": P("tensor", "fsdp"),
      "block_0/mlp_norm/scale": P("fsdp"),
  }
  for name, spec in expected.items():
    assert flat[name] == spec, (name, flat[name])
    assert flat[name.replace("block_0", "block_1")] == spec
  assert len(flat) == 3 + 2 * 9, sorted(flat)
  # When initialising directly into those shardings, every array lands sharded as specified
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    params = jax.jit(lambda k: nn.meta.unbox(model.init(k, tokens)["params"]),
                     out_shardings=mesh_shardings)(jax.random.key(0))
  assert params["embedding"].sharding.spec == P("tensor", "fsdp")
  assert len(params["embedding"].addressable_shards) == 8


def test_bad_model_configs_raise_naming_the_field():
  with pytest.raises(ValueError, match="model_name"):
    get_model("nope", vocab_size=10)
  with pytest.raises(ValueError, match="model.mixers"):
    get_model("lm", vocab_size=10, mixers=["attention", "bogus"])
  with pytest.raises(ValueError, match="model.window"):
    get_model("lm", vocab_size=10, mixers=["sliding_window"]).init_state(1)
  with pytest.raises(ValueError, match="model.variant"):
    get_model("lm", vocab_size=10, variant="huge")
  with pytest.raises(ValueError, match="unknown field"):
    get_model("lm", vocab_size=10, d_modle=3)
  with pytest.raises(ValueError, match="model.max_len"):
    get_model("lm", vocab_size=10, max_len=16).validate(32)
  with pytest.raises(ValueError, match="num_layers"):
    LMConfig(vocab_size=10, num_layers=3, mixers=("attention",))
  assert isinstance(get_model("lm", vocab_size=10), Model)
