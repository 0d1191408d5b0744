r"""Titans: memarch's LMM and MAC side by side with titans-pytorch 0.5.5 (spec titans.md §12), plus decode time.

  python benchmarks/titans.py [--quick] [--plot out.png]
  python benchmarks/titans.py --parts=mac,decode      # only these parts (and the matmul peak)

titans-pytorch is a benchmark-only peer, never a memarch dependency. To run both sides in one process, make an
environment (git-ignored) that sees memarch's packages and add the peer to it::

  python -m venv --system-site-packages .venv-peer
  .venv-peer/bin/pip install torch==2.13.0 titans-pytorch==0.5.5   # the CPU wheel is enough
  .venv-peer/bin/python benchmarks/titans.py

Without torch / titans_pytorch the peer columns read "-" and a line says it was skipped.

What is timed (B = 4, T = 1024, d = 256, fp32, median of `--steps` timed calls after `--warmup` calls, the two
sides interleaved call by call so that machine noise hits both alike; the first jit call is timed apart):

* **LMM, paper-faithful** (spec §3.1 "tp paper-faithful"): gradients at each chunk's start weights (chunk 64,
  TTT window b = 64), momentum and decay on, MLP memory 2 layers x4 GELU with ``k + LN(MLP(k))``, retrieval offset
  1; heads 1 (d_h = 256) and 4 (d_h = 64). Training step = forward + backward of MSE(retrieved, random target)
  w.r.t. all parameters (no optimizer); forward = the layer alone.

  - titans-pytorch: ``NeuralMemory(dim=256, chunk_size=64, batch_size=64, heads=H, dim_head=256 // H)``, every
    other argument at its default (pre-RMSNorm, no q/k/v activation or conv, feature-mean MSE inner loss,
    max_lr 1.0, eta and alpha pooled per chunk, retrieve gate + combine_heads for H > 1).
  - memarch, "tp-matched": ``NeuralMemory(num_heads=H, head_dim=256 // H, chunk_size=64, ttt_batch_size=64,
    max_lr=1.0, inner_loss_scale=1 / d_h, conv_width=0, qkv_silu=False, qk_l2norm=False, output_gate=False)``
    on a parameter-free RMS-normalised input (tp's pre-norm). Deviations we keep: eta and alpha are per token and
    folded exactly into the chunk (spec §3.4; costs a second weighted VJP per chunk), and the output path is
    W_O RMSNorm(y) instead of tp's identity (H = 1) or sigmoid gate + combine (H > 1).
  - memarch, defaults (paper q/k/v: conv, SiLU, l2; output gate; s = 1/2; max_lr 0.1) at H = 4, against the same
    titans-pytorch row.
* **MAC tiny train step**: forward + backward + AdamW of a 2-layer LM, vocabulary 256, ids (4, 1025).
  titans-pytorch: ``MemoryAsContextTransformer(num_tokens=256, dim=256, depth=2, segment_len=128,
  num_persist_mem_tokens=4, num_longterm_mem_tokens=16)`` (its README example: 8 heads of 64, mHC with 4 streams,
  memory in both layers with chunk 144 and its default b = T). memarch: ``lm`` with mixers ("titans_mac",) * 2,
  d_model 256, 4 heads of 64 (attention and memory), 4 persistent tokens, segment 128, memory chunk 64 (b = 128).
* **Decode**: memarch's step form (T == 1) after a prefill of T = 1K, 8K, 32K tokens, timed as one jitted
  `lax.scan` of `--decode_steps` step calls, the scans from the three prefilled states in turn (median of the
  rounds); the time per token must not grow with T (the state is fixed-size).

Model FLOPs (spec §3.6) per token and head for the MLP memory: 8 |W| (store forward 2 |W|, inner backward 4 |W|,
retrieval 2 |W|), plus the q/k/v/output (and gate) projections; a training step counts 3x the forward. MFU is these
FLOPs over the time, against a chained `jnp.dot` peak measured in the same run (the best of a measurement before
and after the timings). Targets (issue 4 item 6): >= 5x titans-pytorch at H = 1 paper-faithful, >= 3x at H = 4,
>= 25 % of the measured peak for memarch's training steps, flat decode time.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags

from memarch.layers.titans import NeuralMemory
from memarch.models import get_model
from memarch.training import metrics
from timing import time_all  # benchmarks/timing.py (the script's folder is on sys.path)

_QUICK = flags.DEFINE_bool("quick", False, "Small shapes (B=2, T=256, d=64; decode at 256/1K/2K) for a smoke run.")
_PLOT = flags.DEFINE_string("plot", None, "Write a bar chart of tok/s and the decode curve to this PNG.")
_STEPS = flags.DEFINE_integer("steps", 0, "Timed calls per measurement (0: 7, or 2 with --quick).")
_WARMUP = flags.DEFINE_integer("warmup", 0, "Untimed calls after the first (0: 2, or 1 with --quick).")
_DECODE_STEPS = flags.DEFINE_integer("decode_steps", 64, "Step calls in the timed decode scan.")
_SKIP_PEER = flags.DEFINE_bool("skip_peer", False, "Do not run titans-pytorch even when it is installed.")
_PARTS = flags.DEFINE_list("parts", ["lmm", "defaults", "mac", "decode"],
                          "What to run: lmm (the paper-faithful LMM rows, H=1 and 4), defaults (the LMM with "
                          "memarch's defaults), mac (the MAC train step), decode (the decode curve). The matmul "
                          "peak always runs; a short accelerator lease can run the missing parts first.")
_PEER_DEVICE = flags.DEFINE_string("peer_device", "cpu", "torch device of titans-pytorch ('cuda' next to JAX on a "
                                   "GPU; 'cpu' uses every core, as XLA's CPU backend does).")


@dataclasses.dataclass(frozen=True)
class Shapes:
  """Benchmark shapes.

  Attributes:
    batch: B.
    seq_len: T.
    d_model: d.
    chunk: memory chunk c (= TTT window b for the LMM rows).
    mac_segment: MAC segment length C.
    mac_chunk: memarch MAC memory chunk (b = C).
    vocab: MAC vocabulary.
    decode_lens: prefill lengths of the decode rows.
  """
  batch: int = 4
  seq_len: int = 1024
  d_model: int = 256
  chunk: int = 64
  mac_segment: int = 128
  mac_chunk: int = 64
  vocab: int = 256
  decode_lens: tuple[int, ...] = (1024, 8192, 32768)


QUICK = Shapes(batch=2, seq_len=256, d_model=64, chunk=16, mac_segment=32, mac_chunk=16,
               decode_lens=(256, 1024, 2048))


@dataclasses.dataclass
class Row:
  """One table row: a setting timed on both sides.

  Attributes:
    name: the setting.
    tokens: tokens per call.
    flops: memarch model FLOPs per call (0: not counted).
    peer_s: titans-pytorch median seconds per call (None: not run).
    ours_s: memarch median seconds per call.
    compile_s: memarch first (jit) call, seconds.
    ratio_target: minimum memarch / titans-pytorch speed (None: no target).
    mfu_target: minimum memarch MFU (None: no target).
  """
  name: str
  tokens: int
  flops: float
  peer_s: float | None
  ours_s: float
  compile_s: float
  ratio_target: float | None = None
  mfu_target: float | None = None


# ---------------------------------------------------------------------------------------------------------------
# Timing.
# ---------------------------------------------------------------------------------------------------------------


def _timed(fn: Callable[[], object]) -> float:
  t0 = time.perf_counter()
  fn()
  return time.perf_counter() - t0


def time_pair(ours: Callable[[], object], peer: Callable[[], object] | None, warmup: int, steps: int
              ) -> tuple[float, float | None, float]:
  """Medians of interleaved calls of both sides (each call blocks until done).

  Args:
    ours: one memarch call (must block, e.g. end in `jax.block_until_ready`).
    peer: one titans-pytorch call, or None.
    warmup: untimed calls of each side after the first.
    steps: timed calls of each side.

  Returns:
    (memarch median s, titans-pytorch median s or None, memarch first-call s).
  """
  compile_s = _timed(ours)
  if peer is not None:
    peer()
  for _ in range(warmup):
    ours()
    if peer is not None:
      peer()
  t_ours, t_peer = [], []
  for _ in range(steps):
    t_ours.append(_timed(ours))
    if peer is not None:
      t_peer.append(_timed(peer))
  return float(np.median(t_ours)), (float(np.median(t_peer)) if peer is not None else None), compile_s


# ---------------------------------------------------------------------------------------------------------------
# Model FLOPs (spec §3.6).
# ---------------------------------------------------------------------------------------------------------------


def lmm_forward_flops(d: int, heads: int, head_dim: int, expansion: int = 4, output_gate: bool = False) -> float:
  """Forward model FLOPs per token of an LMM layer with a 2-layer MLP memory (spec §3.6).

  Args:
    d: model width.
    heads: H.
    head_dim: d_h.
    expansion: hidden width multiple of the memory MLP.
    output_gate: count the W_G projection of the output gate.

  Returns:
    8 |W| per head (store forward, inner backward, retrieval) plus the q/k/v/output(/gate) and gate projections.
  """
  w = 2 * expansion * head_dim * head_dim
  proj = (4 + int(output_gate)) * 2 * d * heads * head_dim + 2 * d * 3 * heads
  return heads * 8 * w + proj


# ---------------------------------------------------------------------------------------------------------------
# The peer (titans-pytorch), imported only when present.
# ---------------------------------------------------------------------------------------------------------------


def load_peer():
  """Returns (torch, titans_pytorch) or None, printing why the peer is skipped."""
  if _SKIP_PEER.value:
    print("titans-pytorch: skipped (--skip_peer)")
    return None
  try:
    import titans_pytorch  # pylint: disable=g-import-not-at-top
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    print(f"titans-pytorch: not installed ({e.name} missing), peer columns skipped. See the module docstring.")
    return None
  torch.set_num_threads(os.cpu_count() or 1)
  torch.manual_seed(0)
  torch.set_default_device(_PEER_DEVICE.value)
  version = getattr(titans_pytorch, "__version__", None)
  if version is None:
    from importlib import metadata  # pylint: disable=g-import-not-at-top
    version = metadata.version("titans-pytorch")
  print(f"titans-pytorch {version}, torch {torch.__version__} on {_PEER_DEVICE.value} "
        f"({torch.get_num_threads()} CPU threads)")
  return torch, titans_pytorch


def _sync(torch) -> None:
  if _PEER_DEVICE.value.startswith("cuda"):
    torch.cuda.synchronize()


def peer_lmm(peer, s: Shapes, heads: int) -> tuple[Callable[[], object], Callable[[], object]]:
  """titans-pytorch NeuralMemory, paper-faithful (batch_size = chunk): (train step, forward) closures."""
  torch, tp = peer
  mem = tp.NeuralMemory(dim=s.d_model, chunk_size=s.chunk, batch_size=s.chunk, heads=heads,
                        dim_head=s.d_model // heads)
  x = torch.randn(s.batch, s.seq_len, s.d_model)
  target = torch.randn(s.batch, s.seq_len, s.d_model)

  def train():
    mem.zero_grad(set_to_none=True)
    y, _ = mem(x)
    torch.nn.functional.mse_loss(y, target).backward()
    _sync(torch)

  def forward():
    with torch.no_grad():
      mem(x)
    _sync(torch)

  return train, forward


def peer_mac(peer, s: Shapes) -> Callable[[], object]:
  """titans-pytorch MemoryAsContextTransformer (README shapes): one forward + backward + AdamW step."""
  torch, tp = peer
  model = tp.MemoryAsContextTransformer(num_tokens=s.vocab, dim=s.d_model, depth=2, segment_len=s.mac_segment,
                                        num_persist_mem_tokens=4, num_longterm_mem_tokens=16)
  opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
  ids = torch.randint(0, s.vocab, (s.batch, s.seq_len + 1))

  def train():
    loss = model(ids, return_loss=True)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    _sync(torch)

  return train


# ---------------------------------------------------------------------------------------------------------------
# memarch.
# ---------------------------------------------------------------------------------------------------------------


def _rms(x):
  return x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + 1e-6)


def ours_lmm(s: Shapes, heads: int, tp_matched: bool) -> tuple[Callable[[], object], Callable[[], object], float]:
  """memarch NeuralMemory: (train step, forward, forward model FLOPs per token)."""
  e = s.d_model // heads
  if tp_matched:
    layer = NeuralMemory(num_heads=heads, head_dim=e, chunk_size=s.chunk, ttt_batch_size=s.chunk, max_lr=1.0,
                         inner_loss_scale=1.0 / e, conv_width=0, qkv_silu=False, qk_l2norm=False,
                         output_gate=False)
  else:
    layer = NeuralMemory(num_heads=heads, head_dim=e, chunk_size=s.chunk, ttt_batch_size=s.chunk)
  x = jax.random.normal(jax.random.key(0), (s.batch, s.seq_len, s.d_model))
  target = jax.random.normal(jax.random.key(1), (s.batch, s.seq_len, s.d_model))
  params = layer.init(jax.random.key(2), x[:, :s.chunk])

  def loss(p, x):
    return jnp.mean(jnp.square(layer.apply(p, _rms(x))[0] - target))

  grad = jax.jit(jax.grad(loss))
  fwd = jax.jit(lambda p, x: layer.apply(p, _rms(x))[0])
  flops = lmm_forward_flops(s.d_model, heads, e, output_gate=not tp_matched)
  return (lambda: jax.block_until_ready(grad(params, x))), (lambda: jax.block_until_ready(fwd(params, x))), flops


def ours_mac(s: Shapes) -> tuple[Callable[[], object], float]:
  """memarch LM with two titans_mac mixers: (AdamW train step closure, train model FLOPs per token)."""
  model = get_model("lm", vocab_size=s.vocab, variant=None, d_model=s.d_model, num_layers=2, num_heads=4,
                    head_dim=s.d_model // 4, mixers=("titans_mac",) * 2, num_persistent=4, max_len=s.seq_len,
                    mixer_options={"titans_mac": {"segment_len": s.mac_segment, "chunk_size": s.mac_chunk}})
  ids = jax.random.randint(jax.random.key(0), (s.batch, s.seq_len + 1), 0, s.vocab)
  inputs, targets = ids[:, :-1], ids[:, 1:]
  params = model.init(jax.random.key(1), inputs[:, :s.mac_chunk])["params"]
  tx = optax.adamw(1e-4)
  state = {"params": params, "opt": tx.init(params)}

  def loss(p):
    logits, _ = model.apply({"params": p}, inputs)
    return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()

  @functools.partial(jax.jit, donate_argnums=(0,))
  def step(st):
    l, g = jax.value_and_grad(loss)(st["params"])
    upd, opt = tx.update(g, st["opt"], st["params"])
    return {"params": optax.apply_updates(st["params"], upd), "opt": opt}, l

  def run():
    nonlocal state
    state, l = step(state)
    jax.block_until_ready(l)

  return run, model.flops_per_token(s.seq_len)


def decode_times(s: Shapes, n_steps: int, reps: int) -> list[tuple[int, float, float]]:
  """memarch NeuralMemory (defaults, 4 heads) step-form time per token after prefills of `s.decode_lens`.

  The prefills run first; then the decode scans from every prefilled state are timed in turn (`time_all`), so
  that load changes on a shared machine hit every T alike.

  Returns:
    [(T, prefill s (compiled before), median ms per decoded token over at least `reps` rounds)].
  """
  layer = NeuralMemory(num_heads=4, head_dim=s.d_model // 4, chunk_size=s.chunk)
  params = layer.init(jax.random.key(0), jnp.zeros((s.batch, s.chunk, s.d_model)))
  prefill = jax.jit(lambda p, x: layer.apply(p, x)[1])

  @jax.jit
  def decode(p, state, xs):  # xs [n, B, 1, d]
    def step(st, x):
      y, st = layer.apply(p, x, state=st)
      return st, y
    state, ys = jax.lax.scan(step, state, xs)
    return ys, state

  xs = jax.random.normal(jax.random.key(2), (n_steps, s.batch, 1, s.d_model))
  prefill_s, calls = {}, {}
  for length in s.decode_lens:
    x = jax.random.normal(jax.random.key(1), (s.batch, length, s.d_model))
    compiled = prefill.lower(params, x).compile()
    t0 = time.perf_counter()
    state = jax.block_until_ready(compiled(params, x))
    prefill_s[length] = time.perf_counter() - t0
    calls[length] = (decode, (params, state, xs))  # the same shapes for every T: one compilation
  times = time_all(calls, repeats=max(4 * reps, 12), budget_s=30.0)
  return [(length, prefill_s[length], 1e3 * times[length][0] / n_steps) for length in s.decode_lens]


# ---------------------------------------------------------------------------------------------------------------
# Report.
# ---------------------------------------------------------------------------------------------------------------


def _fmt_rate(x: float | None) -> str:
  return "-" if x is None else f"{x:,.0f}"


def _progress(r: Row) -> None:
  peer = "-" if r.peer_s is None else f"{r.tokens / r.peer_s:,.0f}"
  print(f"  {r.name}: memarch {r.tokens / r.ours_s:,.0f} tok/s (1st call {r.compile_s:.1f} s), titans-pytorch "
        f"{peer} tok/s", flush=True)


def print_table(rows: list[Row], peak: float, decode: list[tuple[int, float, float]], flat_tol: float) -> bool:
  """Prints the comparison table and the decode table; returns whether every target passed."""
  header = ("setting", "titans-pytorch tok/s", "memarch tok/s", "ratio", "memarch MFU", "1st call s", "target",
            "result")
  lines, all_ok = [], True
  for r in rows:
    ours = r.tokens / r.ours_s
    peer = None if r.peer_s is None else r.tokens / r.peer_s
    ratio = None if peer is None else ours / peer
    mfu = r.flops / r.ours_s / peak if r.flops else None
    targets, verdicts = [], []
    if r.ratio_target is not None:
      targets.append(f">= {r.ratio_target:g}x")
      if ratio is None:
        verdicts.append("n/a")
      else:
        ok = ratio >= r.ratio_target
        all_ok &= ok
        verdicts.append("PASS" if ok else "MISS")
    if r.mfu_target is not None and mfu is not None:
      targets.append(f">= {100 * r.mfu_target:g}% MFU")
      ok = mfu >= r.mfu_target
      all_ok &= ok
      verdicts.append("PASS" if ok else "MISS")
    lines.append((r.name, _fmt_rate(peer), _fmt_rate(ours), "-" if ratio is None else f"{ratio:.2f}x",
                  "-" if mfu is None else f"{100 * mfu:.1f} %", f"{r.compile_s:.1f}", ", ".join(targets) or "-",
                  " / ".join(verdicts) or "-"))
  widths = [max(len(str(x[i])) for x in [header] + lines) for i in range(len(header))]
  fmt = lambda cells: "| " + " | ".join(f"{str(c):<{w}}" for c, w in zip(cells, widths)) + " |"
  print(fmt(header))
  print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
  for line in lines:
    print(fmt(line))
  print()
  if not decode:
    return all_ok
  per_tok = [d[2] for d in decode]
  spread = max(per_tok) / min(per_tok)
  flat = spread <= flat_tol
  all_ok &= flat
  print("| decode (memarch step form, NeuralMemory 4 heads) | prefill s | ms / token |")
  print("|---|---|---|")
  for length, prefill_s, ms in decode:
    print(f"| after T = {length:,} | {prefill_s:.1f} | {ms:.3f} |")
  print(f"| flat in T (max / min <= {flat_tol}) | - | {spread:.2f} {'PASS' if flat else 'MISS'} |")
  return all_ok


def plot(path: str, rows: list[Row], decode: list[tuple[int, float, float]]) -> None:
  """Bar chart of tok/s per setting (both sides) and the decode time per token against T."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(13, 4.5), gridspec_kw=dict(width_ratios=[2.2, 1]))
  idx = np.arange(len(rows))
  ours = [r.tokens / r.ours_s for r in rows]
  peer = [0 if r.peer_s is None else r.tokens / r.peer_s for r in rows]
  ax0.bar(idx - 0.2, peer, 0.4, label="titans-pytorch 0.5.5")
  ax0.bar(idx + 0.2, ours, 0.4, label="memarch")
  ax0.set_xticks(idx, [r.name for r in rows], rotation=25, ha="right", fontsize=7)
  ax0.set_yscale("log")
  ax0.set_ylabel("tokens / s")
  ax0.legend()
  ax1.plot([d[0] for d in decode], [d[2] for d in decode], "o-")
  ax1.set_xscale("log")
  ax1.set_ylim(0, 1.5 * max(d[2] for d in decode))
  ax1.set_xlabel("prefill length T")
  ax1.set_ylabel("ms / decoded token")
  ax1.set_title("memarch decode")
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  print(f"wrote {path}")


def main(argv: list[str]) -> None:
  """Runs every setting on both sides and prints the table."""
  del argv
  s = QUICK if _QUICK.value else Shapes()
  steps = _STEPS.value or (2 if _QUICK.value else 7)
  warmup = _WARMUP.value or (1 if _QUICK.value else 2)
  device = jax.devices()[0]
  print(f"memarch on {device.device_kind} ({device.platform}), jax {jax.__version__}, {os.cpu_count()} CPU cores; "
        f"B={s.batch} T={s.seq_len} d={s.d_model} chunk={s.chunk}, fp32, median of {steps} after {warmup} warm-ups")
  parts = set(_PARTS.value)
  if unknown := parts - {"lmm", "defaults", "mac", "decode"}:
    raise ValueError(f"--parts: unknown {sorted(unknown)}; choose from lmm, defaults, mac, decode")
  peer = load_peer()
  peak = metrics.measure_matmul_peak()
  rows = []

  for heads in (1, 4) if "lmm" in parts else ():
    train, fwd, flops = ours_lmm(s, heads, tp_matched=True)
    p_train, p_fwd = peer_lmm(peer, s, heads) if peer else (None, None)
    tokens = s.batch * s.seq_len
    target = 5.0 if heads == 1 else 3.0
    o, p, c = time_pair(train, p_train, warmup, steps)
    rows.append(Row(f"LMM H={heads} paper-faithful, train", tokens, 3 * flops * tokens, p, o, c, target, 0.25))
    _progress(rows[-1])
    o, p, c = time_pair(fwd, p_fwd, warmup, steps)
    rows.append(Row(f"LMM H={heads} paper-faithful, forward", tokens, flops * tokens, p, o, c))
    _progress(rows[-1])

  if "defaults" in parts:
    train, _, flops = ours_lmm(s, 4, tp_matched=False)
    p_train = peer_lmm(peer, s, 4)[0] if peer else None
    o, p, c = time_pair(train, p_train, warmup, steps)
    rows.append(Row("LMM H=4 memarch defaults, train", s.batch * s.seq_len, 3 * flops * s.batch * s.seq_len, p, o,
                    c))
    _progress(rows[-1])

  if "mac" in parts:
    train, flops_per_token = ours_mac(s)
    o, p, c = time_pair(train, peer_mac(peer, s) if peer else None, warmup, steps)
    rows.append(Row("MAC tiny, train step (+AdamW)", s.batch * s.seq_len, flops_per_token * s.batch * s.seq_len,
                    p, o, c, None, 0.25))
    _progress(rows[-1])

  decode = decode_times(s, _DECODE_STEPS.value, reps=max(3, steps)) if "decode" in parts else []
  peak = max(peak, metrics.measure_matmul_peak())
  print(f"\njnp.dot peak (fp32, best of two measurements): {peak / 1e9:.1f} GFLOP/s\n")
  ok = print_table(rows, peak, decode, flat_tol=1.25)
  scope = "all targets" if len(parts) == 4 else f"targets of --parts={','.join(sorted(parts))}"
  print(f"\n{scope}: {'PASS' if ok else 'MISS'}")
  if _PLOT.value:
    if rows and decode:
      plot(_PLOT.value, rows, decode)
    else:
      print("--plot: skipped (it needs a timed row and the decode curve)")


if __name__ == "__main__":
  app.run(main)
