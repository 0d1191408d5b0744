r"""The no-long-term-memory baseline on ballet (spec hcam.md §11.3): the HCAM model without HCAM.

4 layers of sliding-window attention with the same window as HCAM's local attention (C = 16) and the same width,
heads and MLP, so the only difference is the chunk memory. Measured on one H200 (batch 64, lr 1e-3): test accuracy
0.55 after 3000 steps at 2 dancers / delay 16 (chance 0.5; HCAM: 0.95 after 500) and 0.12-0.14 after 1800 steps at
8 / 48 (chance 0.125).

python train.py --config configs/ballet/transformer_window.py:dancers=8,delay=48 --workdir $WORKDIR
python train.py --config configs/ballet/transformer_window.py:runlocal --workdir $WORKDIR

Args (``:key=value,...``): ``dancers``, ``delay`` (unset: 8 / 48, or 2 / 16 with ``runlocal``), ``window``,
``steps``, ``lr``, ``batch`` (0: the level's default), ``runlocal``.
"""

from __future__ import annotations

import ml_collections as mlc

from configs import common as cc
import configs.ballet as bc


def get_config(arg: str | None = None) -> mlc.ConfigDict:
  """Returns the ballet windowed-transformer config.

  Args:
    arg: see the module docstring.

  Returns:
    The experiment ConfigDict.
  """
  arg = cc.parse_arg(arg, dancers=0, delay=-1, window=16, steps=0, lr=0.0, batch=0, runlocal=False)
  c = bc.base_config(arg)
  c.model.mixers = ("sliding_window",) * 4
  c.model.window = arg.window  # = HCAM's local window (its chunk size C)
  return c
