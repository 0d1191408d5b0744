r"""Checks memarch's accelerator path: equivalences on the device, bf16 against fp32, and step timings.

  python benchmarks/accelerator_check.py [--timings]   # on jax.devices()[0] (GPU, TPU or CPU)

Prints one table row per check. Equivalence checks run in float32 with "highest" matmul precision (no TF32), so
their tolerances are the CPU suite's; the bf16 rows compare bf16 activations (fp32 params and state) with fp32.
"""

from __future__ import annotations

import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from memarch.models import get_model, mixers
from memarch.models.lm import generate


def _max_rel(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-12))


def check_mixers(rows: list[tuple[str, str, str]]) -> None:
  """Every registered mixer: full forward == token-by-token decode, on the device, float32."""
  from memarch.models.lm import LMConfig  # pylint: disable=g-import-not-at-top
  cfg = LMConfig(vocab_size=64, d_model=64, num_layers=1, num_heads=4, window=8, num_persistent=2, max_len=96)
  x = jax.random.normal(jax.random.key(0), (2, 40, 64))
  for name in sorted(mixers.MIXERS):
    mixer = mixers.get_mixer_spec(name).build(cfg, 0, parent=None)
    params = mixer.init(jax.random.key(1), x)
    apply = jax.jit(mixer.apply)
    with jax.default_matmul_precision("highest"):
      y, _ = apply(params, x)
      state, ys = mixer.init_state(2), []
      for t in range(x.shape[1]):
        yt, state = apply(params, x[:, t:t + 1], state=state)
        ys.append(yt)
    err = _max_rel(jnp.concatenate(ys, 1), y)
    rows.append((f"{name}: full == token-by-token (fp32)", f"max rel err {err:.1e}", "ok" if err < 1e-4 else "FAIL"))


def check_lm_bf16(rows: list[tuple[str, str, str]]) -> None:
  """A hybrid LM in bf16 vs fp32 (same params), gradients finite, and greedy generate == argmax of the forward."""
  names = tuple(n for n in ("attention", "sliding_window", "mamba2") if n in mixers.MIXERS)
  kw = dict(vocab_size=256, variant="small", mixers=names, window=32, max_len=256)
  tokens = jax.random.randint(jax.random.key(0), (4, 128), 0, 256)
  f32, bf16 = get_model("lm", **kw), get_model("lm", **kw, dtype="bfloat16")
  variables = f32.init(jax.random.key(1), tokens)
  with jax.default_matmul_precision("highest"):
    ref, _ = jax.jit(f32.apply)(variables, tokens)
  got, states = jax.jit(bf16.apply)(variables, tokens)
  p_ref, p_got = jax.nn.softmax(ref, -1), jax.nn.softmax(got, -1)
  tv = float(0.5 * jnp.abs(p_ref - p_got).sum(-1).max())
  rows.append((f"LM {'+'.join(names)} bf16 vs fp32", f"max total-variation {tv:.3f}", "ok" if tv < 0.1 else "FAIL"))
  state_ok = all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(states) if jnp.issubdtype(leaf.dtype,
                                                                                                  jnp.floating))
  rows.append(("bf16 activations keep fp32 state", str(state_ok), "ok" if state_ok else "FAIL"))
  grads = jax.jit(jax.grad(lambda v: jnp.mean(bf16.apply(v, tokens)[0] ** 2)))(variables)
  finite = all(bool(jnp.isfinite(g).all()) for g in jax.tree.leaves(grads))
  rows.append(("bf16 gradients finite", str(finite), "ok" if finite else "FAIL"))
  with jax.default_matmul_precision("highest"):
    out = generate(f32, variables, tokens[:, :16], 16)
    logits, _ = jax.jit(f32.apply)(variables, jnp.concatenate([tokens[:, :16], out[:, :-1]], 1))
  same = float((jnp.argmax(logits[:, 15:], -1) == out).mean())
  rows.append(("generate == argmax of full forward (fp32)", f"{same:.3f} agree", "ok" if same == 1.0 else "FAIL"))


def time_lm(rows: list[tuple[str, str, str]]) -> None:
  """Forward+backward ms of a 125M-preset LM at T=2048 in bf16 per mixer kind (accelerators only)."""
  if jax.devices()[0].platform == "cpu":
    rows.append(("125M LM timings", "skipped on CPU (see train_step.py)", "-"))
    return
  for names in (("attention",) * 12, ("sliding_window",) * 12, ("mamba2",) * 12):
    if names[0] not in mixers.MIXERS:
      continue
    model = get_model("lm", vocab_size=32_000, variant="125M", mixers=names, window=512, max_len=2048,
                      dtype="bfloat16")
    tokens = jax.random.randint(jax.random.key(0), (8, 2048), 0, 32_000)
    variables = model.init(jax.random.key(1), tokens[:, :8])
    step = jax.jit(jax.grad(lambda v, t: jnp.mean(model.apply(v, t)[0])))
    jax.block_until_ready(step(variables, tokens))
    t0 = time.perf_counter()
    for _ in range(5):
      out = step(variables, tokens)
    jax.block_until_ready(out)
    ms = (time.perf_counter() - t0) / 5 * 1e3
    tok_s = 8 * 2048 / (ms / 1e3)
    rows.append((f"125M {names[0]} x12, B=8 T=2048 bf16 fwd+bwd", f"{ms:.1f} ms ({tok_s / 1e3:.0f}k tok/s)", "-"))


class _Rows(list):
  """A list of table rows that prints each row as it is added (partial results survive a timeout)."""

  def append(self, row: tuple[str, str, str]) -> None:
    super().append(row)
    print(f"| {row[0]:<48} | {row[1]:<34} | {row[2]:<4} |", flush=True)


def main() -> None:
  device = jax.devices()[0]
  rows = _Rows()
  rows.append(("device", f"{device.platform}: {device.device_kind}", "-"))
  rows.append(("jax", jax.__version__, "-"))
  check_mixers(rows)
  check_lm_bf16(rows)
  if "--timings" in sys.argv:
    time_lm(rows)
  if any(r[2] == "FAIL" for r in rows):
    raise SystemExit(1)


if __name__ == "__main__":
  main()
