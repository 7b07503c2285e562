"""The Llama-family decoder (Llama, Mistral, Qwen2 differ only in config) over a paged KV cache.

Module names mirror the HF checkpoints' (`embed_tokens`, `layers.N.self_attn`, `mlp`, `norm`) except
for the merged projections (`qkv_proj`, `gate_up_proj`), which the loader fills part by part.
Tokens are packed: every tensor is [T, ...] over all sequences of the step, described by
AttentionMetadata; the attention backend writes and reads the paged cache.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .. import ops
from ..attention.base import AttentionBackend, AttentionMetadata, Rotary
from .layers import MergedLinear, QuantizedInput, RMSNorm
from .registry import UnsupportedArchitecture
from .rope import RopeSpec, cos_sin_cache


@dataclass(frozen=True)
class DecoderSpec:
    model_type: str
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    rms_norm_eps: float
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    max_position_embeddings: int
    rope: RopeSpec
    sliding_window: int | None  # Mistral-style window; None when every layer attends to everything

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"rotary embeddings need an even head_dim, got {self.head_dim}")

    @classmethod
    def from_hf(cls, cfg) -> DecoderSpec:
        model_type = cfg.model_type
        act = getattr(cfg, "hidden_act", "silu")
        if act != "silu":
            raise UnsupportedArchitecture(f"decoder hidden_act {act!r} is not supported natively (only 'silu')")
        num_heads = cfg.num_attention_heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // num_heads
        if model_type == "qwen2":  # Qwen2 always has q/k/v biases and no others
            qkv_bias, o_bias, mlp_bias = True, False, False
        elif model_type == "mistral":
            qkv_bias = o_bias = mlp_bias = False
        else:  # Llama: one flag for all four attention projections
            qkv_bias = o_bias = bool(getattr(cfg, "attention_bias", False))
            mlp_bias = bool(getattr(cfg, "mlp_bias", False))
        return cls(
            model_type=model_type,
            hidden_size=cfg.hidden_size,
            intermediate_size=cfg.intermediate_size,
            num_layers=cfg.num_hidden_layers,
            num_heads=num_heads,
            num_kv_heads=getattr(cfg, "num_key_value_heads", None) or num_heads,
            head_dim=head_dim,
            vocab_size=cfg.vocab_size,
            rms_norm_eps=float(cfg.rms_norm_eps),
            qkv_bias=qkv_bias,
            o_bias=o_bias,
            mlp_bias=mlp_bias,
            max_position_embeddings=int(cfg.max_position_embeddings),
            rope=RopeSpec.from_hf(cfg),
            sliding_window=_sliding_window(cfg),
        )


def _sliding_window(cfg) -> int | None:
    window = getattr(cfg, "sliding_window", None)
    if window is None or getattr(cfg, "use_sliding_window", True) is False:
        return None
    layer_types = getattr(cfg, "layer_types", None)
    if layer_types is not None and "sliding_attention" not in layer_types:
        return None
    return int(window)


class DecoderAttention(nn.Module):
    def __init__(self, spec: DecoderSpec):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = spec.num_heads, spec.num_kv_heads, spec.head_dim
        q_rows, kv_rows = spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim
        self.qkv_proj = MergedLinear(
            spec.hidden_size, {"q_proj": q_rows, "k_proj": kv_rows, "v_proj": kv_rows}, bias=spec.qkv_bias
        )
        self.qkv_sizes = [q_rows, kv_rows, kv_rows]  # kept here: quantization may replace qkv_proj
        self.o_proj = nn.Linear(q_rows, spec.hidden_size, bias=spec.o_bias)
        self.scale = spec.head_dim**-0.5

    def forward(self, rotary: Rotary, hidden, kv_cache, meta: AttentionMetadata, attn: AttentionBackend):
        qkv = self.qkv_proj(hidden)  # hidden: [T, H], or a QuantizedInput -> [T, (Hq + 2 Hk) * D]
        T = qkv.shape[0]
        # Views into qkv, no copies (three fewer kernels per layer): rotary (in place), the cache
        # write and the attention kernels all take a row stride with dense heads within the row.
        q, k, v = qkv.split(self.qkv_sizes, dim=-1)  # [T, H * D], row stride of qkv
        # The backend rotates q and k in place and writes k and v to the cache, in one kernel.
        out = attn.forward(
            q.view(T, self.num_heads, self.head_dim),
            k.view(T, self.num_kv_heads, self.head_dim),
            v.view(T, self.num_kv_heads, self.head_dim),
            kv_cache[0],
            kv_cache[1],
            meta,
            self.scale,
            rotary=rotary,
        )  # [T, Hq, D]
        return self.o_proj(out.reshape(T, self.num_heads * self.head_dim))


class DecoderMLP(nn.Module):
    def __init__(self, spec: DecoderSpec):
        super().__init__()
        inter = spec.intermediate_size
        self.gate_up_proj = MergedLinear(spec.hidden_size, {"gate_proj": inter, "up_proj": inter}, bias=spec.mlp_bias)
        self.down_proj = nn.Linear(inter, spec.hidden_size, bias=spec.mlp_bias)
        # down_proj is fp8 (set by quant.quantize_model): the activation kernel writes its input
        # quantized, so the [T, I] activation never exists in the model dtype.
        self.quant_act = False

    def forward(self, x: torch.Tensor | QuantizedInput) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)  # [T, 2I]
        if self.quant_act:
            return self.down_proj(QuantizedInput(*ops.silu_and_mul_quant_fp8(gate_up)))
        return self.down_proj(ops.silu_and_mul(gate_up))


class DecoderLayer(nn.Module):
    def __init__(self, spec: DecoderSpec):
        super().__init__()
        self.input_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.self_attn = DecoderAttention(spec)
        self.post_attention_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.mlp = DecoderMLP(spec)

    def forward(self, rotary: Rotary, hidden, residual, kv_cache, meta, attn):
        # The residual stream is carried separately so each norm can fuse the preceding add.
        if residual is None:
            residual = hidden
            hidden = self.input_layernorm(hidden)
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.self_attn(rotary, hidden, kv_cache, meta, attn)
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self.mlp(hidden), residual


class DecoderModel(nn.Module):
    """HF's `language_model` body: embeddings, layers, final norm (no LM head)."""

    def __init__(self, spec: DecoderSpec):
        super().__init__()
        self.spec = spec
        self.embed_tokens = nn.Embedding(spec.vocab_size, spec.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(spec) for _ in range(spec.num_layers))
        self.norm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.register_buffer("cos_sin_cache", torch.empty(0), persistent=False)

    def init_buffers(self, max_positions: int | None = None) -> None:
        """(Re)compute the float32 rope cache on the module's device (after meta init / to_empty).
        It covers max(max_position_embeddings, max_positions) positions."""
        device = self.embed_tokens.weight.device
        n = max(self.spec.max_position_embeddings, max_positions or 0)
        self.cos_sin_cache = cos_sin_cache(self.spec.rope, self.spec.head_dim, n, device)  # [P, D] float32

    def forward(self, inputs_embeds, positions, kv_caches, meta: AttentionMetadata, attn: AttentionBackend):
        if len(kv_caches) != len(self.layers):
            raise ValueError(f"got {len(kv_caches)} KV caches for {len(self.layers)} decoder layers")
        hidden, residual = inputs_embeds, None  # [T, H]
        rotary = Rotary(positions, self.cos_sin_cache, is_neox=True)  # every layer's, one object
        for layer, kv_cache in zip(self.layers, kv_caches):
            hidden, residual = layer(rotary, hidden, residual, kv_cache, meta, attn)
        hidden, _ = self.norm(hidden, residual)
        return hidden
