"""The torch references (the CPU path and the kernels' oracle) against independent formulations.
Runs everywhere, CPU CI included."""

from __future__ import annotations

import inspect
import math
import shutil

import pytest
import torch
import torch.nn.functional as F
from kernel_helpers import dense_attention, make_meta, make_paged_kv, rel_err

from modelyard.engine import kernels, ops
from modelyard.engine.attention import flash
from modelyard.engine.attention.csrc_paged import sdpa_prefill


@pytest.mark.parametrize("hq,hk", [(4, 4), (8, 2), (7, 1)])
@pytest.mark.parametrize("block_size", [16, 32])
def test_paged_decode_ref_matches_dense_softmax(hq, hk, block_size):
    gen = torch.Generator().manual_seed(hq * 100 + block_size)
    seq_lens = [1, block_size - 1, block_size, block_size + 1, 3 * block_size + 5, 70]
    d = 32
    dk, dv, kc, vc, bt = make_paged_kv(seq_lens, hk, d, block_size, torch.float32, "cpu", gen)
    q = torch.randn(len(seq_lens), hq, d, generator=gen)
    scale = d**-0.5
    out = ops.paged_decode_attention_ref(q, kc, vc, bt, torch.tensor(seq_lens, dtype=torch.int32), scale)
    for i in range(len(seq_lens)):
        ref = dense_attention(q[i : i + 1], dk[i], dv[i], scale)[0]
        assert rel_err(out[i], ref) < 1e-5


def test_reshape_and_cache_ref_scatters_and_skips_padding():
    gen = torch.Generator().manual_seed(1)
    kc = torch.zeros(4, 8, 2, 16)
    vc = torch.zeros(4, 8, 2, 16)
    k = torch.randn(5, 2, 16, generator=gen)
    v = torch.randn(5, 2, 16, generator=gen)
    slots = torch.tensor([3, 17, -1, 31, 8])
    ops.reshape_and_cache_ref(k, v, kc, vc, slots)
    flat_k, flat_v = kc.view(32, 2, 16), vc.view(32, 2, 16)
    for row, s in enumerate(slots.tolist()):
        if s >= 0:
            assert torch.equal(flat_k[s], k[row]) and torch.equal(flat_v[s], v[row])
    written = {3, 17, 31, 8}
    untouched = [i for i in range(32) if i not in written]
    assert flat_k[untouched].abs().sum() == 0 and flat_v[untouched].abs().sum() == 0


def _rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def test_rotary_ref_neox_matches_rotate_half_and_gptj_matches_complex():
    gen = torch.Generator().manual_seed(2)
    T, hq, hk, d = 6, 3, 1, 16
    cache = ops.build_cos_sin_cache(d, 64, 10000.0)
    pos = torch.tensor([0, 1, 5, 9, 33, 63])
    q = torch.randn(T, hq * d, generator=gen, dtype=torch.float64).float()
    k = torch.randn(T, hk * d, generator=gen, dtype=torch.float64).float()
    cos, sin = cache[pos].chunk(2, dim=-1)

    qn, kn = ops.rotary_embedding_ref(pos, q.clone(), k.clone(), d, cache, is_neox=True)
    c2, s2 = torch.cat([cos, cos], -1)[:, None], torch.cat([sin, sin], -1)[:, None]
    qv = q.view(T, hq, d)
    assert torch.allclose(qn.view(T, hq, d), qv * c2 + _rotate_half(qv) * s2, atol=1e-5)

    qg, _ = ops.rotary_embedding_ref(pos, q.clone(), k.clone(), d, cache, is_neox=False)
    z = torch.view_as_complex(qv.double().reshape(T, hq, d // 2, 2).contiguous())
    rot = torch.polar(torch.ones_like(cos.double()), torch.atan2(sin.double(), cos.double()))[:, None]
    want = torch.view_as_real(z * rot).reshape(T, hq, d).float()
    assert torch.allclose(qg.view(T, hq, d), want, atol=1e-5)


def test_norm_and_activation_refs():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(5, 24, generator=gen)
    r = torch.randn(5, 24, generator=gen)
    w = torch.randn(24, generator=gen)
    want = w * x / torch.sqrt((x * x).mean(-1, keepdim=True) + 1e-6)
    assert torch.allclose(ops.rms_norm_ref(x, w, 1e-6), want, atol=1e-5)
    normed, res = ops.fused_add_rms_norm_ref(x, r, w, 1e-6)
    assert torch.allclose(res, x + r) and torch.allclose(normed, ops.rms_norm_ref(x + r, w, 1e-6))
    g = torch.randn(4, 2, 10, generator=gen)
    a, b = g[..., :5], g[..., 5:]
    assert torch.allclose(ops.silu_and_mul_ref(g), a / (1 + torch.exp(-a)) * b, atol=1e-6)


def test_context_slots_follow_block_tables():
    bt = torch.tensor([[5, 2, 0], [1, 7, 3]], dtype=torch.int32)
    slots = flash.context_slots(bt, torch.tensor([20, 35], dtype=torch.int32), [20, 35], 16)
    want = [5 * 16 + t for t in range(16)] + [2 * 16 + t for t in range(4)]
    want += [1 * 16 + t for t in range(16)] + [7 * 16 + t for t in range(16)] + [3 * 16 + t for t in range(3)]
    assert slots.tolist() == want


@pytest.mark.parametrize(
    "lens,qlens,calls",
    [
        ([30, 8, 5], [30, 8, 5], [("direct", 43)]),  # all fresh: one direct call
        ([50, 8, 5], [20, 8, 5], [("cache", 50), ("direct", 13)]),  # leading chunk, fresh tail: split
        ([8, 50, 5], [8, 20, 5], [("cache", 58), ("direct", 5)]),  # prefixed in the middle
        ([8, 5, 50], [8, 5, 20], [("cache", 63)]),  # prefixed last: all from the cache
    ],
)
def test_prefill_varlen_reads_the_cache_only_where_needed(lens, qlens, calls):
    """flash.prefill_varlen on the CPU with a dense stand-in for FlashAttention: same attention
    whichever way the step is split, and fresh sequences after the last prefixed one attend over the
    step's own K/V."""
    gen = torch.Generator().manual_seed(7)
    hq = hk = 2
    d, bs = 16, 16
    nblk = [-(-n // bs) for n in lens]
    bt = torch.zeros(len(lens), max(nblk), dtype=torch.int32)
    perm = torch.randperm(sum(nblk) + 2, generator=gen)
    off = 0
    for i, b in enumerate(nblk):
        bt[i, :b] = perm[off : off + b].to(torch.int32)
        off += b
    kc = torch.randn(sum(nblk) + 2, bs, hk, d, generator=gen)
    vc = torch.randn_like(kc)
    dense = [
        (
            torch.stack([kc[bt[i, t // bs], t % bs] for t in range(n)]),
            torch.stack([vc[bt[i, t // bs], t % bs] for t in range(n)]),
        )
        for i, n in enumerate(lens)
    ]
    k_new = torch.cat([k[n - q :] for (k, _), n, q in zip(dense, lens, qlens)])
    v_new = torch.cat([v[n - q :] for (_, v), n, q in zip(dense, lens, qlens)])
    q = torch.randn(sum(qlens), hq, d, generator=gen)
    seen = []

    def fake_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal):
        direct = k.untyped_storage().data_ptr() == k_new.untyped_storage().data_ptr()
        seen.append(("direct" if direct else "cache", k.shape[0]))
        out = torch.empty_like(q)
        for i in range(len(cu_seqlens_q) - 1):
            a, b = int(cu_seqlens_q[i]), int(cu_seqlens_q[i + 1])
            c, e = int(cu_seqlens_k[i]), int(cu_seqlens_k[i + 1])
            mask = torch.ones(b - a, e - c, dtype=torch.bool).tril(e - c - (b - a))
            out[a:b] = F.scaled_dot_product_attention(
                q[a:b].transpose(0, 1),
                k[c:e].transpose(0, 1),
                v[c:e].transpose(0, 1),
                attn_mask=mask,
                scale=softmax_scale,
            ).transpose(0, 1)
        return out

    impl = flash.VarlenImpl("fake", fake_varlen, frozenset(), None)
    meta = make_meta(bt, lens, qlens, bs, "cpu")
    out = flash.prefill_varlen(impl, q, k_new, v_new, kc, vc, meta, d**-0.5)
    assert seen == calls
    start = 0
    for i, (n, ql) in enumerate(zip(lens, qlens)):
        ref = dense_attention(q[start : start + ql], *dense[i], d**-0.5, causal_offset=n - ql)
        assert torch.allclose(out[start : start + ql].double(), ref.double(), atol=1e-5), i
        start += ql


@pytest.mark.parametrize("hq,hk", [(4, 4), (6, 2)])
def test_sdpa_prefill_with_cached_prefix_matches_dense(hq, hk):
    """The CsrcBackend's non-flash prefill: chunked prefill over a prefix already in the cache."""
    gen = torch.Generator().manual_seed(4)
    block_size, d = 16, 32
    seq_lens, query_lens = [40, 17, 5], [8, 17, 1]
    dk, dv, kc, vc, bt = make_paged_kv(seq_lens, hk, d, block_size, torch.float32, "cpu", gen)
    meta = make_meta(bt, seq_lens, query_lens, block_size, "cpu")
    q = torch.randn(sum(query_lens), hq, d, generator=gen)
    out = sdpa_prefill(q, kc, vc, meta, 0.2)
    start = 0
    for i, (n, ql) in enumerate(zip(seq_lens, query_lens)):
        ref = dense_attention(q[start : start + ql], dk[i], dv[i], 0.2, causal_offset=n - ql)
        assert rel_err(out[start : start + ql], ref) < 1e-5
        start += ql


def _fake_varlen(signature_src: str):
    """A stand-in whose signature is one torch release's varlen_attn; records its call."""
    calls = []
    ns = {}
    exec(f"def fn{signature_src}:\n    calls.append(dict(locals()))\n    return query", {"calls": calls}, ns)
    return ns["fn"], calls


@pytest.mark.parametrize(
    "sig,causal_kw",
    [
        ("(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=False, return_aux=None)", "is_causal"),
        (
            "(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None, "
            "window_size=(-1, -1))",
            "window_size",
        ),
        (
            "(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None, "
            "window_size=(-1, -1), enable_gqa=False, seqused_k=None, block_table=None, num_splits=None)",
            "window_size",
        ),
    ],
)
def test_torch_varlen_calls_adapt_to_the_signature(sig, causal_kw):
    fn, calls = _fake_varlen(sig)
    impl = flash.VarlenImpl(
        "torch", fn, frozenset(inspect.signature(fn).parameters), 256 if "block_table" in sig else None
    )
    q = torch.ones(3, 4, 8)
    k = torch.ones(3, 2, 8)
    cu = torch.tensor([0, 3], dtype=torch.int32)
    impl(q, k, k, cu, cu, 3, 3, 0.5)
    call = calls[-1]
    assert call["is_causal"] is True if causal_kw == "is_causal" else call["window_size"] == (-1, 0)
    if "scale" in call:
        assert call["scale"] == 0.5 and torch.equal(call["query"], q)
    else:  # 1/sqrt(8) applied by the kernel, the rest folded into q
        assert torch.allclose(call["query"], q * 0.5 * math.sqrt(8))
    if "enable_gqa" in call:
        assert call["enable_gqa"] is True
    assert impl.supports_paged(256) == ("block_table" in sig) and not impl.supports_paged(16)


def test_describe_backends_and_kernel_status_on_this_machine():
    info = flash.describe_backends()
    assert {"auto", "prefill_varlen", "varlen_candidates", "decode", "kernels"} <= info.keys()
    assert set(info["varlen_candidates"]) == {c[0] for c in flash._CANDIDATES}
    st = kernels.status()
    assert st["sources_found"], st
    if not torch.cuda.is_available():
        assert info["auto"] == "sdpa"
        assert kernels.get() is None


def test_build_key_tracks_sources(tmp_path):
    src = tmp_path / "csrc"
    shutil.copytree(kernels.csrc_dir(), src)
    k1 = kernels.build_key((9, 0), src)
    assert kernels.build_key((9, 0), src) == k1
    assert kernels.build_key((8, 0), src) != k1
    (src / "common.cuh").write_text((src / "common.cuh").read_text() + "\n// changed\n")
    assert kernels.build_key((9, 0), src) != k1


def test_kernels_switch_off(monkeypatch):
    monkeypatch.setenv(kernels.ENV_SWITCH, "0")
    assert not kernels.enabled()
    assert kernels._Loader().get() is None  # a fresh process with the switch off never builds
    assert flash.auto_backend_name() in ("sdpa", "flash")
