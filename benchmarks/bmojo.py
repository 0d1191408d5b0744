r"""B'MOJO speed: training tokens/s against Mamba-2 alone and full attention, decode time per token against the
context length, and the SSD forms (token scan vs chunked), all in one process with ratios.

python benchmarks/bmojo.py --quick                 # small shapes: ~2 CPU-minutes, mostly compiles
python benchmarks/bmojo.py --lengths 2048,8192,32768 --plot bmojo.png
python benchmarks/bmojo.py --lengths 32768 --models bmojo_f,mamba2 --repeats 1   # no quadratic attention

Each row times one layer (d_model, heads, window W, store M) on [batch, T, d] inputs: forward + backward of
``sum(y²)`` for training (the layers timed in turn, median of ``repeats`` rounds), one ``t == 1`` step from the
state after a prefill of T tokens for decoding (in turn, median of ``20 · repeats`` rounds). Timing in turn
(`benchmarks/timing.py`) lets load changes on a shared machine hit every layer alike, so the ratios hold. Full
attention's decode reads a KV cache of T tokens, so its time per token grows with T; B'MOJO's state is bounded, so
its time per token should stay flat.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

from memarch.layers.attention import MultiHeadAttention
from memarch.layers.bmojo import BMojo, BMojoF
from memarch.layers.mamba2 import Mamba2
from memarch.ops import ssd as ssd_ops
from timing import time_all  # benchmarks/timing.py (the script's folder is on sys.path)


def _layers(d: int, heads: int, window: int, memory: int, max_len: int, d_state: int):
  ssm = dict(d_state=d_state, ssm_head_dim=32, ssm_chunk_size=64)
  return {
      "bmojo": BMojo(num_heads=heads, window=window, d_model=d, k_sel=4, memory_size=memory, **ssm),
      "bmojo_unsplit": BMojo(num_heads=heads, window=window, d_model=d, k_sel=4, memory_size=memory,
                             query_block=window, **ssm),
      "bmojo_novelty": BMojo(num_heads=heads, window=window, d_model=d, k_sel=4, memory_size=memory,
                             innovation="key_novelty", **ssm),
      "bmojo_f": BMojoF(num_heads=heads, window=window, d_model=d, **ssm),
      "mamba2": Mamba2(d_model=d, d_state=d_state, head_dim=32, chunk_size=64),
      "attention": MultiHeadAttention(num_heads=heads, max_len=max_len, d_model=d),
  }


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--quick", action="store_true", help="small shapes (about 2 CPU-minutes, mostly compilation)")
  parser.add_argument("--lengths", default="2048,8192,32768", help="comma-separated sequence lengths T")
  parser.add_argument("--batch", type=int, default=1)
  parser.add_argument("--d_model", type=int, default=256)
  parser.add_argument("--heads", type=int, default=4)
  parser.add_argument("--window", type=int, default=512)
  parser.add_argument("--memory", type=int, default=64)
  parser.add_argument("--d_state", type=int, default=64)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--plot", default=None, help="write decode time vs T to this PNG")
  parser.add_argument("--models", default="bmojo,bmojo_f,mamba2,attention",
                      help="layers to time (B'MOJO is always timed; leave out attention at very long T; "
                           "bmojo_unsplit: B'MOJO with query sub-blocks of W, i.e. no sub-blocking; "
                           "bmojo_novelty: B'MOJO scoring by key novelty, spec §4.1)")
  args = parser.parse_args()
  if args.quick:
    args.lengths, args.d_model, args.heads, args.window, args.memory, args.d_state = "256,1024", 64, 2, 32, 16, 16
  lengths = [int(x) for x in args.lengths.split(",")]
  b, d = args.batch, args.d_model
  print(f"backend={jax.default_backend()} batch={b} d_model={d} heads={args.heads} W={args.window} "
        f"M={args.memory} N={args.d_state}")

  names = ["bmojo"] + [n for n in ("bmojo_unsplit", "bmojo_novelty", "bmojo_f", "mamba2", "attention")
                       if n in args.models.split(",")]
  train, decode = {}, {}
  for t in lengths:
    layers = _layers(d, args.heads, args.window, args.memory, t + 1, args.d_state)
    x = jax.random.normal(jax.random.key(0), (b, t, d))
    grads, steps = {}, {}
    for name, layer in layers.items():
      if name not in names:
        continue
      params = jax.jit(layer.init)(jax.random.key(1), x[:, :8])
      grads[name] = (jax.jit(jax.grad(lambda p, x, layer=layer: jnp.sum(layer.apply(p, x)[0] ** 2))), (params, x))
      _, state = jax.jit(lambda p, x, s, layer=layer: layer.apply(p, x, state=s))(params, x, layer.init_state(b))
      steps[name] = (jax.jit(lambda p, x, s, layer=layer: layer.apply(p, x, state=s)), (params, x[:, :1], state))
    for name, (median, _, _) in time_all(grads, repeats=args.repeats, budget_s=120.0).items():
      train[name, t] = b * t / median
    for name, (median, _, _) in time_all(steps, repeats=max(20 * args.repeats, 20), budget_s=60.0).items():
      decode[name, t] = median * 1e3

  nan = float("nan")
  ratio = lambda table, a, b, t: table[a, t] / table[b, t] if (a, t) in table and (b, t) in table else nan
  print("\ntraining tokens/s (forward + backward of one layer); ratio = B'MOJO / other")
  print(f"{'T':>7} " + " ".join(f"{n:>13}" for n in names) + "  bmojo/mamba2  bmojo/attention")
  for t in lengths:
    row = " ".join(f"{train[n, t]:13.0f}" for n in names)
    ratios = ratio(train, "bmojo", "mamba2", t), ratio(train, "bmojo", "attention", t)
    print(f"{t:7d} {row}  {ratios[0]:12.2f}  {ratios[1]:15.2f}")
  print("\ndecode ms per token after a prefill of T tokens (B'MOJO's state is bounded: flat in T)")
  print(f"{'T':>7} " + " ".join(f"{n:>13}" for n in names) + "  attention/bmojo")
  for t in lengths:
    row = " ".join(f"{decode[n, t]:13.3f}" for n in names)
    print(f"{t:7d} {row}  {ratio(decode, 'attention', 'bmojo', t):15.2f}")

  print("\nSSD forms, forward + backward ms (H=8, P=32, N=d_state); ratio = token scan / chunked")
  print(f"{'T':>7} {'scan':>10} {'chunked':>10} {'ratio':>7}")
  for t in lengths:
    ks = jax.random.split(jax.random.key(t), 4)
    xs = jax.random.normal(ks[0], (b, t, 8, 32))
    dt = jax.nn.softplus(jax.random.normal(ks[1], (b, t, 8))) * 0.1
    a = -jnp.linspace(1.0, 8.0, 8)
    bm, cm = (jax.random.normal(k, (b, t, 1, args.d_state)) for k in ks[2:])
    forms = {kind: (jax.jit(jax.grad(lambda xs, kind=kind: jnp.sum(
        ssd_ops.ssd(xs, dt, a, bm, cm, scan_type=kind)[0] ** 2))), (xs,)) for kind in ("linear", "chunked")}
    res = {kind: median * 1e3 for kind, (median, _, _) in time_all(forms, repeats=args.repeats, budget_s=60.0).items()}
    print(f"{t:7d} {res['linear']:10.1f} {res['chunked']:10.1f} {res['linear'] / res['chunked']:7.2f}")

  if args.plot:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for n in names:
      ax.plot(lengths, [decode[n, t] for t in lengths], marker="o", label=n)
    ax.set(xscale="log", xlabel="context length T", ylabel="decode ms / token", title="decode cost vs context")
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.plot, dpi=120)
    print(f"wrote {args.plot}")


if __name__ == "__main__":
  main()
