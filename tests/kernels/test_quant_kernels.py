"""The fp8 linear path on the GPU: the csrc per-token quantizer bit-exact against the torch reference
(vector and scalar paths, strided rows, zero rows), torch._scaled_mm with row-wise scales against
float32 math over the same e4m3 inputs, at the LLaVA-7B / Qwen2-1.5B projection shapes, and the
norm / activation kernels with the quantizer fused in, bit-exact against the unfused CUDA ops."""

from __future__ import annotations

import pytest
import torch
from kernel_helpers import rel_err, requires_cuda

from modelyard.engine import kernels, ops
from modelyard.engine.models.layers import QuantizedInput
from modelyard.engine.quant import Fp8Linear, fp8_linear

pytestmark = requires_cuda


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize(
    "m,k,width", [(1, 4096, 4096), (37, 11008, 11008), (300, 1536, 1536), (9, 70, 70), (13, 4096, 12288)]
)
def test_per_token_quant_bit_exact(dtype, m, k, width):
    g = torch.Generator(device="cuda").manual_seed(m + k)
    base = torch.randn(m, width, device="cuda", generator=g) * torch.logspace(-4, 4, m, device="cuda").view(-1, 1)
    x = base.to(dtype)[:, width - k :]  # a column slice: row stride != k when width > k
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
    w = (torch.randn(n, k, device="cuda", generator=g) * k**-0.5).to(torch.bfloat16)
    wq, ws = ops.per_token_quant_fp8(w)
    out = fp8_linear(x, wq, ws.view(1, -1), None, torch.bfloat16)
    assert out.shape == (m, n) and out.dtype == torch.bfloat16
    xq, xs = ops.per_token_quant_fp8_ref(x)
    want = (xq.float() @ wq.float().t()) * xs * ws.view(1, -1)  # same e4m3 inputs, float32 sums
    assert rel_err(out, want) < 4e-3  # bf16 output rounding + sum order
    exact = x.float() @ w.float().t()
    assert rel_err(out, exact) < 0.06  # quantization error, not garbage


def test_fp8_linear_module_bias_and_leading_dims():
    lin = torch.nn.Linear(1536, 2048, bias=True, device="cuda", dtype=torch.bfloat16)
    fq = Fp8Linear.from_linear(lin)
    x = torch.randn(3, 5, 1536, device="cuda", dtype=torch.bfloat16)
    y = fq(x)
    assert y.shape == (3, 5, 2048)
    assert rel_err(y, lin(x)) < 0.06
    with pytest.raises(ValueError, match="multiples of 16"):
        Fp8Linear.from_linear(torch.nn.Linear(72, 40, device="cuda", dtype=torch.bfloat16))


# ---- the quantizer fused into the kernels that produce the fp8 layers' inputs ----------------------
# Bit-exact against the unfused CUDA composition (the csrc norm / activation, then the csrc quantizer):
# the fused kernels must round exactly as those do. The torch references round the 16-bit values a
# little differently (sum order, fast-math exp and rsqrt: test_small_kernels.py compares those with a
# tolerance), so against them the dequantized outputs are compared with one.

DTYPES = [torch.bfloat16, torch.float16, torch.float32]
_MIN_SCALE = torch.tensor(1e-12) / 448.0  # the scale of an all-zero row


def _assert_same_quant(got, want):
    (q, s), (wq, ws) = got, want
    assert q.dtype == torch.float8_e4m3fn and s.dtype == torch.float32 and s.shape == (*q.shape[:-1], 1)
    assert torch.equal(s, ws)
    assert torch.equal(q.view(torch.uint8), wq.view(torch.uint8))


def _assert_close_to_ref(got, want, exact):
    """got / want: (q, scales) of the kernel and the torch reference; exact: the unquantized reference."""
    deq, ref = got[0].float() * got[1], want[0].float() * want[1]
    assert rel_err(deq, ref) < 0.03  # rare one-step e4m3 differences where the 16-bit inputs differ
    assert rel_err(deq, exact.float()) < 0.06  # quantization error, not garbage


def _rows(T, width, dtype, gen, lo=-3.0, hi=3.0, pad=64):
    """[T, width] with row magnitudes spanning 10^lo..10^hi and row 1 all zero, as a column slice of a
    wider buffer (row stride width + pad, start 16-byte aligned): the layout of a slice of a fused output."""
    rows_scale = torch.logspace(lo, hi, T, device="cuda").view(-1, 1)
    base = torch.randn(T, width + pad, device="cuda", generator=gen) * rows_scale
    x = base.to(dtype)[:, pad // 2 : pad // 2 + width]
    if T > 2:
        x[1] = 0.0
    return x


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T", [1, 37, 300])
@pytest.mark.parametrize("H", [4096, 1536, 11008, 18944, 72, 70])  # 70: not a whole vector, scalar path
@pytest.mark.parametrize("add", [False, True])
def test_norm_quant_bit_exact(dtype, T, H, add):
    k = kernels.get()
    g = torch.Generator(device="cuda").manual_seed(T * 31 + H)
    x = _rows(T, H, dtype, g)
    w = (1 + 0.1 * torch.randn(H, device="cuda", generator=g)).to(dtype)
    r = _rows(T, H, dtype, g) * 0.5
    if dtype == torch.float32 and H == 18944:
        # 4736 float32 vectors exceed one CTA's registers (1024 threads x 4): the plain norm refuses
        # this width too, and the fused one must refuse it rather than launch.
        with pytest.raises(RuntimeError, match="too large"):
            k.rms_norm(x, w, 1e-6)
        with pytest.raises(RuntimeError, match="too large"):
            (k.fused_add_rms_norm_quant_fp8(x, r, w, 1e-6) if add else k.rms_norm_quant_fp8(x, w, 1e-6))
        return
    x0, r0 = x.clone(), r.clone()
    if add:
        q, s, res = k.fused_add_rms_norm_quant_fp8(x, r, w, 1e-5)
        normed, want_res = k.fused_add_rms_norm(x, r, w, 1e-5)
        assert torch.equal(res, want_res)
        assert torch.equal(x, x0) and torch.equal(r, r0)  # inputs untouched
        *ref, ref_res = ops.fused_add_rms_norm_quant_fp8_ref(x, r, w, 1e-5)
        exact = ops.fused_add_rms_norm_ref(x, r, w, 1e-5)[0]
        assert torch.equal(res, ref_res)
    else:
        q, s = k.rms_norm_quant_fp8(x, w, 1e-6)
        normed = k.rms_norm(x, w, 1e-6)
        ref, exact = ops.rms_norm_quant_fp8_ref(x, w, 1e-6), ops.rms_norm_ref(x, w, 1e-6)
    assert q.shape == (T, H) and s.shape == (T, 1)
    _assert_same_quant((q, s), k.per_token_quant_fp8(normed))
    _assert_close_to_ref((q, s), ref, exact)
    if T > 2:  # row 1 of x (and residual) is all zero
        assert float(s[1]) == float(_MIN_SCALE) and not q[1].float().any()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("H", [4096, 1000])
def test_norm_quant_misaligned_rows(dtype, H):
    """x (and residual) starting one element past a 16-byte boundary: the scalar path for any width."""
    k = kernels.get()
    g = torch.Generator(device="cuda").manual_seed(H)
    T = 37
    x = torch.randn(T * H + 1, device="cuda", generator=g).to(dtype)[1:].view(T, H)
    r = torch.randn(T * H + 1, device="cuda", generator=g).to(dtype)[1:].view(T, H)
    w = torch.randn(H, device="cuda", generator=g).to(dtype)
    _assert_same_quant(k.rms_norm_quant_fp8(x, w, 1e-6), k.per_token_quant_fp8(k.rms_norm(x, w, 1e-6)))
    q, s, res = k.fused_add_rms_norm_quant_fp8(x, r, w, 1e-6)
    normed, want_res = k.fused_add_rms_norm(x, r, w, 1e-6)
    _assert_same_quant((q, s), k.per_token_quant_fp8(normed))
    assert torch.equal(res, want_res)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T", [1, 37, 300])
# 1001: odd, the scalar two-pass kernel; 40960: wider than the register kernel holds, vector two-pass
@pytest.mark.parametrize("inter", [4096, 1536, 11008, 18944, 1001, 40960])
def test_silu_and_mul_quant_bit_exact(dtype, T, inter):
    k = kernels.get()
    g = torch.Generator(device="cuda").manual_seed(T * 7 + inter)
    x = _rows(T, 2 * inter, dtype, g, lo=-2.0, hi=1.5)  # products stay finite in float16
    q, s = k.silu_and_mul_quant_fp8(x)
    assert q.shape == (T, inter) and s.shape == (T, 1)
    _assert_same_quant((q, s), k.per_token_quant_fp8(k.silu_and_mul(x)))
    _assert_close_to_ref((q, s), ops.silu_and_mul_quant_fp8_ref(x), ops.silu_and_mul_ref(x))
    if T > 2:
        assert float(s[1]) == float(_MIN_SCALE) and not q[1].float().any()


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_and_mul_quant_leading_dims_and_misaligned(dtype):
    k = kernels.get()
    x = torch.randn(3, 5, 2 * 4864, device="cuda", dtype=dtype) * 4
    q, s = ops.silu_and_mul_quant_fp8(x)
    assert q.shape == (3, 5, 4864) and s.shape == (3, 5, 1)
    _assert_same_quant((q.view(15, 4864), s.view(15, 1)), k.per_token_quant_fp8(k.silu_and_mul(x).view(15, 4864)))
    flat = torch.randn(37 * 2 * 11008 + 1, device="cuda").to(dtype)[1:].view(37, 2 * 11008)  # scalar path
    _assert_same_quant(k.silu_and_mul_quant_fp8(flat), k.per_token_quant_fp8(k.silu_and_mul(flat)))


def test_fused_quant_ops_capture_in_cuda_graph():
    """No host syncs and no allocations that escape the graph: captured, the ops recompute from new inputs."""
    T, H, inter, dt = 16, 1024, 2816, torch.bfloat16
    x = torch.randn(T, H, device="cuda", dtype=dt)
    r = torch.randn(T, H, device="cuda", dtype=dt)
    w = torch.randn(H, device="cuda", dtype=dt)
    gu = torch.randn(T, 2 * inter, device="cuda", dtype=dt)

    def step():
        return (
            ops.rms_norm_quant_fp8(x, w, 1e-6),
            ops.fused_add_rms_norm_quant_fp8(x, r, w, 1e-6),
            ops.silu_and_mul_quant_fp8(gu),
        )

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        step()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        outs = step()
    for t in (x, r, gu):
        t.copy_(torch.randn_like(t) * 3)
    g.replay()
    torch.cuda.synchronize()
    want = step()
    _assert_same_quant(outs[0], want[0])
    _assert_same_quant(outs[1][:2], want[1][:2])
    assert torch.equal(outs[1][2], want[1][2])
    _assert_same_quant(outs[2], want[2])


def test_fp8_linear_takes_fused_inputs_bit_exact():
    """The model's wiring on CUDA: a projection fed by the quantizing norm / activation computes the
    same bits as one fed the 16-bit output that it quantizes itself."""
    from modelyard.engine.models.layers import RMSNorm

    T, H, inter, dt = 300, 1536, 8960, torch.bfloat16
    norm = RMSNorm(H, 1e-6).to("cuda", dt)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.1 * torch.randn(H, device="cuda"))
    qkv = Fp8Linear.from_linear(torch.nn.Linear(H, 2048, bias=True, device="cuda", dtype=dt))
    gate_up = Fp8Linear.from_linear(torch.nn.Linear(H, 2 * inter, device="cuda", dtype=dt))
    down = Fp8Linear.from_linear(torch.nn.Linear(inter, H, device="cuda", dtype=dt))
    x = torch.randn(T, H, device="cuda", dtype=dt)
    res = torch.randn(T, H, device="cuda", dtype=dt)
    plain = qkv(norm(x)), norm(x, res)
    norm.quant_out = True
    fused_in = norm(x)
    assert isinstance(fused_in, QuantizedInput)
    assert torch.equal(qkv(fused_in), plain[0])
    fused_in, fused_res = norm(x, res)
    h = gate_up(fused_in)
    assert torch.equal(h, gate_up(plain[1][0])) and torch.equal(fused_res, plain[1][1])
    assert torch.equal(down(QuantizedInput(*ops.silu_and_mul_quant_fp8(h))), down(ops.silu_and_mul(h)))
