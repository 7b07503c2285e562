"""csrc gate_up_silu (tma_gemm.cu: the decode MLP's gate_up GEMM, its folded RMSNorm and SiLU in one
kernel, sm_90a): every config against a float64 reference with the unfused path's rounding points,
over M = 1..64, ragged I and K, with and without the norm; every element written; determinism; inside
a CUDA graph; the argument checks. GPU only (Hopper for the kernel itself)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from modelyard.engine import kernels, ops

from kernel_helpers import poison_next_alloc, rel_err, requires_cuda

pytestmark = requires_cuda

# (M, I, K): one row; I not a multiple of any config's block (64, 96, 128) and K not of the 64-wide
# stage; K shorter than one pipeline; a Llama-7B decode shape at batch 64.
SHAPES = [(1, 64, 64), (7, 200, 72), (33, 288, 4104), (48, 1000, 640), (64, 11008, 4096)]
EPS = 1e-5


@pytest.fixture(scope="module")
def k():
    return kernels.get()


@pytest.fixture(scope="module")
def configs(k):
    blocks = k.gate_up_silu_configs().tolist()
    if torch.cuda.get_device_capability() != (9, 0):
        assert blocks == []
        pytest.skip("gate_up_silu is built for sm_90a (TMA + wgmma) only: this GPU has none of its configs")
    assert blocks and all(b % 32 == 0 for b in blocks)
    return blocks


def inputs(M, I, K, seed=0):
    """h [M, K] (a residual stream: rows of different scales) and w [2I, K] bf16."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    h = (torch.randn(M, K, device="cuda", generator=g) * torch.rand(M, 1, device="cuda", generator=g) * 8).bfloat16()
    w = (torch.randn(2 * I, K, device="cuda", generator=g) * K ** -0.5).bfloat16()
    return h, w


def reference(h, w, eps):
    """The unfused path's function and roundings: [g | u] = h w^T rounded to bf16 (the GEMM), each row
    scaled by 1 / sqrt(mean(h^2) + eps) and rounded (silu_and_mul's folded norm), then silu(g) rounded,
    times u, rounded. Products in float64."""
    gu = (h.double() @ w.double().t()).bfloat16()
    if eps is not None:
        s = torch.rsqrt(h.double().pow(2).mean(-1, keepdim=True) + eps)
        gu = (gu.double() * s).bfloat16()
    i = gu.shape[1] // 2
    return (F.silu(gu[:, :i].float()).bfloat16().float() * gu[:, i:].float()).bfloat16()


@pytest.mark.parametrize("norm", [True, False])
@pytest.mark.parametrize("M,I,K", SHAPES)
def test_every_config_matches_the_reference(k, configs, norm, M, I, K):
    h, w = inputs(M, I, K)
    eps = EPS if norm else None
    ref = reference(h, w, eps)
    for config, block in enumerate(configs):
        poison_next_alloc((M, I), torch.bfloat16, "cuda")
        out = k.gate_up_silu(h, w, eps, config)
        assert out.shape == (M, I) and out.dtype == torch.bfloat16
        # float32 accumulation order flips a bf16 rounding now and then: a few ulps, never a wrong column
        assert rel_err(out, ref) < 4e-3, (config, block)
        bad = (out.float() - ref.float()).abs() > 0.03 * ref.float().abs() + 0.03 * ref.float().abs().mean()
        assert not bad.any(), (config, block, bad.nonzero()[:4].tolist())
        assert torch.equal(out, k.gate_up_silu(h, w, eps, config))          # deterministic


def test_matches_the_unfused_ops(k, configs):
    """Against what the step ran before: the GEMM, then ops.silu_and_mul reducing the norm itself."""
    h, w = inputs(64, 1024, 2048, seed=3)
    unfused = ops.silu_and_mul(F.linear(h, w), norm_x=h, norm_eps=EPS)
    for config in range(len(configs)):
        assert rel_err(k.gate_up_silu(h, w, EPS, config), unfused) < 4e-3, config


def test_strided_rows(k, configs):
    """x may be a row-strided view (the TMA map takes its row stride)."""
    h, w = inputs(16, 256, 512, seed=1)
    wide = torch.zeros(16, 512 + 64, device="cuda", dtype=torch.bfloat16)
    wide[:, :512] = h
    for config in range(len(configs)):
        assert torch.equal(k.gate_up_silu(wide[:, :512], w, EPS, config), k.gate_up_silu(h, w, EPS, config))


def test_inside_a_cuda_graph(k, configs):
    """Replayed with new x: the tensor map (a captured kernel argument) points at x's buffer."""
    h, w = inputs(24, 512, 1024, seed=2)
    for config in range(len(configs)):
        eager = k.gate_up_silu(h, w, EPS, config)
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            k.gate_up_silu(h, w, EPS, config)
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            out = k.gate_up_silu(h, w, EPS, config)
        h.copy_(h.flip(0))
        g.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, eager.flip(0)), config
        h.copy_(h.flip(0))


def test_argument_checks(k, configs):
    h, w = inputs(8, 64, 128)
    bad = [
        (lambda: k.gate_up_silu(torch.zeros(65, 128, device="cuda", dtype=torch.bfloat16), w, EPS, 0), "M must be"),
        (lambda: k.gate_up_silu(h.half(), w.half(), EPS, 0), "must be bfloat16"),
        (lambda: k.gate_up_silu(h, w[:, :64], EPS, 0), "need x"),
        (lambda: k.gate_up_silu(h, w[:127], EPS, 0), "need x"),                       # 2I rows: even
        (lambda: k.gate_up_silu(h, w[:124], EPS, 0), "multiples of 8"),               # I = 62
        (lambda: k.gate_up_silu(h, w.t().contiguous().t(), EPS, 0), "must be contiguous"),
        (lambda: k.gate_up_silu(h, w, -1.0, 0), "norm_eps"),
        (lambda: k.gate_up_silu(h, w, EPS, len(configs)), "config must be"),
        (lambda: k.gate_up_silu(h.cpu(), w.cpu(), EPS, 0), None),
    ]
    for fn, msg in bad:
        with pytest.raises((RuntimeError, NotImplementedError), match=msg):
            fn()
