"""S-NIAH configs; ``base_config`` holds what Titans MAC / MAG / MAL and the sliding-window baseline share."""

from __future__ import annotations

import ml_collections as mlc

from configs import common as cc

# Args every S-NIAH config accepts (``--config configs/niah/X.py:key=value,...``); 0 means "the default".
ARGS = dict(seq_len=0, steps=0, lr=0.0, batch=0, layers=0, d=0, segment=0, runlocal=False)


def segment_len(arg: mlc.ConfigDict) -> int:
  """The attention span shared by every model: MAC's segment C and the sliding window of MAG / MAL / baseline."""
  return arg.segment or (16 if arg.runlocal else 32)


def base_config(arg: mlc.ConfigDict) -> mlc.ConfigDict:
  """The shared part of the S-NIAH configs; the caller sets ``model.mixers`` (and their options).

  Args:
    arg: parsed ``ARGS``.

  Returns:
    The ConfigDict without mixers.
  """
  c = mlc.ConfigDict()
  c.seed = 0
  c.total_steps = arg.steps or (100 if arg.runlocal else 3000)

  c.input = mlc.ConfigDict()
  c.input.name = "niah"
  # L; test_4x evaluates at 4L. The haystack (L - 22 words) is longer than the attention span (segment_len), so
  # the pass key has to come from a memory, not from attention, and at 4L even more so.
  c.input.seq_len = arg.seq_len or (64 if arg.runlocal else 256)
  c.input.vocab_size = 64     # 10 reserved words, 10 digits, 44 haystack words
  c.input.passkey_len = 5     # 5 scored digits per row (chance 0.1 each)
  c.input.haystack = "noise"  # RULER's pass-key haystack: one sentence repeated
  c.input.noise_period = 16
  c.input.num_train = 4_096 if arg.runlocal else 100_000
  c.input.num_test = 64 if arg.runlocal else 500
  c.input.data_seed = 0
  c.input.batch_size = arg.batch or (16 if arg.runlocal else 64)
  c.input.data_dir = mlc.FieldReference(None, field_type=str)  # None: $MEMARCH_DATA_DIR or ~/tensorflow_datasets

  c.model_name = "lm"
  c.model = mlc.ConfigDict()
  c.model.vocab_size = c.input.vocab_size
  c.model.variant = None
  # The 4 layers; runlocal keeps 2 so the CPU smoke run compiles quickly.
  c.model.num_layers = arg.layers or (2 if arg.runlocal else 4)
  c.model.d_model = arg.d or (64 if arg.runlocal else 128)
  c.model.num_heads = 2 if arg.runlocal else 4
  c.model.max_len = 4 * c.input.seq_len  # test_4x
  c.model.dtype = mlc.FieldReference(None, field_type=str)  # "bfloat16" on accelerators

  cc.add_sharding(c)
  cc.add_warm_start(c)
  c.optax = cc.adamw(arg.lr or (3e-3 if arg.runlocal else 1e-3), warmup_steps=max(1, min(200, c.total_steps // 10)))

  c.log_every = 10 if arg.runlocal else 50
  c.eval_every = 50 if arg.runlocal else 500
  c.ckpt_every = 50 if arg.runlocal else 500
  c.keep_ckpts = 2
  return c


def titans_memory(arg: mlc.ConfigDict) -> tuple[tuple[str, object], ...]:
  """NeuralMemory options shared by MAC / MAG / MAL (a hashable tuple for ``model.mixer_options``).

  * chunk 8: chunk-granular reads (spec §2.3) at an eighth of the sequential steps of the token-level update;
  * a linear memory (L_M = 1): the delta rule of spec §2.6, the natural fit for one needle;
  * theta_max = 1 / chunk: every gradient of a chunk is taken at the chunk-start weights, so the chunk's steps
    along one key add up, and 1 / c keeps their sum at one exact overwrite at most. The spec's theta_max = 1
    (its start for c = 1) overshoots on the haystack's repeated keys: with chunk 8 and the momentum at 0.88 the
    weights reached 6e14 after 4L = 1,024 random tokens at initialisation, and the 4L evaluation of an H100 run
    read NaN;
  * max_grad_norm 1: the soft clamp of each chunk's surprise (spec §9) keeps the growth linear when training
    drives theta and eta to their maxima (|W| ~ 300 after 1,024 tokens at theta = theta_max, eta = 1, not inf);
  * init_alpha_bias -8 (alpha ~ 3e-4 at init instead of the spec's 0.018): at 4L the needle must survive ~4L
    decay steps, and 0.982^1000 is 1e-8; the forget gate stays data-dependent and learnable.
  """
  del arg
  chunk = 8
  return (("chunk_size", chunk), ("depth", 1), ("max_lr", 1.0 / chunk), ("max_grad_norm", 1.0),
          ("init_alpha_bias", -8.0))
