r"""The "2x dense" baseline on the long-tail facts task (spec hmem.md §5.4): the anchor with twice the layers.

d=128, L=8: about twice the anchor's non-embedding parameters (2.1M vs 1.05M); runlocal: L=4 at d=64.

python train.py --config configs/facts/dense2x.py --workdir $WORKDIR
python train.py --config configs/facts/dense2x.py:runlocal --workdir $WORKDIR

Args (``:key=value,...``, 0 = default): ``steps``, ``lr``, ``batch``, ``layers`` (the anchor's, doubled), ``d``,
``data`` (a facts builder config), ``tests`` (questions per exposure bucket), ``runlocal``.
"""

from __future__ import annotations

import ml_collections as mlc

from configs import common as cc
import configs.facts as fc


def get_config(arg: str | None = None) -> mlc.ConfigDict:
  """Returns the facts 2x dense config.

  Args:
    arg: see the module docstring.

  Returns:
    The experiment ConfigDict.
  """
  c = fc.base_config(cc.parse_arg(arg, **fc.ARGS))
  c.model.num_layers = 2 * c.model.num_layers
  return c
