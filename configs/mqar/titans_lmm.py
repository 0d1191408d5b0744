r"""A 2-layer Titans (LMM-only) LM on MQAR, next to configs/mqar/transformer.py and configs/mqar/mamba2.py.

python train.py --config configs/mqar/titans_lmm.py --workdir $WORKDIR
python train.py --config configs/mqar/titans_lmm.py:runlocal --workdir $WORKDIR
"""

from __future__ import annotations

import ml_collections as mlc

from configs import common as cc
from configs.mqar import transformer


def get_config(arg: str | None = None) -> mlc.ConfigDict:
  """Returns the MQAR Titans-LMM config: the transformer config with both mixers swapped for the LMM.

  Args:
    arg: ``runlocal`` for a short smoke run on 2 CPU cores.

  Returns:
    The experiment ConfigDict.
  """
  arg = cc.parse_arg(arg, runlocal=False)
  # Same task, data, mesh, schedule and logging as the attention baseline, so the two are directly comparable.
  c = transformer.get_config("runlocal" if arg.runlocal else None)

  c.model.mixers = ("titans_lmm", "titans_lmm")
  # Mixer-only blocks, as zoology's MQAR models: recall must come from the memory, not an MLP.
  c.model.mlp = "none"
  # 2 heads of 32 (d_model 64). A linear (L_M = 1) memory with theta_max = 1 is the delta rule at theta = 1
  # (spec §2.6): an exact key -> value overwrite, the natural fit for associative recall; its state per layer is
  # 3 H e^2 floats (weights, momentum, window reference). Chunk 8: the 64-token sequence runs in 8 chunk steps
  # (c = 1, the paper's token-level update, is 8x more sequential steps for the same chunk-end states); queries come
  # after all key-value pairs, so chunk-granular reads cost MQAR nothing. A hashable tuple (not a dict) keeps the
  # model a valid static jit argument through ConfigDict.
  c.model.mixer_options = (("titans_lmm", (("chunk_size", 8), ("depth", 1), ("max_lr", 1.0))),)

  # The mamba2 MQAR learning rate; the memory's gate projections may need their own multiplier (spec §2.4), e.g.
  # c.optax.lr_multipliers = [(r"/gates/", 0.1)].
  c.optax.lr = 1e-3
  # W_0 is the learned initial memory: decaying it towards 0 is a modelling choice, not regularisation.
  c.optax.wd_exclude = [r"/memory/w_\d+$"]
  return c
