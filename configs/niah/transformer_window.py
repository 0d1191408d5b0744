r"""The no-memory baseline on S-NIAH: 4 layers of sliding-window attention, the same size as the Titans configs.

The window equals MAC's segment C (MAG / MAL use it as their window too) and is much shorter than the haystack:
the needle is visible only while it is within about layers x window tokens of the question, so the model must
fail at 4L (and mostly at L) where Titans reads the pass key from its memory.

python train.py --config configs/niah/transformer_window.py --workdir $WORKDIR
python train.py --config configs/niah/transformer_window.py:runlocal --workdir $WORKDIR

Args (``:key=value,...``, 0 = default): ``seq_len`` (L), ``steps``, ``lr``, ``batch``, ``layers``, ``d`` (width),
``segment`` (the window), ``runlocal``.
"""

from __future__ import annotations

import ml_collections as mlc

from configs import common as cc
import configs.niah as nc


def get_config(arg: str | None = None) -> mlc.ConfigDict:
  """Returns the S-NIAH sliding-window transformer config.

  Args:
    arg: see the module docstring.

  Returns:
    The experiment ConfigDict.
  """
  arg = cc.parse_arg(arg, **nc.ARGS)
  c = nc.base_config(arg)
  c.model.mixers = ("sliding_window",) * c.model.num_layers
  c.model.window = nc.segment_len(arg)
  c.model.num_persistent = 4  # as the Titans hybrids: attention sinks, not memory
  return c
