"""Titans layers: full forward == chunk-by-chunk == token-by-token, gradients, causality, resets, sharding."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from memarch import sharding
from memarch.layers import titans
from memarch.models import get_model

T = 13  # not a multiple of the chunk (4) or of the MAC segment (8)
# First piece ends inside a chunk, then one token, then the rest (equal lengths share one compilation).
SPLITS = [(0, 6), (6, 7), (7, T)]
# Tiny memory: chunk 4 (so the pending buffer and the chunk phase are exercised), depth-2 MLP.
MEMORY = dict(chunk_size=4, depth=2, expansion=2)
# MAG and MAL reuse the LMM; their slower cases run with -m slow (the LM protocol test also covers them). MAC,
# the model whose memory read depends on the segment's attention output, runs in the default suite.
_SLOW_HYBRIDS = [pytest.param(k, marks=pytest.mark.slow) for k in ("mag", "mal")]
_SLOW_MAC = [pytest.param("mac", marks=pytest.mark.slow)]
LAYERS = {
    "lmm": lambda **kw: titans.NeuralMemory(num_heads=2, d_model=16, **{**MEMORY, **kw}),
    "mag": lambda **kw: titans.TitansMAG(num_heads=2, d_model=16, window=3, num_persistent=2,
                                         memory_options=tuple(sorted(MEMORY.items())), **kw),
    # MAC: segments of 8 tokens written in memory chunks of 4; 13 tokens cross a segment boundary.
    "mac": lambda **kw: titans.TitansMAC(num_heads=2, d_model=16, segment_len=8, num_persistent=2,
                                         memory_options=tuple(sorted(MEMORY.items())), **kw),
    "mal": lambda **kw: titans.TitansMAL(num_heads=2, d_model=16, window=3, num_persistent=2,
                                         memory_options=tuple(sorted(MEMORY.items())), **kw),
}


@functools.cache
def _setup(kind):
  """One layer, its params, a jitted apply shared by every test (equal shapes compile once) and T tokens."""
  layer = LAYERS[kind]()
  x = jax.random.normal(jax.random.key(0), (2, T, 16))
  params = jax.jit(layer.init)(jax.random.key(1), x)
  return layer, jax.jit(layer.apply), params, x


def _run(layer, apply, params, x, bounds, segment_ids=None):
  state, ys = layer.init_state(x.shape[0]), []
  for lo, hi in bounds:
    seg = None if segment_ids is None else segment_ids[:, lo:hi]
    y, state = apply(params, x[:, lo:hi], segment_ids=seg, state=state)
    ys.append(y)
  return jnp.concatenate(ys, 1), state


def _memory_state(kind, state):
  """The op-level `MemoryState` inside a layer state."""
  return state.memory if kind in ("lmm", "mac") else state.memory.memory


def _assert_close(a, b, atol=1e-5):
  jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, atol=atol, rtol=1e-5), a, b)


@pytest.mark.parametrize("kind", ["lmm", "mag", "mac", pytest.param("mal", marks=pytest.mark.slow)])
def test_full_equals_chunks_and_token_by_token(kind):
  # Given a layer and 13 tokens of one document (explicit ids: the calls share traces with the reset test)
  layer, apply, params, x = _setup(kind)
  seg = jnp.zeros((2, T), jnp.int32)
  # When run as one call, in uneven pieces with the carried state, and token by token
  y_full, s_full = apply(params, x, segment_ids=seg)
  y_chk, s_chk = _run(layer, apply, params, x, SPLITS, seg)
  y_tok, s_tok = _run(layer, apply, params, x, [(t, t + 1) for t in range(T)], seg)
  # Then outputs and final states agree
  _assert_close(y_chk, y_full)
  _assert_close(y_tok, y_full)
  _assert_close(s_chk, s_full)
  _assert_close(s_tok, s_full)
  # And the memory really learned: its fast weights moved away from W_0
  w0 = params["params"]["memory"]["w_0"] if kind == "lmm" else params["params"]["memory"]["memory"]["w_0"]
  assert float(jnp.abs(_memory_state(kind, s_full).weights["w_0"] - nn.meta.unbox(w0)[None]).max()) > 1e-4


@pytest.mark.parametrize("kind", ["lmm", "mac"] + _SLOW_HYBRIDS)
def test_gradients_full_equal_chunked_with_state(kind):
  layer, _, params, x = _setup(kind)
  mem_of = functools.partial(_memory_state, kind)

  def loss(p, x, cut):
    ys, state = [], None
    for lo, hi in ((0, cut), (cut, T)) if cut else ((0, T),):
      y, state = layer.apply(p, x[:, lo:hi], state=state)
      ys.append(y)
    return jnp.sum(jnp.concatenate(ys, 1) ** 2) + jnp.sum(mem_of(state).weights["w_1"] ** 2)

  g_full = jax.jit(jax.grad(functools.partial(loss, cut=0), argnums=(0, 1)))(params, x)
  g_chk = jax.jit(jax.grad(functools.partial(loss, cut=6), argnums=(0, 1)))(params, x)
  _assert_close(g_chk, g_full, atol=1e-4)
  # Outer gradients reach W_0 and the gate projections through the inner update (spec §10.7).
  flat = {"/".join(str(getattr(k, "key", k)) for k in path): np.asarray(v)
          for path, v in jax.tree_util.tree_leaves_with_path(nn.meta.unbox(g_full[0]))}
  assert all(np.isfinite(v).all() for v in flat.values())
  for suffix in ("memory/w_0", "gates/w", "k/kernel", "v/kernel"):
    assert any(k.endswith(suffix) and np.abs(v).max() > 0 for k, v in flat.items()), suffix


@pytest.mark.parametrize("kind", ["lmm", "mac"] + _SLOW_HYBRIDS)
def test_causality(kind):
  # The Jacobian of output t with respect to inputs after t is zero, and not zero at t itself.
  _, apply, params, x = _setup(kind)
  jac = jax.jit(jax.jacfwd(lambda z: apply(params, z)[0][0]))(x)  # [t, d, b, t', d]
  for t in range(T):
    np.testing.assert_array_equal(jac[t, :, :, t + 1:], 0.0)
    assert np.abs(np.asarray(jac[t, :, 0, t])).max() > 0


@pytest.mark.parametrize("kind", ["lmm"] + _SLOW_MAC + _SLOW_HYBRIDS)
def test_documents_are_isolated_and_resets_survive_call_boundaries(kind):
  # Given two packed documents, the second starting at position 4 (a chunk multiple)
  layer, apply, params, x = _setup(kind)
  seg = jnp.array([[3] * 4 + [5] * (T - 4)] * 2)
  # When run packed, alone, and in pieces that end with the new document still pending (tokens 4, 5 of chunk 4..7)
  y_packed, s_packed = apply(params, x, segment_ids=seg)
  y_alone, s_alone = _run(layer, apply, params, x[:, 4:], [(0, T - 4)], seg[:, 4:])
  y_split, s_split = _run(layer, apply, params, x, SPLITS, segment_ids=seg)
  # Then the second document never sees the first, also when its start waits in the pending buffer
  _assert_close(y_packed[:, 4:], y_alone, atol=1e-4)
  _assert_close(y_split, y_packed)
  mem = functools.partial(_memory_state, kind)
  _assert_close(mem(s_packed).weights, mem(s_alone).weights, atol=1e-4)
  _assert_close(mem(s_split).weights, mem(s_packed).weights)


def test_misaligned_document_start_raises():
  layer, _, params, x = _setup("lmm")
  seg = jnp.array([[0] * 3 + [1] * (T - 3)] * 2)
  with pytest.raises(ValueError, match="chunk_size"):
    layer.apply(params, x, segment_ids=seg)  # eager: the op checks the alignment


def test_diagnostics():
  # Given the LMM, when asked for its diagnostics (spec §9)
  layer, _, params, x = _setup("lmm")
  y, state, aux = jax.jit(functools.partial(layer.apply, return_aux=True))(params, x)
  # Then the main outputs are unchanged and every chunk reports finite, non-negative statistics
  y_ref, _ = _setup("lmm")[1](params, x)
  np.testing.assert_allclose(y, y_ref, atol=1e-6)
  n_chunks = -(-(3 + T) // 4)
  for key in ("loss_before", "loss_after", "surprise_norm"):
    assert aux[key].shape == (2, n_chunks, 2) and bool(jnp.all(jnp.isfinite(aux[key])))
    assert bool(jnp.all(aux[key] >= 0))
  np.testing.assert_array_equal(aux["chunk_mask"][0], [1, 1, 1, 0])
  # A write lowers the inner loss of the chunk it absorbed
  assert bool(jnp.all(aux["loss_after"][:, :3] < aux["loss_before"][:, :3]))
  np.testing.assert_allclose(aux["theta"], 0.1 * jax.nn.sigmoid(-2.0), rtol=1e-5)  # zero-init gate projection


def test_state_size_and_unbound_init_state():
  layer = LAYERS["lmm"]()
  state = layer.init_state(3)
  assert state.memory.weights["w_0"].shape == (3, 2, 8, 16) and state.memory.weights["w_0"].dtype == jnp.float32
  assert bool(state.restart.all())
  # fast weights, momentum and window reference (3 x 2 heads x 2 x 8 x 16) + pending chunk + conv tails
  assert layer.state_size() == 3 * 2 * 2 * 8 * 16 + 3 * (2 * (2 * 8 + 3) + 1) + 3 * 3 * 16
  for kind in ("mag", "mal"):
    hybrid = LAYERS[kind]()
    assert hybrid.state_size() == layer.state_size() + 2 * 2 * 2 * 8  # + 2 (window - 1) slots of k and v


@pytest.mark.parametrize("mixer", ["titans_mag"] + [pytest.param(m, marks=pytest.mark.slow)
                                                    for m in ("titans_lmm", "titans_mal", "titans_mac")])
def test_partition_specs_on_a_2x2x2_mesh(mixer):
  # Given the (data=2, fsdp=2, tensor=2) mesh and the default rules
  mesh = sharding.make_mesh([("data", 2), ("fsdp", 2), ("tensor", 2)])
  rules = sharding.rules_for_mesh(sharding.DEFAULT_RULES, mesh)
  model = get_model("lm", vocab_size=64, variant="tiny", mixers=[mixer], window=4, num_persistent=2)
  mesh_shardings = sharding.param_shardings(model, jnp.zeros((4, 8), jnp.int32), mesh=mesh, rules=rules)
  flat = sharding.flat_specs(mesh_shardings)
  # Then memory heads go on `tensor`, model width on `fsdp`
  mem = "block_0/mixer" if mixer == "titans_lmm" else "block_0/mixer/memory"
  expected = {
      f"{mem}/q/kernel": P("fsdp", "tensor", None), f"{mem}/k/kernel": P("fsdp", "tensor", None),
      f"{mem}/v/kernel": P("fsdp", "tensor", None), f"{mem}/g/kernel": P("fsdp", "tensor", None),
      f"{mem}/o/kernel": P("tensor", None, "fsdp"), f"{mem}/gates/w": P("fsdp", None, "tensor"),
      f"{mem}/gates/b": P(None, "tensor"), f"{mem}/memory/w_0": P("tensor", None, None),
      f"{mem}/memory/w_1": P("tensor", None, None), f"{mem}/memory/norm_scale": P("tensor", None),
      f"{mem}/conv/kernel": P(None, "fsdp"), f"{mem}/out_norm/scale": P("fsdp"),
  }
  if mixer == "titans_mac":
    expected.update({"block_0/mixer/attn_q/kernel": P("fsdp", "tensor", None),
                     "block_0/mixer/attn_o/kernel": P("tensor", None, "fsdp"),
                     "block_0/mixer/persistent/vectors": P(None, "fsdp")})
  elif mixer != "titans_lmm":
    expected.update({"block_0/mixer/attention/q": P("fsdp", "tensor", None),
                     "block_0/mixer/attention/o": P("tensor", None, "fsdp")})
  for name, spec in expected.items():
    assert flat[name] == spec, (name, flat[name])
  # And the model initialises straight into those shardings
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    params = jax.jit(lambda k: nn.meta.unbox(model.init(k, jnp.zeros((4, 8), jnp.int32))["params"]),
                     out_shardings=mesh_shardings)(jax.random.key(0))
  w0 = params["block_0"]["mixer"]["memory"]
  w0 = w0["w_0"] if mixer == "titans_lmm" else w0["memory"]["w_0"]
  assert w0.sharding.spec == P("tensor", None, None)


@pytest.mark.slow
def test_decode_equals_full_forward_in_float64():
  # spec §10.4: float64, atol 1e-6, with the paper's larger theta_max = 1 on a deep memory.
  with jax.enable_x64(True):
    layer = titans.NeuralMemory(num_heads=2, d_model=16, chunk_size=2, depth=2, max_lr=1.0,
                                param_dtype=jnp.float64, state_dtype=jnp.float64)
    x = jax.random.normal(jax.random.key(0), (1, 9, 16), jnp.float64)
    params = layer.init(jax.random.key(1), x)
    apply = jax.jit(layer.apply)
    y_full, s_full = apply(params, x)
    y_tok, s_tok = _run(layer, apply, params, x, [(t, t + 1) for t in range(9)])
    np.testing.assert_allclose(y_tok, y_full, atol=1e-6)
    _assert_close(s_tok.memory.weights, s_full.memory.weights, atol=1e-6)


def test_niah_memory_stays_bounded_on_a_repeating_stream():
  # Given the S-NIAH configs' memory options and a stream that repeats every 16 tokens, as their haystack does
  import configs.niah as niah_configs  # pylint: disable=g-import-not-at-top

  options = dict(niah_configs.titans_memory(None))
  period = jax.random.normal(jax.random.key(0), (1, 16, 32))
  x = jnp.tile(period, (1, 64, 1))  # 1,024 tokens, the 4L evaluation length of the default config

  def max_weight(**override):
    layer = titans.NeuralMemory(num_heads=2, d_model=32, **{**options, **override})
    params = layer.init(jax.random.key(1), x[:, :16])
    _, state = jax.jit(layer.apply)(params, x)
    return float(jnp.max(jnp.abs(state.memory.weights["w_0"])))

  # Then theta_max = 1 / chunk keeps the linear memory bounded at the initial gates ...
  assert max_weight() < 10.0
  # ... the surprise clamp keeps it finite and bounded when theta and eta sit at their maxima ...
  assert max_weight(init_theta_bias=8.0, init_eta_bias=8.0) < 1e4
  # ... while theta_max = 1 without the clamp (the configs before an H100 run read NaN at 4L) blows up once
  # theta reaches 0.5 (sigmoid(0)), a value training can reach
  assert not max_weight(max_lr=1.0, max_grad_norm=None, init_theta_bias=0.0) < 1e6  # NaN or huge


def test_zero_initial_memory_starts_at_zero_and_learns_from_writes():
  # Given an LMM with W_0 = 0 (the S-NIAH MAC config's choice, spec §2.5 option)
  layer = titans.NeuralMemory(num_heads=2, d_model=16, chunk_size=4, depth=1, zero_init_memory=True)
  x = jax.random.normal(jax.random.key(0), (1, 9, 16))
  params = layer.init(jax.random.key(1), x)
  w0 = nn.meta.unbox(params)["params"]["memory"]["w_0"]
  # Then W_0 is a zero parameter, the writes of a call move the memory away from it ...
  assert w0.shape == (2, 8, 8) and not bool(jnp.any(w0))
  y, state = layer.apply(params, x)
  assert bool(jnp.any(state.memory.weights["w_0"])) and bool(jnp.all(jnp.isfinite(y)))
  # ... and W_0 still gets an outer-loop gradient (it is learned, only its start is zero)
  g = jax.grad(lambda p: jnp.sum(layer.apply(p, x)[0] ** 2))(params)
  assert bool(jnp.any(nn.meta.unbox(g)["params"]["memory"]["w_0"]))
