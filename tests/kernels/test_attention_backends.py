"""FlashBackend and CsrcBackend end to end (cache write + attention) against dense float64 attention:
fresh prefill, chunked prefill over a cached prefix, decode, GQA, and the fp8 cache (whose reference
attends over the K/V values rounded through e4m3 with the backend's scales)."""

from __future__ import annotations

import pytest
import torch
from kernel_helpers import dense_attention, make_meta, make_paged_kv, rel_err, requires_cuda

from modelyard.engine import ops
from modelyard.engine.attention import flash
from modelyard.engine.attention.csrc_paged import CsrcBackend

pytestmark = requires_cuda


def _backend(kind, **scales):
    if kind == "flash":
        if not flash.probe_varlen()[0]:
            pytest.skip(f"no varlen FlashAttention importable: {dict(flash.probe_varlen()[1])}")
        return flash.FlashBackend(**scales)
    return CsrcBackend(**scales)


def _run_step(backend, seq_lens, query_lens, hq, hk, d, block_size, dtype, seed, fp8_scales=None):
    """Context rows before each sequence's new tokens are already cached; the step's rows are not."""
    gen = torch.Generator().manual_seed(seed)
    dk, dv, kc, vc, bt = make_paged_kv(seq_lens, hk, d, block_size, dtype, "cuda", gen)
    if fp8_scales is not None:  # the pool holds e4m3; the reference sees what the backend reads back
        ks, vs = fp8_scales
        kc, vc = ops.quantize_kv(kc, ops.FP8_KV_DTYPE, ks), ops.quantize_kv(vc, ops.FP8_KV_DTYPE, vs)
        dk = [ops.dequantize_kv(ops.quantize_kv(k, ops.FP8_KV_DTYPE, ks), dtype, ks) for k in dk]
        dv = [ops.dequantize_kv(ops.quantize_kv(v, ops.FP8_KV_DTYPE, vs), dtype, vs) for v in dv]
    meta = make_meta(bt, seq_lens, query_lens, block_size, "cuda")
    k_new = torch.cat([k[n - q :] for k, n, q in zip(dk, seq_lens, query_lens)])
    v_new = torch.cat([v[n - q :] for v, n, q in zip(dv, seq_lens, query_lens)])
    stale = torch.randn_like(k_new).to(kc.dtype)  # rows the step must overwrite
    kc.view(-1, hk, d).view(torch.uint8)[meta.slot_mapping] = stale.view(torch.uint8)
    vc.view(-1, hk, d).view(torch.uint8)[meta.slot_mapping] = stale.view(torch.uint8)
    q = torch.randn(sum(query_lens), hq, d, generator=gen).to(dtype).cuda()
    scale = d**-0.5
    out = backend.forward(q, k_new, v_new, kc, vc, meta, scale)
    start = 0
    for i, (n, ql) in enumerate(zip(seq_lens, query_lens)):
        ref = dense_attention(q[start : start + ql], dk[i], dv[i], scale, causal_offset=n - ql)
        err = rel_err(out[start : start + ql], ref)
        assert err < 1.5e-2, f"sequence {i}: rel err {err:.2e}"
        start += ql


@pytest.mark.parametrize("kind", ["flash", "csrc"])
@pytest.mark.parametrize("hq,hk", [(8, 8), (8, 2)])
@pytest.mark.parametrize("block_size", [16, 32])
def test_fresh_prefill(kind, hq, hk, block_size):
    lens = [1, 17, 130, 64]
    _run_step(_backend(kind), lens, lens, hq, hk, 128, block_size, torch.bfloat16, seed=hq + block_size)


# (seq_lens, query_lens): prefixed sequences last; leading then a fresh tail (the flash backend
# splits the step there); prefixed in the middle (split after it)
CHUNKED = [([300, 40, 17], [64, 40, 1]), ([300, 40, 17], [64, 40, 17]), ([40, 300, 17, 9], [40, 64, 17, 9])]


@pytest.mark.parametrize("kind", ["flash", "csrc"])
@pytest.mark.parametrize("hq,hk", [(8, 8), (28, 4)])
@pytest.mark.parametrize("lens,qlens", CHUNKED)
def test_chunked_prefill_over_cached_prefix(kind, hq, hk, lens, qlens):
    _run_step(_backend(kind), lens, qlens, hq, hk, 128, 16, torch.bfloat16, seed=hq)


@pytest.mark.parametrize("kind", ["flash", "csrc"])
@pytest.mark.parametrize("d", [64, 80, 128])
def test_decode(kind, d):
    lens = [1, 33, 650, 1200]
    _run_step(_backend(kind), lens, [1] * len(lens), 16, 4, d, 16, torch.float16, seed=d)


@pytest.mark.parametrize("kind", ["flash", "csrc"])
@pytest.mark.parametrize("hq,hk,d", [(8, 8, 128), (28, 4, 128), (16, 4, 64)])
@pytest.mark.parametrize("scales", [(1.0, 1.0), (0.5, 2.5)])
def test_fp8_cache_decode_and_chunked_prefill(kind, hq, hk, d, scales):
    backend = _backend(kind, k_scale=scales[0], v_scale=scales[1])
    lens = [1, 33, 650, 1200]
    _run_step(backend, lens, [1] * len(lens), hq, hk, d, 16, torch.bfloat16, seed=d + hq, fp8_scales=scales)
    for lens, qlens in CHUNKED:
        _run_step(backend, lens, qlens, hq, hk, d, 16, torch.bfloat16, seed=hq, fp8_scales=scales)


def test_csrc_backend_float32_uses_sdpa_prefill():
    lens = [20, 45]
    backend = CsrcBackend()
    _run_step(backend, lens, lens, 4, 2, 64, 16, torch.float32, seed=5)
    _run_step(backend, lens, [1, 1], 4, 2, 64, 16, torch.float32, seed=6)
