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
from memarch.layers.memory import HierarchicalMemoryFFN, ProductKeyMemory
from memarch.models import mixers as mixer_registry
from memarch.typing import Array

States = dict[str, Any]

# Keyword options accepted in ``memory_options`` (HierarchicalMemoryFFN) and ``pkm_options`` (ProductKeyMemory).
MEMORY_OPTION_DEFAULTS: dict[str, Any] = dict(ranks=(64, 32), branching=16, use_generic=True,
                                              w_init_variance_scale=1.0)
PKM_OPTION_DEFAULTS: dict[str, Any] = dict(n_keys=128, heads=4, knn=16, k_dim=64, v_dim=None, gated=True,
                                           qk_norm=False)


def _options_tuple(value: Any) -> tuple[tuple[str, Any], ...]:
  """A dict / pairs of options as a sorted hashable tuple (list values become tuples)."""
  items = dict(value or ()).items()
  return tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in items))

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
    vocab_size: number of token ids (with ``input_features``: the number of output classes).
    input_features: None: the inputs are token ids, embedded by a lookup. F: the inputs are float [b, t, F]
      feature vectors, embedded by a linear map F -> d_model (with bias); the output head is then always untied
      (there is no token embedding to tie it to): ``tie_embeddings`` defaults to False and True is an error.
    d_model: residual width.
    num_layers: number of blocks.
    num_heads: attention heads.
    num_kv_heads: key/value heads (None: num_heads).
    head_dim: per-head width (None: d_model // num_heads).
    mixers: mixer name per layer (registered in :mod:`memarch.models.mixers`).
    mlp: ``"swiglu"``, ``"hmem"`` (the SwiGLU plus a hierarchical FFN-memory bank fetched on the sequence's tree
      route, :class:`memarch.layers.memory.HierarchicalMemoryFFN`, spec hmem.md §1.3; the model then needs
      ``route``) or ``"none"`` (mixer-only blocks, as in zoology's MQAR models).
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
    memory_options: with ``mlp="hmem"``: ``((key, value), ...)`` options of the memory FFN, keys ``ranks``
      (units per level, e.g. ``(64, 32)``), ``branching``, ``use_generic``, ``w_init_variance_scale``.
    memory_layers: with ``mlp="hmem"``: the layers whose FFN has the memory (None: all; others keep the SwiGLU).
    pkm_layers: layers with a :class:`memarch.layers.memory.ProductKeyMemory` in parallel with the FFN:
      ``x + mlp(norm(x)) + pkm(norm(x))`` (Memory Layers at scale).
    pkm_options: ``((key, value), ...)`` options of the PKM: ``n_keys``, ``heads``, ``knn``, ``k_dim``, ``v_dim``,
      ``gated``, ``qk_norm``.
    recon_weight: weight of the auxiliary reconstruction loss (spec hcam.md §7; needs ``input_features``): a
      linear head ``recon_head`` maps the top layer's normed output back to each input frame, the model sows the
      reconstructions as ``("aux", "reconstruction")`` and the train step adds ``recon_weight`` times their mean
      squared error. 0 (default): no head, no term.
  """
  vocab_size: int
  input_features: int | None = None
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
  memory_options: tuple[tuple[str, Any], ...] = ()
  memory_layers: tuple[int, ...] | None = None
  pkm_layers: tuple[int, ...] = ()
  pkm_options: tuple[tuple[str, Any], ...] = ()
  recon_weight: float = 0.0

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
    if self.mlp not in ("swiglu", "hmem", "none"):
      raise ValueError(f"model.mlp={self.mlp!r}: expected 'swiglu', 'hmem' or 'none'")
    for field, defaults in (("memory_options", MEMORY_OPTION_DEFAULTS), ("pkm_options", PKM_OPTION_DEFAULTS)):
      opts = _options_tuple(getattr(self, field))
      object.__setattr__(self, field, opts)
      unknown = sorted(k for k, _ in opts if k not in defaults)
      if unknown:
        raise ValueError(f"model.{field}: unknown keys {unknown}; known: {sorted(defaults)}")
    if self.memory_options and self.mlp != "hmem":
      raise ValueError(f"model.memory_options is set but model.mlp={self.mlp!r} (use mlp='hmem')")
    for field in ("memory_layers", "pkm_layers"):
      layers = getattr(self, field)
      if layers is None:
        continue
      layers = tuple(int(i) for i in layers)
      object.__setattr__(self, field, layers)
      bad = [i for i in layers if not 0 <= i < self.num_layers]
      if bad:
        raise ValueError(f"model.{field}: layers {bad} outside [0, num_layers={self.num_layers})")
    ranks = self.memory()["ranks"]
    if self.mlp == "hmem" and (not ranks or any(r < 0 for r in ranks) or sum(ranks) == 0):
      raise ValueError(f"model.memory_options: ranks={ranks} need non-negative units per level, positive sum")
    if self.mlp_hidden is None:
      object.__setattr__(self, "mlp_hidden", -(-8 * self.d_model // 3 // 64) * 64)
    if self.vocab_size < 1:
      raise ValueError(f"model.vocab_size={self.vocab_size} must be positive")
    if self.input_features is not None:
      if self.input_features < 1:
        raise ValueError(f"model.input_features={self.input_features} must be positive (or None for tokens)")
      if self.tie_embeddings:
        raise ValueError("model.tie_embeddings=True needs token inputs: with model.input_features the output head "
                         "is untied (leave tie_embeddings unset or set it False)")
    if not self.recon_weight >= 0:
      raise ValueError(f"model.recon_weight={self.recon_weight} must be >= 0")
    if self.recon_weight > 0 and self.input_features is None:
      raise ValueError(f"model.recon_weight={self.recon_weight} needs feature inputs (model.input_features): a token "
                       "model has no input frames to reconstruct")
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
    for field in ("memory_options", "pkm_options"):
      if field in overrides:
        overrides[field] = _options_tuple(overrides[field])
    for field in ("memory_layers", "pkm_layers"):
      if field in overrides:
        overrides[field] = tuple(overrides[field])
    if "mixer_options" in overrides and isinstance(overrides["mixer_options"], dict):
      overrides["mixer_options"] = tuple(
          (k, tuple(sorted(dict(v).items()))) for k, v in sorted(overrides["mixer_options"].items()))
    if overrides.get("input_features") is not None:
      fields.setdefault("tie_embeddings", False)  # feature inputs: no token embedding to tie the head to
    fields.update(overrides)
    return cls(**fields)

  def options(self, mixer_name: str) -> dict[str, Any]:
    """Keyword options given for ``mixer_name`` in ``mixer_options``."""
    return dict(dict(self.mixer_options).get(mixer_name, ()))

  def memory(self) -> dict[str, Any]:
    """The memory FFN's options: ``memory_options`` over :data:`MEMORY_OPTION_DEFAULTS`."""
    opts = {**MEMORY_OPTION_DEFAULTS, **dict(self.memory_options)}
    opts["ranks"] = tuple(int(r) for r in opts["ranks"])
    return opts

  def pkm(self) -> dict[str, Any]:
    """The PKM's options: ``pkm_options`` over :data:`PKM_OPTION_DEFAULTS`."""
    return {**PKM_OPTION_DEFAULTS, **dict(self.pkm_options)}

  def has_memory(self, index: int) -> bool:
    """Whether layer ``index``'s FFN is the hierarchical memory FFN."""
    return self.mlp == "hmem" and (self.memory_layers is None or index in self.memory_layers)

  @property
  def route_depth(self) -> int:
    """The route columns the memory reads (the number of levels in ``ranks``); 0 without ``mlp="hmem"``."""
    return len(self.memory()["ranks"]) if self.mlp == "hmem" else 0


class Block(nn.Module):
  """Pre-norm residual block: ``x + mixer(norm(x))`` then ``x + mlp(norm(x))`` (``+ pkm(norm(x))`` in PKM layers).

  The MLP is a SwiGLU, or with ``mlp="hmem"`` (in ``memory_layers``) a :class:`HierarchicalMemoryFFN` whose
  anchor SwiGLU is ``mlp/anchor`` and which adds the blocks fetched for ``route``.

  Attributes:
    config: the LM config.
    index: layer index (selects ``config.mixers[index]``).
  """
  config: LMConfig
  index: int

  def setup(self):
    cfg = self.config
    self.mixer_norm = RMSNorm(dtype=cfg.dtype)
    spec = mixer_registry.get_mixer_spec(cfg.mixers[self.index])
    self.mixer = spec.build(cfg, self.index)
    self.score_kwarg = spec.score_kwarg(cfg) if spec.score_kwarg else None
    self.use_pkm = self.index in cfg.pkm_layers
    if cfg.mlp != "none" or self.use_pkm:
      self.mlp_norm = RMSNorm(dtype=cfg.dtype)
    if cfg.has_memory(self.index):
      opts = cfg.memory()
      self.mlp = HierarchicalMemoryFFN(cfg.d_model, cfg.mlp_hidden, ranks=opts["ranks"], branching=opts["branching"],
                                       use_generic=opts["use_generic"],
                                       w_init_variance_scale=opts["w_init_variance_scale"], dtype=cfg.dtype,
                                       param_dtype=as_dtype(cfg.param_dtype))
    elif cfg.mlp != "none":
      self.mlp = SwiGLU(cfg.mlp_hidden, dtype=cfg.dtype)
    if self.use_pkm:
      self.pkm = ProductKeyMemory(cfg.d_model, **cfg.pkm(), dtype=cfg.dtype, param_dtype=as_dtype(cfg.param_dtype))

  def __call__(self, x: Array, segment_ids: Array | None, state: Any,
               route: Array | None = None, token_scores: Array | None = None) -> tuple[Array, Any]:
    """Applies the block; returns the new residual stream and the mixer's new state."""
    scores = {} if self.score_kwarg is None else {self.score_kwarg: token_scores}
    y, state = self.mixer(self.mixer_norm(x), segment_ids=segment_ids, state=state, **scores)
    x = x + y
    cfg = self.config
    if cfg.mlp != "none" or self.use_pkm:
      h = self.mlp_norm(x)
      out = 0.0
      if cfg.has_memory(self.index):
        out = self.mlp(h, route=route)
      elif cfg.mlp != "none":
        out = self.mlp(h)
      if self.use_pkm:
        out = out + self.pkm(h)
      x = x + out
    return nn.with_logical_constraint(x, ("act_batch", "act_len", "act_emb")), state


class Model(nn.Module):
  """Decoder LM over a per-layer list of mixers; ``model(tokens) -> (logits, states)``.

  Every field but ``vocab_size`` overrides the ``variant`` preset when set; see :class:`LMConfig` for their meaning.

  Attributes:
    vocab_size: number of token ids (output classes with ``input_features``).
    input_features: None for token inputs; F for float [b, t, F] feature inputs (linear embedding, untied head).
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
    memory_options: options of the ``mlp="hmem"`` memory FFN (dict or ``((key, value), ...)``).
    memory_layers: layers with the memory FFN (None: all).
    pkm_layers: layers with a product-key memory in parallel with the FFN.
    pkm_options: options of the PKM (dict or ``((key, value), ...)``).
    recon_weight: weight of the auxiliary frame-reconstruction loss (feature inputs only; 0: off).
  """
  vocab_size: int
  input_features: int | None = None
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
  memory_options: Any = None
  memory_layers: Sequence[int] | None = None
  pkm_layers: Sequence[int] | None = None
  pkm_options: Any = None
  recon_weight: float | None = None

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
    if cfg.input_features is None:
      self.embed = self.param(
          "embedding", nn.with_logical_partitioning(nn.initializers.normal(cfg.embed_init_std), ("vocab", "embed")),
          (cfg.vocab_size, cfg.d_model), as_dtype(cfg.param_dtype))
    else:  # feature inputs: a linear map with bias, fan-in scaled
      self.input_proj = self.param(
          "input_proj", nn.with_logical_partitioning(nn.initializers.lecun_normal(), (None, "embed")),
          (cfg.input_features, cfg.d_model), as_dtype(cfg.param_dtype))
      self.input_bias = self.param(
          "input_bias", nn.with_logical_partitioning(nn.initializers.zeros_init(), ("embed",)),
          (cfg.d_model,), as_dtype(cfg.param_dtype))
    if not cfg.tie_embeddings:
      self.head = self.param(
          "head", nn.with_logical_partitioning(nn.initializers.normal(cfg.d_model ** -0.5), ("embed", "vocab")),
          (cfg.d_model, cfg.vocab_size), as_dtype(cfg.param_dtype))
    if cfg.recon_weight > 0:  # the auxiliary reconstruction head (spec hcam.md §7)
      self.recon_head = self.param(
          "recon_head", nn.with_logical_partitioning(nn.initializers.normal(cfg.d_model ** -0.5), ("embed", None)),
          (cfg.d_model, cfg.input_features), as_dtype(cfg.param_dtype))
      self.recon_bias = self.param(
          "recon_bias", nn.with_logical_partitioning(nn.initializers.zeros_init(), (None,)),
          (cfg.input_features,), as_dtype(cfg.param_dtype))
    block = nn.remat(Block, prevent_cse=True) if cfg.remat else Block
    self.blocks = [block(cfg, i, name=f"block_{i}") for i in range(cfg.num_layers)]
    self.final_norm = RMSNorm(dtype=cfg.dtype)

  def __call__(self, tokens: Array, *, segment_ids: Array | None = None, states: States | None = None,
               route: Array | None = None, logit_positions: Array | None = None,
               token_scores: Array | None = None) -> tuple[Array, States]:
    """Runs the LM over ``tokens`` from ``states``.

    Args:
      tokens: [b, t] int token ids, or [b, t, F] float features when ``input_features = F``.
      segment_ids: [b, t] document ids of packed rows (None: one document per row).
      states: per-block mixer states from a previous call (None: start of sequence).
      route: with ``mlp="hmem"``: int32 [b, depth] per-level (nested) tree node ids of each row's path,
        ``depth >= len(ranks)``; a row of -1 selects the generic memory (see :mod:`memarch.ops.memory_bank`).
        Ignored otherwise.
      logit_positions: int32 [b, n]: compute the logits only at these positions of each row (gathered after the
        final norm, so the head costs n / t of the full one; spec bmojo.md §6.5). None: every position.
      token_scores: float [b, t] per-token scores for the mixers that read them (``bmojo`` with
        ``mixer_options["bmojo"]["innovation"] = "external"``: the store keeps the highest-scored tokens of each
        chunk, e.g. by surprisal); required by such a model, ignored by the others.

    Returns:
      ``(logits, new_states)``: float32 logits [b, t, vocab] ([b, n, vocab] with ``logit_positions``) and the
      states after the last token.
    """
    cfg = self.config
    dtype = as_dtype(cfg.dtype) or jnp.float32
    if cfg.input_features is None:
      if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
        raise ValueError(f"Model: expected int token ids [b, t], got {tokens.dtype}{list(tokens.shape)} (set "
                         "model.input_features for feature inputs)")
      x = jnp.take(self.embed, tokens, axis=0).astype(dtype)
    else:
      if tokens.ndim != 3 or tokens.shape[-1] != cfg.input_features:
        raise ValueError(f"Model: model.input_features={cfg.input_features} expects inputs [b, t, "
                         f"{cfg.input_features}], got {list(tokens.shape)}")
      x = jnp.einsum("btf,fd->btd", tokens.astype(dtype), self.input_proj.astype(dtype))
      x = x + self.input_bias.astype(dtype)
    x = nn.with_logical_constraint(x, ("act_batch", "act_len", "act_emb"))
    if cfg.mlp == "hmem":
      if route is None:
        raise ValueError("Model: model.mlp='hmem' needs route, int32 [b, depth] tree paths (the batch's 'route')")
      if route.ndim != 2 or route.shape[0] != x.shape[0] or route.shape[1] < cfg.route_depth:
        raise ValueError(f"Model: route must be int32 [b={x.shape[0]}, depth>={cfg.route_depth}] (the levels of "
                         f"model.memory_options ranks), got {list(route.shape)}")
    if self.reads_token_scores and token_scores is None:
      raise ValueError("Model: a mixer reads per-token scores (innovation='external' in model.mixer_options); "
                       "pass token_scores float [b, t]")
    if token_scores is not None and token_scores.shape != x.shape[:2]:
      raise ValueError(f"Model: token_scores must be [b, t] = {list(x.shape[:2])}, got {list(token_scores.shape)}")
    new_states = {}
    for i, block in enumerate(self.blocks):
      key = f"block_{i}"
      x, new_states[key] = block(x, segment_ids, None if states is None else states[key],
                                 route if cfg.has_memory(i) else None, token_scores)
    x = self.final_norm(x)
    if cfg.recon_weight > 0:  # read with mutable=["aux"]; the loss is the train step's (it knows the padding)
      self.sow("aux", "reconstruction", jnp.einsum("btd,df->btf", x, self.recon_head.astype(dtype),
                                                   preferred_element_type=jnp.float32) + self.recon_bias)
    if logit_positions is not None:
      x = jnp.take_along_axis(x, logit_positions[..., None].astype(jnp.int32), axis=1)
    head = self.embed.T if cfg.tie_embeddings else self.head
    logits = jnp.einsum("btd,dv->btv", x, head.astype(dtype), preferred_element_type=jnp.float32)
    return logits, new_states

  @property
  def reads_token_scores(self) -> bool:
    """Whether some mixer reads the per-token ``token_scores`` (works on an unbound module)."""
    cfg = self.config
    return any(spec.score_kwarg is not None and spec.score_kwarg(cfg) is not None
               for spec in map(mixer_registry.get_mixer_spec, cfg.mixers))

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

  @property
  def route_depth(self) -> int:
    """Columns of ``route`` the model reads (0: it takes no route); see :attr:`LMConfig.route_depth`."""
    return self.config.route_depth

  def dummy_route(self, batch_size: int) -> Array | None:
    """An all-zeros int32 [batch_size, route_depth] route for initialisation (None if the model takes none)."""
    depth = self.route_depth
    return jnp.zeros((batch_size, depth), jnp.int32) if depth else None

  def param_count(self) -> int:
    """Number of parameters (memory banks included), from shapes only (``jax.eval_shape``)."""
    f = self.config.input_features
    dummy = jnp.zeros((1, 1), jnp.int32) if f is None else jnp.zeros((1, 1, f), jnp.float32)
    scores = jnp.zeros((1, 1), jnp.float32) if self.reads_token_scores else None
    shapes = jax.eval_shape(lambda: self.init(jax.random.key(0), dummy, route=self.dummy_route(1),
                                              token_scores=scores))
    boxed = lambda x: isinstance(x, nn.meta.AxisMetadata)
    # Unbox without sharding constraints, so this also works inside a mesh / logical-rules context.
    leaves = [x.unbox(apply_constraint=False) if boxed(x) else x
              for x in jax.tree.leaves(shapes["params"], is_leaf=boxed)]
    return int(sum(np.prod(x.shape) for x in leaves))

  def flops_per_token(self, seq_len: int) -> float:
    """Training (forward + backward) FLOPs per token at ``seq_len``.

    ``6 x`` the parameters used in matmuls (the embedding lookup is free; a tied embedding counts once, as the
    head) plus each mixer's extra work (attention scores over the causally visible keys). With feature inputs
    every parameter is in a matmul. Memories count only what a token uses: a hierarchical memory layer the
    ``R = sum(ranks)`` fetched units (``3 d R`` parameters: one path of blocks, or the generic block), not its
    bank, and a PKM layer its query, sub-keys and gate/output and the ``heads * knn`` value rows it reads, not the
    ``n_keys^2`` table (the gathers themselves are not counted).
    """
    cfg = self.config
    lookup = 0 if cfg.tie_embeddings or cfg.input_features is not None else cfg.vocab_size * cfg.d_model
    matmul_params = self.param_count() - lookup
    d = cfg.d_model
    if cfg.mlp == "hmem":
      opts = cfg.memory()
      units = sum(opts["ranks"])
      stored = sum(3 * d * r * opts["branching"] ** l for l, r in enumerate(opts["ranks"], start=1))
      stored += 3 * d * units if opts["use_generic"] else 0
      matmul_params -= sum(cfg.has_memory(i) for i in range(cfg.num_layers)) * (stored - 3 * d * units)
    if cfg.pkm_layers:
      p = cfg.pkm()
      dv = p["v_dim"] or d
      matmul_params -= len(set(cfg.pkm_layers)) * (p["n_keys"] ** 2 - p["heads"] * p["knn"]) * dv
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
             temperature: float = 0.0, states: States | None = None, route: Array | None = None) -> Array:
  """Streams ``max_new_tokens`` tokens after ``prompt`` by carrying the mixer states (prefill, then decode steps).

  Args:
    model: the LM.
    variables: its variables (``{"params": ...}``).
    prompt: [b, t0] int prompt tokens (t0 >= 1).
    max_new_tokens: tokens to generate (>= 1).
    rng: sampling key (required when ``temperature > 0``).
    temperature: 0 for greedy decoding, else softmax temperature.
    states: states to continue from (None: a fresh start).
    route: int32 [b, depth] memory route (needed with ``mlp="hmem"``; fixed for the whole generation).

  Returns:
    [b, max_new_tokens] int32 generated tokens.
  """
  cfg = model.config
  if cfg.input_features is not None:
    raise ValueError(f"generate: needs a token model; this one reads model.input_features={cfg.input_features} "
                     "feature vectors, so its outputs cannot be fed back as inputs")
  t0 = prompt.shape[1]
  if max_new_tokens < 1:
    raise ValueError(f"generate: max_new_tokens={max_new_tokens} must be >= 1")
  if "attention" in cfg.mixers and t0 + max_new_tokens > cfg.max_len:
    raise ValueError(f"generate: prompt ({t0}) + max_new_tokens ({max_new_tokens}) exceed model.max_len="
                     f"{cfg.max_len}, the KV cache of full attention")
  if temperature > 0 and rng is None:
    raise ValueError("generate: sampling with temperature > 0 needs rng")
  rng = jax.random.key(0) if rng is None else rng
  return _generate(model, variables, prompt, states, rng, max_new_tokens, float(temperature), route)


@functools.partial(jax.jit, static_argnums=(0, 5, 6))
def _generate(model, variables, prompt, states, rng, max_new_tokens, temperature, route):
  def pick(logits, key):
    if temperature == 0:
      return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return jax.random.categorical(key, logits / temperature, axis=-1).astype(jnp.int32)

  states = model.init_state(prompt.shape[0]) if states is None else states
  logits, states = model.apply(variables, prompt, states=states, route=route)  # prefill: the chunked/parallel form
  rng, key = jax.random.split(rng)
  first = pick(logits[:, -1], key)

  def step(carry, key):  # decode: the t == 1 step form
    token, states = carry
    logits, states = model.apply(variables, token[:, None], states=states, route=route)
    return (pick(logits[:, -1], key), states), token

  (last, _), tokens = jax.lax.scan(step, (first, states), jax.random.split(rng, max_new_tokens - 1))
  return jnp.concatenate([tokens.T, last[:, None]], axis=1)
