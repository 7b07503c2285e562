"""Rotary position embeddings: the rope parameters of an HF text config, and the cos/sin cache.

transformers 5 keeps them in `config.rope_parameters` ({"rope_type", "rope_theta", ...}); older configs
use `rope_theta` plus an optional `rope_scaling` dict ({"type" or "rope_type", "factor", ...}).
The inverse frequencies and the angle products are computed in float32 exactly as transformers does,
so the positions' cos/sin match the reference bit for bit on the same device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .registry import UnsupportedArchitecture

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


@dataclass(frozen=True)
class RopeSpec:
    rope_type: str = "default"
    theta: float = 10000.0
    factor: float = 1.0  # linear, llama3
    low_freq_factor: float = 1.0  # llama3
    high_freq_factor: float = 4.0  # llama3
    original_max_position_embeddings: int = 8192  # llama3

    def __post_init__(self):
        if self.rope_type not in SUPPORTED_ROPE_TYPES:
            raise UnsupportedArchitecture(
                f"rope_type {self.rope_type!r} is not supported by the native engine (supported: "
                f'{SUPPORTED_ROPE_TYPES}); use EngineConfig(backend="transformers") for this checkpoint'
            )
        if self.theta <= 0 or self.factor <= 0:
            raise ValueError(f"invalid rope parameters: theta={self.theta}, factor={self.factor}")
        if self.rope_type == "llama3" and self.high_freq_factor <= self.low_freq_factor:
            raise ValueError("llama3 rope needs high_freq_factor > low_freq_factor")

    @classmethod
    def from_hf(cls, text_config) -> RopeSpec:
        params = getattr(text_config, "rope_parameters", None)
        if params is None:  # transformers 4.x layout
            params = dict(getattr(text_config, "rope_scaling", None) or {})
            params.setdefault("rope_theta", getattr(text_config, "rope_theta", 10000.0))
        params = dict(params)
        if params and all(isinstance(v, dict) for v in params.values()):
            raise UnsupportedArchitecture(
                "per-layer-type rope parameters are not supported by the native engine; "
                'use EngineConfig(backend="transformers")'
            )
        rope_type = params.get("rope_type", params.get("type", "default")) or "default"
        partial = params.get("partial_rotary_factor", getattr(text_config, "partial_rotary_factor", None))
        if partial not in (None, 1.0):
            raise UnsupportedArchitecture(f"partial_rotary_factor={partial} is not supported by the native engine")
        max_pos = int(getattr(text_config, "max_position_embeddings", 8192))
        return cls(
            rope_type=rope_type,
            theta=float(params.get("rope_theta", 10000.0)),
            factor=float(params.get("factor", 1.0)),
            low_freq_factor=float(params.get("low_freq_factor", 1.0)),
            high_freq_factor=float(params.get("high_freq_factor", 4.0)),
            original_max_position_embeddings=int(params.get("original_max_position_embeddings") or max_pos),
        )


def inv_freq(spec: RopeSpec, head_dim: int, device=None) -> torch.Tensor:
    """[head_dim // 2] float32 inverse frequencies after the spec's scaling."""
    exponent = torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).to(torch.float32) / head_dim
    freq = 1.0 / (spec.theta**exponent)
    if spec.rope_type == "linear":
        return freq / spec.factor
    if spec.rope_type == "llama3":
        old_len = spec.original_max_position_embeddings
        low_freq_wavelen = old_len / spec.low_freq_factor
        high_freq_wavelen = old_len / spec.high_freq_factor
        wavelen = 2 * math.pi / freq
        # Long wavelengths are divided by factor, short ones kept, the band between interpolated smoothly.
        scaled = torch.where(wavelen > low_freq_wavelen, freq / spec.factor, freq)
        smooth = (old_len / wavelen - spec.low_freq_factor) / (spec.high_freq_factor - spec.low_freq_factor)
        smoothed = (1 - smooth) * scaled / spec.factor + smooth * scaled
        is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
        return torch.where(is_medium, smoothed, scaled)
    return freq


def cos_sin_cache(spec: RopeSpec, head_dim: int, max_pos: int, device=None) -> torch.Tensor:
    """[max_pos, head_dim] float32 rows of [cos(head_dim/2) | sin(head_dim/2)] (the ops layout)."""
    freq = inv_freq(spec, head_dim, device)  # [D/2]
    angles = torch.arange(max_pos, device=device, dtype=torch.float32)[:, None] * freq[None, :]
    return torch.cat([angles.cos(), angles.sin()], dim=-1)
