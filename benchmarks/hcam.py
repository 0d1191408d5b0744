r"""HCAM read: memarch's compute paths against the reference formulation and dense attention (spec hcam.md §3, §8).

  python benchmarks/hcam.py                     # issue shapes: B=8, Q=64, L=2048 (64 x 32), d=256, H=4, k=8
  python benchmarks/hcam.py --quick             # small shapes, seconds on CPU
  python benchmarks/hcam.py --plot hcam.png     # also plot time against memory length

Every variant runs in this one process, jitted and warmed up; a time is the median (and min) of ``--repeats`` timed
rounds; a round calls every variant of a table row once (interleaved, so that load on a shared machine hits all
variants alike), each call ended by ``jax.block_until_ready``. Variants:

  * ``hcam auto`` and each forced path (``block_dense``, ``gather_projected``, ``gather_raw``) of
    :func:`memarch.ops.hcam.hcam_read`, which computes the chunk means (summary keys) from the memory on every
    call; in the sweeps also ``hcam auto, stored keys``, given the means (a decoding state can keep them, spec §2);
  * ``reference``: the read as DeepMind's Haiku module computes it (spec §3, §13), written here: top-k chunks per
    query, then a full MHA (its own K/V projections of the selected chunk, output projection and bias) for every
    (query, selected chunk) pair, and the relevance-weighted sum of the k results;
  * ``dense``: one MHA of the same width over all ``L`` memory slots, re-projecting the memory each call (stored
    layer inputs need that, as in HCAM); ``dense (K/V cached)`` (memory-length sweeps only) attends to memory keys
    and values projected beforehand, the decoding baseline of a KV cache.

Tables: the training shapes (forward and forward+backward), then forward time against memory length for one query
(decoding; the single-query target) and for ``Q`` queries (where ``auto`` moves from block-dense to a gather).

Backward passes differentiate a fixed random projection of the output with respect to the queries and every
weight; memory is data (stop-gradient) for all variants, as in HCAM. Before timing, the script checks once at small
shapes, in float32 at "highest" matmul precision, that the reference formulation equals memarch's op (outputs and
gradients), so the comparison is between two computations of the same function.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from memarch.ops import attention as attn_ops
from memarch.ops import hcam as hcam_ops
from memarch.ops.hcam import HCAMParams, HCAMPath
from timing import time_all  # benchmarks/timing.py (the script's folder is on sys.path)

_QUICK = flags.DEFINE_bool("quick", False, "Small shapes (seconds on CPU); the targets are then only indicative.")
_PLOT = flags.DEFINE_string("plot", None, "Write a plot of time against memory length to this PNG path.")
_REPEATS = flags.DEFINE_integer("repeats", 0, "Timed rounds (0: 10, or 3 with --quick).")
_LENGTHS = flags.DEFINE_list("lengths", None, "Memory lengths (tokens) of the single-query sweep "
                             "(default 2048,16384,65536; --quick 256,1024).")
_Q_LENGTHS = flags.DEFINE_list("q_lengths", None, "Memory lengths of the Q-query sweep (default 2048,8192,16384; "
                               "--quick 256,1024).")
_BUDGET = flags.DEFINE_float("budget_s", 60.0, "Soft limit on the timed rounds of one table row, in seconds (at "
                              "least 3 rounds run).")
_BATCH = flags.DEFINE_integer("batch_size", 0, "Batch size B (0: 8, or 2 with --quick).")

PATHS = (HCAMPath.BLOCK_DENSE, HCAMPath.GATHER_PROJECTED, HCAMPath.GATHER_RAW)
# Issue targets: training shapes (Q = 64, L = 2048) and single-query reads at the longest memory.
TARGET_VS_REFERENCE = 4.0  # hcam auto at least this many times faster than the reference formulation
TARGET_VS_DENSE = 1.2  # hcam auto at most this many times the time of dense attention
TARGET_SINGLE_QUERY = 50.0  # hcam auto at least this many times faster than dense at the longest memory


def make_params(key: jax.Array, d: int, h: int) -> HCAMParams:
  """Random HCAM weights at width ``d`` (= E = D = F) with ``h`` heads (fan-in scaled, small random biases)."""
  dk = d // h
  ks = jax.random.split(key, 10)
  n = lambda i, shape: jax.random.normal(ks[i], shape) * d ** -0.5
  b = lambda i, shape: 0.1 * jax.random.normal(ks[i], shape)
  return HCAMParams(summary_query=n(0, (d, d)), summary_key=n(1, (d, d)), query=n(2, (d, h, dk)),
                    query_bias=b(3, (h, dk)), key=n(4, (d, h, dk)), key_bias=b(5, (h, dk)),
                    value=n(6, (d, h, dk)), value_bias=b(7, (h, dk)), out=n(8, (h, dk, d)), out_bias=b(9, (d,)))


def reference_read(params: HCAMParams, x: jax.Array, contents: jax.Array, mask: jax.Array, *,
                   top_k: int) -> jax.Array:
  """The read as the reference module computes it (spec §3): one MHA per (query, selected chunk), then a sum.

  Args:
    params: HCAM weights.
    x: queries [b, q, E].
    contents: memory [b, M, C, D].
    mask: [b, q, M] True where a query may read a chunk (every query must be able to read ``top_k`` chunks: the
      reference averages masked chunks otherwise, spec §5).
    top_k: ``k``.

  Returns:
    [b, q, F].
  """
  _, _, c, d = contents.shape
  f = params.summary_query.shape[-1]
  dk = params.query.shape[-1]
  means = jax.lax.stop_gradient(jnp.mean(contents, axis=2))
  scores = jnp.einsum("bqf,bmf->bqm", x @ params.summary_query, means @ params.summary_key) / math.sqrt(f)
  top, idx = jax.lax.top_k(jnp.where(mask, scores, -1e6), top_k)
  weights = jax.nn.softmax(top, axis=-1)  # [b, q, k]
  chunks = jax.vmap(lambda cb, ib: cb[ib])(contents, idx)  # [b, q, k, C, D]
  chunks = jax.lax.stop_gradient(chunks + hcam_ops.position_code(c, d))

  def mha(xt, chunk):  # one query [E], one chunk [C, D] -> [F]; the chunk is projected for this query alone
    qh = jnp.einsum("e,ehk->hk", xt, params.query) + params.query_bias
    kh = jnp.einsum("cd,dhk->chk", chunk, params.key) + params.key_bias
    vh = jnp.einsum("cd,dhk->chk", chunk, params.value) + params.value_bias
    p = jax.nn.softmax(jnp.einsum("hk,chk->hc", qh, kh) / math.sqrt(dk), axis=-1)
    return jnp.einsum("hc,chk,hkf->f", p, vh, params.out) + params.out_bias

  per_chunk = jax.vmap(jax.vmap(jax.vmap(mha, (None, 0)), (0, 0)), (0, 0))(x, chunks)  # [b, q, k, F]
  return jnp.einsum("bqk,bqkf->bqf", weights, per_chunk)


def dense_read(params: HCAMParams, x: jax.Array, contents: jax.Array, mask: jax.Array) -> jax.Array:
  """One MHA (HCAM's within-chunk weights) over all ``L = M C`` memory slots; ``mask`` is per chunk."""
  b, m, c, d = contents.shape
  mem = jax.lax.stop_gradient(contents.reshape(b, m * c, d))
  qh = jnp.einsum("bqe,ehk->bqhk", x, params.query) + params.query_bias
  kh = jnp.einsum("bld,dhk->blhk", mem, params.key) + params.key_bias
  vh = jnp.einsum("bld,dhk->blhk", mem, params.value) + params.value_bias
  return dense_attend(params, qh, kh, vh, jnp.repeat(mask, c, axis=-1))


def dense_attend(params: HCAMParams, qh: jax.Array, kh: jax.Array, vh: jax.Array, mask: jax.Array) -> jax.Array:
  """Masked softmax attention of projected queries over projected memory, then the output projection."""
  o = attn_ops.dot_product_attention(qh, kh, vh, mask)
  return jnp.einsum("bqhk,hkf->bqf", o, params.out) + params.out_bias


def _fwd_bwd(read: Callable) -> Callable:
  """``read`` -> (params, x, contents, mask, cotangent) -> gradients w.r.t. params and x of <read(...), cot>."""
  def loss(params, x, contents, mask, cot):
    return jnp.sum(read(params, x, contents, mask) * cot)
  return jax.grad(loss, argnums=(0, 1))


def _data(key, b, q, m, c, d, k):
  """Queries, memory, a random mask under which every query can read at least ``k`` chunks, an output cotangent."""
  kx, kc, km, kg = jax.random.split(key, 4)
  x = jax.random.normal(kx, (b, q, d))
  contents = jax.random.normal(kc, (b, m, c, d))
  mask = jax.random.uniform(km, (b, q, m)) < 0.75
  mask = mask.at[..., :k].set(True)
  return x, contents, mask, jax.random.normal(kg, (b, q, d))


def _rel(a, b) -> float:
  """Relative L2 error of pytree ``a`` against ``b``."""
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  num = sum(float(np.sum((np.asarray(u, np.float64) - np.asarray(v, np.float64)) ** 2)) for u, v in zip(la, lb))
  den = sum(float(np.sum(np.asarray(v, np.float64) ** 2)) for v in lb)
  return math.sqrt(num / max(den, 1e-30))


def check_reference(tol: float = 1e-5) -> list[tuple[str, float, float]]:
  """Reference formulation == memarch's op on every path (outputs and gradients), small shapes, fp32 "highest".

  Returns:
    (path, output rel. error, gradient rel. error) rows; raises if any exceeds ``tol``.
  """
  b, q, m, c, d, h, k = 2, 6, 10, 4, 16, 4, 3
  params = make_params(jax.random.key(1), d, h)
  x, contents, mask, cot = _data(jax.random.key(2), b, q, m, c, d, k)
  drop_bk = lambda g: (g[0]._replace(key_bias=jnp.zeros(())), g[1])  # b_k's gradient is identically 0 (spec §4)
  rows = []
  with jax.default_matmul_precision("highest"):
    ref = lambda p, xx, cc, mm: reference_read(p, xx, cc, mm, top_k=k)
    want = jax.jit(ref)(params, x, contents, mask)
    want_g = drop_bk(jax.jit(_fwd_bwd(ref))(params, x, contents, mask, cot))
    for path in (HCAMPath.AUTO,) + PATHS:
      op = lambda p, xx, cc, mm, path=path: hcam_ops.hcam_read(p, xx, cc, mm, top_k=k, path=path)
      got = jax.jit(op)(params, x, contents, mask)
      got_g = drop_bk(jax.jit(_fwd_bwd(op))(params, x, contents, mask, cot))
      rows.append((path.value, _rel(got, want), _rel(got_g, want_g)))
  bad = [r for r in rows if max(r[1:]) > tol]
  if bad:
    raise AssertionError(f"reference formulation != memarch hcam_read: {bad}")
  return rows


def _hcam(path: HCAMPath, k: int) -> Callable:
  return lambda p, x, cc, mm: hcam_ops.hcam_read(p, x, cc, mm, top_k=k, path=path)


def _auto_path(q, m, c, d, h, k) -> HCAMPath:
  return hcam_ops.resolve_path("auto", num_queries=q, num_chunks=m, chunk_size=c, top_k=min(k, m), d_in=d,
                               d_out=d)


def _verdict(ok: bool) -> str:
  return "PASS" if ok else "MISS"


def bench_training(b, q, m, c, d, h, k, repeats, budget_s) -> dict[str, tuple]:
  """Forward and forward+backward times of every variant at ``Q`` queries over ``M x C`` memory."""
  params = make_params(jax.random.key(0), d, h)
  x, contents, _, cot = _data(jax.random.key(3), b, q, m, c, d, k)
  mask = jnp.ones((b, q, m), bool)
  variants = {"reference": lambda p, xx, cc, mm: reference_read(p, xx, cc, mm, top_k=k), "dense": dense_read}
  variants.update({f"hcam {p.value}": _hcam(p, k) for p in (HCAMPath.AUTO,) + PATHS})
  fwd = time_all({n: (jax.jit(r), (params, x, contents, mask)) for n, r in variants.items()},
                 repeats=repeats, budget_s=budget_s)
  bwd = time_all({n: (jax.jit(_fwd_bwd(r)), (params, x, contents, mask, cot)) for n, r in variants.items()},
                 repeats=repeats, budget_s=budget_s)
  for n in variants:
    print(f"  timed {n:<24} fwd {fwd[n][0] * 1e3:9.2f} ms   fwd+bwd {bwd[n][0] * 1e3:9.2f} ms", flush=True)
  return {n: (fwd[n], bwd[n]) for n in variants}


def bench_sweep(b, q, lengths, c, d, h, k, repeats, budget_s) -> dict[int, dict[str, tuple]]:
  """Forward times of a ``Q``-query read at each memory length, per variant."""
  params = make_params(jax.random.key(0), d, h)
  out = {}
  for length in lengths:
    m = length // c
    x, contents, _, _ = _data(jax.random.key(4), b, q, m, c, d, k)
    mask = jnp.ones((b, q, m), bool)
    mem = contents.reshape(b, m * c, d)
    kv = jax.jit(lambda p, mm: (jnp.einsum("bld,dhk->blhk", mm, p.key) + p.key_bias,
                                jnp.einsum("bld,dhk->blhk", mm, p.value) + p.value_bias))(params, mem)

    def cached(p, xx, kh, vh, mm):
      qh = jnp.einsum("bqe,ehk->bqhk", xx, p.query) + p.query_bias
      return dense_attend(p, qh, kh, vh, jnp.repeat(mm, c, axis=-1))

    args = (params, x, contents, mask)
    calls = {"dense": (jax.jit(dense_read), args),
             "dense (K/V cached)": (jax.jit(cached), (params, x, *kv, mask)),
             "reference": (jax.jit(lambda p, xx, cc, mm: reference_read(p, xx, cc, mm, top_k=k)), args)}
    calls.update({f"hcam {p.value}": (jax.jit(_hcam(p, k)), args) for p in (HCAMPath.AUTO,) + PATHS})
    stored = lambda p, xx, cc, mm, kk: hcam_ops.hcam_read(p, xx, cc, mm, top_k=k, keys=kk)
    calls["hcam auto, stored keys"] = (jax.jit(stored), args + (jnp.mean(contents, axis=2),))
    out[length] = time_all(calls, repeats=repeats, budget_s=budget_s)
    del kv, calls
    print(f"  timed Q={q} L={length:<6} " + "  ".join(f"{n} {t[0] * 1e3:.2f}" for n, t in out[length].items()),
          flush=True)
  return out


def _ms(t: tuple) -> str:
  return f"{t[0] * 1e3:9.2f} ({t[1] * 1e3:8.2f})"


def print_training(res, shape, auto) -> list[bool]:
  """Prints the training-shape table and returns the target verdicts."""
  ref_f, ref_b = res["reference"][0][0], res["reference"][1][0]
  den_f, den_b = res["dense"][0][0], res["dense"][1][0]
  print(f"\nTraining shapes {shape}; hcam auto -> {auto.value}. ms: median (min); compile+1st call in brackets.")
  print(f"| {'variant':<22} | {'fwd ms':>20} | {'fwd+bwd ms':>20} | {'ref/x fwd':>9} | {'ref/x f+b':>9} "
        f"| {'x/dense fwd':>11} | {'x/dense f+b':>11} | {'compile s':>11} |")
  print("|" + "|".join("-" * (w + 2) for w in (22, 20, 20, 9, 9, 11, 11, 11)) + "|")
  for name, (f, bw) in res.items():
    print(f"| {name:<22} | {_ms(f)} | {_ms(bw)} | {ref_f / f[0]:9.2f} | {ref_b / bw[0]:9.2f} "
          f"| {f[0] / den_f:11.2f} | {bw[0] / den_b:11.2f} | {f[2]:5.1f}/{bw[2]:5.1f} |")
  a_f, a_b = res["hcam auto"][0][0], res["hcam auto"][1][0]
  checks = [(f"hcam auto fwd     >= {TARGET_VS_REFERENCE:g}x faster than reference", ref_f / a_f,
             ref_f / a_f >= TARGET_VS_REFERENCE),
            (f"hcam auto fwd+bwd >= {TARGET_VS_REFERENCE:g}x faster than reference", ref_b / a_b,
             ref_b / a_b >= TARGET_VS_REFERENCE),
            (f"hcam auto fwd     <= {TARGET_VS_DENSE:g}x dense", a_f / den_f, a_f / den_f <= TARGET_VS_DENSE),
            (f"hcam auto fwd+bwd <= {TARGET_VS_DENSE:g}x dense", a_b / den_b, a_b / den_b <= TARGET_VS_DENSE)]
  for text, value, ok in checks:
    print(f"  target: {text:<50} {value:6.2f}  {_verdict(ok)}")
  return [ok for *_, ok in checks]


def print_sweep(res, b, q, c, d, h, k, target: float | None) -> list[bool]:
  """Prints a memory-length sweep; with ``target``, returns the verdict of dense/auto at the longest memory."""
  names = list(next(iter(res.values())))
  print(f"\nReads against memory length (B={b}, Q={q}, C={c}, d={d}, H={h}, k={k}): fwd ms, median (min).")
  print(f"| {'L':>6} | {'auto path':<16} | {'fastest hcam path':<17} | " + " | ".join(f"{n:>20}" for n in names)
        + f" | {'dense/auto':>10} | {'cached/auto':>11} |")
  print("|" + "|".join("-" * (w + 2) for w in [6, 16, 17] + [20] * len(names) + [10, 11]) + "|")
  for length, row in res.items():
    auto = _auto_path(q, length // c, c, d, h, k)
    best = min(PATHS, key=lambda p: row[f"hcam {p.value}"][0])
    a = row["hcam auto"][0]
    print(f"| {length:>6} | {auto.value:<16} | {best.value:<17} | " + " | ".join(_ms(row[n]) for n in names)
          + f" | {row['dense'][0] / a:10.1f} | {row['dense (K/V cached)'][0] / a:11.1f} |")
  if target is None:
    return []
  longest = max(res)
  ratio = res[longest]["dense"][0] / res[longest]["hcam auto"][0]
  ok = ratio >= target
  print(f"  target: hcam auto >= {target:g}x faster than dense at Q={q}, L={longest:<6}"
        f"{'':>7}{ratio:6.1f}  {_verdict(ok)}")
  stored = res[longest]["dense"][0] / res[longest]["hcam auto, stored keys"][0]
  print(f"  (hcam auto with the chunk means stored, as a decoding state may keep them: dense/hcam = {stored:.1f})")
  return [ok]


def plot(path, sweeps: dict[int, dict[int, dict[str, tuple]]]) -> None:
  """Forward time against memory length, one panel per number of queries."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  import matplotlib.ticker  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, axes = plt.subplots(1, len(sweeps), figsize=(6.5 * len(sweeps), 4.8), squeeze=False)
  for ax, (q, res) in zip(axes[0], sweeps.items()):
    lengths = sorted(res)
    for name in res[lengths[0]]:
      style = "--" if name.startswith("dense") or name == "reference" else "-"
      ax.plot(lengths, [res[n][name][0] * 1e3 for n in lengths], style, marker="o", label=name,
              lw=2.5 if name == "hcam auto" else 1.2)
    ax.set(xscale="log", yscale="log", xlabel="memory length L (tokens)", ylabel="forward ms (median)",
           title=f"Q = {q} quer{'y' if q == 1 else 'ies'}")
    ax.set_xticks(lengths, [f"{n // 1024}K" if n >= 1024 else str(n) for n in lengths])
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
  fig.suptitle(f"HCAM read on {jax.devices()[0].device_kind} (float32)")
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  print(f"\nplot written to {path}")


def main(argv: list[str]) -> None:
  """Checks the reference formulation, times every variant and prints the tables."""
  del argv
  quick = _QUICK.value
  b = _BATCH.value or (2 if quick else 8)
  q, m, c, d, h, k = (16, 16, 8, 64, 4, 4) if quick else (64, 64, 32, 256, 4, 8)
  repeats = _REPEATS.value or (3 if quick else 10)
  budget_s = _BUDGET.value
  lengths = [int(n) for n in (_LENGTHS.value or ((256, 1024) if quick else (2048, 16384, 65536)))]
  dev = jax.devices()[0]
  print(f"device: {dev.device_kind} ({dev.platform}), jax {jax.__version__}, float32, "
        f"matmul precision {jax.config.jax_default_matmul_precision or 'default'}")

  for path, err, gerr in check_reference():
    print(f"  check: reference == hcam_read[{path:<16}] output rel err {err:.1e}, gradient rel err {gerr:.1e}")

  shape = f"B={b} Q={q} L={m * c} (M={m} x C={c}) d={d} H={h} k={k}"
  print(f"\ntraining shapes: {shape}", flush=True)
  training = bench_training(b, q, m, c, d, h, k, repeats, budget_s)
  q_lengths = [int(n) for n in (_Q_LENGTHS.value or ((256, 1024) if quick else (2048, 8192, 16384)))]
  sweeps = {}
  for nq, ls in ((1, lengths), (q, q_lengths)):
    print(f"\nmemory-length sweep, Q={nq}: L = {ls}", flush=True)
    sweeps[nq] = bench_sweep(b, nq, ls, c, d, h, k, repeats, budget_s)

  verdicts = print_training(training, shape, _auto_path(q, m, c, d, h, k))
  verdicts += print_sweep(sweeps[1], b, 1, c, d, h, k, TARGET_SINGLE_QUERY)
  print_sweep(sweeps[q], b, q, c, d, h, k, None)
  print(f"\n{sum(verdicts)}/{len(verdicts)} targets met" + (" (quick shapes: indicative only)" if quick else ""))
  if _PLOT.value:
    plot(_PLOT.value, sweeps)

if __name__ == "__main__":
  app.run(main)
