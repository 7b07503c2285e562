"""csrc skinny_gemm (small-batch decode GEMMs, split-K over a thread-block cluster; mma.sync kernels,
and on Hopper TMA + wgmma ones, csrc/tma_gemm.cu): every config and split_k against a float64
reference across M = 1..64, ragged N and K, bias, bf16 / fp16, strided rows; determinism; the
argument checks. GPU only."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from modelyard.engine import kernels

from kernel_helpers import linear_inputs, linear_ref, rel_err, requires_cuda

pytestmark = requires_cuda

# (M, N, K): one 16-row tile and partial ones, ragged last column block (N % block_n != 0), K not a
# multiple of the 64-wide stage, K shorter than one pipeline, a 7B-like shape with split-K 8.
SHAPES = [(1, 64, 64), (7, 200, 72), (16, 1024, 1024), (33, 136, 4104), (48, 1000, 640), (64, 4096, 11008)]


@pytest.fixture(scope="module")
def k():
    return kernels.get()


@pytest.fixture(scope="module")
def configs(k):
    rows = k.skinny_gemm_configs().tolist()
    assert rows, "an sm_80+ GPU offers every config"
    assert [r[4] for r in rows] == sorted(r[4] for r in rows)      # mma.sync configs first, then TMA
    if torch.cuda.get_device_capability() == (9, 0):
        assert {1, 2, 3} <= {r[4] for r in rows}, "an sm_90a build offers the TMA + wgmma configs of each kind"
    assert all(r[3] == 1 for r in rows if r[4] in (2, 3)), "the pair and x-sharing configs do not split K"
    return rows


def tma_configs(configs):
    return [i for i, r in enumerate(configs) if r[4] >= 1]


def _splits(K, max_split):
    return sorted({s for s in (1, 2, 3, max_split) if s <= min(max_split, -(-K // 64))})


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("M,N,K", SHAPES)
def test_every_config_matches_the_reference(k, configs, dtype, bias, M, N, K):
    x, w, b = linear_inputs(M, N, K, dtype, bias)
    ref = linear_ref(x, w, b)
    tol = 2 * rel_err(F.linear(x, w, b), ref) + 1e-3     # torch's own rounding, with headroom
    for config, (block_n, threads, max_m, max_split, kind, per_sm) in enumerate(configs):
        assert block_n % 8 == 0 and threads % 32 == 0 and max_m == 64 and kind in (0, 1, 2, 3) and 1 <= per_sm <= 2
        for split in _splits(K, max_split):
            out = k.skinny_gemm(x, w, b, config, split)
            assert out.shape == (M, N) and out.dtype == dtype
            assert rel_err(out, ref) < tol, (config, split)
            assert torch.equal(out, k.skinny_gemm(x, w, b, config, split))     # deterministic


@pytest.mark.parametrize("M,N,K", SHAPES)
def test_add_in_place(k, configs, M, N, K):
    """skinny_gemm_add_: out += x w^T in place for every config and split_k, one rounding of the sum."""
    x, w, _ = linear_inputs(M, N, K, torch.bfloat16, False)
    base = torch.randn(M, N, device="cuda").to(torch.bfloat16)
    ref = linear_ref(x, w, None) + base.double()
    tol = 2 * rel_err(torch.addmm(base, x, w.t()), ref) + 1e-3
    for config, (_, _, _, max_split, _, _) in enumerate(configs):
        for split in _splits(K, max_split):
            out = base.clone()
            k.skinny_gemm_add_(out, x, w, config, split)
            assert rel_err(out, ref) < tol, (config, split)
    with pytest.raises(RuntimeError, match="skinny_gemm_add_: out must be"):
        k.skinny_gemm_add_(base.t(), x, w, 0, 1)


def test_rows_past_m_and_columns_past_n_are_untouched_and_zero_free(k, configs):
    """M = 5 of a 16-row tile, N = 72 of a 128-wide block: the output holds exactly M x N values and
    a row of zeros in x gives a row of (bias) values, not garbage from the tile's padding."""
    x, w, b = linear_inputs(5, 72, 256, torch.bfloat16, True, seed=1)
    x[2] = 0
    for config in range(len(configs)):
        out = k.skinny_gemm(x, w, b, config, 2 if configs[config][3] >= 2 else 1)
        assert out.shape == (5, 72)
        assert torch.equal(out[2], b)


def test_strided_rows(k, configs):
    """x as a view with a row stride larger than K (a slice of a wider activation)."""
    wide = torch.randn(16, 512 + 64, device="cuda").to(torch.bfloat16)
    x = wide[:, :512]
    w = (torch.randn(256, 512, device="cuda") / 512 ** 0.5).to(torch.bfloat16)
    for config in [2] + tma_configs(configs):
        out = k.skinny_gemm(x, w, None, config, min(2, configs[config][3]))
        assert torch.equal(out, k.skinny_gemm(x.contiguous(), w, None, config, min(2, configs[config][3])))
        assert rel_err(out, linear_ref(x.contiguous(), w, None)) < 1e-2


def test_inside_a_cuda_graph(k, configs):
    """Replayed with new x: the TMA kernels' tensor maps (captured kernel arguments) point at x's
    buffer, so they read the new values as the mma.sync kernels do."""
    for config in [1] + tma_configs(configs):
        x, w, b = linear_inputs(16, 512, 1024, torch.bfloat16, True, seed=2)
        split = min(4, configs[config][3])
        eager = k.skinny_gemm(x, w, b, config, split)
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            k.skinny_gemm(x, w, b, config, split)
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            out = k.skinny_gemm(x, w, b, config, split)
        x.copy_(x.flip(0))
        g.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, k.skinny_gemm(x, w, b, config, split)), config
        assert rel_err(out, eager.flip(0)) < 1e-2, config


def test_argument_checks(k, configs):
    x, w, _ = linear_inputs(8, 64, 128, torch.bfloat16, False)
    max_split = configs[0][3]
    bad = [
        (lambda: k.skinny_gemm(torch.randn(65, 128, device="cuda").to(torch.bfloat16), w, None, 0, 1), "M must be"),
        (lambda: k.skinny_gemm(x, w.half(), None, 0, 1), "both be bfloat16 or both float16"),
        (lambda: k.skinny_gemm(x.float(), w.float(), None, 0, 1), "both be bfloat16 or both float16"),
        (lambda: k.skinny_gemm(x[:, :124], w[:, :124].contiguous(), None, 0, 1), "multiples of 8"),
        (lambda: k.skinny_gemm(x, w[:60], None, 0, 1), "multiples of 8"),
        (lambda: k.skinny_gemm(x, w.t().contiguous().t(), None, 0, 1), "must be contiguous"),
        (lambda: k.skinny_gemm(x, w[:, :64], None, 0, 1), "need x"),
        (lambda: k.skinny_gemm(x, w, None, len(configs), 1), "config must be"),
        (lambda: k.skinny_gemm(x, w, None, 0, 0), "split_k must be"),
        (lambda: k.skinny_gemm(x, w, None, 0, 3), "split_k must be"),              # K = 128: 2 stages
        (lambda: k.skinny_gemm(x, w, torch.zeros(63, device="cuda", dtype=torch.bfloat16), 0, 1), "bias"),
        (lambda: k.skinny_gemm(x, w, torch.zeros(64, device="cuda"), 0, 1), "bias"),
        (lambda: k.skinny_gemm(x.cpu(), w.cpu(), None, 0, 1), None),
    ]
    if max_split == 1:
        bad.append((lambda: k.skinny_gemm(x, w, None, 0, 2), "split_k must be"))
    for c in [i for i, r in enumerate(configs) if r[4] in (2, 3)]:
        bad.append((lambda c=c: k.skinny_gemm(x, w, None, c, 2), "split_k must be"))
    for fn, msg in bad:
        with pytest.raises((RuntimeError, NotImplementedError), match=msg):
            fn()
