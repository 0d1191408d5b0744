r"""A 2-layer Mamba-2 LM on MQAR: the fading-memory baseline next to configs/mqar/transformer.py.

python train.py --config configs/mqar/mamba2.py --workdir $WORKDIR
python train.py --config configs/mqar/mamba2.py:runlocal --workdir $WORKDIR
"""

from __future__ import annotations

import ml_collections as mlc

from configs import common as cc
from configs.mqar import transformer


def get_config(arg: str | None = None) -> mlc.ConfigDict:
  """Returns the MQAR Mamba-2 config: the transformer config with both mixers swapped for Mamba-2.

  Args:
    arg: ``runlocal`` for a run of about a minute on 2 CPU cores.

  Returns:
    The experiment ConfigDict.
  """
  arg = cc.parse_arg(arg, runlocal=False)
  # Same task, data, mesh, schedule and logging as the attention baseline, so the two are directly comparable.
  c = transformer.get_config("runlocal" if arg.runlocal else None)

  c.model.mixers = ("mamba2", "mamba2")
  # Mixer-only blocks, as zoology's MQAR models: recall must come from the sequence mixer, not an MLP.
  c.model.mlp = "none"
  # MQAR/CPU scale from spec bmojo.md §5.1: head width P = 32 and N = 64 (N = 16 on runlocal). The state per
  # layer is H P N + 3 (d_inner + 2 N) floats; N is the knob to sweep for accuracy-vs-state plots.
  # A hashable tuple (not a dict) so the model stays a valid static jit argument through ConfigDict.
  d_state = 16 if arg.runlocal else 64
  c.model.mixer_options = (("mamba2", (("chunk_size", 64), ("d_state", d_state), ("expand", 2),
                                       ("head_dim", 32))),)

  # SSM recall is LR-sensitive (spec bmojo.md §7.5): 1e-3 is the middle of zoology's sweep; sweep it per point.
  c.optax.lr = 1e-3
  # Mamba-2 decays neither A_log nor D (dt_bias, norm gains and biases are already exempt by name).
  c.optax.wd_exclude = [r"(^|/)A_log$", r"(^|/)D$"]
  return c
