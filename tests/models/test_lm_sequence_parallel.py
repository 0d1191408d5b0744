"""Sequence parallelism through the LM (spec bmojo.md §5.5): a mesh with a `sequence` axis under the default rules
splits Mamba-2 / B'MOJO over it, and the model equals the unsharded one (logits and gradients)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from memarch import sharding
from memarch.layers.common import resolve_sequence_axis
from memarch.models.lm import Model

V, B, T = 31, 2, 16
MODEL = dict(vocab_size=V, variant=None, d_model=16, num_layers=2, num_heads=2, mlp="none", window=2,
             mixers=("mamba2", "bmojo"),
             mixer_options=(("mamba2", (("chunk_size", 4), ("d_state", 8), ("head_dim", 8))),
                            ("bmojo", (("chunk_size", 2), ("d_state", 8), ("k_sel", 1), ("memory_size", 2),
                                       ("ssm_chunk_size", 4), ("ssm_head_dim", 8)))))


@pytest.mark.slow  # compiles an 8-device LM gradient twice: ~1-2 minutes on 2 cores
def test_default_rules_split_mamba2_and_bmojo_over_a_sequence_axis():
  # Given an LM with a Mamba-2 and a B'MOJO layer, and packed documents crossing the shard boundaries
  model = Model(**MODEL)
  tokens = jax.random.randint(jax.random.key(0), (B, T), 0, V)
  seg = jnp.asarray(np.array([[1] * T, [1] * 3 + [2] * 7 + [3] * 6]))
  params = jax.jit(model.init)(jax.random.key(1), tokens)["params"]

  def loss(p):
    logits, _ = model.apply({"params": p}, tokens, segment_ids=seg)
    return jnp.mean(jax.nn.log_softmax(logits)[..., 0]), logits

  grad = jax.value_and_grad(loss, has_aux=True)
  (ref_loss, ref_logits), ref_grads = jax.jit(grad)(params)
  # When the same model runs on a (data 2, sequence 4) mesh with the default logical rules
  mesh = sharding.make_mesh([("data", 2), ("sequence", 4)])
  rules = sharding.rules_for_mesh(sharding.DEFAULT_RULES, mesh)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    assert resolve_sequence_axis(None) == "sequence"
    assert "shard_map" in str(jax.make_jaxpr(grad)(params))  # the sequence-parallel path is the one taken
    (sp_loss, sp_logits), sp_grads = jax.jit(grad)(params)
  # Then logits, loss and every gradient equal the unsharded run
  np.testing.assert_allclose(sp_logits, ref_logits, atol=2e-5, rtol=1e-5)
  np.testing.assert_allclose(sp_loss, ref_loss, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=2e-6, rtol=1e-4), nn.meta.unbox(sp_grads),
               nn.meta.unbox(ref_grads))
  # And without a sequence axis (or with one of size 1) nothing is split
  with jax.set_mesh(sharding.make_mesh([("data", 8)])), nn.logical_axis_rules(rules):
    assert resolve_sequence_axis(None) is None
  with pytest.raises(ValueError, match="act_len"):
    with jax.set_mesh(mesh), nn.logical_axis_rules((("act_len", ("data", "sequence")),)):
      resolve_sequence_axis(None)
