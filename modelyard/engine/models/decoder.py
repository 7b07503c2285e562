"""The Llama-family decoder (Llama, Mistral, Qwen2 differ only in config) over a paged KV cache.

Module names mirror the HF checkpoints' (`embed_tokens`, `layers.N.self_attn`, `mlp`, `norm`) except
for the merged projections (`qkv_proj`, `gate_up_proj`), which the loader fills part by part.
Tokens are packed: every tensor is [T, ...] over all sequences of the step, described by
AttentionMetadata; the attention backend writes and reads the paged cache.

Folded norms (DecoderModel.fold_norms, EngineConfig.fold_norms): RMSNorm(h) W^T = s * (h (W diag(g))^T)
with s = 1 / sqrt(mean(h^2) + eps) one number per token and g the norm's weight. So each layer's two
norm weights are multiplied into qkv_proj's and gate_up_proj's columns once at load, those GEMMs read
the residual stream h itself, and the kernels that consume their outputs apply s before their own
work: the rotary + cache-write kernel scales q, k and v, the SiLU-and-mul kernel gate and up. In the
decode graphs s comes from a small kernel (ops.rms_scale, one CTA per token) on a forked branch beside
the GEMM that reads the same h (qkv_proj, gate_up_proj), off the critical path (benchmarks/RESULTS.md,
session 12); eagerly the consumers reduce h's rows themselves (fewer ops for the host to launch). The
residual adds go into the o_proj and down_proj GEMMs (h += x W^T, beta 1), so h is updated in place
and no norm kernel runs inside the layers: two kernels fewer per layer, which at decode sizes are
latency-bound (3.7-3.9 us each on an H200, benchmarks/RESULTS.md, session 7). Decode steps
run these folded layers; prefill and mixed steps keep the norm kernels (with the norm weights, now
inside the projections, set to 1: the same function), since there the folded layers measured 2%
slower on a 16k-token step (extra passes over h in the consumers at 16k rows, a beta-1 GEMM). The
rounding points move (the projection of h is rounded, then scaled and rounded, where HF rounds the normed row
before the projection); both are bfloat16-level. Not for float16, whose range the un-normalized
projections could exceed, nor for biased or fp8 projections.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn

from .. import ops
from ..attention.base import AttentionBackend, AttentionMetadata, Rotary
from .layers import Linear, MergedLinear, QuantizedInput, RMSNorm
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
    sliding_window: int | None    # Mistral-style window; None when every layer attends to everything

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"rotary embeddings need an even head_dim, got {self.head_dim}")

    @classmethod
    def from_hf(cls, cfg) -> "DecoderSpec":
        model_type = cfg.model_type
        act = getattr(cfg, "hidden_act", "silu")
        if act != "silu":
            raise UnsupportedArchitecture(f"decoder hidden_act {act!r} is not supported natively (only 'silu')")
        num_heads = cfg.num_attention_heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // num_heads
        if model_type == "qwen2":          # Qwen2 always has q/k/v biases and no others
            qkv_bias, o_bias, mlp_bias = True, False, False
        elif model_type == "mistral":
            qkv_bias = o_bias = mlp_bias = False
        else:                              # Llama: one flag for all four attention projections
            qkv_bias = o_bias = bool(getattr(cfg, "attention_bias", False))
            mlp_bias = bool(getattr(cfg, "mlp_bias", False))
        return cls(
            model_type=model_type, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
            num_layers=cfg.num_hidden_layers, num_heads=num_heads,
            num_kv_heads=getattr(cfg, "num_key_value_heads", None) or num_heads, head_dim=head_dim,
            vocab_size=cfg.vocab_size, rms_norm_eps=float(cfg.rms_norm_eps),
            qkv_bias=qkv_bias, o_bias=o_bias, mlp_bias=mlp_bias,
            max_position_embeddings=int(cfg.max_position_embeddings), rope=RopeSpec.from_hf(cfg),
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
        self.qkv_proj = MergedLinear(spec.hidden_size, {"q_proj": q_rows, "k_proj": kv_rows, "v_proj": kv_rows},
                                     bias=spec.qkv_bias)
        self.qkv_sizes = [q_rows, kv_rows, kv_rows]    # kept here: quantization may replace qkv_proj
        self.o_proj = Linear(q_rows, spec.hidden_size, bias=spec.o_bias)
        self.scale = spec.head_dim ** -0.5

    def forward(self, rotary: Rotary, hidden, kv_cache, meta: AttentionMetadata, attn: AttentionBackend):
        # hidden: [T, H], or a QuantizedInput -> qkv [T, (Hq + 2 Hk) * D]
        return self.o_proj(self.attend(rotary, self.qkv_proj(hidden), kv_cache, meta, attn))

    def attend(self, rotary: Rotary, qkv, kv_cache, meta: AttentionMetadata, attn: AttentionBackend):
        """Attention over the packed projections qkv [T, (Hq + 2 Hk) * D] -> [T, Hq * D] (before o_proj)."""
        T = qkv.shape[0]
        # Views into qkv, no copies (three fewer kernels per layer): rotary (in place), the cache
        # write and the attention kernels all take a row stride with dense heads within the row.
        q, k, v = qkv.split(self.qkv_sizes, dim=-1)         # [T, H * D], row stride of qkv
        # The backend rotates q and k in place and writes k and v to the cache, in one kernel.
        out = attn.forward(
            q.view(T, self.num_heads, self.head_dim),
            k.view(T, self.num_kv_heads, self.head_dim),
            v.view(T, self.num_kv_heads, self.head_dim),
            kv_cache[0], kv_cache[1], meta, self.scale, rotary=rotary,
        )                                                                 # [T, Hq, D]
        return out.reshape(T, self.num_heads * self.head_dim)


class DecoderMLP(nn.Module):
    def __init__(self, spec: DecoderSpec):
        super().__init__()
        inter = spec.intermediate_size
        self.gate_up_proj = MergedLinear(spec.hidden_size, {"gate_proj": inter, "up_proj": inter},
                                         bias=spec.mlp_bias)
        self.down_proj = Linear(inter, spec.hidden_size, bias=spec.mlp_bias)
        # down_proj is fp8 (set by quant.quantize_model): the activation kernel writes its input
        # quantized, so the [T, I] activation never exists in the model dtype.
        self.quant_act = False

    def forward(self, x: torch.Tensor | QuantizedInput) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)                                   # [T, 2I]
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

    def forward_folded(self, rotary: Rotary, h: torch.Tensor, kv_cache, meta, attn) -> None:
        """h += attention(norm(h)); h += mlp(norm(h)), in place, with the norms folded (module docstring).
        Each norm scale is taken from h before the GEMM that adds to h is launched."""
        sa, mlp = self.self_attn, self.mlp
        norm, qkv = _folded_norm(h, self.input_layernorm.eps, sa.qkv_proj)
        sa.o_proj.add_(h, sa.attend(replace(rotary, **norm), qkv, kv_cache, meta, attn))
        norm, gate_up = _folded_norm(h, self.post_attention_layernorm.eps, mlp.gate_up_proj)
        mlp.down_proj.add_(h, ops.silu_and_mul(gate_up, **norm))


# Whether graph captures compute the norm scales on a forked branch (a switch for A/B measurements).
SCALE_BESIDE = True
_side_streams: dict[torch.device, torch.cuda.Stream] = {}


def _folded_norm(h: torch.Tensor, eps: float, proj) -> tuple[dict, torch.Tensor]:
    """(the folded norm's arguments for its consumer, proj(h)). Under CUDA graph capture the scale is
    computed by ops.rms_scale on a forked branch of the graph, beside proj's GEMM (both only read h),
    and the consumer gets norm_scale (-0.07 ms per decode step, H200, benchmarks/RESULTS.md, session 12).
    Eagerly the consumer gets norm_x = h and reduces the rows itself: the extra ops would cost the host
    more (eager decode is launch-bound) than the GPU saves."""
    if not (SCALE_BESIDE and h.is_cuda and torch.cuda.is_current_stream_capturing()):
        return {"norm_x": h, "norm_eps": eps}, proj(h)
    s = torch.empty(h.shape[0], dtype=torch.float32, device=h.device)  # allocated on the main stream
    main = torch.cuda.current_stream(h.device)
    side = _side_streams.get(h.device)
    if side is None:
        side = _side_streams[h.device] = torch.cuda.Stream(h.device)
    side.wait_stream(main)
    with torch.cuda.stream(side):
        ops.rms_scale(h, eps, out=s)
    out = proj(h)
    main.wait_stream(side)  # joins before the consumer is launched
    return {"norm_scale": s}, out


class DecoderModel(nn.Module):
    """HF's `language_model` body: embeddings, layers, final norm (no LM head)."""

    def __init__(self, spec: DecoderSpec):
        super().__init__()
        self.spec = spec
        self.embed_tokens = nn.Embedding(spec.vocab_size, spec.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(spec) for _ in range(spec.num_layers))
        self.norm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.register_buffer("cos_sin_cache", torch.empty(0), persistent=False)
        self.norms_folded = False

    def fold_norms(self) -> bool:
        """Folds every layer's two RMSNorm weights into qkv_proj's and gate_up_proj's weights (see the
        module docstring) and switches forward to the folded layers; once, after the weights are
        loaded. Returns whether the model is folded: not for float16, or when any decoder projection
        has a bias or is not a 16/32-bit Linear (fp8 quantization), which keep the norm kernels."""
        if self.norms_folded:
            return True
        if self.embed_tokens.weight.dtype not in (torch.bfloat16, torch.float32):
            return False
        for layer in self.layers:
            projections = (layer.self_attn.qkv_proj, layer.self_attn.o_proj, layer.mlp.gate_up_proj,
                           layer.mlp.down_proj)
            if not all(isinstance(p, Linear) and p.bias is None for p in projections):
                return False
        with torch.no_grad():
            for layer in self.layers:
                for proj, norm in ((layer.self_attn.qkv_proj, layer.input_layernorm),
                                   (layer.mlp.gate_up_proj, layer.post_attention_layernorm)):
                    proj.weight.mul_(norm.weight.to(proj.weight.dtype))     # W[:, j] *= g[j], rounded once
                    norm.weight.fill_(1.0)      # now inside the projection: the norm kernels' path (prefill)
                                                # computes the same function with these weights
                layer.self_attn.o_proj.accumulates = True
                layer.mlp.down_proj.accumulates = True
        self.norms_folded = True
        return True

    def init_buffers(self, max_positions: int | None = None) -> None:
        """(Re)compute the float32 rope cache on the module's device (after meta init / to_empty).
        It covers max(max_position_embeddings, max_positions) positions."""
        device = self.embed_tokens.weight.device
        n = max(self.spec.max_position_embeddings, max_positions or 0)
        self.cos_sin_cache = cos_sin_cache(self.spec.rope, self.spec.head_dim, n, device)  # [P, D] float32

    def forward(self, inputs_embeds, positions, kv_caches, meta: AttentionMetadata, attn: AttentionBackend):
        if len(kv_caches) != len(self.layers):
            raise ValueError(f"got {len(kv_caches)} KV caches for {len(self.layers)} decoder layers")
        rotary = Rotary(positions, self.cos_sin_cache, is_neox=True)     # every layer's, one object
        if self.norms_folded and meta.is_decode:
            h = inputs_embeds.clone()           # the residual stream, which the layers update in place
            for layer, kv_cache in zip(self.layers, kv_caches):
                layer.forward_folded(rotary, h, kv_cache, meta, attn)
            return self.norm(h)
        hidden, residual = inputs_embeds, None                           # [T, H]
        for layer, kv_cache in zip(self.layers, kv_caches):
            hidden, residual = layer(rotary, hidden, residual, kv_cache, meta, attn)
        hidden, _ = self.norm(hidden, residual)
        return hidden
