"""Numeric tests of the pure-JAX Titans LMM core (`memarch.ops.titans`), spec `titans.md` §10 and CONVENTIONS C13."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from memarch.ops import titans

_FIELDS = ("q", "k", "v", "theta", "eta", "alpha")


def _inputs(seed, batch, length, heads, dim, *, theta_max=0.5, alpha_max=0.2, dtype=jnp.float32):
  """Random q, k, v (l2-normalised q and k, as the layer produces) and gates in their ranges."""
  ks = jax.random.split(jax.random.PRNGKey(seed), 6)
  unit = lambda x: x / jnp.linalg.norm(x, axis=-1, keepdims=True)
  shape = (batch, length, heads, dim)
  return dict(
      q=unit(jax.random.normal(ks[0], shape, dtype)),
      k=unit(jax.random.normal(ks[1], shape, dtype)),
      v=jax.random.normal(ks[2], shape, dtype),
      theta=theta_max * jax.random.uniform(ks[3], shape[:3], dtype),
      eta=jax.random.uniform(ks[4], shape[:3], dtype),
      alpha=alpha_max * jax.random.uniform(ks[5], shape[:3], dtype),
  )


def _params(seed, heads, dim, config, dtype=jnp.float32):
  params = titans.init_memory_params(
      jax.random.PRNGKey(seed), heads, dim, config.depth, config.expansion, wrap=config.wrap,
      use_bias=config.use_bias, dtype=dtype)
  if params.norm is not None:  # non-trivial LayerNorm so that its gradient path is exercised
    ks = jax.random.split(jax.random.PRNGKey(seed + 1))
    params = params._replace(norm={
        "scale": 1.0 + 0.1 * jax.random.normal(ks[0], params.norm["scale"].shape, dtype),
        "bias": 0.1 * jax.random.normal(ks[1], params.norm["bias"].shape, dtype)})
  return params


def _slice(inp, start, stop):
  return {n: x[:, start:stop] for n, x in inp.items()}


_LOW_OPT = {"xla_backend_optimization_level": 0}


def _call(fn, inp, state, params, config, *, eager=False, return_aux=False, **kw):
  """Runs one LMM form; by default jitted and compiled at a low XLA optimisation level (compile time dominates
  these small tests)."""
  extra = {"return_aux": True} if return_aux else {}

  def run(inp, state, params, kw):
    return fn(*(inp[n] for n in _FIELDS), state, params=params, config=config, **kw, **extra)

  if eager:
    return run(inp, state, params, kw)
  return jax.jit(run).lower(inp, state, params, kw).compile(compiler_options=_LOW_OPT)(inp, state, params, kw)


def _compiled(loss, *args):
  """Runs (aux, grads) of `loss` w.r.t. all args, compiled once at a low XLA optimisation level (compile time
  dominates these small tests)."""
  fn = jax.jit(lambda *a: jax.grad(loss, argnums=tuple(range(len(a))), has_aux=True)(*a)[::-1])
  aux, grads = fn.lower(*args).compile(compiler_options=_LOW_OPT)(*args)
  return aux, grads


def _max_err(a, b):
  return max(float(jnp.max(jnp.abs(x - y))) if x.size else 0.0
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def _assert_tree_close(a, b, atol):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  err = _max_err(a, b)
  assert err <= atol, f"max abs error {err} > {atol} (max abs value {_max_err(a, jax.tree.map(jnp.zeros_like, a))})"


# Reference == chunked: (depth, heads, chunk, window b, T, o, max_grad_norm). Float64, so any mismatch in the
# folding shows up far above round-off.
_FAST_CASES = [
    (1, 4, 16, 16, 37, 1, 0.3),
    (2, 2, 4, 8, 10, 0, None),
]
_SLOW_CASES = [
    (1, 4, 16, 16, 37, 1, None),
    (2, 2, 4, 8, 10, 1, 0.3),
    (2, 1, 16, 32, 37, 0, None),
    (2, 2, 1, 4, 12, 1, None),
    (2, 1, 4, 4, 10, 1, 0.3),
    (2, 1, 64, 64, 100, 1, None),
    (1, 1, 1, 1, 37, 1, None),
    (1, 4, 64, 128, 100, 0, None),
    (2, 4, 16, 16, 100, 1, None),
    (2, 1, 1, 1, 37, 0, None),
    (2, 4, 16, 32, 100, 1, 0.5),
    (1, 1, 16, 16, 37, 1, 0.2),
]


def _case_config(depth, chunk, window, offset, clamp, **memory):
  return titans.LMMConfig(depth=depth, expansion=2, chunk_size=chunk, ttt_batch_size=window,
                          retrieve_offset=offset, max_grad_norm=clamp, **memory)


def _reference_vs_chunked(depth, heads, chunk, window, length, offset, clamp, **memory):
  # Given float64 inputs with a masked token and a mid-stream non-trivial start state.
  config = _case_config(depth, chunk, window, offset, clamp, **memory)
  dim = 4
  with jax.enable_x64(True):
    inp = _inputs(0, 2, length, heads, dim, dtype=jnp.float64)
    params = _params(1, heads, dim, config, dtype=jnp.float64)
    mask = jnp.ones((2, length)).at[1, 3].set(0.0)

    def run(fn, inp, params):
      state = titans.init_state(params, 2, config, dtype=jnp.float64)
      y, st = _call(fn, inp, state, params, config, eager=True, mask=mask)
      w, s = (st.weights, st.momentum) if isinstance(st, titans.MemoryState) else st
      return y, w, s

    def loss(fn, inp, params):
      y, w, s = run(fn, inp, params)
      leaves = jax.tree.leaves((w, s))
      return jnp.sum(jnp.sin(3.0 * y)) + sum(jnp.sum(jnp.cos(x)) for x in leaves), (y, w, s)

    # When both forms run, forward and gradients (one compiled function per form).
    out_ref, g_ref = _compiled(functools.partial(loss, titans.lmm_reference), inp, params)
    out_chk, g_chk = _compiled(functools.partial(loss, titans.lmm_chunked), inp, params)
    # Then they agree to float64 round-off.
    _assert_tree_close(out_ref, out_chk, 1e-9)
    # Gradients through 100 steps of a deep memory grow large, so the gradient check is relative to their scale.
    scale = max(1.0, max(float(jnp.max(jnp.abs(x))) for x in jax.tree.leaves(g_ref)))
    _assert_tree_close(g_ref, g_chk, 1e-9 * scale)
    assert float(jnp.max(jnp.abs(out_chk[0][1, 3]))) == 0.0  # masked token reads nothing
    # And W_0 and the wrapper norm receive non-zero outer gradients.
    assert all(float(jnp.max(jnp.abs(x))) > 0 for x in jax.tree.leaves(g_chk[1]))
    for name in _FIELDS:
      assert float(jnp.max(jnp.abs(g_chk[0][name]))) > 0, name


@pytest.mark.parametrize("case", _FAST_CASES)
def test_reference_equals_chunked(case):
  _reference_vs_chunked(*case)


@pytest.mark.slow
@pytest.mark.parametrize("case", _SLOW_CASES)
def test_reference_equals_chunked_slow(case):
  _reference_vs_chunked(*case)


@pytest.mark.parametrize("memory", [
    dict(activation="silu", use_bias=True, wrap="residual"),
    pytest.param(dict(activation="gelu", use_bias=True, wrap="none"), marks=pytest.mark.slow),
])
def test_reference_equals_chunked_memory_variants(memory):
  # Given the memory-MLP variants the chunk surprises write out by hand (spec §2.5): depth 3, SiLU, fast-weight
  # biases, the plain residual and the bare MLP, with the soft clamp of spec §9 (a third weighting).
  _reference_vs_chunked(3, 2, 4, 4, 9, 1, 0.3, **memory)


@pytest.mark.slow
def test_reference_equals_chunked_float32():
  # Given fp32 inputs with a small learning rate (the deep-memory regime, spec §2.4).
  config = titans.LMMConfig(depth=2, expansion=2, chunk_size=16)
  inp = _inputs(2, 2, 37, 2, 8, theta_max=0.1)
  params = _params(3, 2, 8, config)
  state = titans.init_state(params, 2, config)
  # When both forms run, then they agree at fp32 tolerance.
  y_ref, (w_ref, s_ref) = _call(titans.lmm_reference, inp, state, params, config)
  y_chk, st = _call(titans.lmm_chunked, inp, state, params, config)
  _assert_tree_close((y_ref, w_ref, s_ref), (y_chk, st.weights, st.momentum), 1e-5)
  assert st.weights["w_0"].dtype == jnp.float32


def test_linear_memory_is_the_delta_rule():
  # Given the linear memory, s = 1/2, eta = alpha = 0, b = c = 1 and unit keys (spec §10.3).
  config = titans.LMMConfig(depth=1, chunk_size=1)
  length, dim = 9, 5
  inp = _inputs(4, 1, length, 1, dim)
  inp["eta"] = jnp.zeros_like(inp["eta"])
  inp["alpha"] = jnp.zeros_like(inp["alpha"])
  params = _params(5, 1, dim, config)
  state = titans.init_state(params, 1, config)
  # When the chunked form runs with per-token theta, and with theta = 1.
  y, st = _call(titans.lmm_chunked, inp, state, params, config)
  y1, _ = _call(titans.lmm_chunked, dict(inp, theta=jnp.ones_like(inp["theta"])), state, params, config)
  # Then the row-vector memory z -> z W follows W_t = (I - theta_t k_t k_t^T) W_{t-1} + theta_t k_t v_t^T,
  # written in closed form: W_T = Pi_t A_t W_0 + sum_t (Pi_{s>t} A_s) theta_t k_t v_t^T.
  k, v, q = (np.asarray(inp[n][0, :, 0], np.float64) for n in ("k", "v", "q"))
  th = np.asarray(inp["theta"][0, :, 0], np.float64)
  w0 = np.asarray(params.weights["w_0"][0], np.float64)
  a = [np.eye(dim) - th[t] * np.outer(k[t], k[t]) for t in range(length)]

  def suffix(t):  # A_T ... A_{t+1}
    out = np.eye(dim)
    for s in range(t + 1, length):
      out = a[s] @ out
    return out

  w_t = suffix(-1) @ w0 + sum(suffix(t) @ (th[t] * np.outer(k[t], v[t])) for t in range(length))
  np.testing.assert_allclose(st.weights["w_0"][0, 0], w_t, atol=1e-5)
  # y_t = q_t W_t (o = 1, c = 1: the token reads its own write).
  w_prefix = [w0]
  for t in range(length):
    w_prefix.append(a[t] @ w_prefix[-1] + th[t] * np.outer(k[t], v[t]))
  np.testing.assert_allclose(y[0, :, 0], np.stack([q[t] @ w_prefix[t + 1] for t in range(length)]), atol=1e-5)
  # With theta = 1 the write is an exact overwrite: reading at k_t returns v_t.
  y_at_k, _ = _call(titans.lmm_chunked, dict(inp, q=inp["k"], theta=jnp.ones_like(inp["theta"])), state, params,
                    config)
  np.testing.assert_allclose(y_at_k, inp["v"], atol=1e-5)
  assert y1.shape == y.shape


def _run_pieces(inp, state, params, config, splits, **kw):
  ys, start = [], 0
  for stop in splits + [inp["q"].shape[1]]:
    piece_kw = {n: x[:, start:stop] for n, x in kw.items()}
    y, state = _call(titans.lmm_chunked, _slice(inp, start, stop), state, params, config, **piece_kw)
    ys.append(y)
    start = stop
  return jnp.concatenate(ys, axis=1), state


def test_streaming_chunk_by_chunk_equals_full():
  # Given c = 8, b = 16, a document start at 24, and splits at 5 (shorter than c, inside a chunk) and at 24
  # (exactly the document start, so the reset is detected across calls) (spec §10.4).
  config = titans.LMMConfig(depth=1, chunk_size=8, ttt_batch_size=16)
  length = 37
  inp = _inputs(6, 2, length, 2, 4, theta_max=0.2)
  params = _params(7, 2, 4, config)
  seg = jnp.where(jnp.arange(length) < 24, 1, 2)[None].repeat(2, axis=0)
  mask = jnp.ones((2, length)).at[0, 10].set(0.0)
  state = titans.init_state(params, 2, config)
  # When the sequence is fed whole and in pieces (one boundary exactly at the document start).
  y_full, st_full = _call(titans.lmm_chunked, inp, state, params, config, segment_ids=seg, mask=mask)
  y_split, st_split = _run_pieces(inp, state, params, config, [5, 24], segment_ids=seg, mask=mask)
  # Then outputs and the whole state agree.
  _assert_tree_close(y_full, y_split, 1e-5)
  _assert_tree_close(st_full, st_split, 1e-5)
  assert int(st_full.n_pending[0]) == length % 8


def test_aligned_calls_equal_general_calls():
  # Given c = 4, b = 8, a mask and a document start at 8: calls of 8, 4 and 5 tokens from a fresh state (each
  # earlier call ends on a chunk boundary, so no call starts with pending tokens)
  config = titans.LMMConfig(depth=2, expansion=2, chunk_size=4, ttt_batch_size=8)
  length = 17
  inp = _inputs(40, 2, length, 2, 4, theta_max=0.3)
  params = _params(41, 2, 4, config)
  seg = jnp.where(jnp.arange(length) < 8, 1, 2)[None].repeat(2, axis=0)
  mask = jnp.ones((2, length)).at[1, 5].set(0.0)
  kw = dict(segment_ids=seg, mask=mask)
  # When each call runs with aligned=True (no buffer slots for pending tokens) and with the general layout
  outs = {}
  for aligned in (False, True):
    state, ys = titans.init_state(params, 2, config), []
    for lo, hi in ((0, 8), (8, 12), (12, length)):
      piece = {n: x[:, lo:hi] for n, x in kw.items()}
      y, state = _call(functools.partial(titans.lmm_chunked, aligned=aligned), _slice(inp, lo, hi), state, params,
                       config, **piece)
      ys.append(y)
    outs[aligned] = (jnp.concatenate(ys, axis=1), state)
  # Then outputs and states agree, the last call leaving one token pending
  _assert_tree_close(outs[True], outs[False], 1e-6)
  assert int(outs[True][1].n_pending[0]) == 1
  # And a concrete state with pending tokens is refused
  with pytest.raises(ValueError, match="aligned=True.*n_pending"):
    titans.lmm_chunked(*(_slice(inp, 0, 4)[n] for n in _FIELDS), outs[True][1], params=params, config=config,
                       aligned=True)


def _pending_start_case(depth):
  """c = 4, b = 8, documents starting at 12 (mid-window) and 20 of a 22-token stream."""
  config = titans.LMMConfig(depth=depth, expansion=2, chunk_size=4, ttt_batch_size=8)
  length = 22
  inp = _inputs(30, 2, length, 2, 4, theta_max=0.3)
  params = _params(31, 2, 4, config)
  seg = jnp.asarray(np.select([np.arange(length) < 12, np.arange(length) < 20], [1, 2], 3))[None].repeat(2, 0)
  return config, inp, params, seg


def test_document_start_in_pending_chunk_survives_uneven_calls():
  # Given calls [0, 5) [5, 8) [8, 13) [13, 18) [18, 21) [21, 22): [8, 13) ends with the start at 12 alone in the
  # pending chunk, [13, 18) completes that chunk, and [18, 21) ends with the start at 20 pending (linear memory:
  # the reset logic does not depend on the depth, and it compiles fastest).
  config, inp, params, seg = _pending_start_case(depth=1)
  state = titans.init_state(params, 2, config)
  ys, states, start = [], [], 0
  for stop in (5, 8, 13, 18, 21, 22):  # three call lengths: 5, 3 and 1 tokens
    y, st = _call(titans.lmm_chunked, _slice(inp, start, stop), states[-1] if states else state, params, config,
                  segment_ids=seg[:, start:stop])
    ys.append(y)
    states.append(st)
    start = stop
  # When compared with one call over the whole stream.
  y_full, st_full = _call(titans.lmm_chunked, inp, state, params, config, segment_ids=seg)
  # Then outputs and the final state agree.
  _assert_tree_close(jnp.concatenate(ys, axis=1), y_full, 1e-5)
  _assert_tree_close(states[-1], st_full, 1e-5)
  # And a start waiting in the pending chunk has already reset the carried state to (W_0, 0) in a fresh window.
  for after in (states[2], states[4]):
    assert after.n_pending.tolist() == [1, 1]
    w0 = jax.tree.map(lambda w: jnp.broadcast_to(w[None], (2,) + w.shape), params.weights)
    _assert_tree_close((after.weights, after.ref_weights), (w0, w0), 0.0)
    assert float(max(jnp.max(jnp.abs(m)) for m in jax.tree.leaves(after.momentum))) == 0.0
    assert after.window_phase.tolist() == [0, 0]


def test_document_start_in_pending_chunk_gradients():
  # Given the stream above, fed whole and in uneven calls (one ending with the start at 12 pending, one with the
  # start at 20 pending), with a deep memory whose LayerNorm wrapper also gets gradients.
  config, inp, params, seg = _pending_start_case(depth=2)

  def loss(inp, params, cuts):
    state, ys, start = titans.init_state(params, 2, config), [], 0
    for stop in cuts + (22,):
      y, state = titans.lmm_chunked(*(inp[n][:, start:stop] for n in _FIELDS), state, seg[:, start:stop],
                                    params=params, config=config)
      ys.append(y)
      start = stop
    y = jnp.concatenate(ys, axis=1)
    final = jax.tree.leaves((state.weights, state.momentum))
    return jnp.sum(jnp.sin(3.0 * y)) + sum(jnp.sum(jnp.cos(w)) for w in final), y

  # When differentiating w.r.t. the inputs and the memory parameters (W_0 and the wrapper LayerNorm).
  y_full, g_full = _compiled(lambda i, p: loss(i, p, ()), inp, params)
  y_split, g_split = _compiled(lambda i, p: loss(i, p, (5, 8, 13, 18, 21)), inp, params)
  # Then outputs and gradients agree.
  _assert_tree_close(y_split, y_full, 1e-5)
  _assert_tree_close(g_split, g_full, 1e-4)


def test_token_by_token_equals_full():
  # Given c = 4, b = 8 and the jitted decode step.
  config = titans.LMMConfig(depth=2, expansion=2, chunk_size=4, ttt_batch_size=8)
  length = 19
  inp = _inputs(8, 2, length, 2, 4, theta_max=0.2)
  params = _params(9, 2, 4, config)
  state = titans.init_state(params, 2, config)
  # When every token is fed alone.
  ys, st = [], state
  step = None
  for t in range(length):
    piece = _slice(inp, t, t + 1)
    if step is None:  # one compilation for all steps
      step = jax.jit(lambda inp, st: titans.lmm_step(*(inp[n] for n in _FIELDS), st, params=params, config=config))
      step = step.lower(piece, st).compile(compiler_options=_LOW_OPT)
    y, st = step(piece, st)
    ys.append(y)
  y_full, st_full = _call(titans.lmm_chunked, inp, state, params, config)
  # Then it equals one call.
  _assert_tree_close(jnp.concatenate(ys, axis=1), y_full, 1e-5)
  _assert_tree_close(st, st_full, 1e-5)


def test_token_by_token_with_resets_masks_and_reset_momentum():
  # Given c = 4, b = 8, row 1 starting a second document at 8 (chunk-aligned), a masked token in row 0, and a
  # reset momentum S_P: the read-and-queue steps and the chunk-completing steps together equal one call.
  config = titans.LMMConfig(depth=2, expansion=2, chunk_size=4, ttt_batch_size=8)
  length = 15
  inp = _inputs(17, 2, length, 2, 4, theta_max=0.2)
  params = _params(18, 2, 4, config)
  params = params._replace(momentum=jax.tree.map(lambda w: 0.05 * jnp.ones_like(w), params.weights))
  state = titans.init_state(params, 2, config)
  seg = jnp.stack([jnp.zeros(length, jnp.int32), jnp.where(jnp.arange(length) < 8, 3, 5)])
  mask = jnp.ones((2, length)).at[0, 5].set(0.0)
  step = jax.jit(lambda inp, st, sg, mk: titans.lmm_step(*(inp[n] for n in _FIELDS), st, sg, params=params,
                                                         config=config, mask=mk))
  ys, st = [], state
  for t in range(length):
    y, st = step(_slice(inp, t, t + 1), st, seg[:, t:t + 1], mask[:, t:t + 1])
    ys.append(y)
  y_full, st_full = _call(titans.lmm_chunked, inp, state, params, config, segment_ids=seg, mask=mask)
  _assert_tree_close(jnp.concatenate(ys, axis=1), y_full, 1e-5)
  _assert_tree_close(st, st_full, 1e-5)


@pytest.mark.parametrize("window", [pytest.param(8, marks=pytest.mark.slow), 16])
def test_segment_reset_equals_separate_documents(window):
  # Given two documents of 16 and 13 tokens packed into one row, c = 8 (b = 16: window-aligned start;
  # b = 8 also; the chunk-aligned but mid-window case is covered by the reference test with b = 2c below).
  config = titans.LMMConfig(depth=2, expansion=2, chunk_size=8, ttt_batch_size=window)
  inp = _inputs(10, 1, 29, 2, 4, theta_max=0.2)
  params = _params(11, 2, 4, config)
  state = titans.init_state(params, 1, config)
  seg = jnp.where(jnp.arange(29) < 16, 3, 7)[None]
  # When run packed with segment ids, and each document separately from the initial state.
  y_packed, st_packed = _call(titans.lmm_chunked, inp, state, params, config, segment_ids=seg)
  y_a, _ = _call(titans.lmm_chunked, _slice(inp, 0, 16), state, params, config)
  y_b, st_b = _call(titans.lmm_chunked, _slice(inp, 16, 29), state, params, config)
  # Then the second document does not see the first.
  _assert_tree_close(y_packed, jnp.concatenate([y_a, y_b], axis=1), 1e-5)
  _assert_tree_close((st_packed.weights, st_packed.momentum, st_packed.ref_weights),
                     (st_b.weights, st_b.momentum, st_b.ref_weights), 1e-5)


def test_mid_window_reset_matches_reference():
  # Given b = 2c and a document start at c (chunk-aligned, inside a gradient window).
  config = titans.LMMConfig(depth=1, chunk_size=4, ttt_batch_size=8)
  inp = _inputs(12, 1, 14, 1, 4)
  params = _params(13, 1, 4, config)
  state = titans.init_state(params, 1, config)
  seg = jnp.where(jnp.arange(14) < 4, 0, 1)[None]
  y_packed, st = _call(titans.lmm_chunked, inp, state, params, config, segment_ids=seg)
  y_ref, (w_ref, _) = _call(titans.lmm_reference, inp, state, params, config, segment_ids=seg)
  y_b, st_b = _call(titans.lmm_chunked, _slice(inp, 4, 14), state, params, config)
  # Then the restarted window equals running the second document alone.
  _assert_tree_close(y_packed, y_ref, 1e-5)
  _assert_tree_close(y_packed[:, 4:], y_b, 1e-5)
  _assert_tree_close(st.weights, w_ref, 1e-5)
  _assert_tree_close(st.weights, st_b.weights, 1e-5)


def test_reset_restores_given_momentum():
  # Given params carrying a reset momentum S_P (a memory that absorbed a prefix, spec §6) and a document start.
  config = titans.LMMConfig(depth=2, expansion=2, chunk_size=4, ttt_batch_size=8)
  inp = _inputs(14, 1, 14, 2, 4)
  params = _params(15, 2, 4, config)
  s_p = jax.tree.map(lambda w: 0.1 * jax.random.normal(jax.random.key(16), w.shape), params.weights)
  params_p = params._replace(momentum=s_p)
  state = titans.init_state(params_p, 1, config)
  seg = jnp.where(jnp.arange(14) < 4, 0, 1)[None]
  y_packed, st = _call(titans.lmm_chunked, inp, state, params_p, config, segment_ids=seg)
  y_ref, (w_ref, s_ref) = _call(titans.lmm_reference, inp, state, params_p, config, segment_ids=seg)
  y_b, st_b = _call(titans.lmm_chunked, _slice(inp, 4, 14), state, params_p, config)
  y_zero, _ = _call(titans.lmm_chunked, inp, titans.init_state(params, 1, config), params, config, segment_ids=seg)
  # Then both forms restart from (W_0, S_P), and S_P matters.
  _assert_tree_close(jax.tree.map(lambda a: a[0, 0], state.momentum), jax.tree.map(lambda a: a[0], s_p), 1e-7)
  _assert_tree_close(y_packed, y_ref, 1e-5)
  _assert_tree_close((st.weights, st.momentum), (w_ref, s_ref), 1e-5)
  _assert_tree_close(y_packed[:, 4:], y_b, 1e-5)
  assert _max_err(y_packed, y_zero) > 1e-3


def test_misaligned_reset_raises():
  config = titans.LMMConfig(depth=1, chunk_size=4)
  inp = _inputs(14, 1, 8, 1, 4)
  params = _params(15, 1, 4, config)
  state = titans.init_state(params, 1, config)
  seg = jnp.where(jnp.arange(8) < 3, 0, 1)[None]
  with pytest.raises(ValueError, match="not aligned"):
    _call(titans.lmm_chunked, inp, state, params, config, eager=True, segment_ids=seg)


def test_masked_tokens_leave_state_unchanged():
  # Given a state after 8 tokens and a call whose 8 tokens are all masked.
  config = titans.LMMConfig(depth=2, expansion=2, chunk_size=4)
  inp = _inputs(16, 1, 16, 1, 4)
  params = _params(17, 1, 4, config)
  _, st = _call(titans.lmm_chunked, _slice(inp, 0, 8), titans.init_state(params, 1, config), params, config)
  y, st2 = _call(titans.lmm_chunked, _slice(inp, 8, 16), st, params, config, mask=jnp.zeros((1, 8)))
  # Then outputs are zero and the memory is untouched.
  assert float(jnp.max(jnp.abs(y))) == 0.0
  _assert_tree_close((st.weights, st.momentum), (st2.weights, st2.momentum), 0.0)


def test_causality():
  # Given c = 4, b = 8 (chunk-granular reads) and o = 1.
  config = titans.LMMConfig(depth=2, expansion=2, chunk_size=4, ttt_batch_size=8)
  length = 11
  inp = _inputs(18, 1, length, 1, 3)
  params = _params(19, 1, 3, config)
  state = titans.init_state(params, 1, config)

  def outputs(inp):
    return _call(titans.lmm_chunked, inp, state, params, config, eager=True)[0]

  # When the Jacobian of every output w.r.t. every input is taken.
  jac = jax.jit(jax.jacrev(outputs)).lower(inp).compile(compiler_options=_LOW_OPT)(inp)
  # Then d y_t / d x_s = 0 for s > t, and the past does matter.
  future = np.triu(np.ones((length, length), bool), 1)
  for name, j in jac.items():
    dep = jnp.abs(j).reshape(length, 3, length, -1).sum(axis=(1, 3))  # [t, s]
    assert float(jnp.max(jnp.where(future, dep, 0.0))) == 0.0, name
  dep_k = jnp.abs(jac["k"]).reshape(length, 3, length, -1).sum(axis=(1, 3))
  assert float(dep_k[length - 1, 0]) > 0  # an old key influences the last read


def test_aux_diagnostics():
  config = titans.LMMConfig(depth=1, chunk_size=4)
  inp = _inputs(20, 2, 10, 2, 4, theta_max=0.3)
  inp["eta"] = jnp.zeros_like(inp["eta"])
  inp["alpha"] = jnp.zeros_like(inp["alpha"])
  params = _params(21, 2, 4, config)
  y, st, aux = _call(titans.lmm_chunked, inp, titans.init_state(params, 2, config), params, config,
                     return_aux=True)
  n_chunks = -(-(3 + 10) // 4)
  assert aux["loss_before"].shape == (2, n_chunks, 2)
  np.testing.assert_array_equal(aux["chunk_mask"][0], [1, 1, 0, 0])
  done = aux["chunk_mask"][:, :, None] > 0
  # A plain gradient step with a small rate lowers the chunk loss.
  assert bool(jnp.all(jnp.where(done, aux["loss_after"] <= aux["loss_before"], True)))
  assert bool(jnp.all(jnp.where(done, aux["surprise_norm"] > 0, True)))


def test_bf16_inputs_keep_fp32_state():
  config = titans.LMMConfig(depth=2, expansion=2, chunk_size=4)
  inp = {n: x.astype(jnp.bfloat16) for n, x in _inputs(22, 1, 6, 1, 4).items()}
  params = _params(23, 1, 4, config)
  y, st = _call(titans.lmm_chunked, inp, titans.init_state(params, 1, config), params, config)
  assert y.dtype == jnp.bfloat16
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves((st.weights, st.momentum, st.pending_k)))


def test_config_validation():
  with pytest.raises(ValueError):
    titans.LMMConfig(chunk_size=16, ttt_batch_size=24)
  with pytest.raises(ValueError):
    titans.LMMConfig(retrieve_offset=2)
  assert titans.LMMConfig(depth=1).wrap == "none"
  assert titans.LMMConfig(depth=2).wrap == "residual_norm"
