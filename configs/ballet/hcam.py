r"""HCAM on the supervised ballet task (spec hcam.md §11.3): 4 layers, each local attention + HCAM.

python train.py --config configs/ballet/hcam.py:dancers=8,delay=48 --workdir $WORKDIR
python train.py --config configs/ballet/hcam.py:dancers=2,delay=16 --workdir $WORKDIR
python train.py --config configs/ballet/hcam.py:runlocal --workdir $WORKDIR

Args (``:key=value,...``): ``dancers`` (N, 1..8) and ``delay`` (rest frames after each dance; unset: the
hard level 8 / 48, or 2 / 16 with ``runlocal``), ``chunk`` (C), ``top_k`` (k), ``recon`` (weight of the auxiliary
frame-reconstruction loss, spec §7; default 0 = off, as the spec makes it optional and gives no weight), ``sg``
(stop gradients into the memory, the reference's behaviour; ``sg=0`` lets them flow), ``steps``,
``lr``, ``batch`` (0 for each: the default), ``runlocal`` (a short CPU run).

Measured on one H200 (batch 64, lr 1e-3, in-memory episodes of the same generator): 2 dancers / delay 16 reached
0.95 test accuracy after 500 steps (0.98 after 800; chance 0.5); 8 / 48 was at 0.28 / 0.37 / 0.43 after
500 / 1000 / 1450 steps (chance 0.125; the windowed transformer stayed at 0.12-0.14), ~7 s per 100 steps.
On 2 CPU cores at 2 / 16, ``sg=0`` left the chance plateau about 100 steps sooner than the default on two seeds.
8 / 48 reached 0.9125 / 0.9675 / 0.9655 at ``top_k=8`` (seeds 0 / 1 / 2) with no step at 8 / 48: ``sg=0``
throughout, 2 / 16 for 500-600 steps, then 8 / 16 with ``top_k=16`` (every chunk) for 300 steps at lr 1e-3 and
then 300-step stages at 3e-4 (one for seed 0, three for seed 1, four for seed 2), each stage started with
``--config.init_from`` from the one before (README, Results, with the commands).
"""

from __future__ import annotations

import ml_collections as mlc

from configs import common as cc
import configs.ballet as bc


def get_config(arg: str | None = None) -> mlc.ConfigDict:
  """Returns the ballet HCAM config.

  Args:
    arg: see the module docstring.

  Returns:
    The experiment ConfigDict.
  """
  arg = cc.parse_arg(arg, dancers=0, delay=-1, chunk=16, top_k=4, recon=0.0, sg=True, steps=0, lr=0.0, batch=0,
                     runlocal=False)
  c = bc.base_config(arg)
  c.model.mixers = ("hcam",) * 4  # the paper's agent: "a 4-layer memory with an HCAM block in each layer"
  # The local window defaults to C (spec §6: >= C covers the unfinished chunk). C = 16 holds one aligned dance;
  # max_chunks = 64 keeps every chunk of the longest level (513 frames / 16 = 32), so nothing is evicted.
  c.model.mixer_options = (("hcam", (("chunk_size", arg.chunk), ("max_chunks", 64), ("top_k", arg.top_k),
                                     ("stop_gradient_memory", arg.sg))),)
  # A linear head reconstructs every input frame from the top layer (logged as recon_loss); off by default.
  c.model.recon_weight = arg.recon
  return c
