"""The fp8 KV cache's torch side: quantize/dequantize, the reference cache write and paged decode, and
every attention path that reads cache rows back (sdpa backend, csrc sdpa_prefill, the varlen gather
branch, FlashBackend's kernels-off decode), against float64 attention over hand-rounded K/V."""

from __future__ import annotations

import inspect
import math
import random

import pytest
import torch
from test_attention_sdpa import dense_reference, paged_meta, scattered_tables

from modelyard.engine import ops
from modelyard.engine.attention import flash, gather_kv
from modelyard.engine.attention.base import AttentionBackend
from modelyard.engine.attention.csrc_paged import sdpa_prefill
from modelyard.engine.attention.sdpa import SdpaBackend

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
SCALES = [(1.0, 1.0), (0.37, 1.9)]


def hand_round(x: torch.Tensor, scale: float) -> torch.Tensor:
    """float32 value an fp8 cache entry of x reads back as (saturate, round to e4m3, rescale)."""
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8).float() * scale


# ---- quantize / dequantize ---------------------------------------------------------------------


@pytest.mark.parametrize("scale", [1.0, 0.37, 4.0])
def test_round_trip_error_is_within_half_an_e4m3_step(scale):
    gen = torch.Generator().manual_seed(0)
    # magnitudes from deep in the subnormals (2^-9 is the smallest e4m3 step) up to the saturation point
    mags = torch.logspace(-4, math.log10(FP8_MAX), 4001, dtype=torch.float64).float()
    x = mags * scale * torch.where(torch.rand(4001, generator=gen) < 0.5, -1.0, 1.0)
    q = ops.quantize_kv(x, FP8, scale)
    assert q.dtype == FP8 and q.shape == x.shape
    back = ops.dequantize_kv(q, torch.float32, scale)
    # 3 mantissa bits: half a step is 2^-4 of the value for normals, 2^-10 absolute for subnormals
    bound = torch.maximum(x.abs() * 2.0**-4, torch.tensor(2.0**-10 * scale)) * (1 + 1e-6)
    assert ((back - x).abs() <= bound).all()
    assert (back != x).float().mean() > 0.5  # it did round: most values are not on the grid
    assert torch.equal(ops.dequantize_kv(q, torch.float32, scale), hand_round(x, scale))
    grid = torch.tensor([0.0, 1.0, -1.5, 0.875, 448.0, 2.0**-9]) * scale
    assert torch.allclose(
        ops.dequantize_kv(ops.quantize_kv(grid, FP8, scale), torch.float32, scale), grid, rtol=1e-6, atol=0
    )  # representable values survive exactly


def test_out_of_range_values_saturate_instead_of_turning_nan():
    scale = 0.5
    x = torch.tensor([1e6, -1e6, 300.0, -224.5, float("inf"), float("-inf")])
    back = ops.dequantize_kv(ops.quantize_kv(x, FP8, scale), torch.float32, scale)
    assert torch.equal(back, torch.tensor([224.0, -224.0, 224.0, -224.0, 224.0, -224.0]))
    assert ops.dequantize_kv(ops.quantize_kv(x, FP8, scale), torch.bfloat16, scale).dtype == torch.bfloat16


def test_a_16_or_32_bit_cache_ignores_the_scale():
    x = torch.randn(5, 3)
    assert torch.equal(ops.quantize_kv(x, torch.float16, 0.25), x.half())
    assert torch.equal(ops.dequantize_kv(x.half(), torch.float32, 0.25), x.half().float())
    assert not ops.is_fp8(torch.bfloat16) and ops.is_fp8(FP8) and ops.is_fp8(torch.zeros(1, dtype=FP8))


def test_gather_kv_dequantizes_fp8_rows_and_passes_other_dtypes_through():
    gen = torch.Generator().manual_seed(1)
    vals = torch.randn(6, 4, 2, 8, generator=gen)  # [NB, BS, Hk, D]
    cache = ops.quantize_kv(vals, FP8, 0.37)
    idx = torch.tensor([[4, 1], [0, 5]])
    got = gather_kv(cache, idx, torch.float32, 0.37)  # [2, 2, BS, Hk, D]
    assert got.dtype == torch.float32 and got.shape == (2, 2, 4, 2, 8)
    assert torch.equal(got, hand_round(vals, 0.37)[idx])
    assert torch.equal(gather_kv(vals, idx, torch.float16, 0.37), vals[idx].half())


# ---- the reference cache write and paged decode ------------------------------------------------


def test_reshape_and_cache_ref_quantizes_each_tensor_with_its_scale_and_skips_padding():
    gen = torch.Generator().manual_seed(2)
    nb, bs, hk, d = 4, 4, 2, 8
    old_k = ops.quantize_kv(torch.randn(nb, bs, hk, d, generator=gen), FP8)
    old_v = ops.quantize_kv(torch.randn(nb, bs, hk, d, generator=gen), FP8)
    k_cache, v_cache = old_k.clone(), old_v.clone()
    k = torch.randn(6, hk, d, generator=gen) * 3
    v = torch.randn(6, hk, d, generator=gen) * 3
    slots = torch.tensor([5, -1, 0, 15, -1, 9])  # -1: padding rows, never written
    ops.reshape_and_cache_ref(k, v, k_cache, v_cache, slots, k_scale=0.37, v_scale=1.9)
    assert k_cache.dtype == v_cache.dtype == FP8
    flat_k, flat_v = k_cache.view(-1, hk, d), v_cache.view(-1, hk, d)
    for row, slot in enumerate(slots.tolist()):
        if slot >= 0:
            assert torch.equal(flat_k[slot].float() * 0.37, hand_round(k[row], 0.37))
            assert torch.equal(flat_v[slot].float() * 1.9, hand_round(v[row], 1.9))
    untouched = [s for s in range(nb * bs) if s not in (5, 0, 15, 9)]
    for new, old in ((flat_k, old_k), (flat_v, old_v)):
        assert torch.equal(new[untouched].view(torch.uint8), old.view(-1, hk, d)[untouched].view(torch.uint8))


@pytest.mark.parametrize("k_scale,v_scale", SCALES)
def test_paged_decode_attention_ref_reads_fp8_with_its_scales(k_scale, v_scale):
    gen = torch.Generator().manual_seed(3)
    rng = random.Random(3)
    hq, hk, d, bs = 8, 2, 16, 4
    seq_lens = [1, 7, 20]
    nb = sum(math.ceil(n / bs) for n in seq_lens) + 2
    tables = scattered_tables(seq_lens, bs, nb, rng)
    keys = torch.randn(nb, bs, hk, d, generator=gen) * 2
    vals = torch.randn(nb, bs, hk, d, generator=gen) * 2
    k_cache, v_cache = ops.quantize_kv(keys, FP8, k_scale), ops.quantize_kv(vals, FP8, v_scale)
    meta = paged_meta([1] * 3, seq_lens, tables, bs)
    q = torch.randn(3, hq, d, generator=gen)
    out = ops.paged_decode_attention_ref(q, k_cache, v_cache, meta.block_tables, meta.seq_lens, 0.25, k_scale, v_scale)
    for i, (n, table) in enumerate(zip(seq_lens, tables)):
        rows = torch.tensor(table)
        k_i = hand_round(keys[rows], k_scale).flatten(0, 1)[:n]  # [n, Hk, D]
        v_i = hand_round(vals[rows], v_scale).flatten(0, 1)[:n]
        torch.testing.assert_close(out[i], dense_reference(q[i : i + 1], k_i, v_i, 0.25)[0], rtol=1e-5, atol=1e-5)
    if (k_scale, v_scale) != (1.0, 1.0):  # the scales are applied: reading without them differs
        unscaled = ops.paged_decode_attention_ref(q, k_cache, v_cache, meta.block_tables, meta.seq_lens, 0.25)
        assert (unscaled - out).abs().max() > 0.1


# ---- attention backends over an fp8 cache ------------------------------------------------------


def fp8_step(query_lens, seq_lens, k_scale, v_scale, hq=6, hk=2, d=16, bs=4, dtype=torch.float32, seed=0):
    """A step whose prefixes are already in an fp8 cache (written by the reference op with the
    scales). Returns q, the step's k/v, the caches, the metadata, and per sequence the full K/V as
    the cache reads them back (hand-rounded) and unrounded."""
    gen = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    nb = sum(math.ceil(n / bs) for n in seq_lens) + 3
    k_cache = torch.zeros(nb, bs, hk, d, dtype=FP8)
    v_cache = torch.zeros(nb, bs, hk, d, dtype=FP8)
    tables = scattered_tables(seq_lens, bs, nb, rng)
    full_k = [torch.randn(n, hk, d, generator=gen).to(dtype) for n in seq_lens]
    full_v = [torch.randn(n, hk, d, generator=gen).to(dtype) for n in seq_lens]
    prefix = [n - ql for ql, n in zip(query_lens, seq_lens)]
    pre = [i for i, p in enumerate(prefix) if p > 0]
    if pre:
        pm = paged_meta([prefix[i] for i in pre], [prefix[i] for i in pre], [tables[i] for i in pre], bs)
        ops.reshape_and_cache_ref(
            torch.cat([full_k[i][: prefix[i]] for i in pre]),
            torch.cat([full_v[i][: prefix[i]] for i in pre]),
            k_cache,
            v_cache,
            pm.slot_mapping,
            k_scale,
            v_scale,
        )
    meta = paged_meta(query_lens, seq_lens, tables, bs)
    k_new = torch.cat([k[p:] for k, p in zip(full_k, prefix)])
    v_new = torch.cat([v[p:] for v, p in zip(full_v, prefix)])
    q = torch.randn(sum(query_lens), hq, d, generator=gen).to(dtype)
    rounded = [(hand_round(k, k_scale), hand_round(v, v_scale)) for k, v in zip(full_k, full_v)]
    return q, k_new, v_new, k_cache, v_cache, meta, rounded, list(zip(full_k, full_v))


def check_against(out, q, meta, kv, scale, tol):
    start = 0
    for (k, v), ql in zip(kv, meta.query_lens_cpu):
        ref = dense_reference(q[start : start + ql].float(), k.float(), v.float(), scale)
        torch.testing.assert_close(out[start : start + ql].float(), ref, rtol=tol, atol=tol)
        start += ql


CASES = {
    "fresh prefill": ([5, 9], [5, 9]),
    "chunk over a cached prefix": ([4, 1, 6], [13, 9, 6]),
    "decode": ([1, 1, 1], [1, 10, 17]),
}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("k_scale,v_scale", SCALES)
def test_sdpa_backend_attends_over_the_dequantized_cache(case, k_scale, v_scale):
    query_lens, seq_lens = CASES[case]
    q, k, v, kc, vc, meta, rounded, exact = fp8_step(query_lens, seq_lens, k_scale, v_scale)
    out = SdpaBackend(k_scale=k_scale, v_scale=v_scale).forward(q, k, v, kc, vc, meta, 0.3)
    check_against(out, q, meta, rounded, 0.3, 1e-5)
    # the cache really is fp8: the unrounded K/V give a measurably different answer
    with pytest.raises(AssertionError):
        check_against(out, q, meta, exact, 0.3, 1e-4)


@pytest.mark.parametrize("k_scale,v_scale", SCALES)
def test_csrc_sdpa_prefill_dequantizes_the_gathered_context(k_scale, v_scale):
    q, k, v, kc, vc, meta, rounded, _ = fp8_step([4, 1, 6], [13, 9, 6], k_scale, v_scale, seed=1)
    AttentionBackend(k_scale=k_scale, v_scale=v_scale).write_kv(k, v, kc, vc, meta)
    out = sdpa_prefill(q, kc, vc, meta, 0.3, k_scale, v_scale)
    check_against(out, q, meta, rounded, 0.3, 1e-5)


def _fake_varlen(paged_block_multiple):
    """A CPU stand-in for a varlen FlashAttention (flash_attn's keyword signature): packed causal
    attention, bottom-right aligned; it records its calls and cannot read a paged cache."""
    calls = []

    def flash_attn_varlen_func(
        q,
        k,
        v,
        cu_seqlens_q,
        cu_seqlens_k,
        max_seqlen_q,
        max_seqlen_k,
        softmax_scale=None,
        causal=False,
        block_table=None,
        seqused_k=None,
    ):
        calls.append({"k_dtype": k.dtype, "paged": block_table is not None})
        if block_table is not None:
            return torch.zeros_like(q)  # routing checks only; a real kernel reads the pool here
        out = torch.empty_like(q)
        bounds = zip(cu_seqlens_q.tolist(), cu_seqlens_q.tolist()[1:], cu_seqlens_k.tolist(), cu_seqlens_k.tolist()[1:])
        for q0, q1, k0, k1 in bounds:
            out[q0:q1] = dense_reference(q[q0:q1].float(), k[k0:k1].float(), v[k0:k1].float(), softmax_scale).to(
                q.dtype
            )
        return out

    params = frozenset(inspect.signature(flash_attn_varlen_func).parameters)
    return flash.VarlenImpl("fake", flash_attn_varlen_func, params, paged_block_multiple), calls


@pytest.mark.parametrize("k_scale,v_scale", SCALES)
def test_varlen_prefill_gathers_an_fp8_prefix_instead_of_paging_it(k_scale, v_scale):
    impl, calls = _fake_varlen(paged_block_multiple=4)  # would page this block size if it could
    q, k, v, kc, vc, meta, rounded, exact = fp8_step(
        [4, 1, 6], [13, 9, 6], k_scale, v_scale, dtype=torch.bfloat16, seed=2
    )
    AttentionBackend(k_scale=k_scale, v_scale=v_scale).write_kv(k, v, kc, vc, meta)
    out = flash.prefill_varlen(impl, q, k, v, kc, vc, meta, 0.3, k_scale=k_scale, v_scale=v_scale)
    # the two prefixed sequences gather from the cache (fp8-rounded); the fresh last one attends over
    # its own 16-bit K/V, as it would in a step of fresh prompts only
    assert calls == [{"k_dtype": torch.bfloat16, "paged": False}] * 2
    check_against(out, q, meta, rounded[:2] + exact[2:], 0.3, 2e-2)
    # a 16-bit cache still goes through block_table (the routing change is fp8-only)
    flash.prefill_varlen(impl, q, k, v, kc.float().bfloat16(), vc.float().bfloat16(), meta, 0.3)
    assert calls[-2]["paged"] and not calls[-1]["paged"]


def _flash_backend_without_cuda(impl, k_scale, v_scale):
    """FlashBackend's constructor insists on CUDA; its forward's routing does not. Built by hand
    with the csrc kernels off, the MODELYARD_KERNELS=0 configuration."""
    backend = flash.FlashBackend.__new__(flash.FlashBackend)
    AttentionBackend.__init__(backend, k_scale=k_scale, v_scale=v_scale)
    backend.varlen, backend.csrc_decode = impl, False
    return backend


@pytest.mark.parametrize("k_scale,v_scale", SCALES)
def test_flash_backend_kernels_off_decode_of_fp8_takes_the_reference(k_scale, v_scale):
    impl, calls = _fake_varlen(paged_block_multiple=4)
    backend = _flash_backend_without_cuda(impl, k_scale, v_scale)
    q, k, v, kc, vc, meta, rounded, _ = fp8_step([1, 1, 1], [1, 10, 17], k_scale, v_scale, dtype=torch.bfloat16, seed=4)
    out = backend.forward(q, k, v, kc, vc, meta, 0.3)
    assert calls == []  # the varlen kernel cannot read fp8 pages
    check_against(out, q, meta, rounded, 0.3, 2e-2)
    kc16, vc16 = torch.zeros(kc.shape, dtype=torch.bfloat16), torch.zeros(vc.shape, dtype=torch.bfloat16)
    backend.forward(q, k, v, kc16, vc16, meta, 0.3)
    assert calls == [{"k_dtype": torch.bfloat16, "paged": True}]


def test_backends_reject_bad_scales():
    for bad in (0.0, -1.0, math.inf, math.nan):
        with pytest.raises(ValueError, match="k_scale"):
            SdpaBackend(k_scale=bad)
        with pytest.raises(ValueError, match="v_scale"):
            SdpaBackend(v_scale=bad)
