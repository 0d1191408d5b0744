"""Registry of sequence mixers the LM can compose by name (``mixers=["attention", "sliding_window", ...]``).

Each entry builds a mixer module from the LM config and says, where it matters, how many extra FLOPs per token the
mixer spends beyond its parameter matmuls and which sequence lengths it accepts. Module families register their own
mixers here (e.g. ``titans_mac``, ``hcam``, ``bmojo``); the LM never names a concrete layer class.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NamedTuple

from memarch.layers.attention import MultiHeadAttention

if TYPE_CHECKING:
  from memarch.models.lm import LMConfig


class MixerSpec(NamedTuple):
  """How to build and account for one kind of mixer.

  Attributes:
    build: ``(config, layer_index, **module_kwargs) -> module`` following the layer protocol; ``module_kwargs``
      are linen construction arguments (e.g. ``parent=None`` for an unbound instance).
    extra_flops: ``(config, seq_len) -> float`` training FLOPs per token not counted as ``6 * params``
      (e.g. attention scores); None: zero.
    validate: ``(config, seq_len) -> None`` raising ``ValueError`` naming the field for an unusable length;
      None: every length works.
  """
  build: Callable[..., Any]
  extra_flops: Callable[["LMConfig", int], float] | None = None
  validate: Callable[["LMConfig", int], None] | None = None


MIXERS: dict[str, MixerSpec] = {}


def register_mixer(name: str, spec: MixerSpec) -> None:
  """Adds ``spec`` under ``name`` (re-registering a name replaces it)."""
  MIXERS[name] = spec


def get_mixer_spec(name: str) -> MixerSpec:
  """The spec registered under ``name``; a ValueError naming ``model.mixers`` otherwise."""
  try:
    return MIXERS[name]
  except KeyError:
    raise ValueError(f"model.mixers: unknown mixer {name!r}; registered: {sorted(MIXERS)}") from None


def _attention(window_of: Callable[["LMConfig"], int | None]) -> MixerSpec:
  def build(cfg: "LMConfig", layer_index: int, **module_kwargs) -> MultiHeadAttention:
    del layer_index
    return MultiHeadAttention(**module_kwargs,
        num_heads=cfg.num_heads, head_dim=cfg.head_dim, num_kv_heads=cfg.num_kv_heads, window=window_of(cfg),
        num_persistent=cfg.num_persistent, max_len=cfg.max_len, rope_max_wavelength=cfg.rope_max_wavelength,
        conv_width=cfg.attention_conv_width, d_model=cfg.d_model,
        dtype=cfg.dtype, param_dtype=cfg.param_dtype, state_dtype=cfg.state_dtype)

  def extra_flops(cfg: "LMConfig", seq_len: int) -> float:
    # Scores and weighted sum: 2 matmuls x 2 FLOPs x (heads * head_dim) per visible key, x3 for fwd + bwd.
    # Causal: query i sees i + 1 keys (capped by the window), averaged over the sequence.
    w = window_of(cfg)
    visible = sum(min(i + 1, w or i + 1) for i in range(seq_len)) / seq_len + cfg.num_persistent
    return 3 * 4 * cfg.num_heads * cfg.head_dim * visible

  def validate(cfg: "LMConfig", seq_len: int) -> None:
    w = window_of(cfg)
    if w is None and seq_len > cfg.max_len:
      raise ValueError(f"model.max_len={cfg.max_len} is shorter than the sequence length {seq_len}: the KV cache of "
                       "full attention must hold the whole sequence")
    if w is not None and w < 1:
      raise ValueError(f"model.window={w} must be >= 1")

  return MixerSpec(build, extra_flops, validate)


def _window(cfg: "LMConfig") -> int:
  if cfg.window is None:
    raise ValueError("model.window: the 'sliding_window' mixer needs model.window set")
  return cfg.window


register_mixer("attention", _attention(lambda cfg: None))
register_mixer("sliding_window", _attention(_window))


def _mamba2() -> MixerSpec:
  options = ("d_state", "expand", "head_dim", "num_groups", "conv_width", "chunk_size", "scan_type")

  def kwargs(cfg: "LMConfig") -> dict[str, Any]:
    opts = cfg.options("mamba2")
    unknown = sorted(set(opts) - set(options))
    if unknown:
      raise ValueError(f"model.mixer_options['mamba2']: unknown option(s) {unknown}; known: {list(options)}")
    return opts

  def build(cfg: "LMConfig", layer_index: int, **module_kwargs):
    del layer_index
    from memarch.layers.mamba2 import Mamba2  # lazy: keeps the registry import-cycle free
    return Mamba2(**module_kwargs, d_model=cfg.d_model, **kwargs(cfg), dtype=cfg.dtype,
                  param_dtype=cfg.param_dtype, state_dtype=cfg.state_dtype)

  def extra_flops(cfg: "LMConfig", seq_len: int) -> float:
    # Chunked SSD per token (fwd, x3 for fwd + bwd): C Bᵀ scores (2 Q N per group), their product with dt x
    # (2 Q P per head), the chunk state and the carried-state readout (2 P N each per head); plus the conv taps.
    m = build(cfg, 0, parent=None)
    _, heads, head_dim, channels = m.dims()
    q = min(m.chunk_size, seq_len)
    ssd = 2 * m.num_groups * q * m.d_state + heads * (2 * q * head_dim + 4 * head_dim * m.d_state)
    return 3 * (ssd + 2 * m.conv_width * channels)

  def validate(cfg: "LMConfig", seq_len: int) -> None:
    del seq_len
    try:
      build(cfg, 0, parent=None).dims()
    except ValueError as e:
      raise ValueError(f"model.mixer_options['mamba2']: {e}") from None

  return MixerSpec(build, extra_flops, validate)


register_mixer("mamba2", _mamba2())
