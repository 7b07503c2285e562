"""The fp8 linear path on the GPU: the csrc per-token quantizer bit-exact against the torch reference
(vector and scalar paths, strided rows, zero rows), and torch._scaled_mm with row-wise scales against
float32 math over the same e4m3 inputs, at the LLaVA-7B / Qwen2-1.5B projection shapes."""
from __future__ import annotations

import pytest
import torch

from kernel_helpers import rel_err, requires_cuda
from modelyard.engine import kernels, ops
from modelyard.engine.quant import Fp8Linear, fp8_linear

pytestmark = requires_cuda


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("m,k,width", [(1, 4096, 4096), (37, 11008, 11008), (300, 1536, 1536),
                                       (9, 70, 70), (13, 4096, 12288)])
def test_per_token_quant_bit_exact(dtype, m, k, width):
    g = torch.Generator(device="cuda").manual_seed(m + k)
    base = torch.randn(m, width, device="cuda", generator=g) * torch.logspace(-4, 4, m, device="cuda").view(-1, 1)
    x = base.to(dtype)[:, width - k:]                 # a column slice: row stride != k when width > k
    if m > 2:
        x[1] = 0.0
    q, s = kernels.get().per_token_quant_fp8(x)
    rq, rs = ops.per_token_quant_fp8_ref(x)
    assert q.dtype == torch.float8_e4m3fn and s.shape == (m, 1)
    assert torch.equal(s, rs)
    assert torch.equal(q.view(torch.uint8), rq.view(torch.uint8))


@pytest.mark.parametrize("m", [1, 7, 64, 257, 2048])
@pytest.mark.parametrize("k,n", [(4096, 12288), (11008, 4096), (1536, 2048), (4096, 22016)])
def test_fp8_linear_against_float32(m, k, n):
    g = torch.Generator(device="cuda").manual_seed(m * 7 + n)
    x = torch.randn(m, k, device="cuda", generator=g, dtype=torch.bfloat16)
    w = (torch.randn(n, k, device="cuda", generator=g) * k ** -0.5).to(torch.bfloat16)
    wq, ws = ops.per_token_quant_fp8(w)
    out = fp8_linear(x, wq, ws.view(1, -1), None, torch.bfloat16)
    assert out.shape == (m, n) and out.dtype == torch.bfloat16
    xq, xs = ops.per_token_quant_fp8_ref(x)
    want = (xq.float() @ wq.float().t()) * xs * ws.view(1, -1)       # same e4m3 inputs, float32 sums
    assert rel_err(out, want) < 4e-3                                  # bf16 output rounding + sum order
    exact = x.float() @ w.float().t()
    assert rel_err(out, exact) < 0.06                                 # quantization error, not garbage


def test_fp8_linear_module_bias_and_leading_dims():
    lin = torch.nn.Linear(1536, 2048, bias=True, device="cuda", dtype=torch.bfloat16)
    fq = Fp8Linear.from_linear(lin)
    x = torch.randn(3, 5, 1536, device="cuda", dtype=torch.bfloat16)
    y = fq(x)
    assert y.shape == (3, 5, 2048)
    assert rel_err(y, lin(x)) < 0.06
    with pytest.raises(ValueError, match="multiples of 16"):
        Fp8Linear.from_linear(torch.nn.Linear(72, 40, device="cuda", dtype=torch.bfloat16))
