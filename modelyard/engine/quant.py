"""fp8 (e4m3) weights and activations for the decoder's linear layers: EngineConfig(quantization="fp8").

Online quantization of a 16-bit checkpoint, like vLLM's fp8 with dynamic activation scales: after
the weights load, each projection of every decoder layer (qkv, o, gate_up, down) keeps its weight
as e4m3 with one float32 scale per output row (W ~= Wq * sw), and each forward quantizes its input
per token (x ~= xq * sx, the csrc per_token_quant_fp8 kernel). The GEMM multiplies e4m3 on the
tensor cores and applies sx * sw to the float32 accumulator before rounding to bf16
(torch._scaled_mm with row-wise scales). On the CPU the same quantized math runs in float32, which
is what the tests check the plumbing against.

Three of the four inputs come straight out of a csrc kernel, which then writes them quantized
(e4m3 plus [T, 1] scales, a QuantizedInput) instead of in bf16 for a separate quantize pass to read
back: qkv_proj's from the input norm, gate_up_proj's from the post-attention norm (RMSNorm.quant_out),
down_proj's from silu_and_mul (DecoderMLP.quant_act). The fused kernels are bit-identical to
quantizing the 16-bit output, so this changes speed only. o_proj quantizes its attention input itself.

What it buys: half the weight bytes (decode steps read them all), and e4m3 tensor-core throughput
for the prefill GEMMs. What it costs: quantization error, so outputs differ from the 16-bit model;
measure agreement on your model before relying on it. The vision tower, projector, embeddings, norms
and LM head stay in the model dtype.
"""

from __future__ import annotations

import torch
from torch import nn

from . import ops
from .config import QUANTIZATION_METHODS as _CONFIG_METHODS
from .models.decoder import DecoderAttention, DecoderLayer, DecoderMLP
from .models.layers import QuantizedInput

QUANTIZATION_METHODS = tuple(m for m in _CONFIG_METHODS if m is not None)  # ("fp8",)
_MIN_CAPABILITY = (8, 9)  # e4m3 tensor cores: Ada and Hopper onwards
_ALIGN = 16  # torch._scaled_mm: K and N multiples of 16


def check_quantization(method: str | None, device: torch.device, dtype: torch.dtype) -> None:
    """Refuse, before any weights load, a quantization this device / dtype cannot run."""
    if method is None:
        return
    if method not in QUANTIZATION_METHODS:
        raise ValueError(f"quantization must be one of {QUANTIZATION_METHODS} or None, got {method!r}")
    if device.type != "cuda":
        return  # the float32 emulation runs any dtype
    cap = torch.cuda.get_device_capability(device)
    if cap < _MIN_CAPABILITY:
        raise ValueError(
            f"quantization='fp8' needs fp8 tensor cores (compute capability >= 8.9); "
            f"{torch.cuda.get_device_name(device)} is {cap[0]}.{cap[1]}"
        )
    if dtype != torch.bfloat16:
        # torch._scaled_mm produces row-wise scaled results in bfloat16 only
        raise ValueError(f"quantization='fp8' on CUDA needs dtype='bfloat16', got {dtype}")


def fp8_linear(
    x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None, out_dtype: torch.dtype
) -> torch.Tensor:
    """x [M, K] 16/32-bit, weight [N, K] e4m3, weight_scale [1, N] float32 -> [M, N] out_dtype."""
    xq, xs = ops.per_token_quant_fp8(x)  # [M, K] e4m3, [M, 1]
    return fp8_scaled_mm(xq, xs, weight, weight_scale, bias, out_dtype)


def fp8_scaled_mm(
    xq: torch.Tensor,
    xs: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """xq [M, K] e4m3 with per-row scales xs [M, 1] float32, weight [N, K] e4m3 with weight_scale
    [1, N] float32 -> (xq * xs) (weight * weight_scale)^T (+ bias) [M, N] out_dtype."""
    if xq.device.type == "cuda":
        out = torch._scaled_mm(xq, weight.t(), scale_a=xs, scale_b=weight_scale, out_dtype=out_dtype)
    else:
        # e4m3 x e4m3 products are exact in float32; scale the accumulator, as the GPU epilogue does
        out = ((xq.float() @ weight.float().t()) * xs * weight_scale).to(out_dtype)
    if bias is not None:
        out.add_(bias)
    return out


class Fp8Linear(nn.Module):
    """y = x W^T (+ b) with W stored as e4m3 rows and per-row float32 scales."""

    def __init__(
        self, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None, out_dtype: torch.dtype
    ):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.register_buffer("weight", weight)  # [N, K] float8_e4m3fn
        self.register_buffer("weight_scale", weight_scale)  # [1, N] float32
        self.register_buffer("bias", bias)  # [N] out_dtype, or None
        self.out_dtype = out_dtype

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Fp8Linear:
        w = linear.weight.detach()  # [N, K]
        if w.device.type == "cuda" and (w.shape[0] % _ALIGN or w.shape[1] % _ALIGN):
            raise ValueError(
                f"quantization='fp8' needs linear layer sizes that are multiples of {_ALIGN} "
                f"on CUDA, got {tuple(w.shape)}"
            )
        q, scales = ops.per_token_quant_fp8(w)  # per output row: the activation kernel's math
        bias = linear.bias.detach() if linear.bias is not None else None
        return cls(q, scales.reshape(1, -1).contiguous(), bias, w.dtype)

    def forward(self, x: torch.Tensor | QuantizedInput) -> torch.Tensor:
        """x [..., K] in any float dtype, or already quantized by the kernel that produced it."""
        if isinstance(x, QuantizedInput):
            lead = x.q.shape[:-1]
            xq, xs = x.q.reshape(-1, self.in_features), x.scale.reshape(-1, 1)  # [M, K] e4m3, [M, 1]
        else:
            lead = x.shape[:-1]
            xq, xs = ops.per_token_quant_fp8(x.reshape(-1, self.in_features))
        out = fp8_scaled_mm(xq, xs, self.weight, self.weight_scale, self.bias, self.out_dtype)
        return out.view(*lead, self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fp8 e4m3 row-wise"


def quantize_model(model: nn.Module, method: str) -> int:
    """Replace the decoder layers' projections in place; returns how many were replaced.
    Each module's 16-bit weights are dropped once its projections are converted (nothing else holds
    them), so peak memory grows by one module's projections, not by the decoder's."""
    if method not in QUANTIZATION_METHODS:
        raise ValueError(f"quantization must be one of {QUANTIZATION_METHODS}, got {method!r}")
    replaced = 0
    targets = [m for m in model.modules() if isinstance(m, (DecoderAttention, DecoderMLP))]
    for module in targets:
        for name, child in list(module.named_children()):
            if isinstance(child, nn.Linear):
                setattr(module, name, Fp8Linear.from_linear(child))
                replaced += 1
    if replaced == 0:
        raise ValueError(f"quantization={method!r}: the model has no decoder projections to quantize")
    # Let the kernels that produce an fp8 projection's input write it quantized. Only these three:
    # the final norm feeds the 16-bit LM head, and o_proj's input comes from the attention backend.
    for module in model.modules():
        if isinstance(module, DecoderLayer):
            module.input_layernorm.quant_out = isinstance(module.self_attn.qkv_proj, Fp8Linear)
            module.post_attention_layernorm.quant_out = isinstance(module.mlp.gate_up_proj, Fp8Linear)
        elif isinstance(module, DecoderMLP):
            module.quant_act = isinstance(module.down_proj, Fp8Linear)
    return replaced
