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
    score_kwarg: ``config -> str | None``: the keyword through which the built mixer reads the model's per-token
      ``token_scores`` (B'MOJO with ``innovation="external"``: ``"innovation_scores"``); None: it reads none.
  """
  build: Callable[..., Any]
  extra_flops: Callable[["LMConfig", int], float] | None = None
  validate: Callable[["LMConfig", int], None] | None = None
  score_kwarg: Callable[["LMConfig"], str | None] | None = None


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


# Titans (spec titans.md): the LMM alone and the MAG / MAL / MAC hybrids. Options come from
# ``model.mixer_options[name]``: NeuralMemory fields (chunk_size, depth, max_lr, ...) for every variant, plus the
# block's own fields for the hybrids (e.g. ``gate`` for MAG, ``segment_len`` for MAC). The registered memory
# default is chunk_size=1 (the paper's token-level update, spec §3.1 "paper-exact"): packed documents may then start
# anywhere; a larger chunk needs document starts at its multiples.
_TITANS_MEMORY_DEFAULTS = {"chunk_size": 1}


def _titans(name: str) -> MixerSpec:
  def parts(cfg: "LMConfig"):
    import dataclasses as dc

    from memarch.layers import titans  # lazy: keeps the registry import-cycle free
    memory_fields = {f.name for f in dc.fields(titans.NeuralMemory)} - {"parent", "name"}
    block_cls = getattr(titans, {"titans_lmm": "NeuralMemory", "titans_mag": "TitansMAG", "titans_mal": "TitansMAL",
                                 "titans_mac": "TitansMAC"}[name])
    block_fields = {f.name for f in dc.fields(block_cls)} - {"parent", "name", "memory_options"}
    opts = cfg.options(name)
    unknown = sorted(set(opts) - memory_fields - block_fields)
    if unknown:
      raise ValueError(f"model.mixer_options[{name!r}]: unknown option(s) {unknown}")
    return titans, block_cls, block_fields, opts

  def build(cfg: "LMConfig", layer_index: int, **module_kwargs):
    del layer_index
    titans, block_cls, block_fields, opts = parts(cfg)
    common = dict(num_heads=cfg.num_heads, head_dim=cfg.head_dim, d_model=cfg.d_model, dtype=cfg.dtype,
                  param_dtype=cfg.param_dtype, state_dtype=cfg.state_dtype)
    if block_cls is titans.NeuralMemory:
      return block_cls(**module_kwargs, **{**common, **_TITANS_MEMORY_DEFAULTS, **opts})
    memory = {**_TITANS_MEMORY_DEFAULTS, **{k: v for k, v in opts.items() if k not in block_fields}}
    block = dict(num_persistent=cfg.num_persistent, rope_max_wavelength=cfg.rope_max_wavelength)
    if name != "titans_mac":
      block.update(window=cfg.window, max_len=cfg.max_len, attention_conv_width=cfg.attention_conv_width)
    block.update({k: v for k, v in opts.items() if k in block_fields})
    return block_cls(**module_kwargs, **common, **block, memory_options=tuple(sorted(memory.items())))

  def extra_flops(cfg: "LMConfig", seq_len: int) -> float:
    # Memory (spec §3.6): store forward 2|W| + inner backward 4|W| + retrieval 2|W| per head and token, x3 for the
    # outer forward + backward; attention scores as for sliding windows (MAC: N_p + up to 2C keys per query).
    titans, block_cls, _, _ = parts(cfg)
    m = build(cfg, 0, parent=None)
    mem = m if block_cls is titans.NeuralMemory else m._memory(parent=None)
    h, e = mem.dims()
    c = mem.lmm_config()
    widths = [e] + [c.expansion * e] * (c.depth - 1) + [e]
    w = sum(a * b for a, b in zip(widths[:-1], widths[1:]))
    flops = 3 * 8 * h * w
    if block_cls is titans.NeuralMemory:
      return flops
    if name == "titans_mac":
      visible = m.num_persistent + min(seq_len, m.segment_len)  # h and x keys, on average C/2 each
    else:
      win = m.window
      visible = sum(min(i + 1, win or i + 1) for i in range(seq_len)) / seq_len + m.num_persistent
    return flops + 3 * 4 * cfg.num_heads * cfg.head_dim * visible

  def validate(cfg: "LMConfig", seq_len: int) -> None:
    del seq_len
    try:
      m = build(cfg, 0, parent=None)
      m.init_state(1)
    except ValueError as e:
      raise ValueError(f"model.mixer_options[{name!r}]: {e}") from None

  return MixerSpec(build, extra_flops, validate)


for _name in ("titans_lmm", "titans_mag", "titans_mal", "titans_mac"):
  register_mixer(_name, _titans(_name))


def _hcam() -> MixerSpec:
  options = ("chunk_size", "top_k", "max_chunks", "window", "memory_source", "path", "stop_gradient_memory",
             "use_position_code", "hcam_init_variance_scale")

  def kwargs(cfg: "LMConfig") -> dict[str, Any]:
    opts = cfg.options("hcam")
    unknown = sorted(set(opts) - set(options))
    if unknown:
      raise ValueError(f"model.mixer_options['hcam']: unknown option(s) {unknown}; known: {list(options)}")
    return opts

  def build(cfg: "LMConfig", layer_index: int, **module_kwargs):
    del layer_index
    from memarch.layers.hcam import HCAMBlock  # lazy: keeps the registry import-cycle free
    return HCAMBlock(**module_kwargs, num_heads=cfg.num_heads, head_dim=cfg.head_dim, d_model=cfg.d_model,
                     rope_max_wavelength=cfg.rope_max_wavelength, **kwargs(cfg), dtype=cfg.dtype,
                     param_dtype=cfg.param_dtype, state_dtype=cfg.state_dtype)

  def extra_flops(cfg: "LMConfig", seq_len: int) -> float:
    # Per token, x3 for fwd + bwd: local attention scores and sum (4 H dk per visible key); HCAM relevance scores
    # (2 d per visible chunk) and the block-dense within-chunk attention (4 H dk per visible memory slot). Visible
    # chunks are averaged over the sequence and capped by max_chunks.
    m = build(cfg, 0, parent=None)
    w, c, f = m.local_window(), m.chunk_size, cfg.num_heads * cfg.head_dim
    local = sum(min(i + 1, w) for i in range(seq_len)) / seq_len
    chunks = sum(min(max(i // c - 1, 0), m.max_chunks) for i in range(seq_len)) / seq_len
    return 3 * (4 * f * local + 2 * cfg.d_model * chunks + 4 * f * chunks * c)

  def validate(cfg: "LMConfig", seq_len: int) -> None:
    del seq_len
    try:
      build(cfg, 0, parent=None).check()
    except ValueError as e:
      raise ValueError(f"model.mixer_options['hcam']: {e}") from None

  return MixerSpec(build, extra_flops, validate)


register_mixer("hcam", _hcam())


# B'MOJO (spec bmojo.md §3, §4): "bmojo_f" is sliding-window attention over [t-W+1, t] plus W keys / values derived
# from a Mamba-2 output at [t-2W+1, t-W] in one softmax; "bmojo" adds the innovation-selected eidetic store. The
# window is ``mixer_options[name]["window"]``, else ``model.window``.
_BMOJO_F_OPTIONS = ("window", "tie_attn_weights", "d_state", "expand", "ssm_head_dim", "conv_width",
                    "ssm_chunk_size", "query_block", "qk_norm")
_BMOJO_OPTIONS = _BMOJO_F_OPTIONS + ("chunk_size", "k_sel", "memory_size", "innovation_dim", "innovation_seed",
                                     "aux_weight", "aux_grad_to_ssm", "selector_bias", "bound", "innovation")


def _bmojo(name: str) -> MixerSpec:
  options = _BMOJO_OPTIONS if name == "bmojo" else _BMOJO_F_OPTIONS

  def kwargs(cfg: "LMConfig") -> dict[str, Any]:
    opts = cfg.options(name)
    unknown = sorted(set(opts) - set(options))
    if unknown:
      raise ValueError(f"model.mixer_options[{name!r}]: unknown option(s) {unknown}; known: {list(options)}")
    opts.setdefault("window", cfg.window)
    if opts["window"] is None:
      raise ValueError(f"model.window: the {name!r} mixer needs model.window (or mixer_options[{name!r}]['window'])")
    return opts

  def build(cfg: "LMConfig", layer_index: int, **module_kwargs):
    del layer_index
    from memarch.layers import bmojo  # lazy: keeps the registry import-cycle free
    cls = bmojo.BMojo if name == "bmojo" else bmojo.BMojoF
    return cls(**module_kwargs, num_heads=cfg.num_heads, head_dim=cfg.head_dim, num_kv_heads=cfg.num_kv_heads,
               d_model=cfg.d_model, rope_max_wavelength=cfg.rope_max_wavelength, **kwargs(cfg), dtype=cfg.dtype,
               param_dtype=cfg.param_dtype, state_dtype=cfg.state_dtype)

  def extra_flops(cfg: "LMConfig", seq_len: int) -> float:
    # Per token, x3 for fwd + bwd: scores and weighted sum (4 H e per visible key) over the window, the fading
    # span and the store (chunks already written, capped at M), averaged over the sequence; the Mamba-2 SSD and
    # conv as for "mamba2"; for B'MOJO the innovation probe (2 d d_e) and its target projection.
    m = build(cfg, 0, parent=None)
    w, (c, k_sel, mem) = m.window, m.store_config()
    visible = sum(min(i + 1, w) + min(max(i - w + 1, 0), w) + min(max(i // c - 1, 0) * k_sel, mem)
                  for i in range(seq_len)) / seq_len
    ssm = m._ssm(parent=None)
    _, heads, head_dim, channels = ssm.dims()
    q = min(ssm.chunk_size, seq_len)
    ssd = 2 * ssm.num_groups * q * ssm.d_state + heads * (2 * q * head_dim + 4 * head_dim * ssm.d_state)
    kind = getattr(m, "innovation", None) if mem else None
    d_e = getattr(m, "innovation_dim", None) or cfg.d_model
    innovation = 4 * cfg.d_model * d_e if kind == "ssm_residual" else 0
    # key novelty: cosines with W - 1 window keys, the store and one chunk's new entries, forward only
    _, kv_heads, head_dim = m.dims()
    novelty = 2 * kv_heads * head_dim * (w - 1 + mem + k_sel) if kind == "key_novelty" else 0
    return 3 * (4 * cfg.num_heads * cfg.head_dim * visible + ssd + 2 * ssm.conv_width * channels + innovation) + novelty

  def validate(cfg: "LMConfig", seq_len: int) -> None:
    del seq_len
    try:
      build(cfg, 0, parent=None).check()
    except ValueError as e:
      raise ValueError(f"model.mixer_options[{name!r}]: {e}") from None

  def score_kwarg(cfg: "LMConfig") -> str | None:
    external = name == "bmojo" and kwargs(cfg).get("innovation") == "external"
    return "innovation_scores" if external else None

  return MixerSpec(build, extra_flops, validate, score_kwarg)


for _name in ("bmojo_f", "bmojo"):
  register_mixer(_name, _bmojo(_name))
