"""Per-token scores for B'MOJO's ``innovation="external"`` (spec bmojo.md §4.1) through the LM and the train step."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from memarch.models.lm import Model
from memarch.training import step as step_lib
from memarch.training import validate
from tests.training import helpers_training

V, B, T = 29, 2, 14
OPTS = (("bmojo", (("chunk_size", 3), ("d_state", 8), ("innovation", "external"), ("k_sel", 1),
                   ("memory_size", 3), ("ssm_chunk_size", 4), ("ssm_head_dim", 8), ("window", 2))),)


def _model(**kw):
  return Model(vocab_size=V, variant=None, d_model=16, num_layers=1, num_heads=2, mixers=("bmojo",), mlp="none",
               mixer_options=OPTS, **kw)


@pytest.mark.slow  # token-by-token LM compiles; the train-step test below covers the model path by default
def test_lm_passes_token_scores_to_the_store_full_equals_steps():
  # Given an LM whose B'MOJO keeps the tokens its caller scores highest
  model = _model()
  tokens = jax.random.randint(jax.random.key(0), (B, T), 0, V)
  scores = jax.random.uniform(jax.random.key(1), (B, T))
  novelty = Model(vocab_size=V, variant=None, d_model=16, num_layers=1, num_heads=2, mixers=("bmojo",), mlp="none",
                  mixer_options=(("bmojo", dict(OPTS[0][1]) | {"innovation": "key_novelty"}),))
  assert 0 < model.flops_per_token(T) < novelty.flops_per_token(T)  # the cosines cost, the caller's scores do not
  assert model.reads_token_scores and not Model(vocab_size=V, variant=None, d_model=16, num_layers=1, num_heads=2,
                                                  mixers=("bmojo",), window=2).reads_token_scores
  variables = jax.jit(model.init)(jax.random.key(2), tokens, token_scores=scores)
  apply = jax.jit(model.apply)
  # When run whole and token by token with carried states
  logits, _ = apply(variables, tokens, token_scores=scores)
  states, steps = model.init_state(B), []
  for t in range(T):
    out, states = apply(variables, tokens[:, t:t + 1], states=states, token_scores=scores[:, t:t + 1])
    steps.append(out)
  np.testing.assert_allclose(jnp.concatenate(steps, 1), logits, atol=1e-5, rtol=1e-5)
  # Then other scores store other tokens: the first chunk's entry is read from position 3 + W - 1 on at the latest
  flipped, _ = apply(variables, tokens, token_scores=-scores)
  np.testing.assert_allclose(flipped[:, :3], logits[:, :3], atol=1e-6)
  assert np.abs(np.asarray(flipped - logits)).max() > 1e-4
  # And a missing or misshapen score array is named
  with pytest.raises(ValueError, match="token_scores"):
    model.apply(variables, tokens)
  with pytest.raises(ValueError, match=r"token_scores must be \[b, t\]"):
    model.apply(variables, tokens, token_scores=scores[:, :3])


def test_train_step_reads_token_scores_from_the_batch_and_validate_names_the_option(tmp_path):
  model = _model()
  rng = np.random.default_rng(0)
  batch = {"inputs": jnp.asarray(rng.integers(0, V, (B, T)), jnp.int32),
           "targets": jnp.asarray(rng.integers(0, V, (B, T)), jnp.int32),
           "segment_ids": jnp.ones((B, T), jnp.int32), "positions": jnp.broadcast_to(jnp.arange(T), (B, T)),
           "token_scores": jnp.asarray(rng.random((B, T)), jnp.float32)}
  params = jax.jit(model.init)(jax.random.key(0), batch["inputs"], token_scores=batch["token_scores"])["params"]
  tx = optax.sgd(0.1)
  state = {"params": params, "opt": tx.init(params), "step": jnp.zeros((), jnp.int32),
           "rng": jax.random.key_data(jax.random.key(0))}
  run = jax.jit(lambda s, b: step_lib.train_step(s, b, model=model, tx=tx, schedule=lambda _: 0.1)[1]["loss"])
  loss = run(state, batch)
  loss_flipped = run(state, {**batch, "token_scores": -batch["token_scores"]})
  assert np.isfinite(loss) and abs(float(loss) - float(loss_flipped)) > 1e-6
  # No built-in task provides token_scores, so train.py's validation rejects the option by name.
  config = helpers_training.tiny_config(str(tmp_path))
  config.model.update(mixers=("bmojo", "bmojo"), mixer_options=OPTS)
  with pytest.raises(ValueError, match="innovation='external' needs per-token token_scores"):
    validate.validate(config)
