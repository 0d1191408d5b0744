r"""Cost of fetching FFN-memory blocks (forward + gradient) against the bank size: shard_map fetch vs plain take.

  python benchmarks/memory_bank.py --quick                 # 8 simulated CPU devices, seconds
  python benchmarks/memory_bank.py --plot bank.png         # larger banks

Both sides run in this process on a (memory, data, tensor) mesh, bank rows over (memory, data) and units over
tensor (spec hmem.md §3.3): ``ours`` is :func:`memarch.ops.memory_bank.fetch_blocks` (a ``shard_map``), ``take`` is
``jnp.take`` on the same row-sharded bank left to GSPMD. The fetched size is fixed; the bank grows with the
branching ``k`` (rows ``k + k^2``). Per bank size the table gives the step time (jitted fetch + FFN + gradient) and
the largest collective in the compiled HLO; ours should stay flat, take's grows with the bank (its backward
all-reduces a bank-sized gradient, spec §3.2). For scale, ``dense`` times the anchor's own SwiGLU FFN (``d_f = 4d``,
forward + gradient, units over ``tensor``) on the same activations in the same process; ``ours/dense`` is the memory's
cost relative to the FFN it is added to (the FLOP ratio is ``sum(ranks) / d_f``, spec §1.4). ``fwd`` columns time
the forward alone (fetch + apply): the gradient of a bank is a dense bank-shaped array in JAX, so the backward also
pays a zero-fill + local scatter-add of the device's bank shard, O(bank / devices) memory traffic per step that
grows with the bank even though no collective does (the AdamW update of the bank is O(bank / devices) too). On
simulated CPU devices the collectives are memory copies, so the times understate what a real interconnect pays for the
bank-sized all-reduce; the bytes column is exact.
"""

from __future__ import annotations

import argparse
import os
import re
import time

if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from memarch import sharding  # noqa: E402
from memarch.ops import memory_bank as mb  # noqa: E402

_COLLECTIVE = re.compile(r"\b(all-reduce|all-gather|reduce-scatter|all-to-all|collective-permute)(-start)?\(")
_BYTES = {"f32": 4, "bf16": 2, "s32": 4, "f16": 2, "pred": 1}


def max_collective_bytes(hlo: str) -> int:
  """Bytes of the largest array (operand or result) of any collective in compiled HLO text."""
  best = 0
  for line in hlo.splitlines():
    if _COLLECTIVE.search(line):
      for dt, dims in re.findall(r"\b([a-z]+\d*)\[([\d,]*)\]", line.split(" metadata=")[0]):
        best = max(best, _BYTES.get(dt, 4) * int(np.prod([int(v) for v in dims.split(",") if v])))
  return best


def run(branching: int, d: int, ranks: tuple[int, int], batch: int, seq: int, steps: int, mesh) -> dict:
  """Times both fetches for one bank size; returns a table row."""
  rows_axes = ("memory", "data")
  keys = jax.random.split(jax.random.key(branching), 4)
  levels = [mb.init_blocks(keys[l], branching ** (l + 1), (), d, r) for l, r in enumerate(ranks)]
  levels = [b._replace(down=0.1 * jnp.ones_like(b.down)) for b in levels]
  c = jax.random.randint(keys[2], (batch, 2), 0, branching)
  route = jnp.stack([c[:, 0], c[:, 0] * branching + c[:, 1]], 1).astype(jnp.int32)
  x = jax.random.normal(keys[3], (batch, seq, d))
  axes = mb.BankAxes(rows_axes, rows_axes, "tensor")

  def ours(levels, x, route):
    return jnp.sum(jnp.sin(mb.apply_blocks(x, mb.fetch_blocks(levels, route, axes=axes))))

  def take(levels, x, route):
    f = mb.Blocks(*(jnp.concatenate([jnp.take(getattr(b, n), route[:, l], axis=0) for l, b in enumerate(levels)],
                                    -1 if n != "down" else -2) for n in ("gate", "up", "down")))
    return jnp.sum(jnp.sin(mb.apply_blocks(x, f)))

  kd = jax.random.split(keys[3], 3)
  dense_w = tuple(jax.random.normal(k_, s_) / np.sqrt(s_[0])
                  for k_, s_ in zip(kd, ((d, 4 * d), (d, 4 * d), (4 * d, d))))

  def dense(w, x, route):
    del route
    g, u, dn = w
    return jnp.sum(jnp.sin((jax.nn.silu(x @ g) * (x @ u)) @ dn))

  row = {"k": branching, "bank_params": sum(sum(t.size for t in b) for b in levels),
         "fetched_params": batch * 3 * d * sum(ranks)}
  with jax.set_mesh(mesh):
    sh = lambda spec: NamedSharding(mesh, spec)
    lv = [mb.Blocks(jax.device_put(b.gate, sh(P(rows_axes, None, "tensor"))),
                    jax.device_put(b.up, sh(P(rows_axes, None, "tensor"))),
                    jax.device_put(b.down, sh(P(rows_axes, "tensor", None)))) for b in levels]
    x, route = jax.device_put(x, sh(P(rows_axes))), jax.device_put(route, sh(P(rows_axes)))
    dw = tuple(jax.device_put(w, sh(spec)) for w, spec in zip(dense_w, (P(None, "tensor"), P(None, "tensor"),
                                                                       P("tensor", None))))
    fns = {"ours": (ours, lv), "take": (take, lv), "dense": (dense, dw), "ours_fwd": (ours, lv),
           "dense_fwd": (dense, dw)}
    compiled = {}
    for name, (fn, w) in fns.items():
      step = jax.jit(fn if name.endswith("_fwd") else jax.grad(fn))
      row[f"{name}_coll_bytes"] = max_collective_bytes(step.lower(w, x, route).compile().as_text())
      jax.block_until_ready(step(w, x, route))
      compiled[name] = (step, w)
    times = {name: [] for name in fns}
    for _ in range(steps):  # interleaved, so machine noise hits every side alike
      for name, (step, w) in compiled.items():
        t0 = time.perf_counter()
        jax.block_until_ready(step(w, x, route))
        times[name].append(time.perf_counter() - t0)
    for name in fns:
      row[f"{name}_ms"] = 1e3 * float(np.median(times[name]))
  return row


def main() -> None:
  """Parses flags, runs every bank size, prints the table (and a plot)."""
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--quick", action="store_true", help="small shapes, seconds on CPU")
  ap.add_argument("--plot", default="", help="write a PNG of time and collective bytes against bank size")
  ap.add_argument("--steps", type=int, default=0, help="timed steps per point (0: 3 quick, 10 otherwise)")
  args = ap.parse_args()
  if args.quick:
    ks, d, ranks, batch, seq = (8, 16, 32), 32, (16, 8), 8, 16
  else:
    ks, d, ranks, batch, seq = (8, 16, 32, 64, 128), 64, (32, 16), 16, 64
  steps = args.steps or (3 if args.quick else 10)
  mesh = sharding.make_mesh([("memory", 2), ("data", 2), ("tensor", 2)])
  rows = [run(k, d, ranks, batch, seq, steps, mesh) for k in ks]
  base = rows[0]
  print(f"fetch + FFN + gradient on {mesh.devices.size} {jax.devices()[0].platform} devices "
        f"(memory=2, data=2, tensor=2); d={d}, ranks={ranks}, batch={batch}, T={seq}; x: ratio vs the smallest "
        f"bank; dense: the anchor SwiGLU FFN (d_f={4 * d}) alone, median of {steps} interleaved steps")
  print(f"{'k':>4} {'bank params':>12} {'fetched':>9} | {'ours ms':>8} {'x':>5} {'coll KiB':>9} | "
        f"{'take ms':>8} {'x':>5} {'coll KiB':>9} | {'dense ms':>8} {'ours/dense':>10} {'take/dense':>10} | "
        f"{'fwd ours':>8} {'x':>5} {'fwd dense':>9} {'ours/dense':>10}")
  for r in rows:
    print(f"{r['k']:>4} {r['bank_params']:>12,} {r['fetched_params']:>9,} | {r['ours_ms']:>8.2f} "
          f"{r['ours_ms'] / base['ours_ms']:>5.2f} {r['ours_coll_bytes'] / 1024:>9.1f} | {r['take_ms']:>8.2f} "
          f"{r['take_ms'] / base['take_ms']:>5.2f} {r['take_coll_bytes'] / 1024:>9.1f} | {r['dense_ms']:>8.2f} "
          f"{r['ours_ms'] / r['dense_ms']:>10.2f} {r['take_ms'] / r['dense_ms']:>10.2f} | {r['ours_fwd_ms']:>8.2f} "
          f"{r['ours_fwd_ms'] / base['ours_fwd_ms']:>5.2f} {r['dense_fwd_ms']:>9.2f} "
          f"{r['ours_fwd_ms'] / r['dense_fwd_ms']:>10.2f}")
  if args.plot:
    import matplotlib  # pylint: disable=g-import-not-at-top
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    bank = [r["bank_params"] for r in rows]
    a1.plot(bank, [r["dense_ms"] for r in rows], "k--", label="dense FFN (anchor)")
    a1.plot(bank, [r["ours_fwd_ms"] for r in rows], "o:", label="ours, forward only")
    for name in ("ours", "take"):
      a1.plot(bank, [r[f"{name}_ms"] for r in rows], "o-", label=name)
      a2.plot(bank, [r[f"{name}_coll_bytes"] / 1024 for r in rows], "o-", label=name)
    for a, yl in ((a1, "step ms"), (a2, "largest collective (KiB)")):
      a.set_xscale("log"), a.set_yscale("log"), a.set_xlabel("bank parameters"), a.set_ylabel(yl), a.legend()
    fig.tight_layout()
    fig.savefig(args.plot, dpi=120)
    print(f"wrote {args.plot}")


if __name__ == "__main__":
  main()
