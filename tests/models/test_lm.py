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
  variables = jax.jit(model.init)(jax.random.key(1), prompt)
  # When generating greedily with carried states
  out = generate(model, variables, prompt, 9)
  # Then each generated token is the argmax of the full forward over prompt + generated prefix
  full = jnp.concatenate([prompt, out[:, :-1]], axis=1)
  logits, _ = jax.jit(model.apply)(variables, full)
  np.testing.assert_array_equal(jnp.argmax(logits[:, 4:], -1), out)
  sampled = generate(model, variables, prompt, 4, rng=jax.random.key(3), temperature=1.0)
  assert sampled.shape == (2, 4) and int(sampled.max()) < 37
  with pytest.raises(ValueError, match="max_len"):
    generate(model, variables, prompt, 40)


# Titans LMM / MAG already pass full == chunks == token by token as layers in the default suite
# (tests/layers/test_titans_layers.py) and their LM compiles are among the slowest: their LM-level run is ``-m slow``.
# (MAC and MAL stay here: their layer-level streaming tests are the slow ones.)
_SLOW_MIXERS = ("titans_lmm", "titans_mag")


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in _SLOW_MIXERS else n
                                  for n in sorted(mixers.MIXERS)])
def test_every_mixer_follows_the_protocol(name):
  # Given the mixer as the LM would build it
  fields = {k: v for k, v in SMALL.items() if k != "variant"}
  cfg = LMConfig.from_preset(None, **{**fields, "mixers": (name,)})
  mixer = mixers.get_mixer_spec(name).build(cfg, 0, parent=None)
  x = jax.random.normal(jax.random.key(0), (2, 9, cfg.d_model))
  params = jax.jit(mixer.init)(jax.random.key(1), x)
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
  # Then outputs never depend on later inputs (causality): new random inputs from position j on leave every
  # output before j unchanged (the whole-sequence compile is reused, where a Jacobian would compile its own)
  noise = jax.random.normal(jax.random.key(2), x.shape)
  for j in range(1, 9):
    changed, _ = apply(params, x.at[:, j:].set(noise[:, j:]))
    np.testing.assert_array_equal(changed[:, :j], y[:, :j])
    assert np.abs(np.asarray(changed[:, j:] - y[:, j:])).max() > 0
  assert mixer.state_size() > 0


def test_lm_causality_and_segment_isolation():
  model = _model(["attention", "sliding_window"])
  tokens = jax.random.randint(jax.random.key(0), (1, 10), 0, 37)
  variables = jax.jit(model.init)(jax.random.key(1), tokens)
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
  variables = jax.jit(model.init)(jax.random.key(1), tokens)
  logits, states = jax.jit(model.apply)(variables, tokens)
  assert logits.dtype == jnp.float32
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(variables))
  assert all(s.k.dtype == jnp.float32 for s in states.values())
  ref, _ = jax.jit(_model(["attention", "sliding_window"]).apply)(variables, tokens)
  np.testing.assert_allclose(logits, ref, atol=5e-2)


def test_remat_gives_the_same_gradients():
  tokens = jax.random.randint(jax.random.key(0), (2, 6), 0, 37)
  plain, remat = _model(["attention"] * 2), _model(["attention"] * 2, remat=True)
  variables = jax.jit(plain.init)(jax.random.key(1), tokens)
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


def test_feature_inputs_full_forward_equals_step_decode():
  # Given an LM over float feature vectors (a linear embedding, an untied head) with HCAM and windowed layers
  model = _model(["hcam", "sliding_window"], input_features=5,
                 mixer_options={"hcam": dict(chunk_size=2, top_k=2, max_chunks=8)})
  assert not model.config.tie_embeddings  # feature inputs untie the head by rule
  x = jax.random.normal(jax.random.key(0), (2, 11, 5))
  variables = nn.meta.unbox(jax.jit(model.init)(jax.random.key(1), x))
  assert "embedding" not in variables["params"] and variables["params"]["input_proj"].shape == (5, 32)
  apply = jax.jit(model.apply)
  # When run whole and frame by frame with carried states
  full, _ = apply(variables, x)
  states, steps = model.init_state(2), []
  for t in range(11):
    logits, states = apply(variables, x[:, t:t + 1], states=states)
    steps.append(logits)
  # Then both agree, and token-only paths refuse feature models
  assert full.shape == (2, 11, 37)
  np.testing.assert_allclose(jnp.concatenate(steps, 1), full, atol=1e-5, rtol=1e-5)
  with pytest.raises(ValueError, match="generate: needs a token model"):
    generate(model, variables, x, 3)
  with pytest.raises(ValueError, match="input_features=5 expects inputs"):
    model.apply(variables, jnp.zeros((2, 3), jnp.int32))
  with pytest.raises(ValueError, match="model.tie_embeddings=True needs token inputs"):
    _model(["attention"], input_features=5, tie_embeddings=True)
  assert model.param_count() == sum(int(np.prod(p.shape)) for p in jax.tree.leaves(variables))


def _hmem_lm(**kw):
  return Model(vocab_size=32, variant=None, d_model=32, num_layers=2, num_heads=2, mlp_hidden=64, **kw)


def test_hmem_lm_at_init_equals_the_swiglu_lm_and_the_route_matters():
  # Given a SwiGLU LM and the same LM with hierarchical memory FFNs, sharing the anchor params.
  opts = (("branching", 4), ("ranks", (8, 4)))
  dense, hmem = _hmem_lm(mlp="swiglu"), _hmem_lm(mlp="hmem", memory_options=opts)
  tokens = jax.random.randint(jax.random.key(0), (3, 7), 0, 32)
  route = jnp.array([[0, 1], [3, 15], [2, 9]], jnp.int32)
  pd = nn.meta.unbox(jax.jit(dense.init)(jax.random.key(1), tokens))["params"]
  ph = nn.meta.unbox(jax.jit(hmem.init)(jax.random.key(2), tokens, route=route))["params"]
  for i in range(2):
    ph[f"block_{i}"]["mlp"]["anchor"] = pd[f"block_{i}"]["mlp"]
    for name in ("mixer", "mixer_norm", "mlp_norm"):
      ph[f"block_{i}"][name] = pd[f"block_{i}"][name]
  ph["embedding"], ph["final_norm"] = pd["embedding"], pd["final_norm"]
  fwd = jax.jit(lambda m, p, r: m.apply({"params": p}, tokens, route=r)[0], static_argnums=0)
  want = fwd(dense, pd, None)
  # Then at init (zero down-projections) the memory has no effect, for any route, generic included.
  for r in (route, route[::-1], jnp.full_like(route, -1)):
    np.testing.assert_array_equal(np.asarray(fwd(hmem, ph, r)), np.asarray(want))
  # And once the bank's down-projections are perturbed, the route changes the output.
  key = jax.random.key(3)
  for i in range(2):
    for name in ("down_1", "down_2"):
      key, sub = jax.random.split(key)
      leaf = ph[f"block_{i}"]["mlp"][name]
      ph[f"block_{i}"]["mlp"][name] = 0.5 * jax.random.normal(sub, leaf.shape)
  a, b = fwd(hmem, ph, route), fwd(hmem, ph, route.at[0, 1].set(2))
  assert float(jnp.abs(a[0] - b[0]).max()) > 1e-3  # row 0's level-2 block changed
  np.testing.assert_allclose(np.asarray(a[1:]), np.asarray(b[1:]), atol=1e-6)  # other rows untouched
  assert float(jnp.abs(a - want).max()) > 1e-3


def test_hmem_and_pkm_configs_count_params_and_active_flops():
  opts = {"branching": 4, "ranks": [8, 4]}
  base, hmem = _hmem_lm(), _hmem_lm(mlp="hmem", memory_options=opts, memory_layers=(1,))
  d, units = 32, 12
  bank = 3 * d * (8 * 4 + 4 * 16) + 3 * d * units  # level tables + the generic block, in layer 1 only
  assert hmem.param_count() == base.param_count() + bank
  # Only the fetched units are active: one path (or the generic block) of 3 d R parameters.
  assert hmem.flops_per_token(7) == base.flops_per_token(7) + 6 * 3 * d * units
  pkm = _hmem_lm(pkm_layers=(0,), pkm_options={"n_keys": 8, "heads": 2, "knn": 4, "k_dim": 8})
  tokens = jnp.zeros((2, 5), jnp.int32)
  logits, _ = jax.jit(lambda p: pkm.apply(p, tokens))(pkm.init(jax.random.key(0), tokens))
  assert logits.shape == (2, 5, 32)
  values = 64 * d
  assert pkm.flops_per_token(7) == pytest.approx(
      base.flops_per_token(7) + 6 * (pkm.param_count() - base.param_count() - values + 2 * 4 * d))


def test_hmem_bad_configs_raise_naming_the_field():
  with pytest.raises(ValueError, match="model.memory_options"):
    _ = _hmem_lm(mlp="hmem", memory_options={"rank": 3}).config
  with pytest.raises(ValueError, match="model.pkm_options"):
    _ = _hmem_lm(pkm_layers=(0,), pkm_options={"slots": 3}).config
  with pytest.raises(ValueError, match="model.pkm_layers"):
    _ = _hmem_lm(pkm_layers=(5,)).config
  m = _hmem_lm(mlp="hmem", memory_options={"branching": 4, "ranks": (8, 4)})
  with pytest.raises(ValueError, match="needs route"):
    m.init(jax.random.key(0), jnp.zeros((2, 3), jnp.int32))
  with pytest.raises(ValueError, match="route must be"):
    m.init(jax.random.key(0), jnp.zeros((2, 3), jnp.int32), route=jnp.zeros((2, 1), jnp.int32))
