"""Long-tail facts configs (spec hmem.md §5); ``base_config`` holds what the four models share.

The anchor is d=128, L=4, H=4, SwiGLU d_f=512 (§5.4); ``hmem`` adds a (64, 32) hierarchical FFN memory routed by
the batch's ``route``, ``pkm`` a product-key memory in one middle layer, ``dense2x`` doubles the depth (about twice
the anchor's non-embedding parameters). ``runlocal`` trains on the ``tiny`` facts config (4x4 topics, 2,048
documents) with a d=64, L=2 anchor so that the CPU smoke run takes seconds. ``tests=N`` draws up to N held-out
questions per exposure bucket (``FactsConfig.num_test_per_bucket``; the documents and the tree do not change), e.g.
``tests=512`` evaluates every fact of the ``tiny`` world instead of 16 per bucket.
"""

from __future__ import annotations

import ml_collections as mlc

from configs import common as cc
from memarch.data import facts
from memarch.data import facts_tfds

# Args every facts config accepts (``--config configs/facts/X.py:key=value,...``); 0 / "" mean "the default".
ARGS = dict(steps=0, lr=0.0, batch=0, layers=0, d=0, data="", tests=0, runlocal=False)


def base_config(arg: mlc.ConfigDict) -> mlc.ConfigDict:
  """The shared part of the facts configs: data, anchor shape, optimiser and loop (spec §5.4).

  Args:
    arg: parsed ``ARGS``; ``data`` names a standard facts builder config (default ``default``, runlocal ``tiny``);
      ``tests`` (> 0) overrides its questions per exposure bucket.

  Returns:
    The ConfigDict of the anchor.
  """
  c = mlc.ConfigDict()
  c.seed = 0

  c.input = mlc.ConfigDict()
  c.input.name = "facts"
  c.input.builder_config = arg.data or ("tiny" if arg.runlocal else "default")
  c.input.batch_size = arg.batch or (32 if arg.runlocal else 64)
  c.input.data_dir = mlc.FieldReference(None, field_type=str)  # None: $MEMARCH_DATA_DIR or ~/tensorflow_datasets
  if arg.tests:
    c.input.num_test_per_bucket = arg.tests
  data = facts_tfds.config_from_input(c.input).facts
  # Equal tokens for every model: 2^25 by default (the whole training split once).
  c.total_steps = arg.steps or max(1, data.num_train // c.input.batch_size)

  c.model_name = "lm"
  c.model = mlc.ConfigDict()
  c.model.vocab_size = facts.vocab(data).size
  c.model.variant = None
  c.model.num_layers = arg.layers or (2 if arg.runlocal else 4)
  c.model.d_model = arg.d or (64 if arg.runlocal else 128)
  c.model.num_heads = 2 if arg.runlocal else 4
  c.model.mlp_hidden = 4 * c.model.d_model  # d_f = 512 at d = 128 (§5.4)
  c.model.max_len = data.seq_len
  c.model.dtype = mlc.FieldReference(None, field_type=str)  # "bfloat16" on accelerators

  cc.add_sharding(c)
  cc.add_warm_start(c)
  c.optax = cc.adamw(arg.lr or 1e-3, warmup_steps=max(1, min(200, c.total_steps // 10)), wd=0.1)

  c.log_every = 10 if arg.runlocal else 100
  c.eval_every = 100 if arg.runlocal else 1000
  c.ckpt_every = 100 if arg.runlocal else 1000
  c.keep_ckpts = 2
  return c


def branching(c: mlc.ConfigDict) -> int:
  """The tree branching of the config's facts data (the memory bank must use the same ``k``)."""
  return facts_tfds.config_from_input(c.input).facts.branching


def levels(c: mlc.ConfigDict) -> int:
  """The route depth of the config's facts data."""
  return facts_tfds.config_from_input(c.input).facts.levels
