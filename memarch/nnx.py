"""NNX facade over the linen layers (``flax.nnx.bridge.ToNNX``).

memarch layers are linen over a pure-JAX core (CONVENTIONS.md, "linen or nnx?"). NNX users get the same layers,
parameters and logical partition names through these factories::

    from flax import nnx
    from memarch import nnx as mnnx
    attn = mnnx.MultiHeadAttention(x, num_heads=4, rngs=nnx.Rngs(0))   # initialised from the sample input x
    y, state = attn(x)                                                    # same protocol as the linen module

Each factory builds the linen module from its keyword fields and initialises it on the sample inputs (under
``nnx.jit`` when they are all arrays).
Parameters keep their logical names (``out_sharding``); variables are created unsharded (outside a mesh), so the
facade works on one CPU and is sharded like any NNX model under a mesh and ``nn.logical_axis_rules``.
"""

from __future__ import annotations

from typing import Any

import flax
import flax.linen as nn
import jax
import numpy as np
from flax import nnx
from flax.nnx import bridge

from memarch.layers import attention as _attention
from memarch.layers import bmojo as _bmojo
from memarch.layers import common as _common
from memarch.layers import hcam as _hcam
from memarch.layers import mamba2 as _mamba2
from memarch.layers import titans as _titans
from memarch.models import lm as _lm


def to_nnx(module: nn.Module, *sample_args: Any, rngs: nnx.Rngs, **sample_kwargs: Any) -> bridge.ToNNX:
  """Wraps a linen ``module`` as an NNX module initialised on ``sample_args`` / ``sample_kwargs``.

  Args:
    module: an unbound linen module.
    *sample_args: positional inputs used to create the parameters.
    rngs: NNX random streams (``params`` is used for initialisation).
    **sample_kwargs: keyword inputs used to create the parameters.

  Returns:
    An NNX module whose call has the linen module's signature and outputs.
  """
  # NNX would eagerly shard variables that carry logical names and fail without a mesh; the names stay as
  # metadata either way, so create plain variables here.
  with flax.config.temp_flip_flag("always_shard_variable", False):
    facade = bridge.ToNNX(module, rngs=rngs)
    if all(isinstance(x, (jax.Array, np.ndarray)) for x in jax.tree.leaves((sample_args, sample_kwargs))):
      _jit_init(facade, sample_args, sample_kwargs)
    else:  # a Python flag or number among the inputs: initialise op by op
      facade.lazy_init(*sample_args, **sample_kwargs)
  return facade


@nnx.jit
def _jit_init(facade: bridge.ToNNX, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
  # One compiled initialisation instead of op-by-op dispatch (about 5x faster for a Titans block on CPU).
  facade.lazy_init(*args, **kwargs)


def linen_variables(module: bridge.ToNNX) -> dict[str, Any]:
  """The ``{"params": ...}`` variables of a facade, as plain arrays usable with the linen module's ``apply``."""
  return {"params": nnx.to_pure_dict(nnx.state(module, nnx.Param))}


def _factory(linen_cls: type[nn.Module]):
  def build(*sample_args: Any, rngs: nnx.Rngs, sample_kwargs: dict[str, Any] | None = None,
            **fields: Any) -> bridge.ToNNX:
    return to_nnx(linen_cls(**fields), *sample_args, rngs=rngs, **(sample_kwargs or {}))

  build.__name__ = linen_cls.__name__
  build.__qualname__ = linen_cls.__name__
  build.__doc__ = (f"NNX :class:`{linen_cls.__module__}.{linen_cls.__name__}` built from ``fields`` and "
                   "initialised on the sample inputs (``sample_kwargs`` are keyword inputs, e.g. segment_ids).")
  return build


RMSNorm = _factory(_common.RMSNorm)
SwiGLU = _factory(_common.SwiGLU)
CausalConv1D = _factory(_common.CausalConv1D)
MultiHeadAttention = _factory(_attention.MultiHeadAttention)
Mamba2 = _factory(_mamba2.Mamba2)
NeuralMemory = _factory(_titans.NeuralMemory)
TitansMAC = _factory(_titans.TitansMAC)
TitansMAG = _factory(_titans.TitansMAG)
TitansMAL = _factory(_titans.TitansMAL)
HCAMBlock = _factory(_hcam.HCAMBlock)
BMojoF = _factory(_bmojo.BMojoF)
BMojo = _factory(_bmojo.BMojo)
LM = _factory(_lm.Model)

PUBLIC_LAYERS = {
    "RMSNorm": (RMSNorm, _common.RMSNorm),
    "SwiGLU": (SwiGLU, _common.SwiGLU),
    "CausalConv1D": (CausalConv1D, _common.CausalConv1D),
    "MultiHeadAttention": (MultiHeadAttention, _attention.MultiHeadAttention),
    "Mamba2": (Mamba2, _mamba2.Mamba2),
    "NeuralMemory": (NeuralMemory, _titans.NeuralMemory),
    "TitansMAC": (TitansMAC, _titans.TitansMAC),
    "TitansMAG": (TitansMAG, _titans.TitansMAG),
    "TitansMAL": (TitansMAL, _titans.TitansMAL),
    "HCAMBlock": (HCAMBlock, _hcam.HCAMBlock),
    "BMojoF": (BMojoF, _bmojo.BMojoF),
    "BMojo": (BMojo, _bmojo.BMojo),
    "LM": (LM, _lm.Model),
}
