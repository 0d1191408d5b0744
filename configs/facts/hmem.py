r"""Anchor + hierarchical FFN memory on the long-tail facts task (spec hmem.md §1.3, §2, §5.4).

Every layer's FFN gets (r1, r2) = (64, 32) memory units fetched on the batch's route (runlocal: (16, 8));
co-training from scratch (A4) with the generic memory drawn with probability ``memory.p_generic = 1/17``.
Bank: lazy Adam rows (``optax.lazy_rows``: unfetched blocks keep their moments and get no update), LR 1e-3 like
the anchor (§5.4, ``bank_lr`` multiplier arg) and no weight decay: the optimiser has one weight-decay rate, and the
spec's bank rate 1e-3 is closer to 0 than to the anchor's 0.1.

python train.py --config configs/facts/hmem.py --workdir $WORKDIR
python train.py --config configs/facts/hmem.py:runlocal --workdir $WORKDIR

Args (``:key=value,...``, 0 = default): ``steps``, ``lr``, ``batch``, ``layers``, ``d``, ``data`` (a facts builder
config), ``bank_lr`` (bank LR multiplier, default 1), ``p_generic`` (-1: 1/17), ``runlocal``.
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
  arg = cc.parse_arg(arg, **fc.ARGS, bank_lr=1.0, p_generic=-1.0)
  c = fc.base_config(arg)
  ranks = (16, 8) if arg.runlocal else (64, 32)
  if len(ranks) > fc.levels(c):
    raise ValueError(f"data={c.input.builder_config!r} has {fc.levels(c)} route levels, the memory needs {len(ranks)}")
  c.model.mlp = "hmem"
  c.model.memory_options = (("branching", fc.branching(c)), ("ranks", ranks), ("use_generic", True))
  c.memory = mlc.ConfigDict()
  c.memory.p_generic = 1.0 / 17.0 if arg.p_generic < 0 else arg.p_generic
  c.optax.lazy_rows = [BANK]
  c.optax.lr_multipliers = [(BANK, arg.bank_lr), (GENERIC, arg.bank_lr)]
  c.optax.wd_exclude = [BANK, GENERIC]
  return c
