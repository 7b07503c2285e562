"""csrc lt_gemm (cuBLASLt with an explicit algorithm): every heuristic candidate against a float64
reference, 16-bit with and without bias, strided inputs, e4m3 with row-wise scales, and the
argument checks. GPU only."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from modelyard.engine import kernels

from kernel_helpers import linear_inputs, linear_ref, rel_err, requires_cuda

pytestmark = requires_cuda

SHAPES = [(1, 256, 128), (7, 384, 512), (64, 1024, 4096)]    # (M, N, K)


@pytest.fixture(scope="module")
def k():
    return kernels.get()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("M,N,K", SHAPES)
def test_every_candidate_matches_the_reference(k, dtype, bias, M, N, K):
    x, w, b = linear_inputs(M, N, K, dtype, bias)
    algos, info = k.lt_gemm_algos(x, w, b, None, None, dtype, 8)
    assert algos.shape[0] >= 1 and algos.shape[1] == 64 and info.shape == (algos.shape[0], 8)
    ref = linear_ref(x, w, b)
    tol = 2 * rel_err(F.linear(x, w, b), ref) + 1e-3     # torch's own rounding, with headroom
    for i in range(algos.shape[0]):
        out = k.lt_gemm(x, w, b, None, None, dtype, algos[i].clone())
        assert out.shape == (M, N) and out.dtype == dtype
        assert rel_err(out, ref) < tol, (i, info[i].tolist())
        assert torch.equal(out, k.lt_gemm(x, w, b, None, None, dtype, algos[i].clone()))   # deterministic


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("M,N,K", SHAPES)
def test_add_in_place(k, dtype, M, N, K):
    """lt_gemm_add_: out += x w^T (beta 1, C = D) with every candidate, one rounding of the sum."""
    x, w, _ = linear_inputs(M, N, K, dtype, False)
    base = torch.randn(M, N, device="cuda").to(dtype)
    ref = linear_ref(x, w, None) + base.double()
    tol = 2 * rel_err(torch.addmm(base, x, w.t()), ref) + 1e-3
    algos, info = k.lt_gemm_algos(x, w, None, None, None, dtype, 8)
    for i in range(algos.shape[0]):
        out = base.clone()
        k.lt_gemm_add_(out, x, w, algos[i].clone())
        assert rel_err(out, ref) < tol, (i, info[i].tolist())
    with pytest.raises(RuntimeError, match="lt_gemm_add_: out must be"):
        k.lt_gemm_add_(base[:, :8].contiguous(), x, w, algos[0].clone())


@pytest.mark.parametrize("M,N,K", SHAPES)
def test_wide_list(k, M, N, K):
    """wide=True: the heuristic's candidates first, then their neighbours (other split-k values,
    tiles and stages); no duplicates, and (a spread-out sample of) its entries all compute the
    product, plain and accumulating."""
    x, w, _ = linear_inputs(M, N, K, torch.bfloat16, False)
    algos, info = k.lt_gemm_algos(x, w, None, None, None, torch.bfloat16, 4096, True)
    assert algos.shape[0] > 8 and info.shape == (algos.shape[0], 8)
    assert len({bytes(r) for r in algos.numpy()}) == algos.shape[0]          # no duplicates
    heur, _ = k.lt_gemm_algos(x, w, None, None, None, torch.bfloat16, 64)
    assert torch.equal(algos[:heur.shape[0]], heur)                            # the heuristic's own list first
    assert len({r[2] for r in info.tolist()}) > 1                             # split-k varies
    ref = linear_ref(x, w, None)
    base = torch.randn(M, N, device="cuda").to(torch.bfloat16)
    tol = 2 * rel_err(F.linear(x, w), ref) + 1e-3
    for i in torch.linspace(0, algos.shape[0] - 1, 48).long().unique().tolist():
        a = algos[i].clone()
        assert rel_err(k.lt_gemm(x, w, None, None, None, torch.bfloat16, a), ref) < tol, info[i].tolist()
        out = base.clone()
        k.lt_gemm_add_(out, x, w, a)
        assert rel_err(out, ref + base.double()) < tol, info[i].tolist()
    few, _ = k.lt_gemm_algos(x, w, None, None, None, torch.bfloat16, 3, True)
    assert torch.equal(few, algos[:3])                                       # max_algos caps, same order
    with pytest.raises(RuntimeError, match="max_algos must be in \\[1, 64\\]"):
        k.lt_gemm_algos(x, w, None, None, None, torch.bfloat16, 65)


def test_strided_rows(k):
    """x as a view with a row stride larger than K (a slice of a wider activation)."""
    wide = torch.randn(16, 512 + 64, device="cuda").to(torch.bfloat16)
    x = wide[:, :512]
    w = (torch.randn(256, 512, device="cuda") / 512 ** 0.5).to(torch.bfloat16)
    algos, _ = k.lt_gemm_algos(x, w, None, None, None, torch.bfloat16, 4)
    out = k.lt_gemm(x, w, None, None, None, torch.bfloat16, algos[0].clone())
    assert rel_err(out, linear_ref(x.contiguous(), w, None)) < 1e-2


@pytest.mark.skipif(torch.cuda.is_available() and torch.cuda.get_device_capability() < (9, 0),
                    reason="row-wise scaled e4m3 GEMMs in cuBLASLt need Hopper (compute capability 9.0) or newer")
@pytest.mark.parametrize("M,N,K", SHAPES)
def test_fp8_row_scaled(k, M, N, K):
    x, w, _ = linear_inputs(M, N, K, torch.bfloat16, False, seed=1)
    xq, xs = k.per_token_quant_fp8(x)
    wq, ws = k.per_token_quant_fp8(w)
    ref = (xq.double() * xs.double()) @ (wq.double() * ws.double()).t()
    algos, _ = k.lt_gemm_algos(xq, wq, None, xs.view(-1), ws.view(-1), torch.bfloat16, 8)
    assert algos.shape[0] >= 1
    for i in range(algos.shape[0]):
        out = k.lt_gemm(xq, wq, None, xs.view(-1), ws.view(-1), torch.bfloat16, algos[i].clone())
        assert out.dtype == torch.bfloat16 and rel_err(out, ref) < 1e-2


def test_argument_checks(k):
    x, w, b = linear_inputs(4, 256, 128, torch.bfloat16, True)
    algos, _ = k.lt_gemm_algos(x, w, None, None, None, torch.bfloat16, 2)
    with pytest.raises(RuntimeError, match="64 bytes"):
        k.lt_gemm(x, w, None, None, None, torch.bfloat16, algos[0, :10].clone())
    with pytest.raises(RuntimeError, match="bfloat16, float16 or float8_e4m3fn"):
        k.lt_gemm_algos(x.float(), w.float(), None, None, None, torch.float32, 2)
    with pytest.raises(RuntimeError, match="bias must be"):
        k.lt_gemm_algos(x, w, b.float(), None, None, torch.bfloat16, 2)
    with pytest.raises(RuntimeError, match="need x \\[M, K\\] and w \\[N, K\\]"):
        k.lt_gemm(x, w[:, :64].contiguous(), None, None, None, torch.bfloat16, algos[0].clone())
    with pytest.raises(RuntimeError, match="need x_scale and w_scale"):
        k.lt_gemm_algos(x.to(torch.float8_e4m3fn), w.to(torch.float8_e4m3fn), None, None, None, torch.bfloat16, 2)
    with pytest.raises(RuntimeError, match="multiples of 8"):
        k.lt_gemm_algos(x[:, :100], w[:, :100].contiguous(), None, None, None, torch.bfloat16, 2)
