r"""Tokens/s and model-FLOPs utilisation of the LM train step, against a jnp.dot peak measured in the same run.

  python benchmarks/train_step.py                       # CPU, float32
  python benchmarks/train_step.py --dtype bfloat16      # GPU

The model is the transformer LM (d=512, 8 heads, 4 attention layers, T=1024); the step is train.py's: forward,
backward and the AdamW update, jitted with the state donated, on one device.
"""

from __future__ import annotations

import functools
import time

import flax.linen as nn
import jax
import ml_collections as mlc
import numpy as np
from absl import app, flags

from memarch import models, sharding
from memarch.training import metrics, optim
from memarch.training import state as state_lib
from memarch.training import step as step_lib

_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Activation (and peak matmul) dtype.")
_BATCH = flags.DEFINE_integer("batch_size", 0, "Sequences per step (0: 2 on CPU, 16 on an accelerator).")
_SEQ_LEN = flags.DEFINE_integer("seq_len", 1024, "Tokens per sequence.")
_D_MODEL = flags.DEFINE_integer("d_model", 512, "Model width.")
_HEADS = flags.DEFINE_integer("num_heads", 8, "Attention heads.")
_LAYERS = flags.DEFINE_integer("num_layers", 4, "Attention layers.")
_VOCAB = flags.DEFINE_integer("vocab_size", 8192, "Vocabulary size.")
_STEPS = flags.DEFINE_integer("steps", 5, "Timed steps (after 2 warm-up steps).")
_PEAK_N = flags.DEFINE_integer("peak_n", 0, "Matrix size of the peak jnp.dot (0: 2048 on CPU, 8192 chained x10 "
                                "on accelerators).")


def main(argv: list[str]) -> None:
  """Builds the model, times the train step and prints a table."""
  del argv
  device = jax.devices()[0]
  batch = _BATCH.value or (2 if device.platform == "cpu" else 16)
  seq_len = _SEQ_LEN.value
  peak = metrics.measure_matmul_peak(n=_PEAK_N.value or None, dtype=_DTYPE.value)

  model = models.get_model("lm", vocab_size=_VOCAB.value, d_model=_D_MODEL.value, num_heads=_HEADS.value,
                           num_layers=_LAYERS.value, mixers=("attention",) * _LAYERS.value, max_len=seq_len,
                           dtype=None if _DTYPE.value == "float32" else _DTYPE.value)
  flops_per_token = model.flops_per_token(seq_len)
  tx, schedule = optim.make_optimizer(mlc.ConfigDict(dict(
      name="adamw", lr=1e-4, b1=0.9, b2=0.98, eps=1e-8, wd=0.1, warmup_steps=10, min_lr_ratio=0.1, clip=1.0)), 1000)

  mesh = sharding.make_mesh([("data", 1), ("fsdp", 1), ("tensor", 1)], devices=[device])
  rules = sharding.rules_for_mesh(sharding.DEFAULT_RULES, mesh)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    _, shardings = state_lib.state_shardings(model, tx, mesh, rules, (batch, seq_len))
    state = state_lib.create_state(model, tx, shardings, 0, (batch, seq_len))
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, _VOCAB.value, (batch, seq_len + 1), dtype=np.int32)
    data = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "segment_ids": np.ones((batch, seq_len), np.int32),
            "positions": np.broadcast_to(np.arange(seq_len, dtype=np.int32), (batch, seq_len)).copy()}
    data = jax.device_put(data, state_lib.replicated(mesh))
    step_fn = jax.jit(functools.partial(step_lib.train_step, model=model, tx=tx, schedule=schedule),
                      donate_argnums=(0,))
    t0 = time.perf_counter()
    state, m = step_fn(state, data)
    jax.block_until_ready(m)
    compile_s = time.perf_counter() - t0
    state, m = step_fn(state, data)
    jax.block_until_ready(m)
    t0 = time.perf_counter()
    for _ in range(_STEPS.value):
      state, m = step_fn(state, data)
    jax.block_until_ready((state, m))
    step_s = (time.perf_counter() - t0) / _STEPS.value

  tokens_per_s = batch * seq_len / step_s
  achieved = tokens_per_s * flops_per_token
  rows = [("device", f"{device.device_kind} ({device.platform})"), ("dtype", _DTYPE.value),
          ("model", f"d={_D_MODEL.value} h={_HEADS.value} L={_LAYERS.value} V={_VOCAB.value} T={seq_len}"),
          ("batch", str(batch)), ("compile + 1st step", f"{compile_s:.1f} s"), ("step", f"{step_s * 1e3:.1f} ms"),
          ("tokens/s", f"{tokens_per_s:,.0f}"), ("train FLOPs/token", f"{flops_per_token / 1e6:.1f} M"),
          ("achieved", f"{achieved / 1e12:.3f} TFLOP/s"),
          ("jnp.dot peak", f"{peak / 1e12:.3f} TFLOP/s"),
          ("MFU", f"{100 * achieved / peak:.1f} %"),
          ("final loss", f"{float(m['loss']):.3f}")]
  width = max(len(k) for k, _ in rows)
  print("\n".join(f"| {k:<{width}} | {v} |" for k, v in rows))


if __name__ == "__main__":
  app.run(main)
