r"""A byte-level transformer LM on any TFDS text dataset (default: memarch's own sources, offline).

python train.py --config configs/text/transformer.py --workdir $WORKDIR
python train.py --config configs/text/transformer.py:runlocal --workdir $WORKDIR
python train.py --config configs/text/transformer.py --workdir $WORKDIR \
    --config.input.dataset=lm1b --config.input.data_dir=$TFDS_DATA_DIR     # any TFDS text dataset
"""

from __future__ import annotations

import ml_collections as mlc

from configs import common as cc
from memarch.data import text


def get_config(arg: str | None = None) -> mlc.ConfigDict:
  """Returns the text LM config.

  Args:
    arg: ``runlocal`` for a short run on 2 CPU cores; ``variant=small`` (etc.) picks the model preset.

  Returns:
    The experiment ConfigDict.
  """
  arg = cc.parse_arg(arg, runlocal=False, variant="small")
  c = mlc.ConfigDict()
  c.seed = 0
  c.total_steps = 50 if arg.runlocal else 5_000

  c.input = mlc.ConfigDict()
  c.input.name = "tfds_text"
  # memarch_local_text ships with the package (no download); lm1b, wikipedia/..., any TFDS text dataset works.
  c.input.dataset = "memarch_local_text"
  c.input.text_key = "text"
  c.input.train_split = "train"
  c.input.eval_split = "test"
  c.input.tokenizer = "byte"  # or the path of a SentencePiece .model file (then set model.vocab_size to match)
  c.input.seq_len = 128 if arg.runlocal else 512
  c.input.batch_size = 8 if arg.runlocal else 32
  c.input.data_dir = mlc.FieldReference(None, field_type=str)

  c.model_name = "lm"
  c.model = mlc.ConfigDict()
  c.model.vocab_size = text.BYTE_VOCAB_SIZE
  c.model.variant = "tiny" if arg.runlocal else arg.variant
  c.model.mixers = ("attention", "sliding_window") * (1 if arg.runlocal else 2)
  c.model.window = 64 if arg.runlocal else 256  # alternate global and local layers
  c.model.max_len = c.input.seq_len
  c.model.dtype = mlc.FieldReference(None, field_type=str)  # "bfloat16" on accelerators

  cc.add_sharding(c)
  cc.add_warm_start(c)
  c.optax = cc.adamw(3e-3 if arg.runlocal else 1e-3, warmup_steps=5 if arg.runlocal else 200, b2=0.95)

  c.log_every = 10 if arg.runlocal else 50
  c.eval_every = 50 if arg.runlocal else 500
  c.ckpt_every = 50 if arg.runlocal else 500
  c.keep_ckpts = 2
  return c
