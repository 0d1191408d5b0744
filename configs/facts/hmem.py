r"""Anchor + hierarchical FFN memory on the long-tail facts task (spec hmem.md §1.3, §2, §5.4).

Every layer's FFN gets (r1, r2) = (64, 32) memory units fetched on the batch's route (runlocal: (16, 8));
co-training from scratch (A4) with the generic memory drawn with probability ``memory.p_generic = 1/17``.
Bank: lazy Adam rows (``optax.lazy_rows``: unfetched blocks keep their moments and get no update, weight decay
included), LR 3x the anchor's (``bank_lr`` multiplier arg; §5.4 says 1e-3 "tune": on runlocal, 3 seeds x 1,000
steps, the bank at 1x lost to the 2x dense model on tail facts, 0.637 vs 0.748, at 3x it beat it, 0.803; at 10x
more so, 0.829, but the rule probe fell; untuned at full size) and weight decay 1e-3 for the bank and the generic
block (``optax.weight_decay_rules``, ``bank_wd`` arg) while the anchor keeps 0.1 (§1.5, §5.4).

python train.py --config configs/facts/hmem.py --workdir $WORKDIR
python train.py --config configs/facts/hmem.py:runlocal --workdir $WORKDIR

Recipe A2 (spec §5.4: anchor for half the budget, then co-training for the other half; A4, the default, trains
both from scratch): ``init_from`` copies every parameter of the anchor run's newest checkpoint whose path and shape
match (all of the anchor); the bank keeps its zero-output initialisation and the optimizer starts fresh::

  python train.py --config configs/facts/anchor.py:steps=N --workdir $ANCHOR
  python train.py --config configs/facts/hmem.py:steps=N,init_from=$ANCHOR --workdir $WORKDIR

Args (``:key=value,...``, 0 = default): ``steps``, ``lr``, ``batch``, ``layers``, ``d``, ``data`` (a facts builder
config), ``tests`` (questions per exposure bucket), ``bank_lr`` (bank LR multiplier, default 3), ``bank_wd`` (bank
weight decay, default 1e-3), ``p_generic`` (-1: 1/17), ``ranks`` (units per level joined by ``x``, e.g. ``16x48``),
``init_from`` (a trained anchor's workdir: recipe A2, below), ``runlocal``. The route depth of the data must cover the levels of ``ranks`` (checked by
``memarch.training.validate``).
"""

from __future__ import annotations

import ml_collections as mlc

from configs import common as cc
import configs.facts as fc

BANK = r"/mlp/(gate|up|down)_\d+$"
GENERIC = r"/mlp/generic_(gate|up|down)$"


def get_config(arg: str | None = None) -> mlc.ConfigDict:
  """Returns the facts anchor + hierarchical memory config.

  Args:
    arg: see the module docstring.

  Returns:
    The experiment ConfigDict.
  """
  arg = cc.parse_arg(arg, **fc.ARGS, bank_lr=3.0, bank_wd=1e-3, p_generic=-1.0, ranks="", init_from="")
  c = fc.base_config(arg)
  cc.add_warm_start(c, arg.init_from)  # A2: a trained anchor's workdir; its params seed the same layers
  ranks = (16, 8) if arg.runlocal else (64, 32)
  if arg.ranks:
    try:
      ranks = tuple(int(r) for r in arg.ranks.split("x"))
    except ValueError:
      raise ValueError(f"config arg ranks={arg.ranks!r}: expected units per level joined by 'x', e.g. 16x48") from None
  c.model.mlp = "hmem"
  c.model.memory_options = (("branching", fc.branching(c)), ("ranks", ranks), ("use_generic", True))
  c.memory = mlc.ConfigDict()
  c.memory.p_generic = 1.0 / 17.0 if arg.p_generic < 0 else arg.p_generic
  c.optax.lazy_rows = [BANK]
  c.optax.lr_multipliers = [(BANK, arg.bank_lr), (GENERIC, arg.bank_lr)]
  c.optax.weight_decay_rules = [(BANK, arg.bank_wd), (GENERIC, arg.bank_wd)]
  return c
