"""The NNX facade gives the linen layers' outputs and logical partition names."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from memarch import nnx as mnnx

X = jax.random.normal(jax.random.key(0), (2, 5, 16))
TOKENS = jnp.arange(10, dtype=jnp.int32).reshape(2, 5)
CASES = {
    "RMSNorm": (dict(), (X,)),
    "SwiGLU": (dict(hidden=32), (X,)),
    "CausalConv1D": (dict(width=3), (X,)),
    "MultiHeadAttention": (dict(num_heads=2, window=3, num_persistent=2), (X,)),
    "Mamba2": (dict(d_model=16, d_state=8, head_dim=8, chunk_size=4), (X,)),
    "NeuralMemory": (dict(num_heads=2, chunk_size=1, d_model=16), (X,)),
    "TitansMAC": (dict(num_heads=2, segment_len=2, num_persistent=2, d_model=16, memory_options=(("chunk_size", 2),)), (X,)),
    "TitansMAG": (dict(num_heads=2, window=3, num_persistent=2, d_model=16), (X,)),
    "TitansMAL": (dict(num_heads=2, window=3, d_model=16), (X,)),
    "HCAMBlock": (dict(num_heads=2, chunk_size=2, top_k=2, max_chunks=4, d_model=16), (X,)),
    "BMojoF": (dict(num_heads=2, window=2, d_model=16, d_state=8, ssm_head_dim=8, ssm_chunk_size=4), (X,)),
    "BMojo": (dict(num_heads=2, window=2, k_sel=1, memory_size=2, d_model=16, d_state=8, ssm_head_dim=8,
                   ssm_chunk_size=4), (X,)),
    "LM": (dict(vocab_size=11, variant="tiny", mixers=("attention", "sliding_window"), window=2, max_len=16),
           (TOKENS,)),
}


@pytest.mark.parametrize("name", sorted(mnnx.PUBLIC_LAYERS))
def test_nnx_facade_matches_linen(name):
  factory, linen_cls = mnnx.PUBLIC_LAYERS[name]
  fields, args = CASES[name]
  module = factory(*args, rngs=nnx.Rngs(0), **fields)
  out_nnx = nnx.jit(lambda m, a: m(*a))(module, args)
  variables = mnnx.linen_variables(module)
  out_linen = jax.jit(linen_cls(**fields).apply)(variables, *args)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6), out_nnx, out_linen)
  # Same logical partition names as the linen module's own initialisation.
  linen_specs = nn.get_partition_spec(jax.eval_shape(lambda: linen_cls(**fields).init(jax.random.key(0), *args)))
  linen_specs = linen_specs["params"]
  nnx_names = nnx.to_pure_dict(jax.tree.map(lambda v: v.get_metadata().get("out_sharding"),
                                            nnx.state(module, nnx.Param),
                                            is_leaf=lambda v: isinstance(v, nnx.Variable)))
  flat_linen = jax.tree_util.tree_leaves_with_path(linen_specs)
  flat_nnx = dict(jax.tree_util.tree_leaves_with_path(nnx_names, is_leaf=lambda v: isinstance(v, tuple)))
  assert flat_linen
  for path, spec in flat_linen:
    assert tuple(flat_nnx[path]) == tuple(spec), path
