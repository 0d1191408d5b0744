"""BMojoF / BMojo layers: naive reference == one call == chunk by chunk == token by token; gradients; causality;
packed documents; the store bound; the auxiliary loss; partition specs on 8 devices."""

import functools
import pathlib
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from memarch import sharding
from memarch.layers.bmojo import BMojo, BMojoF, BMojoState
from memarch.layers.mamba2 import Mamba2
from memarch.ops import attention as attn_ops
from memarch.ops import bmojo as bmojo_ops

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "ops"))
from test_bmojo_ops import naive_bmojo, naive_key_novelty  # noqa: E402  (the independent per-token references)

T = 13  # divisible by neither the selection chunks (4, 3) nor the SSD chunk (4)
SSM = dict(d_model=16, d_state=8, ssm_head_dim=8, ssm_chunk_size=4)
LAYERS = {
    "bmojo_f": (BMojoF, dict(num_heads=2, window=3, **SSM)),
    "bmojo": (BMojo, dict(num_heads=4, num_kv_heads=2, window=3, chunk_size=4, k_sel=2, memory_size=4, **SSM)),
    "bmojo_top_m": (BMojo, dict(num_heads=2, window=3, chunk_size=4, k_sel=2, memory_size=3, bound="top_m", **SSM)),
    "bmojo_untied": (BMojo, dict(num_heads=2, window=2, chunk_size=3, k_sel=1, memory_size=3,
                                 tie_attn_weights=False, innovation_dim=8, **SSM)),
    "bmojo_novelty": (BMojo, dict(num_heads=4, num_kv_heads=2, window=3, chunk_size=4, k_sel=2, memory_size=4,
                                  innovation="key_novelty", **SSM)),
    "bmojo_novelty_top_m": (BMojo, dict(num_heads=2, window=2, chunk_size=4, k_sel=1, memory_size=2, bound="top_m",
                                        innovation="key_novelty", **SSM)),
    "bmojo_external": (BMojo, dict(num_heads=2, window=2, chunk_size=3, k_sel=1, memory_size=3,
                                   innovation="external", **SSM)),
}
SCORES = jax.random.uniform(jax.random.key(7), (2, T))  # the caller's scores for innovation="external"
SEG = jnp.array([[0] * T, [0] * 5 + [1] * 8])  # row 1: a document starts at 5, not a chunk multiple


@functools.cache
def _setup(name, **overrides):
  cls, fields = LAYERS[name]
  layer = cls(**{**fields, **overrides})
  x = jax.random.normal(jax.random.key(0), (2, T, 16))
  kw = dict(innovation_scores=SCORES) if getattr(layer, "innovation", None) == "external" else {}
  params = jax.jit(layer.init)(jax.random.key(1), x, **kw)
  return layer, jax.jit(layer.apply), params, x


def _chunks(layer, apply, params, x, bounds, segment_ids=None, scores=None):
  state, ys = layer.init_state(x.shape[0]), []
  for lo, hi in bounds:
    seg = None if segment_ids is None else segment_ids[:, lo:hi]
    kw = {} if scores is None else dict(innovation_scores=scores[:, lo:hi])
    y, state = apply(params, x[:, lo:hi], segment_ids=seg, state=state, **kw)
    ys.append(y)
  return jnp.concatenate(ys, 1), state


def _close(a, b, atol=1e-5):
  jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, atol=atol, rtol=1e-5), a, b)


def _naive_layer(layer, params, x, seg, scores=None):
  """The layer recomputed by hand around the per-token reference of the ops test."""
  p = nn.meta.unbox(params)["params"]
  s, _ = Mamba2(d_model=16, d_state=8, head_dim=8, chunk_size=4).apply({"params": p["ssm"]}, x, segment_ids=seg)
  pos = jnp.broadcast_to(jnp.arange(T), (x.shape[0], T))
  proj = lambda z, w: jnp.einsum("btd,dhe->bthe", z, w)
  rope = lambda z: attn_ops.rope(z, pos)
  tied = layer.tie_attn_weights
  nq = nk = lambda z: z
  if layer.qk_norm:  # per-head RMS norm before RoPE with gains 1 + g, shared by both paths
    rms = lambda z, g: z / jnp.sqrt(jnp.mean(z * z, -1, keepdims=True) + 1e-6) * (1.0 + g)
    nq, nk = (lambda z: rms(z, p["q_norm"])), (lambda z: rms(z, p["k_norm"]))
  q, k, v = rope(nq(proj(x, p["q"]))), rope(nk(proj(x, p["k"]))), proj(x, p["v"])
  kf = rope(nk(proj(s, p["k"] if tied else p["k_fade"])))
  vf = proj(s, p["v"] if tied else p["v_fade"])
  qf = None if tied else rope(nq(proj(x, p["q_fade"])))
  c, k_sel, m = layer.store_config()
  score = np.zeros((x.shape[0], T))
  innovation = getattr(layer, "innovation", "ssm_residual")
  if m and innovation == "key_novelty":  # pre-RoPE keys, the store kept by the reference itself
    score = naive_key_novelty(nk(proj(x, p["k"])), seg, window=layer.window, chunk=c, k_sel=k_sel, m=m,
                              bound=layer.bound)
  elif m and innovation == "external":
    score = np.asarray(scores)
  elif m:
    xn = (x - x.mean(-1, keepdims=True)) / jnp.sqrt(x.var(-1, keepdims=True) + 1e-5)
    if layer.innovation_dim:
      xn = xn @ (jax.random.normal(jax.random.key(layer.innovation_seed), (16, layer.innovation_dim)) / 4.0)
    pred = s @ p["innovation_probe"]
    seg_np = np.asarray(seg)
    for r in range(x.shape[0]):
      for t in range(T):
        prev = 0.0 if t == 0 or seg_np[r, t] != seg_np[r, t - 1] else pred[r, t - 1]
        score[r, t] = float(jnp.sum((xn[r, t] - prev) ** 2))
  bias = None
  if getattr(layer, "selector_bias", False):
    bias = (np.asarray(p["selector_gamma"], np.float64), np.asarray(p["selector_tau"], np.float64))
  out, _ = naive_bmojo(q, k, v, kf, vf, score, seg, window=layer.window, chunk=c, k_sel=k_sel, m=m, qf=qf,
                       bias=bias, bound=getattr(layer, "bound", "fifo"))
  return jnp.einsum("bthe,hed->btd", out, np.asarray(p["o"], np.float64))


@pytest.mark.parametrize("name", ["bmojo", "bmojo_top_m", pytest.param("bmojo_f", marks=pytest.mark.slow),
                                  pytest.param("bmojo_untied", marks=pytest.mark.slow)])
def test_naive_equals_full_equals_chunks_equals_steps(name):
  # Given a layer and 13 tokens, row 1 holding two packed documents
  layer, apply, params, x = _setup(name)
  # When run by the hand-written reference, in one call, in uneven calls and token by token
  ref = _naive_layer(layer, params, x, SEG)
  y_full, s_full = apply(params, x, segment_ids=SEG)
  y_chk, s_chk = _chunks(layer, apply, params, x, [(0, 6), (6, 7), (7, T)], SEG)
  y_tok, s_tok = _chunks(layer, apply, params, x, [(t, t + 1) for t in range(T)], SEG)
  # Then all outputs agree and so do the final states
  np.testing.assert_allclose(y_full, ref, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(y_chk, y_full, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(y_tok, y_full, atol=1e-5, rtol=1e-5)
  _close(s_chk, s_full)
  _close(s_tok, s_full)
  assert isinstance(s_full, BMojoState)
  assert all(leaf.dtype in (jnp.float32, jnp.int32) for leaf in jax.tree.leaves(s_full))


@pytest.mark.parametrize("name", ["bmojo_novelty", "bmojo_external",
                                  pytest.param("bmojo_novelty_top_m", marks=pytest.mark.slow)])
def test_key_novelty_and_external_innovation_equal_reference_full_chunks_steps(name):
  # Given B'MOJO scoring tokens by key novelty (no parameters) or by the caller's scores (spec §4.1 alternatives)
  layer, apply, params, x = _setup(name)
  scores = SCORES if layer.innovation == "external" else None
  kw = {} if scores is None else dict(innovation_scores=scores)
  # When run by the reference (which recomputes novelty per token with its own store), in one call, in uneven
  # calls and token by token
  ref = _naive_layer(layer, params, x, SEG, scores)
  y_full, s_full = apply(params, x, segment_ids=SEG, **kw)
  y_chk, s_chk = _chunks(layer, apply, params, x, [(0, 6), (6, 7), (7, T)], SEG, scores)
  y_tok, s_tok = _chunks(layer, apply, params, x, [(t, t + 1) for t in range(T)], SEG, scores)
  # Then all agree; neither mode has a probe, an auxiliary loss or a carried SSM output
  np.testing.assert_allclose(y_full, ref, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(y_chk, y_full, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(y_tok, y_full, atol=1e-5, rtol=1e-5)
  _close(s_chk, s_full)
  _close(s_tok, s_full)
  assert "innovation_probe" not in params["params"] and s_full.s_last.shape == (2, 0)
  floats = [a.size for a in jax.tree.leaves(layer.init_state(1)) if jnp.issubdtype(a.dtype, jnp.floating)]
  assert layer.state_size() == sum(floats)  # the float state (positions and ids are int32 metadata)
  if layer.innovation == "key_novelty":  # the carried unit keys are the memory's, un-rotated slot for slot
    _close(s_tok.novelty, bmojo_ops.novelty_keys(s_tok.memory, layer.rope_max_wavelength))
  else:
    assert all(z.shape == (2, 0, 0) for z in s_full.novelty)
  if scores is not None:  # the caller's scores decide what is stored
    _, s_rev = apply(params, x, segment_ids=SEG, innovation_scores=-scores)
    assert not np.array_equal(s_rev.memory.store.positions, s_full.memory.store.positions)


def test_innovation_scores_are_checked():
  x = jnp.zeros((1, 4, 16))
  ext = BMojo(num_heads=2, window=2, k_sel=1, memory_size=2, innovation="external", **SSM)
  with pytest.raises(ValueError, match="innovation_scores"):
    jax.eval_shape(lambda: ext.init(jax.random.key(0), x))
  with pytest.raises(ValueError, match=r"innovation_scores must be \[b=1, t=4\]"):
    jax.eval_shape(lambda: ext.init(jax.random.key(0), x, innovation_scores=jnp.zeros((1, 3))))
  with pytest.raises(ValueError, match="innovation='external'"):
    jax.eval_shape(lambda: BMojo(num_heads=2, window=2, k_sel=1, memory_size=2, **SSM).init(
        jax.random.key(0), x, innovation_scores=jnp.zeros((1, 4))))
  with pytest.raises(ValueError, match="innovation='external'"):
    jax.eval_shape(lambda: BMojoF(num_heads=2, window=2, **SSM).init(jax.random.key(0), x,
                                                                     innovation_scores=jnp.zeros((1, 4))))
  with pytest.raises(ValueError, match="innovation="):
    BMojo(num_heads=2, window=2, k_sel=1, memory_size=2, innovation="surprise", **SSM).init_state(1)


@pytest.mark.parametrize("qk_norm", [False, True])
def test_gradients_full_equal_chunked_with_state(qk_norm):
  # Given B'MOJO without the auxiliary loss (its per-call mean depends on how the sequence is split), with and
  # without qk_norm
  layer, _, params, x = _setup("bmojo", aux_weight=0.0, qk_norm=qk_norm)
  ct = jax.random.normal(jax.random.key(5), x.shape)

  def loss(params, x, bounds):
    y, _ = _chunks(layer, layer.apply, params, x, bounds, SEG)
    return jnp.sum(y * ct)

  grad = jax.jit(jax.grad(loss, argnums=(0, 1)), static_argnums=2)
  g_full = nn.meta.unbox(grad(params, x, ((0, T),)))
  g_chk = nn.meta.unbox(grad(params, x, ((0, 6), (6, T))))
  _close(g_chk, g_full, atol=2e-5)
  # The probe gets no gradient from the main loss: scores only pick entries (top-k is not differentiable)
  np.testing.assert_array_equal(g_full[0]["params"]["innovation_probe"], 0.0)
  assert float(jnp.abs(g_full[0]["params"]["ssm"]["in_zx"]).max()) > 0
  if qk_norm:  # the gains are trained
    assert float(jnp.abs(g_full[0]["params"]["q_norm"]).max()) > 0
    assert float(jnp.abs(g_full[0]["params"]["k_norm"]).max()) > 0


def test_aux_loss_trains_the_probe_only():
  # Given B'MOJO with aux_weight 0.5
  layer, _, params, x = _setup("bmojo", aux_weight=0.5)
  layer0 = layer.clone(aux_weight=0.0)
  # When differentiating a loss of the output
  f = lambda lyr: nn.meta.unbox(jax.jit(jax.grad(lambda p: jnp.sum(lyr.apply(p, x)[0])))(params))["params"]
  g, g0 = f(layer), f(layer0)
  # Then the probe's gradient is 0.5 * d mean(e) / d P_s and every other gradient is unchanged
  p = nn.meta.unbox(params)["params"]
  s, _ = Mamba2(d_model=16, d_state=8, head_dim=8, chunk_size=4).apply({"params": p["ssm"]}, x)
  xn = (x - x.mean(-1, keepdims=True)) / jnp.sqrt(x.var(-1, keepdims=True) + 1e-5)

  def mean_e(probe):
    pred = jnp.concatenate([jnp.zeros((2, 1, 16)), (s @ probe)[:, :-1]], axis=1)
    return jnp.mean(jnp.sum((xn - pred) ** 2, -1))

  np.testing.assert_allclose(g["innovation_probe"], 0.5 * jax.grad(mean_e)(p["innovation_probe"]), atol=1e-5,
                             rtol=1e-4)
  g.pop("innovation_probe"), g0.pop("innovation_probe")
  _close(g, g0)


def test_selector_bias_matches_reference_and_trains_the_probe():
  # Given B'MOJO with the selector bias (spec §4.7), gamma / tau moved off their zero init, no auxiliary loss
  layer, apply, params, x = _setup("bmojo", aux_weight=0.0, selector_bias=True)
  p = nn.meta.unbox(params)
  p["params"]["selector_gamma"] = jnp.array([0.3, -0.2, 0.5, 0.1])
  p["params"]["selector_tau"] = jnp.array([10.0, 14.0, 12.0, 16.0])
  # When run in one call, token by token, and by the reference with the bias
  ref = _naive_layer(layer, p, x, SEG)
  y_full, _ = apply(p, x, segment_ids=SEG)
  y_tok, _ = _chunks(layer, apply, p, x, [(t, t + 1) for t in range(T)], SEG)
  np.testing.assert_allclose(y_full, ref, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(y_tok, y_full, atol=1e-5, rtol=1e-5)
  # Then the main loss reaches the probe through the scores (without the bias it gets exactly 0), and gamma / tau
  grads = jax.jit(jax.grad(lambda q: jnp.sum(layer.apply(q, x, segment_ids=SEG)[0] ** 2)))(p)["params"]
  for name in ("innovation_probe", "selector_gamma", "selector_tau"):
    assert float(jnp.abs(grads[name]).max()) > 0, name


@pytest.mark.parametrize("name", ["bmojo_untied", pytest.param("bmojo_novelty", marks=pytest.mark.slow)])
def test_qk_norm_matches_reference_and_makes_logits_scale_free(name):
  # Given B'MOJO with qk_norm (spec §3 option), its gains moved off their zero init
  layer, apply, params, x = _setup(name, qk_norm=True)
  p, e = nn.meta.unbox(params), layer.dims()[2]
  p["params"]["q_norm"] = jax.random.uniform(jax.random.key(8), (e,), minval=-0.5, maxval=0.5)
  p["params"]["k_norm"] = jax.random.uniform(jax.random.key(9), (e,), minval=-0.5, maxval=0.5)
  # When run by the reference, in one call and token by token
  ref = _naive_layer(layer, p, x, SEG)
  y_full, _ = apply(p, x, segment_ids=SEG)
  y_tok, _ = _chunks(layer, apply, p, x, [(t, t + 1) for t in range(T)], SEG)
  # Then all agree
  np.testing.assert_allclose(y_full, ref, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(y_tok, y_full, atol=1e-5, rtol=1e-5)
  # And scaling every query / key projection by 30 changes nothing (the logits are bounded by the gains), while
  # the same scaling without qk_norm changes the output
  big = {"params": {**p["params"], **{n: 30.0 * w for n, w in p["params"].items()
                                      if n in ("q", "k", "q_fade", "k_fade")}}}
  np.testing.assert_allclose(apply(big, x, segment_ids=SEG)[0], y_full, atol=1e-5, rtol=1e-5)
  plain = layer.clone(qk_norm=False)
  strip = lambda q: {"params": {n: w for n, w in q["params"].items() if n not in ("q_norm", "k_norm")}}
  y_plain, y_plain_big = (jax.jit(plain.apply)(strip(q), x, segment_ids=SEG)[0] for q in (p, big))
  assert float(jnp.abs(y_plain_big - y_plain).max()) > 1e-2


@pytest.mark.parametrize("name", ["bmojo", "bmojo_f", "bmojo_novelty",
                                  pytest.param("bmojo_top_m", marks=pytest.mark.slow)])
def test_causality_future_tokens_change_nothing_before(name):
  layer, apply, params, x = _setup(name)
  # Jacobian of every output wrt every input: zero wherever the input is later than the output
  jac = jax.jit(jax.jacfwd(lambda z: apply(params, z)[0][0]))(x)  # [t, d, b, t', d]
  for t in range(T):
    np.testing.assert_array_equal(jac[t, :, :, t + 1:], 0.0)
  # Perturbing the tokens after tau (which also changes the top-k of tau's chunk) leaves outputs <= tau and the
  # state after tau (store, candidates, window) unchanged
  base, _ = apply(params, x)
  for tau in (4, 5, 9):
    x2 = x.at[:, tau + 1:].add(jax.random.normal(jax.random.key(tau), x[:, tau + 1:].shape))
    y2, _ = apply(params, x2)
    np.testing.assert_allclose(y2[:, :tau + 1], base[:, :tau + 1], atol=1e-6)
    assert np.abs(np.asarray(y2[:, tau + 1:] - base[:, tau + 1:])).max() > 1e-4


@pytest.mark.parametrize("name", ["bmojo", "bmojo_untied"])
def test_packed_documents_equal_separate_runs(name):
  layer, apply, params, x = _setup(name)
  y_packed, _ = apply(params, x, segment_ids=SEG)
  y_alone, _ = apply(params, x[1:, 5:])
  np.testing.assert_allclose(y_packed[1:, 5:], y_alone, atol=1e-5)
  y_first, _ = apply(params, x[1:, :5])
  np.testing.assert_allclose(y_packed[1:, :5], y_first, atol=1e-5)


def test_store_stays_bounded_and_is_used():
  # Given B'MOJO (M = 4) streaming 40 tokens in calls of 7
  layer, apply, params, _ = _setup("bmojo")
  x = jax.random.normal(jax.random.key(3), (2, 40, 16))
  _, state = _chunks(layer, apply, params, x, [(i, min(i + 7, 40)) for i in range(0, 40, 7)])
  # Then the state has the same shapes as at the start, the store holds the picks of the last M / k_sel chunks
  shapes = lambda s: jax.tree.map(lambda a: a.shape, s)
  assert shapes(state) == shapes(layer.init_state(2))
  pos = np.asarray(state.memory.store.positions)
  assert pos.shape == (2, 4) and (pos >= 32).all() and (pos < 40).all()  # chunks [32, 36) and [36, 40)
  # And the store changes the output compared with B'MOJO-F on the same parameters
  params_f = {"params": {k: v for k, v in params["params"].items() if k != "innovation_probe"}}
  layer_f = BMojoF(**{k: v for k, v in LAYERS["bmojo"][1].items() if k not in ("chunk_size", "k_sel", "memory_size")})
  y_f, _ = jax.jit(layer_f.apply)(params_f, x)
  y, _ = apply(params, x)
  # (an entry p of chunk 0 is readable from t = max(4, p + W) on)
  np.testing.assert_allclose(y[:, :4], y_f[:, :4], atol=1e-6)
  assert np.abs(np.asarray(y - y_f))[:, 4:].max() > 1e-3


def test_bad_fields_raise_naming_the_field():
  x = jnp.zeros((1, 4, 16))
  init = lambda layer: jax.eval_shape(lambda: layer.init(jax.random.key(0), x))  # raises while tracing
  with pytest.raises(ValueError, match="k_sel"):
    init(BMojo(num_heads=2, window=2, k_sel=3, memory_size=6, **SSM))
  with pytest.raises(ValueError, match="memory_size"):
    init(BMojo(num_heads=2, window=2, k_sel=2, memory_size=3, **SSM))
  init(BMojo(num_heads=2, window=2, k_sel=2, memory_size=3, bound="top_m", **SSM))  # no FIFO
  with pytest.raises(ValueError, match="bound"):
    init(BMojo(num_heads=2, window=2, bound="lru", **SSM))
  with pytest.raises(ValueError, match="num_kv_heads"):
    BMojoF(num_heads=3, num_kv_heads=2, head_dim=4, window=2, **SSM).init_state(1)
  with pytest.raises(ValueError, match="window"):
    BMojoF(num_heads=2, window=0, **SSM).init_state(1)


def test_partition_specs_on_a_2x2x2_mesh():
  mesh = sharding.make_mesh([("data", 2), ("fsdp", 2), ("tensor", 2)])
  rules = sharding.rules_for_mesh(sharding.DEFAULT_RULES, mesh)
  layer = BMojo(**LAYERS["bmojo_untied"][1])
  x = jnp.zeros((4, 8, 16))
  mesh_shardings = sharding.param_shardings(layer, x, mesh=mesh, rules=rules)
  flat = sharding.flat_specs(mesh_shardings)
  expected = {
      "q": P("fsdp", "tensor", None), "k": P("fsdp", "tensor", None), "v": P("fsdp", "tensor", None),
      "q_fade": P("fsdp", "tensor", None), "k_fade": P("fsdp", "tensor", None),
      "v_fade": P("fsdp", "tensor", None), "o": P("tensor", None, "fsdp"), "innovation_probe": P("fsdp", None),
      "ssm/in_zx": P("fsdp", None, "tensor"), "ssm/out": P("tensor", "fsdp"), "ssm/A_log": P("tensor"),
  }
  for name, spec in expected.items():
    assert flat[name] == spec, (name, flat[name])
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    params = jax.jit(lambda k: nn.meta.unbox(layer.init(k, x)["params"]),
                     out_shardings=mesh_shardings)(jax.random.key(0))
  assert params["q"].sharding.spec == P("fsdp", "tensor", None)
  assert len(params["q"].addressable_shards) == 8
