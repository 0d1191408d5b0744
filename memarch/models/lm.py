"""Decoder-only language model that composes a per-layer list of sequence mixers.

``Model(vocab_size=..., variant="tiny", mixers=("attention", "sliding_window"))`` builds::

    tokens -> embed -> [ x + mixer_i(RMSNorm(x)) ; x + MLP_i(RMSNorm(x)) ] for each layer i -> RMSNorm -> logits

Mixers are looked up by name in :mod:`memarch.models.mixers`, so memory architectures plug in without touching this
file. The model follows the layer protocol one level up: ``(logits, states) = model(tokens, states=...)`` where
``states`` maps ``"block_i"`` to that block's mixer state, and :func:`generate` streams tokens by carrying them.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from memarch.layers.common import DType, RMSNorm, SwiGLU, as_dtype
from memarch.models import mixers as mixer_registry
from memarch.typing import Array

States = dict[str, Any]

# Size presets (vocabulary excluded: the task decides it). mlp_hidden None -> 8/3 d rounded up to 64.
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(d_model=64, num_layers=2, num_heads=2, max_len=2048),
    "small": dict(d_model=256, num_layers=4, num_heads=4, max_len=2048),
    "125M": dict(d_model=768, num_layers=12, num_heads=12, max_len=2048),
    "350M": dict(d_model=1024, num_layers=24, num_heads=16, max_len=2048),
}


@dataclasses.dataclass(frozen=True)
class LMConfig:
  """Typed configuration of :class:`Model` (see :meth:`from_preset`).

  Attributes:
    vocab_size: number of token ids.
    d_model: residual width.
    num_layers: number of blocks.
    num_heads: attention heads.
    num_kv_heads: key/value heads (None: num_heads).
    head_dim: per-head width (None: d_model // num_heads).
    mixers: mixer name per layer (registered in :mod:`memarch.models.mixers`).
    mlp: ``"swiglu"`` or ``"none"`` (mixer-only blocks, as in zoology's MQAR models).
    mlp_hidden: SwiGLU hidden width (None: 8/3 d_model rounded up to a multiple of 64).
    window: sliding-window length used by windowed mixers.
    num_persistent: persistent-memory vectors per attention layer (Titans eq. 19).
    max_len: KV-cache slots of full attention (longest prefill + decode).
    attention_conv_width: short causal convolution before attention's q/k/v projections (0: none).
    rope_max_wavelength: RoPE base.
    tie_embeddings: share the embedding with the output head.
    embed_init_std: standard deviation of the embedding initialiser.
    dtype: activation dtype (None: float32), e.g. ``"bfloat16"``.
    param_dtype: parameter dtype.
    state_dtype: recurrent / cache state dtype (float32 by default, CONVENTIONS.md C2).
    remat: rematerialise each block in the backward pass.
    mixer_options: per-mixer-name keyword options for mixers that need more than these fields, as
      ``((mixer_name, ((key, value), ...)), ...)`` (hashable); read by the mixer's builder.
  """
  vocab_size: int
  d_model: int = 64
  num_layers: int = 2
  num_heads: int = 2
  num_kv_heads: int | None = None
  head_dim: int | None = None
  mixers: tuple[str, ...] = ()
  mlp: str = "swiglu"
  mlp_hidden: int | None = None
  window: int | None = None
  num_persistent: int = 0
  max_len: int = 2048
  attention_conv_width: int = 0
  rope_max_wavelength: float = 10_000.0
  tie_embeddings: bool = True
  embed_init_std: float = 0.02
  dtype: str | None = None
  param_dtype: str = "float32"
  state_dtype: str = "float32"
  remat: bool = False
  mixer_options: tuple[tuple[str, tuple[tuple[str, Any], ...]], ...] = ()

  def __post_init__(self):
    if not self.mixers:
      object.__setattr__(self, "mixers", ("attention",) * self.num_layers)
    object.__setattr__(self, "mixers", tuple(self.mixers))
    if len(self.mixers) != self.num_layers:
      raise ValueError(f"model.mixers has {len(self.mixers)} entries but model.num_layers={self.num_layers}")
    if self.head_dim is None:
      if self.d_model % self.num_heads:
        raise ValueError(f"model.num_heads={self.num_heads} does not divide model.d_model={self.d_model}")
      object.__setattr__(self, "head_dim", self.d_model // self.num_heads)
    if self.mlp not in ("swiglu", "none"):
      raise ValueError(f"model.mlp={self.mlp!r}: expected 'swiglu' or 'none'")
    if self.mlp_hidden is None:
      object.__setattr__(self, "mlp_hidden", -(-8 * self.d_model // 3 // 64) * 64)
    if self.vocab_size < 1:
      raise ValueError(f"model.vocab_size={self.vocab_size} must be positive")
    for name in self.mixers:
      mixer_registry.get_mixer_spec(name)

  @classmethod
  def from_preset(cls, variant: str | None, **overrides) -> "LMConfig":
    """A preset (``tiny``, ``small``, ``125M``, ``350M``; None: no preset) with ``overrides`` on top.

    Overrides set to None are ignored. Giving ``mixers`` without ``num_layers`` sets ``num_layers`` to its length.
    """
    fields = {}
    if variant is not None:
      if variant not in PRESETS:
        raise ValueError(f"model.variant: unknown preset {variant!r}; known: {sorted(PRESETS)}")
      fields.update(PRESETS[variant])
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if "mixers" in overrides:
      overrides["mixers"] = tuple(overrides["mixers"])
      overrides.setdefault("num_layers", len(overrides["mixers"]))
    if "mixer_options" in overrides and isinstance(overrides["mixer_options"], dict):
      overrides["mixer_options"] = tuple(
          (k, tuple(sorted(dict(v).items()))) for k, v in sorted(overrides["mixer_options"].items()))
    fields.update(overrides)
    return cls(**fields)

  def options(self, mixer_name: str) -> dict[str, Any]:
    """Keyword options given for ``mixer_name`` in ``mixer_options``."""
    return dict(dict(self.mixer_options).get(mixer_name, ()))


class Block(nn.Module):
  """Pre-norm residual block: ``x + mixer(norm(x))`` then ``x + mlp(norm(x))``.

  Attributes:
    config: the LM config.
    index: layer index (selects ``config.mixers[index]``).
  """
  config: LMConfig
  index: int

  def setup(self):
    cfg = self.config
    self.mixer_norm = RMSNorm(dtype=cfg.dtype)
    self.mixer = mixer_registry.get_mixer_spec(cfg.mixers[self.index]).build(cfg, self.index)
    if cfg.mlp == "swiglu":
      self.mlp_norm = RMSNorm(dtype=cfg.dtype)
      self.mlp = SwiGLU(cfg.mlp_hidden, dtype=cfg.dtype)

  def __call__(self, x: Array, segment_ids: Array | None, state: Any) -> tuple[Array, Any]:
    """Applies the block; returns the new residual stream and the mixer's new state."""
    y, state = self.mixer(self.mixer_norm(x), segment_ids=segment_ids, state=state)
    x = x + y
    if self.config.mlp == "swiglu":
      x = x + self.mlp(self.mlp_norm(x))
    return nn.with_logical_constraint(x, ("act_batch", "act_len", "act_emb")), state


class Model(nn.Module):
  """Decoder LM over a per-layer list of mixers; ``model(tokens) -> (logits, states)``.

  Every field but ``vocab_size`` overrides the ``variant`` preset when set; see :class:`LMConfig` for their meaning.

  Attributes:
    vocab_size: number of token ids.
    variant: size preset: ``tiny``, ``small``, ``125M``, ``350M`` (None: only the given fields).
    d_model: residual width.
    num_layers: number of blocks.
    num_heads: attention heads.
    num_kv_heads: key/value heads.
    head_dim: per-head width.
    mixers: mixer name per layer.
    mlp: ``"swiglu"`` or ``"none"``.
    mlp_hidden: SwiGLU hidden width.
    window: sliding-window length of windowed mixers.
    num_persistent: persistent-memory vectors per attention layer.
    max_len: KV-cache slots of full attention.
    attention_conv_width: short convolution before attention's projections (0: none).
    rope_max_wavelength: RoPE base.
    tie_embeddings: share embedding and output head.
    embed_init_std: embedding initialiser standard deviation.
    dtype: activation dtype, e.g. ``"bfloat16"``.
    param_dtype: parameter dtype.
    state_dtype: recurrent state dtype.
    remat: rematerialise each block in the backward pass.
    mixer_options: per-mixer options (dict or hashable tuple form).
  """
  vocab_size: int
  variant: str | None = "tiny"
  d_model: int | None = None
  num_layers: int | None = None
  num_heads: int | None = None
  num_kv_heads: int | None = None
  head_dim: int | None = None
  mixers: Sequence[str] | None = None
  mlp: str | None = None
  mlp_hidden: int | None = None
  window: int | None = None
  num_persistent: int | None = None
  max_len: int | None = None
  attention_conv_width: int | None = None
  rope_max_wavelength: float | None = None
  tie_embeddings: bool | None = None
  embed_init_std: float | None = None
  dtype: DType = None
  param_dtype: DType = None
  state_dtype: DType = None
  remat: bool | None = None
  mixer_options: Any = None

  @property
  def config(self) -> LMConfig:
    """The resolved :class:`LMConfig` (preset + overrides)."""
    overrides = {f.name: getattr(self, f.name) for f in dataclasses.fields(LMConfig)}
    for key in ("dtype", "param_dtype", "state_dtype"):
      if overrides[key] is not None:
        overrides[key] = jnp.dtype(overrides[key]).name
    return LMConfig.from_preset(self.variant, **overrides)

  def setup(self):
    cfg = self.config
    self.embed = self.param(
        "embedding", nn.with_logical_partitioning(nn.initializers.normal(cfg.embed_init_std), ("vocab", "embed")),
        (cfg.vocab_size, cfg.d_model), as_dtype(cfg.param_dtype))
    if not cfg.tie_embeddings:
      self.head = self.param(
          "head", nn.with_logical_partitioning(nn.initializers.normal(cfg.d_model ** -0.5), ("embed", "vocab")),
          (cfg.d_model, cfg.vocab_size), as_dtype(cfg.param_dtype))
    block = nn.remat(Block, prevent_cse=True) if cfg.remat else Block
    self.blocks = [block(cfg, i, name=f"block_{i}") for i in range(cfg.num_layers)]
    self.final_norm = RMSNorm(dtype=cfg.dtype)

  def __call__(self, tokens: Array, *, segment_ids: Array | None = None,
               states: States | None = None) -> tuple[Array, States]:
    """Runs the LM over ``tokens`` from ``states``.

    Args:
      tokens: [b, t] int token ids.
      segment_ids: [b, t] document ids of packed rows (None: one document per row).
      states: per-block mixer states from a previous call (None: start of sequence).

    Returns:
      ``(logits, new_states)``: float32 logits [b, t, vocab] and the states after the last token.
    """
    cfg = self.config
    dtype = as_dtype(cfg.dtype) or jnp.float32
    x = jnp.take(self.embed, tokens, axis=0).astype(dtype)
    x = nn.with_logical_constraint(x, ("act_batch", "act_len", "act_emb"))
    new_states = {}
    for i, block in enumerate(self.blocks):
      key = f"block_{i}"
      x, new_states[key] = block(x, segment_ids, None if states is None else states[key])
    x = self.final_norm(x)
    head = self.embed.T if cfg.tie_embeddings else self.head
    logits = jnp.einsum("btd,dv->btv", x, head.astype(dtype), preferred_element_type=jnp.float32)
    return logits, new_states

  def init_state(self, batch_size: int) -> States:
    """Per-block mixer states before the first token; works on an unbound module."""
    cfg = self.config
    states = {}
    for i, name in enumerate(cfg.mixers):
      mixer = mixer_registry.get_mixer_spec(name).build(cfg, i, parent=None)
      states[f"block_{i}"] = mixer.init_state(batch_size)
    return states

  def state_size(self) -> int:
    """Floats of recurrent state per sequence, summed over blocks."""
    cfg = self.config
    return sum(mixer_registry.get_mixer_spec(n).build(cfg, i, parent=None).state_size() for i, n in enumerate(cfg.mixers))

  def param_count(self) -> int:
    """Number of parameters, from shapes only (``jax.eval_shape``)."""
    shapes = jax.eval_shape(lambda: self.init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32)))
    boxed = lambda x: isinstance(x, nn.meta.AxisMetadata)
    # Unbox without sharding constraints, so this also works inside a mesh / logical-rules context.
    leaves = [x.unbox(apply_constraint=False) if boxed(x) else x
              for x in jax.tree.leaves(shapes["params"], is_leaf=boxed)]
    return int(sum(np.prod(x.shape) for x in leaves))

  def flops_per_token(self, seq_len: int) -> float:
    """Training (forward + backward) FLOPs per token at ``seq_len``.

    ``6 x`` the parameters used in matmuls (the embedding lookup is free; a tied embedding counts once, as the
    head) plus each mixer's extra work (attention scores over the causally visible keys).
    """
    cfg = self.config
    matmul_params = self.param_count() - (0 if cfg.tie_embeddings else cfg.vocab_size * cfg.d_model)
    extra = 0.0
    for name in cfg.mixers:
      spec = mixer_registry.get_mixer_spec(name)
      if spec.extra_flops is not None:
        extra += spec.extra_flops(cfg, seq_len)
    return 6.0 * matmul_params + extra

  def validate(self, seq_len: int) -> None:
    """Raises ``ValueError`` naming the field if ``seq_len`` cannot be run (e.g. longer than a KV cache)."""
    cfg = self.config
    if seq_len < 1:
      raise ValueError(f"input.seq_len={seq_len} must be positive")
    for name in cfg.mixers:
      spec = mixer_registry.get_mixer_spec(name)
      if spec.validate is not None:
        spec.validate(cfg, seq_len)


def generate(model: Model, variables: Any, prompt: Array, max_new_tokens: int, *, rng: jax.Array | None = None,
             temperature: float = 0.0, states: States | None = None) -> Array:
  """Streams ``max_new_tokens`` tokens after ``prompt`` by carrying the mixer states (prefill, then decode steps).

  Args:
    model: the LM.
    variables: its variables (``{"params": ...}``).
    prompt: [b, t0] int prompt tokens (t0 >= 1).
    max_new_tokens: tokens to generate (>= 1).
    rng: sampling key (required when ``temperature > 0``).
    temperature: 0 for greedy decoding, else softmax temperature.
    states: states to continue from (None: a fresh start).

  Returns:
    [b, max_new_tokens] int32 generated tokens.
  """
  cfg = model.config
  t0 = prompt.shape[1]
  if max_new_tokens < 1:
    raise ValueError(f"generate: max_new_tokens={max_new_tokens} must be >= 1")
  if "attention" in cfg.mixers and t0 + max_new_tokens > cfg.max_len:
    raise ValueError(f"generate: prompt ({t0}) + max_new_tokens ({max_new_tokens}) exceed model.max_len="
                     f"{cfg.max_len}, the KV cache of full attention")
  if temperature > 0 and rng is None:
    raise ValueError("generate: sampling with temperature > 0 needs rng")
  rng = jax.random.key(0) if rng is None else rng
  return _generate(model, variables, prompt, states, rng, max_new_tokens, float(temperature))


@functools.partial(jax.jit, static_argnums=(0, 5, 6))
def _generate(model, variables, prompt, states, rng, max_new_tokens, temperature):
  def pick(logits, key):
    if temperature == 0:
      return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return jax.random.categorical(key, logits / temperature, axis=-1).astype(jnp.int32)

  states = model.init_state(prompt.shape[0]) if states is None else states
  logits, states = model.apply(variables, prompt, states=states)  # prefill: the chunked/parallel form
  rng, key = jax.random.split(rng)
  first = pick(logits[:, -1], key)

  def step(carry, key):  # decode: the t == 1 step form
    token, states = carry
    logits, states = model.apply(variables, token[:, None], states=states)
    return (pick(logits[:, -1], key), states), token

  (last, _), tokens = jax.lax.scan(step, (first, states), jax.random.split(rng, max_new_tokens - 1))
  return jnp.concatenate([tokens.T, last[:, None]], axis=1)
