r"""A byte-level Titans-MAC LM on any TFDS text dataset (default: memarch's own offline sources).

The configs/text/transformer.py setup (data, tokenizer, sequence length, schedule, logging) with every mixer a
Titans MAC block (spec titans.md §7.1): segment attention plus a neural long-term memory carried across segments.

python train.py --config configs/text/titans_mac.py --workdir $WORKDIR
python train.py --config configs/text/titans_mac.py:runlocal --workdir $WORKDIR
python train.py --config configs/text/titans_mac.py --workdir $WORKDIR \
    --config.input.dataset=lm1b --config.input.data_dir=$TFDS_DATA_DIR     # any TFDS text dataset
"""

from __future__ import annotations

import ml_collections as mlc

from configs import common as cc
from configs.text import transformer


def get_config(arg: str | None = None) -> mlc.ConfigDict:
  """Returns the text Titans-MAC config.

  Args:
    arg: ``runlocal`` for a short run on 2 CPU cores; ``variant=small`` (etc.) picks the model preset.

  Returns:
    The experiment ConfigDict.
  """
  arg = cc.parse_arg(arg, runlocal=False, variant="small")
  c = transformer.get_config(",".join(["runlocal"] * arg.runlocal + [f"variant={arg.variant}"]))
  num_layers = 2 if arg.runlocal else 4  # the tiny / small presets
  c.model.mixers = ("titans_mac",) * num_layers
  c.model.window = None  # MAC attends within its segments; no sliding window
  c.model.num_persistent = 4  # spec §7.1 default N_p
  # Segments of 64 bytes (spec §7.1 CPU-tiny C). Packed documents start at any byte, and a document start must
  # fall on a memory chunk, so the memory updates token by token (chunk_size 1, the paper's update and the
  # registry default). A deep memory (L_M = 2, the spec default) with theta_max = 0.1 (spec §2.4: deep memories
  # need the smaller rate).
  c.model.mixer_options = (("titans_mac", (("segment_len", 64), ("chunk_size", 1), ("depth", 2),
                                           ("max_lr", 0.1))),)
  # W_0 is the learned initial memory: decaying it towards 0 is a modelling choice, not regularisation.
  c.optax.wd_exclude = [r"/memory/w_\d+$"]
  return c
