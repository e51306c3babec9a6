"""The rotary tables: cos and sin of every (position, frequency), for plain RoPE and its scalings.

One kind per model, with Megatron-LM's flags and Hugging Face's `rope_type`:
- default (`--rotary-base`): frequency i is base ** (-2i / head_dim);
- linear (`--rotary-seq-len-interpolation-factor F`): position interpolation, every angle divided by F;
- llama3 (`--use-rope-scaling --rope-scaling-factor F` and the low/high frequency factors): low
  frequencies divided by F, high ones kept, a smooth ramp between;
- yarn (`--position-embedding-type yarn --yarn-*`): low frequencies divided by the factor, high
  ones kept, a linear ramp over the dimensions between; cos and sin carry the attention factor.

The arithmetic is transformers' `modeling_rope_utils`, operation for operation in fp32, so that a
model exported to Hugging Face computes the same logits: at position 4096 one fp32 rounding of an
angle already moves cos by ~1e-4 (Megatron-LM divides the positions rather than the frequencies
for linear interpolation; the same value in exact arithmetic, not in fp32).
"""

from __future__ import annotations

import math
import weakref

import torch

from ..config import ModelConfig
from ..torch_private import tensor_version

try:
    from torch.utils.weak import WeakIdKeyDictionary
except ImportError:  # without it each forward converts the tables again
    WeakIdKeyDictionary = None

KINDS = ("default", "linear", "llama3", "yarn")


def kind(cfg: ModelConfig) -> str:
    if cfg.position_embedding_type == "yarn":
        return "yarn"
    if cfg.use_rope_scaling:
        return "llama3"
    if cfg.rotary_seq_len_interpolation_factor is not None:
        return "linear"
    return "default"


def describe(cfg: ModelConfig) -> str:
    """The flags that set this model's RoPE scaling, with their values ("none" for plain RoPE)."""
    settings = {
        "default": (),
        "linear": (("--rotary-seq-len-interpolation-factor", cfg.rotary_seq_len_interpolation_factor),),
        "llama3": (("--use-rope-scaling --rope-scaling-factor", cfg.rope_scaling_factor),
                   ("--rope-scaling-low-freq-factor", cfg.rope_scaling_low_freq_factor),
                   ("--rope-scaling-high-freq-factor", cfg.rope_scaling_high_freq_factor),
                   ("--rope-scaling-original-max-position-embeddings",
                    cfg.rope_scaling_original_max_position_embeddings)),
        "yarn": (("--position-embedding-type yarn --yarn-rotary-scaling-factor", cfg.yarn_rotary_scaling_factor),
                 ("--yarn-original-max-position-embeddings", cfg.yarn_original_max_position_embeddings),
                 ("--yarn-beta-fast", cfg.yarn_beta_fast), ("--yarn-beta-slow", cfg.yarn_beta_slow),
                 ("--yarn-mscale", cfg.yarn_mscale), ("--yarn-mscale-all-dim", cfg.yarn_mscale_all_dim)),
    }[kind(cfg)]
    return " ".join(f"{flag} {value}" for flag, value in settings) or "none"


def rotary_tables(cfg: ModelConfig, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin laid out for rotate-half: (max_position_embeddings, head_dim), fp32, on `device`.

    Computed once, at build time: nothing here runs per step."""
    inv_freq, attention_factor = inverse_frequencies(cfg, device)
    positions = torch.arange(cfg.max_position_embeddings, dtype=torch.float32, device=device)
    angles = torch.outer(positions, inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    if attention_factor == 1.0:
        return angles.cos(), angles.sin()
    return angles.cos() * attention_factor, angles.sin() * attention_factor


# the tables converted to a compute dtype, per source table; an entry goes with its source
_converted = WeakIdKeyDictionary() if WeakIdKeyDictionary is not None else None


def tables_in(cos: torch.Tensor, sin: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin in `dtype` (the layers' compute dtype), converted once for as long as the
    tables are neither replaced nor written to, rather than once per forward or per layer.

    FSDP2 casts each layer's floating-point inputs to its compute dtype, so fp32 tables handed to
    every layer would be copied in every layer, a new tensor each time: kernels that keep them for
    backward would keep one copy per layer, and an adapter caching what it derives from the tables
    (Transformer Engine's angles) would never hit. Tables already in `dtype` pass through FSDP2
    untouched, the same tensors for every layer and micro-batch."""
    if cos.dtype == dtype and sin.dtype == dtype:
        return cos, sin
    # an inference tensor cannot be saved for backward: what inference mode made stays there
    key = (dtype, torch.is_inference_mode_enabled())
    entries = _converted.setdefault(cos, {}) if _converted is not None else {}
    entry = entries.get(key)
    if entry is not None:
        sin_ref, versions, converted = entry
        if sin_ref() is sin and versions == (tensor_version(cos), tensor_version(sin)):
            return converted
    converted = (cos.to(dtype), sin.to(dtype))
    entries[key] = (weakref.ref(sin), (tensor_version(cos), tensor_version(sin)), converted)
    return converted


def inverse_frequencies(cfg: ModelConfig, device=None) -> tuple[torch.Tensor, float]:
    """The (head_dim / 2,) fp32 frequencies and the factor cos and sin are multiplied by."""
    which = kind(cfg)
    if which == "yarn":
        return _yarn(cfg, device)
    inv_freq = _plain(cfg.head_dim, cfg.rotary_base, device)
    if which == "linear":
        return inv_freq / cfg.rotary_seq_len_interpolation_factor, 1.0
    if which == "llama3":
        return _llama3(cfg, inv_freq), 1.0
    return inv_freq, 1.0


def _plain(dim: int, base: float, device) -> torch.Tensor:
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32, device=device) / dim))


def _llama3(cfg: ModelConfig, inv_freq: torch.Tensor) -> torch.Tensor:
    # Meta's Llama 3.1 rule (Megatron-LM's `_apply_scaling`, transformers' `_compute_llama3_parameters`)
    factor, low, high = cfg.rope_scaling_factor, cfg.rope_scaling_low_freq_factor, cfg.rope_scaling_high_freq_factor
    original = cfg.rope_scaling_original_max_position_embeddings
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > original / low, inv_freq / factor, inv_freq)
    smooth = (original / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < original / high) * ~(wavelen > original / low)
    return torch.where(medium, smoothed, scaled)


def yarn_attention_factor(factor: float, mscale: float, mscale_all_dim: float) -> float:
    """Megatron-LM's YaRN scale of cos and sin: get_mscale(factor, mscale) / get_mscale(factor, mscale_all_dim)."""
    def get_mscale(scale: float, m: float) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    return float(get_mscale(factor, mscale) / get_mscale(factor, mscale_all_dim))


def _yarn(cfg: ModelConfig, device) -> tuple[torch.Tensor, float]:
    dim, base, factor = cfg.head_dim, cfg.rotary_base, cfg.yarn_rotary_scaling_factor
    original = cfg.yarn_original_max_position_embeddings

    def correction_dim(rotations: float) -> float:
        # the dimension whose frequency turns `rotations` times over the original context
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(correction_dim(cfg.yarn_beta_fast)), 0)
    high = min(math.ceil(correction_dim(cfg.yarn_beta_slow)), dim - 1)
    if low == high:
        high += 0.001  # a ramp of zero width would divide by zero
    ramp = ((torch.arange(dim // 2, dtype=torch.float32, device=device) - low) / (high - low)).clamp(0, 1)
    extrapolated = 1 - ramp  # 1 where a frequency is kept, 0 where it is divided by the factor
    pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.float32, device=device) / dim)
    inv_freq = 1.0 / (factor * pos_freqs) * (1 - extrapolated) + 1.0 / pos_freqs * extrapolated
    return inv_freq, yarn_attention_factor(factor, cfg.yarn_mscale, cfg.yarn_mscale_all_dim)
