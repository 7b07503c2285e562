"""Small building blocks shared by the native models: merged linears, activations, RMSNorm."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops


class QuantizedInput(NamedTuple):
    """A linear layer's input already quantized per token (x ~= q * scale row by row), produced by the
    kernel that computed x (quant.Fp8Linear's consumers: the decoder norms and silu_and_mul)."""

    q: torch.Tensor  # [..., K] float8_e4m3fn
    scale: torch.Tensor  # [..., 1] float32


class MergedLinear(nn.Linear):
    """Several projections of one input computed by a single GEMM.

    The checkpoint stores them separately (e.g. q_proj / k_proj / v_proj); the loader copies each into
    its rows of this weight, so `parts` maps the checkpoint's module name to (row offset, rows).
    """

    def __init__(self, in_features: int, parts: dict[str, int], bias: bool):
        super().__init__(in_features, sum(parts.values()), bias=bias)
        self.parts: dict[str, tuple[int, int]] = {}
        offset = 0
        for name, rows in parts.items():
            self.parts[name] = (offset, rows)
            offset += rows


def _quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


def _gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


# The HF `hidden_act` names the supported towers and projectors use; each matches transformers' ACT2FN.
_ACTIVATIONS = {
    "gelu": F.gelu,
    "quick_gelu": _quick_gelu,
    "gelu_pytorch_tanh": _gelu_tanh,
    "silu": F.silu,
}


def activation(name: str):
    try:
        return _ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"unsupported activation {name!r}; supported: {sorted(_ACTIVATIONS)}") from None


class RMSNorm(nn.Module):
    """Holds the weight; the math lives in ops (fused CUDA kernel or the torch reference).

    quant_out: the output feeds only an fp8 linear layer, so the norm kernel writes it quantized
    (a QuantizedInput) instead of in the model dtype; quant.quantize_model sets it."""

    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps
        self.quant_out = False

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """Without residual: norm(x). With residual: (norm(x + residual), x + residual).
        norm(...) is a QuantizedInput when quant_out is set."""
        if self.quant_out:
            if residual is None:
                return QuantizedInput(*ops.rms_norm_quant_fp8(x, self.weight, self.eps))
            q, scale, residual = ops.fused_add_rms_norm_quant_fp8(x, residual, self.weight, self.eps)
            return QuantizedInput(q, scale), residual
        if residual is None:
            return ops.rms_norm(x, self.weight, self.eps)
        return ops.fused_add_rms_norm(x, residual, self.weight, self.eps)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}" + (", quant_out=fp8" if self.quant_out else "")
