r"""Anchor + product-key memory on the long-tail facts task (spec hmem.md §4, §5.4).

One PKM in parallel with the FFN of a middle layer: n = 128 sub-keys (16k slots), 4 heads, knn 16, d_k = 64, the
Memory+ gated read; values get a 10x LR multiplier (§4) and the bank's weight decay 1e-3 (§5.4,
``optax.weight_decay_rules``) while the rest keeps 0.1. runlocal: n = 32, 2 heads, knn 8, d_k = 32.

python train.py --config configs/facts/pkm.py --workdir $WORKDIR
python train.py --config configs/facts/pkm.py:runlocal --workdir $WORKDIR

Args (``:key=value,...``, 0 = default): ``steps``, ``lr``, ``batch``, ``layers``, ``d``, ``data`` (a facts builder
config), ``tests`` (questions per exposure bucket), ``value_lr`` (values LR multiplier, default 10), ``value_wd``
(values weight decay, default 1e-3), ``runlocal``.
"""

from __future__ import annotations

import ml_collections as mlc

from configs import common as cc
import configs.facts as fc


def get_config(arg: str | None = None) -> mlc.ConfigDict:
  """Returns the facts anchor + PKM config.

  Args:
    arg: see the module docstring.

  Returns:
    The experiment ConfigDict.
  """
  arg = cc.parse_arg(arg, **fc.ARGS, value_lr=10.0, value_wd=1e-3)
  c = fc.base_config(arg)
  c.model.pkm_layers = (c.model.num_layers // 2,)
  if arg.runlocal:
    c.model.pkm_options = (("heads", 2), ("k_dim", 32), ("knn", 8), ("n_keys", 32))
  else:
    c.model.pkm_options = (("heads", 4), ("k_dim", 64), ("knn", 16), ("n_keys", 128))
  c.optax.lr_multipliers = [(r"/pkm/values$", arg.value_lr)]
  c.optax.weight_decay_rules = [(r"/pkm/values$", arg.value_wd)]
  return c
