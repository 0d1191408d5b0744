"""Titans hybrids (MAC, MAG, MAL) against a second, naive implementation written from the paper.

The reference below shares no code with `memarch.ops.titans` or `memarch.layers.titans`: it reads the parameters
out of a module's variables and recomputes the block in NumPy float64, one sequence and one token at a time:

* the LMM of eqs. 12-16 (spec §2.2): u_t = grad l_t at the window-start weights M_{t'} (the backward pass of the
  memory MLP written out by hand), S_t = eta_t S_{t-1} - theta_t u_t, M_t = (1 - alpha_t) M_{t-1} + S_t, every
  state kept, and the read y_t = f(M_{tau(t)}; q_t) of eq. 15 with tau(t) = c floor((t - 1 + o) / c) (spec §2.3);
* q, k, v = l2(SiLU(conv(x W))) with the causal depthwise conv as a loop over taps, data-dependent
  theta / eta / alpha = (theta_max, 1, 1) * sigmoid(x w + b), and the output path W_O(RMSNorm(y) * SiLU(x W_G))
  (spec §2.4, §5);
* attention as an explicit loop over the visible keys: the persistent tokens (eq. 19) always visible, a sliding
  window for MAG / MAL (eqs. 26-31), and for MAC the segment [P || h || X] under the aligned causal mask of
  Fig. 3a / spec §7.1 (query i sees h_j and x_j for j <= i);
* MAC's write of the attention output (eq. 24) and its gate with a retrieval from the updated memory (eq. 25).

Where the paper is silent the reference follows the documented memarch choices (spec tags [ours]): rotate-half
RoPE with unrotated persistent keys scored against the unrotated query, the MAG gate
RMSNorm_y(y) * sigmoid(RMSNorm_z(z)), MAL as ``m + SWA*(RMSNorm(x + m))``, MAC's h_i = the LMM output path on the
raw retrieval, and document starts that restart the memory, the conv streams and the MAC segments.

The module runs in float32 (jitted), the reference in float64, so the tolerances measure the module's float32
rounding. Gradients: the module's `jax.grad` w.r.t. every parameter leaf and the input is checked against central
finite differences of the float64 reference along random directions (two per leaf), which needs no autodiff
through the reference (and keeps the default run fast: the reference is NumPy, nothing to compile).
"""

import dataclasses
import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import erf

from memarch.layers import titans

D = 16  # model width


# ----------------------------------------------------------------------------------------------------------------
# The naive reference (NumPy, float64).
# ----------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class MemCfg:
  """What the reference needs to know about the LMM; `options` passes the same values to the module."""
  heads: int
  chunk: int  # c: weights are read at multiples of c (spec §2.3)
  window: int  # b: the gradient window of eq. 16
  offset: int = 1  # o of spec §2.3
  depth: int = 2  # L_M
  expansion: int = 2
  max_lr: float = 0.5  # theta_max
  loss_scale: float = 0.5  # s of spec §2.6
  conv_width: int = 4
  eps: float = 1e-6  # LayerNorm of the residual_norm wrapper, l2 norm, RMSNorms

  def options(self, **extra):
    """The module's `memory_options`."""
    opts = dict(chunk_size=self.chunk, depth=self.depth, expansion=self.expansion, max_lr=self.max_lr,
                retrieve_offset=self.offset, inner_loss_scale=self.loss_scale, conv_width=self.conv_width,
                activation="gelu", wrap="none" if self.depth == 1 else "residual_norm", **extra)
    return tuple(sorted(opts.items()))


def _sigmoid(x):
  return 1.0 / (1.0 + np.exp(-x))


def _silu(x):
  return x * _sigmoid(x)


def _gelu(x):  # exact (erf) GELU
  return 0.5 * x * (1.0 + erf(x / math.sqrt(2.0)))


def _gelu_grad(x):
  return 0.5 * (1.0 + erf(x / math.sqrt(2.0))) + x * np.exp(-0.5 * x * x) / math.sqrt(2.0 * math.pi)


def _rms_norm(x, scale, eps=1e-6):
  """x / rms(x) * (1 + scale) (memarch stores the RMSNorm gain around zero)."""
  return x / np.sqrt(np.mean(x * x) + eps) * (1.0 + scale)


def _l2(x, eps=1e-6):  # per head: x [H, e]
  return x / np.sqrt(np.sum(x * x, axis=-1, keepdims=True) + eps)


def _rope(x, pos, base=10_000.0):
  """Rotate-half RoPE of x [H, e] at the integer position ``pos``."""
  e = x.shape[-1]
  angle = pos * base ** (-np.arange(0, e, 2) / e)
  cos, sin = np.cos(angle), np.sin(angle)
  x1, x2 = x[..., :e // 2], x[..., e // 2:]
  return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def _attend(q_rot, q_plain, keys, prefix):
  """Softmax attention of one query over an explicit list of keys.

  Args:
    q_rot: [H, e] query after RoPE (scored against the token keys, which carry RoPE).
    q_plain: [H, e] query before RoPE (scored against the persistent keys, which carry none).
    keys: list of (k [H, e] after RoPE, v [H, e]) of the visible tokens.
    prefix: list of (k, v) of the persistent tokens.

  Returns:
    [H, e] attention output.
  """
  scale = q_rot.shape[-1] ** -0.5
  scores = [np.sum(q_plain * k, -1) * scale for k, _ in prefix] + [np.sum(q_rot * k, -1) * scale for k, _ in keys]
  values = [v for _, v in prefix] + [v for _, v in keys]
  s = np.stack(scores)  # [n, H]
  p = np.exp(s - s.max(axis=0))
  p = p / p.sum(axis=0)
  return np.einsum("nh,nhe->he", p, np.stack(values))


class _Memory:
  """The memory layer's outer parameters and the memory model f (spec §2.5, §5), for one sequence."""

  def __init__(self, p, cfg: MemCfg):
    self.p, self.cfg = p, cfg
    self.w0 = {n: a for n, a in p["memory"].items() if n.startswith("w_")}  # W_0, leaves [H, ...]
    # The residual_norm wrapper's LayerNorm is an outer-loop parameter, not a fast weight (spec §2.5).
    self.norm = (p["memory"]["norm_scale"], p["memory"]["norm_bias"]) if cfg.depth > 1 else None

  def _forward(self, w, h, z):
    """f(W; z) of head h, z + LN(MLP(z)) for L_M >= 2 and z W for L_M = 1, with what the backward needs."""
    inputs, pre = [z], []
    for i in range(self.cfg.depth):
      pre.append(inputs[-1] @ w[f"w_{i}"][h])
      if i < self.cfg.depth - 1:
        inputs.append(_gelu(pre[-1]))
    if self.norm is None:
      return pre[-1], (inputs, pre, None, None)
    a = pre[-1]
    sd = np.sqrt(np.mean((a - a.mean()) ** 2) + self.cfg.eps)
    n = (a - a.mean()) / sd
    return z + n * self.norm[0][h] + self.norm[1][h], (inputs, pre, n, sd)

  def read(self, w, q):
    """Eq. 15, f(M; q), for every head (heads are independent memories): q [H, e]."""
    return np.stack([self._forward(w, h, q[h])[0] for h in range(self.cfg.heads)])

  def surprise(self, w, k, v):
    """u = grad_W l(W) of l(W) = s * sum_j (f(W; k) - v)_j^2 (eq. 12) at W = ``w``, per head, by hand."""
    grads = {n: np.zeros_like(a) for n, a in w.items()}
    for h in range(self.cfg.heads):
      y, (inputs, pre, n, sd) = self._forward(w, h, k[h])
      da = 2.0 * self.cfg.loss_scale * (y - v[h])
      if n is not None:  # LayerNorm backward (biased variance)
        dn = da * self.norm[0][h]
        da = (dn - dn.mean() - n * np.mean(dn * n)) / sd
      for i in reversed(range(self.cfg.depth)):
        grads[f"w_{i}"][h] = np.outer(inputs[i], da)
        if i:
          da = (da @ w[f"w_{i}"][h].T) * _gelu_grad(pre[i - 1])
    return grads

  def inputs(self, x):
    """Per-token part of spec §5 for x [d]: the projections x W_Q, x W_K, x W_V [3, H, e] and the gates."""
    p = self.p
    pre = np.stack([np.einsum("d,dhe->he", x, p[n]["kernel"]) for n in "qkv"])
    gates = _sigmoid(np.einsum("d,dgh->gh", x, p["gates"]["w"]) + p["gates"]["b"])  # spec §2.4
    return pre, (self.cfg.max_lr * gates[0], gates[1], gates[2])

  def qkv(self, pre):
    """q, k, v [H, e] of the last token: causal depthwise conv over ``pre`` (the document so far), SiLU, l2."""
    cfg = self.cfg
    out = pre[-1]
    if cfg.conv_width:
      kernel = self.p["conv"]["kernel"].reshape(cfg.conv_width, 3, cfg.heads, -1)
      out = self.p["conv"]["bias"].reshape(3, cfg.heads, -1)
      for j in range(min(cfg.conv_width, len(pre))):  # tap j looks j tokens back, never before the document
        out = out + kernel[cfg.conv_width - 1 - j] * pre[-1 - j]
    q, k, v = _silu(out[0]), _silu(out[1]), _silu(out[2])
    return _l2(q, cfg.eps), _l2(k, cfg.eps), v

  def read_out(self, r, x):
    """W_O (RMSNorm(y) * SiLU(x W_G)) of spec §5: r [H, e] retrievals, x [d] the layer input."""
    h, e = r.shape
    o = _rms_norm(r.reshape(h * e), self.p["out_norm"]["scale"], self.cfg.eps).reshape(h, e)
    o = o * _silu(np.einsum("d,dhe->he", x, self.p["g"]["kernel"]))
    return np.einsum("he,hed->d", o, self.p["o"]["kernel"])


class _Stream:
  """One document's LMM token loop (eqs. 13-16, spec §2.2) that keeps every state M_0, M_1, ... ."""

  def __init__(self, mem: _Memory):
    self.mem = mem
    self.pre = []  # the document's projections, for the causal conv
    self.m = mem.w0
    self.s = {n: np.zeros_like(a) for n, a in mem.w0.items()}
    self.ref = None
    self.history = [mem.w0]  # history[j] = M_j, the state after j tokens of the document

  def step(self, x):
    """Absorbs the stream input ``x`` [d] and returns the retrieval [H, e] of eq. 15."""
    cfg = self.mem.cfg
    pre, (theta, eta, alpha) = self.mem.inputs(x)
    self.pre.append(pre)
    q, k, v = self.mem.qkv(self.pre)
    t = len(self.history) - 1  # 0-based position of this token in the document
    if t % cfg.window == 0:  # eq. 16: the gradients of a window are taken at its start weights
      self.ref = self.m
    u = self.mem.surprise(self.ref, k, v)
    bc = lambda g, a: g.reshape(g.shape + (1,) * (a.ndim - 1))  # per-head gate over the weight axes
    self.s = {n: bc(eta, a) * a - bc(theta, a) * u[n] for n, a in self.s.items()}  # eq. 14
    self.m = {n: bc(1.0 - alpha, a) * a + self.s[n] for n, a in self.m.items()}  # eq. 13
    self.history.append(self.m)
    tau = cfg.chunk * ((t + cfg.offset) // cfg.chunk)  # spec §2.3 (0-based t)
    return self.mem.read(self.history[tau], q)


def _starts(seg, t):
  return t == 0 or seg[t] != seg[t - 1]


def _persistent_kv(p_att, persistent):
  return [(np.einsum("d,dhe->he", z, p_att["k"]), np.einsum("d,dhe->he", z, p_att["v"])) for z in persistent]


def _swa_row(p_att, xs, seg, window, persistent):
  """Causal sliding-window attention of one row, persistent tokens always visible (eqs. 19, 27)."""
  prefix = _persistent_kv(p_att, persistent)
  qs = [np.einsum("d,dhe->he", x, p_att["q"]) for x in xs]
  ks = [_rope(np.einsum("d,dhe->he", x, p_att["k"]), j) for j, x in enumerate(xs)]
  vs = [np.einsum("d,dhe->he", x, p_att["v"]) for x in xs]
  out = []
  for i in range(len(xs)):
    lo = 0 if window is None else max(0, i - window + 1)
    keys = [(ks[j], vs[j]) for j in range(lo, i + 1) if seg[j] == seg[i]]
    out.append(np.einsum("he,hed->d", _attend(_rope(qs[i], i), qs[i], keys, prefix), p_att["o"]))
  return out


def _lmm_row(mem, xs, seg, persistent=(), closed=True):
  """The LMM layer over one row; with ``persistent`` the memory first absorbs P per document (spec §6).

  ``closed=False`` streams [P || x] as one sequence (eqs. 26 and 29 literally). ``closed=True`` is memarch's
  variant: after P the chunk grid and the gradient window restart at x's first token from the state after P
  (the conv still reads P). The two agree when N_p is a multiple of the gradient window b.
  """
  out, stream = [], None
  for t, x in enumerate(xs):
    if _starts(seg, t):
      stream = _Stream(mem)
      for z in persistent:
        stream.step(z)
      if persistent and closed:
        stream.history = [stream.m]  # x's token 0 is position 0 of a fresh grid and window
    out.append(mem.read_out(stream.step(x), x))
  return out


def _block_persistent(p):
  return list(p["persistent"]["vectors"]) if "persistent" in p else []


def _gate(p, y, z, kind):
  yn, zn = _rms_norm(y, p["norm_y"]["scale"]), _rms_norm(z, p["norm_z"]["scale"])
  o = yn * _sigmoid(zn) if kind == "sigmoid_z" else _sigmoid(yn * zn)
  return o @ p["out"]["kernel"]


def mag_reference(params, x, seg, *, cfg, window, gate="sigmoid_z", memory_absorbs_persistent=True, closed=True):
  """MAG (eqs. 26-28): o = y (x) z with y = SWA*([P || x]) and z = LMM([P || x]) (spec §6), or z = LMM(x)."""
  p = params["params"]
  mem = _Memory(p["memory"], cfg)
  persistent = _block_persistent(p)
  rows = []
  for b in range(x.shape[0]):
    xs = list(x[b])
    y = _swa_row(p["attention"], xs, seg[b], window, persistent)
    z = _lmm_row(mem, xs, seg[b], persistent if memory_absorbs_persistent else (), closed)
    rows.append(np.stack([_gate(p, yi, zi, gate) for yi, zi in zip(y, z)]))
  return np.stack(rows)


def mal_reference(params, x, seg, *, cfg, window, memory_absorbs_persistent=True, closed=True):
  """MAL (eqs. 29-31) as two residual sub-blocks: m = LMM([P || x]), out = m + SWA*(RMSNorm(x + m))."""
  p = params["params"]
  mem = _Memory(p["memory"], cfg)
  persistent = _block_persistent(p)
  rows = []
  for b in range(x.shape[0]):
    xs = list(x[b])
    m = _lmm_row(mem, xs, seg[b], persistent if memory_absorbs_persistent else (), closed)
    u = [_rms_norm(xi + mi, p["norm"]["scale"]) for xi, mi in zip(xs, m)]
    a = _swa_row(p["attention"], u, seg[b], window, persistent)
    rows.append(np.stack([mi + ai for mi, ai in zip(m, a)]))
  return np.stack(rows)


def mac_reference(params, x, seg, *, cfg, segment_len, gate="sigmoid_z", h_fully_visible=False):
  """MAC (eqs. 21-25, Fig. 3a) token by token.

  For the segment of token i (segments restart at document starts), with M the memory at the segment start:
  h_i = LMM-read(M; q(x_i)) (eq. 21); Y_i = Attn over P, h_j and x_j for j <= i (eqs. 22-23); the memory absorbs
  Y_i (eq. 24: keys, values and gates of Y; the gradient window is the segment); o_i = Y_i (x)
  LMM-read(M_tau(i); q(Y_i)) (eq. 25). ``h_fully_visible`` is the leaky reading of Fig. 3a (every h_j of the
  segment visible, spec §7.1 trap 1), used only to show that the test tells the two apart.
  """
  if cfg.window != segment_len:
    raise ValueError("MAC's gradient window is its segment")
  p = params["params"]
  mem = _Memory(p["memory"], cfg)
  att = {n: p[f"attn_{n}"]["kernel"] for n in "qkvo"}
  proj = lambda z, n: np.einsum("d,dhe->he", z, att[n])
  prefix = _persistent_kv(att, list(p["persistent"]["vectors"]) if "persistent" in p else [])
  rows = []
  for b in range(x.shape[0]):
    # The eq. 21 queries: the memory's W_Q and conv over the x stream (restarting at document starts).
    q_x, pre = [], []
    for t in range(x.shape[1]):
      pre = ([] if _starts(seg[b], t) else pre) + [mem.inputs(x[b, t])[0]]
      q_x.append(mem.qkv(pre)[0])
    outs = []
    for t in range(x.shape[1]):
      if _starts(seg[b], t):
        y_stream, doc_start = _Stream(mem), t
      i = (t - doc_start) % segment_len  # offset in the segment (segments restart at document starts)
      if i == 0:
        m_seg = y_stream.m  # the memory before the segment (eq. 21)
        cache = {}
      seg_start = t - i

      def kv_of(j):  # (key, value) of h_j and of x_j, RoPE at their shared segment offset (spec §7.1)
        if j not in cache:
          h = mem.read_out(mem.read(m_seg, q_x[j]), x[b, j])  # eq. 21, through the LMM output path
          rot = lambda z: _rope(z, j - seg_start)
          cache[j] = ((rot(proj(h, "k")), proj(h, "v")), (rot(proj(x[b, j], "k")), proj(x[b, j], "v")))
        return cache[j]

      keys = [kv for j in range(seg_start, t + 1) for kv in kv_of(j)]  # eq. 23: h_j and x_j for j <= i
      if h_fully_visible:
        later = range(t + 1, min(x.shape[1], seg_start + segment_len))
        keys += [kv_of(j)[0] for j in later if seg[b][j] == seg[b][t]]
      q = proj(x[b, t], "q")
      y = np.einsum("he,hed->d", _attend(_rope(q, i), q, keys, prefix), att["o"])
      r = y_stream.step(y)  # eq. 24 (write Y with the k, v, gates of Y) and the eq. 25 read
      outs.append(_gate(p, y, mem.read_out(r, y), gate))
    rows.append(np.stack(outs))
  return np.stack(rows)


# ----------------------------------------------------------------------------------------------------------------
# Test harness.
# ----------------------------------------------------------------------------------------------------------------


def _random_params(layer, x, seed):
  """Random parameters of the module's shapes (no init compile), all of them non-trivial.

  Gate projections and norm gains, zero at initialisation, get random values so theta, eta and alpha depend on
  the token and every norm has a non-unit gain; the gate biases put theta ~ theta_max / 2, eta ~ 0.7,
  alpha ~ 0.1, so every term of eqs. 13-14 matters.
  """
  abstract = nn.meta.unbox(jax.eval_shape(layer.init, jax.random.key(0), x))
  leaves = jax.tree_util.tree_leaves_with_path(abstract)
  rng = np.random.default_rng(seed)
  values = []
  for path, leaf in leaves:
    name = jax.tree_util.keystr(path)
    shape = leaf.shape
    noise = rng.standard_normal(shape)
    if name.endswith("['gates']['b']"):
      v = np.array([0.0, 1.0, -2.0])[:, None] + 0.3 * noise
    elif name.endswith("['gates']['w']"):
      v = 0.3 * noise
    elif name.endswith("['norm_scale']"):
      v = 1.0 + 0.2 * noise
    elif "scale" in name or "bias" in name:
      v = 0.2 * noise
    elif "persistent" in name:
      v = noise
    elif name.endswith("['conv']['kernel']"):
      v = noise / math.sqrt(shape[0])
    elif "['w_" in name:  # W_0 of the memory, [H, d_in, d_out]
      v = noise / math.sqrt(shape[1])
    elif name.endswith("['o']['kernel']") or name.endswith("['o']") or "attn_o" in name:  # [H, e, d]
      v = noise / math.sqrt(shape[0] * shape[1])
    else:  # input projections [d, H, e] and square kernels [d, d]
      v = noise / math.sqrt(shape[0])
    values.append(jnp.asarray(v, leaf.dtype))
  return jax.tree.unflatten(jax.tree.structure(abstract), values)


def _segments(length, reset_at):
  """Row 0 is one document (id 0); row 1 has ids 7, and 9 from ``reset_at`` on (a document start)."""
  seg = np.zeros((2, length), np.int32)
  seg[1] = 7
  if reset_at is not None:
    seg[1, reset_at:] = 9
  return seg


def _make_layer(kind, heads, cfg, block):
  common = dict(num_heads=heads, d_model=D)
  if kind == "mac":
    return titans.TitansMAC(**common, memory_options=cfg.options(), **block)
  cls = titans.TitansMAG if kind == "mag" else titans.TitansMAL
  return cls(**common, memory_options=cfg.options(ttt_batch_size=cfg.window), **block)


@functools.cache
def _case(kind, heads, length, reset_at, cfg, block_items, grads=True, seed=0):
  """A module with random parameters, inputs, segment ids, a cotangent, and its jitted output (and gradients)."""
  block = dict(block_items)
  layer = _make_layer(kind, heads, cfg, block)
  rng = np.random.default_rng(seed + 100)
  x = jnp.asarray(rng.standard_normal((2, length, D)), jnp.float32)
  params = _random_params(layer, x, seed)
  seg = _segments(length, reset_at)
  cot = jnp.asarray(rng.standard_normal((2, length, D)), jnp.float32)

  def loss(p, z):
    y, _ = layer.apply(p, z, segment_ids=jnp.asarray(seg))
    return jnp.sum(y * cot), y

  if grads:
    (_, y), g = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(params, x)
  else:
    y, g = jax.jit(loss)(params, x)[1], None
  return dict(block=block, params=params, x=x, seg=seg, cot=np.asarray(cot, np.float64), y=np.asarray(y), grads=g)


def _reference(kind, cfg, block, **variant):
  if kind == "mac":
    return functools.partial(mac_reference, cfg=cfg, segment_len=block["segment_len"],
                             gate=block.get("gate", "sigmoid_z"), **variant)
  variant.setdefault("memory_absorbs_persistent", block.get("memory_absorbs_persistent", True))
  if kind == "mag":
    return functools.partial(mag_reference, cfg=cfg, window=block["window"], gate=block.get("gate", "sigmoid_z"),
                             **variant)
  return functools.partial(mal_reference, cfg=cfg, window=block["window"], **variant)


def _f64(tree):
  return jax.tree.map(lambda a: np.asarray(a, np.float64), tree)


def _forward_error(case, ref):
  """max |module - reference| / max |reference|."""
  y_ref = ref(_f64(case["params"]), _f64(case["x"]), case["seg"])
  return float(np.abs(case["y"] - y_ref).max() / np.abs(y_ref).max()), y_ref


def _check_forward(case, ref, tol=2e-5):
  err, y_ref = _forward_error(case, ref)
  assert err < tol, f"max |module - reference| = {err:.2e} of max |reference| = {np.abs(y_ref).max():.3f}"


def _check_gradients(case, ref, n_dirs=2, eps=1e-5, tol=2e-5, seed=0):
  """Each leaf's module gradient along random unit directions == central differences of the float64 reference.

  The error is measured against the norm of that leaf's gradient, |fd - <g, u>| <= tol * |g|.
  """
  params, x, seg, cot = _f64(case["params"]), _f64(case["x"]), case["seg"], case["cot"]
  loss = lambda p, z: float(np.sum(ref(p, z, seg) * cot))
  g_params, g_x = _f64(case["grads"])
  p_leaves, treedef = jax.tree.flatten(params)
  g_leaves = jax.tree.leaves(g_params)
  names = [jax.tree_util.keystr(k) for k, _ in jax.tree_util.tree_leaves_with_path(params)]
  rng = np.random.default_rng(seed)
  failures = []
  for idx in range(len(p_leaves) + 1):
    g = g_x if idx == len(p_leaves) else g_leaves[idx]
    base = x if idx == len(p_leaves) else p_leaves[idx]
    for _ in range(n_dirs):
      u = rng.standard_normal(base.shape)
      u /= np.linalg.norm(u)

      def at(sign):
        moved = base + sign * eps * u
        if idx == len(p_leaves):
          return loss(params, moved)
        leaves = list(p_leaves)
        leaves[idx] = moved
        return loss(jax.tree.unflatten(treedef, leaves), x)

      fd = (at(1.0) - at(-1.0)) / (2 * eps)
      err = abs(fd - float(np.sum(g * u)))
      if err > tol * np.linalg.norm(g) + 1e-7:
        name = "x" if idx == len(p_leaves) else names[idx]
        failures.append(f"{name}: fd {fd:.6g} vs grad {np.sum(g * u):.6g} (|g| = {np.linalg.norm(g):.3g})")
  assert not failures, "\n".join(failures)


def _run(kind, heads, length, reset_at, cfg, block, grads=True, tol=2e-5, grad_tol=None):
  case = _case(kind, heads, length, reset_at, cfg, tuple(sorted(block.items())), grads)
  ref = _reference(kind, cfg, block)
  _check_forward(case, ref, tol=tol)
  if grads:
    _check_gradients(case, ref, tol=tol if grad_tol is None else grad_tol)
  return case


# ----------------------------------------------------------------------------------------------------------------
# Tests.
# ----------------------------------------------------------------------------------------------------------------

MAC_BLOCK = dict(segment_len=8, num_persistent=2)
HYBRID_BLOCK = dict(window=3, num_persistent=2)
# Default cases: 13 tokens (not a multiple of the chunk c = 4 or the MAC segment 8); row 1 of the batch has a
# second document from a chunk-aligned position.
MAG_CASE = ("mag", 2, 13, 8, MemCfg(heads=2, chunk=4, window=8), HYBRID_BLOCK)  # gradient window b = 2c
MAL_CASE = ("mal", 1, 13, 8, MemCfg(heads=1, chunk=4, window=4), HYBRID_BLOCK)
MAC_CASE = ("mac", 2, 13, 4, MemCfg(heads=2, chunk=4, window=8), MAC_BLOCK)  # row 1 restarts mid-segment


def _get(case, grads=True):
  """The cached module run of a case tuple."""
  kind, heads, length, reset_at, cfg, block = case
  return _case(kind, heads, length, reset_at, cfg, tuple(sorted(block.items())), grads)


def test_inner_gradient_matches_autodiff():
  # The hand-written backward of the memory MLP (eq. 12 through GELU layers and the LayerNorm wrapper) ==
  # jax.grad, for L_M = 1, 2, 3 and two heads.
  rng = np.random.default_rng(0)
  for depth in (1, 2, 3):
    cfg = MemCfg(heads=2, chunk=1, window=1, depth=depth)
    widths = [(8, 8)] if depth == 1 else [(8, 16)] + [(16, 16)] * (depth - 2) + [(16, 8)]
    w = {f"w_{i}": rng.standard_normal((2, a, b)) / math.sqrt(a) for i, (a, b) in enumerate(widths)}
    scale, bias = 1 + 0.2 * rng.standard_normal((2, 8)), rng.standard_normal((2, 8))
    k, v = rng.standard_normal((2, 8)), rng.standard_normal((2, 8))
    hand = _Memory({"memory": dict(w, norm_scale=scale, norm_bias=bias)}, cfg).surprise(w, k, v)
    with jax.enable_x64(True):
      def loss(w):  # summed over the independent heads
        z = jnp.asarray(k)[:, None, :]
        for i in range(depth):
          z = z @ w[f"w_{i}"]
          z = jax.nn.gelu(z, approximate=False) if i < depth - 1 else z
        z = z[:, 0]
        if depth > 1:
          mu, var = z.mean(-1, keepdims=True), z.var(-1, keepdims=True)
          z = k + (z - mu) / jnp.sqrt(var + cfg.eps) * scale + bias
        return cfg.loss_scale * jnp.sum((z - v) ** 2)
      auto = jax.jit(jax.grad(loss))(jax.tree.map(jnp.asarray, w))
    for n in w:
      np.testing.assert_allclose(hand[n], auto[n], rtol=1e-10, atol=1e-12)


def test_mag_matches_reference():
  # Forward and gradients (w.r.t. every parameter and the input); 2 heads, gradient window b = 2c.
  _run(*MAG_CASE)


def test_mal_matches_reference():
  # Forward only in the default run (MAL composes the LMM and SWA that the MAG test already differentiates).
  _run(*MAL_CASE, grads=False)


@pytest.mark.slow
def test_mal_gradients_match_reference():
  _run(*MAL_CASE)


def test_mac_matches_reference():
  # Forward and gradients; 2 heads; row 1's second document starts mid-segment (at a chunk boundary).
  _run(*MAC_CASE)


def test_reference_tells_wrong_semantics_apart():
  # The comparison has power: plausible misreadings of the paper miss the module by far more than the tolerance.
  kind, _, _, _, cfg, block = MAG_CASE
  for wrong in (dataclasses.replace(cfg, offset=0),  # strictly-previous-state reads (spec §2.3)
                dataclasses.replace(cfg, window=cfg.chunk),  # gradients at every chunk start, not window start
                dataclasses.replace(cfg, window=1),  # eqs. 13-14 literally (gradient at M_{t-1})
                dataclasses.replace(cfg, max_lr=1.01 * cfg.max_lr)):  # theta off by 1%
    assert _forward_error(_get(MAG_CASE), _reference(kind, wrong, block))[0] > 1e-3, wrong
  for wrong in (dict(memory_absorbs_persistent=False),  # the memory never sees P (eq. 26 uses [P || x])
                dict(closed=False)):  # N_p = 2 is not a multiple of b = 8: closing P's window is visible
    assert _forward_error(_get(MAG_CASE), _reference(kind, cfg, block, **wrong))[0] > 1e-3, wrong
  kind, _, _, _, cfg, block = MAC_CASE
  # Fig. 3a read with a fully visible h block leaks later tokens (spec §7.1 trap 1).
  assert _forward_error(_get(MAC_CASE), _reference(kind, cfg, block, h_fully_visible=True))[0] > 1e-3


def test_memory_absorbs_persistent_tokens_literally_when_aligned():
  # N_p = b = 4 (and 2 heads, a second document): closing P's last window changes nothing, so the module equals
  # the literal LMM([P || x]) of eq. 29, conv over P included.
  case = ("mal", 2, 13, 8, MemCfg(heads=2, chunk=2, window=4), dict(window=3, num_persistent=4))
  _check_forward(_get(case, grads=False), _reference("mal", case[4], case[5], closed=False))


def test_memory_absorption_can_be_turned_off():
  case = ("mag", 1, 13, 8, MemCfg(heads=1, chunk=4, window=4),
          dict(window=3, num_persistent=2, memory_absorbs_persistent=False))
  _check_forward(_get(case, grads=False), _reference("mag", case[4], case[5]))


# Bigger grids (each case compiles the module once): lengths 1 .. 24 (a partial first chunk, whole chunks,
# several MAC segments), 1 and 2 heads, token-level chunks c = 1, the linear memory L_M = 1, o = 0, b = c and
# b = 2c, full attention and the sigmoid_product gate.
_SLOW = [
    ("mag", 1, 1, None, MemCfg(heads=1, chunk=4, window=4), HYBRID_BLOCK),
    ("mag", 2, 24, 12, MemCfg(heads=2, chunk=1, window=1), dict(window=5, num_persistent=1)),
    ("mag", 1, 9, 4, MemCfg(heads=1, chunk=2, window=4, depth=1, max_lr=1.0),
     dict(window=None, num_persistent=0, gate="sigmoid_product")),
    ("mag", 2, 16, 8, MemCfg(heads=2, chunk=4, window=4, offset=0, depth=3), HYBRID_BLOCK),
    ("mal", 2, 24, 12, MemCfg(heads=2, chunk=4, window=8), dict(window=4, num_persistent=2)),
    ("mal", 1, 7, 2, MemCfg(heads=1, chunk=2, window=2, depth=1, max_lr=1.0, offset=0), dict(window=None)),
    ("mac", 1, 24, 16, MemCfg(heads=1, chunk=4, window=8), MAC_BLOCK),
    ("mac", 2, 24, 12, MemCfg(heads=2, chunk=1, window=4), dict(segment_len=4, num_persistent=1)),
    ("mac", 2, 11, 4, MemCfg(heads=2, chunk=2, window=8, depth=1, max_lr=1.0, offset=0),
     dict(segment_len=8, num_persistent=0, gate="sigmoid_product")),
    ("mac", 1, 5, None, MemCfg(heads=1, chunk=4, window=8), MAC_BLOCK),
]


@pytest.mark.slow
@pytest.mark.parametrize("case", _SLOW, ids=lambda c: f"{c[0]}-h{c[1]}-t{c[2]}-c{c[4].chunk}-b{c[4].window}-"
                                                       f"o{c[4].offset}-L{c[4].depth}")
def test_grid_matches_reference(case):
  # fp32 module against the float64 reference. The deepest recurrences here (c = 1 over 25 stream tokens; L_M = 3
  # with o = 0), both after absorbing P, amplify fp32 rounding: forward up to 5.2e-5, and for L_M = 3 (seed 0) gradients
  # up to 8e-4 of a leaf's norm (3.5e-4 before the chunk surprises were written out; seeds 1-3 stay <= 1.6e-5 with
  # either form). The same module in float64 (its l2 norm uncast) matches the reference's finite differences to
  # 1.2e-5, the written-out surprises equal the VJP form to 1e-9 in float64 (tests/ops/test_titans_ops.py), and
  # without absorption the fp32 gradients pass at 2e-5, so these are rounding, not semantics. The forward check
  # stays at <= 1e-4: a wrong reading misses it by > 1e-3 (test_reference_tells_wrong_semantics_apart).
  deep = case[4].depth == 3
  _run(*case, tol=1e-4 if deep else 5e-5, grad_tol=1e-3 if deep else 5e-5)
