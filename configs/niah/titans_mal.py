r"""Titans MAL (memory as a layer, spec titans.md §7.3) on S-NIAH: 4 layers, trained at L, evaluated at L and 4L.

Its sliding window equals MAC's segment (and the baseline's window), so only the memory reaches the needle.

python train.py --config configs/niah/titans_mal.py --workdir $WORKDIR
python train.py --config configs/niah/titans_mal.py:runlocal --workdir $WORKDIR

Args (``:key=value,...``, 0 = default): ``seq_len`` (L), ``steps``, ``lr``, ``batch``, ``layers``, ``d`` (width),
``segment`` (the sliding window), ``runlocal``.
"""

from __future__ import annotations

import ml_collections as mlc

from configs import common as cc
import configs.niah as nc


def get_config(arg: str | None = None) -> mlc.ConfigDict:
  """Returns the S-NIAH Titans-MAL config.

  Args:
    arg: see the module docstring.

  Returns:
    The experiment ConfigDict.
  """
  arg = cc.parse_arg(arg, **nc.ARGS)
  c = nc.base_config(arg)
  c.model.mixers = ("titans_mal",) * c.model.num_layers
  c.model.window = nc.segment_len(arg)
  c.model.num_persistent = 4  # spec §6: a persistent prefix always visible to the attention
  c.model.mixer_options = (("titans_mal", nc.titans_memory(arg)),)
  # W_0 is the learned initial memory: decaying it towards 0 is a modelling choice, not regularisation.
  c.optax.wd_exclude = [r"/memory/w_\d+$"]
  return c
