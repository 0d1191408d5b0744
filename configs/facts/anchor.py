r"""The anchor alone on the long-tail facts task (spec hmem.md §5.4): d=128, L=4, H=4, SwiGLU d_f=512.

python train.py --config configs/facts/anchor.py --workdir $WORKDIR
python train.py --config configs/facts/anchor.py:runlocal --workdir $WORKDIR

Args (``:key=value,...``, 0 = default): ``steps``, ``lr``, ``batch``, ``layers``, ``d`` (width), ``data`` (a facts
builder config: ``default``, ``runlocal``, ``tiny``), ``tests`` (questions per exposure bucket), ``runlocal``.
"""

from __future__ import annotations

import ml_collections as mlc

from configs import common as cc
import configs.facts as fc


def get_config(arg: str | None = None) -> mlc.ConfigDict:
  """Returns the facts anchor config.

  Args:
    arg: see the module docstring.

  Returns:
    The experiment ConfigDict.
  """
  return fc.base_config(cc.parse_arg(arg, **fc.ARGS))
