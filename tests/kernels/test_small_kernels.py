"""csrc cache write, norms, rotary and activation against the torch references, including strided
views (q/k/v are column slices of the fused qkv output) and the unaligned scalar paths."""

from __future__ import annotations

import pytest
import torch
from kernel_helpers import poison_next_alloc, rel_err, requires_cuda

from modelyard.engine import kernels, ops

pytestmark = requires_cuda

DTYPES = [torch.bfloat16, torch.float16, torch.float32]


def _close(out, ref, dtype):
    """Same rounding points as the reference: at most one unit in the last place apart."""
    tol = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}[dtype]
    assert rel_err(out, ref) < tol
    assert torch.allclose(out.float(), ref.float(), rtol=2 * tol, atol=2 * tol)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hk,d,block_size", [(2, 64, 16), (4, 128, 32), (1, 80, 16)])
def test_reshape_and_cache(dtype, hk, d, block_size):
    nb, T = 40, 37
    qkv = torch.randn(T, (4 + 2 * hk) * d, device="cuda", dtype=dtype)
    k = qkv[:, 4 * d : (4 + hk) * d].view(T, hk, d)  # strided views, as the model passes them
    v = qkv[:, (4 + hk) * d :].view(T, hk, d)
    slots = torch.randperm(nb * block_size, device="cuda")[:T]
    slots[5] = -1  # padding row
    kc = torch.randn(nb, block_size, hk, d, device="cuda", dtype=dtype)
    vc = torch.randn_like(kc)
    kr, vr = kc.clone(), vc.clone()
    kernels.get().reshape_and_cache(k, v, kc, vc, slots)
    ops.reshape_and_cache_ref(k, v, kr, vr, slots)
    assert torch.equal(kc, kr) and torch.equal(vc, vr)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("k_scale,v_scale", [(1.0, 1.0), (0.25, 4.0), (0.37, 1.3)])
@pytest.mark.parametrize("aligned", [True, False])
def test_reshape_and_cache_fp8(dtype, k_scale, v_scale, aligned):
    """Stores e4m3(x / scale), saturated at +-448; the vector and the scalar (unaligned) paths."""
    nb, bs, hk, T = 20, 16, 4, 29
    d = 128 if aligned else 72
    qkv = torch.randn(T, (2 + 2 * hk) * d + (0 if aligned else 1), device="cuda", dtype=dtype) * 4
    qkv[3, 2 * d] = 5000.0  # saturates (k_scale <= 1)
    k = qkv[:, 2 * d : (2 + hk) * d].view(T, hk, d)
    v = qkv[:, (2 + hk) * d : (2 + 2 * hk) * d].view(T, hk, d)
    slots = torch.randperm(nb * bs, device="cuda")[:T]
    slots[7] = -1
    kc = torch.zeros(nb, bs, hk, d, device="cuda", dtype=ops.FP8_KV_DTYPE)
    vc = torch.zeros_like(kc)
    kr, vr = kc.clone(), vc.clone()
    kernels.get().reshape_and_cache(k, v, kc, vc, slots, k_scale, v_scale)
    ops.reshape_and_cache_ref(k, v, kr, vr, slots, k_scale, v_scale)
    # x * (1 / s) in the kernel vs x / s in the reference: equal except within a float ulp of a tie.
    for got, want in ((kc, kr), (vc, vr)):
        g, w = got.float(), want.float()
        assert not g.isnan().any()
        assert (g != w).float().mean().item() < 1e-3
        assert torch.allclose(g, w, rtol=0.13, atol=0)  # one e4m3 step at most
    assert kc.float().abs().max().item() == 448.0


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,H", [(1, 4096), (37, 896), (64, 3584), (5, 100)])  # 100: unaligned scalar path
def test_rms_norm_and_fused_add(dtype, T, H):
    x = torch.randn(T, H, device="cuda", dtype=dtype) * 3
    r = torch.randn(T, H, device="cuda", dtype=dtype)
    w = (1 + 0.1 * torch.randn(H, device="cuda")).to(dtype)
    poison_next_alloc((T, H), dtype, "cuda")
    _close(ops.rms_norm(x, w, 1e-6), ops.rms_norm_ref(x, w, 1e-6), dtype)
    x0, r0 = x.clone(), r.clone()
    normed, res = ops.fused_add_rms_norm(x, r, w, 1e-5)
    n_ref, r_ref = ops.fused_add_rms_norm_ref(x, r, w, 1e-5)
    assert torch.equal(res, r_ref)  # one rounding, identical
    _close(normed, n_ref, dtype)
    assert torch.equal(x, x0) and torch.equal(r, r0)  # inputs untouched, like the reference


def test_rms_norm_strided_rows():
    x = torch.randn(16, 2 * 1024, device="cuda", dtype=torch.bfloat16)[:, :1024]
    w = torch.randn(1024, device="cuda", dtype=torch.bfloat16)
    _close(ops.rms_norm(x, w, 1e-6), ops.rms_norm_ref(x, w, 1e-6), torch.bfloat16)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("is_neox", [True, False])
# d=72: 36 pairs per half-row, not a whole number of 16-bit 16-byte vectors (the scalar kernel).
@pytest.mark.parametrize("hq,hk,d", [(32, 32, 128), (28, 4, 128), (8, 2, 64), (4, 4, 80), (4, 2, 72)])
def test_rotary_in_place(dtype, is_neox, hq, hk, d):
    T = 19
    cache = ops.build_cos_sin_cache(d, 4096, 1e6, device="cuda")
    pos = torch.randint(0, 4096, (T,), device="cuda")
    qkv = torch.randn(T, (hq + 2 * hk) * d, device="cuda", dtype=dtype)
    q, k = qkv[:, : hq * d], qkv[:, hq * d : (hq + hk) * d]
    q_ref, k_ref = ops.rotary_embedding_ref(pos, q.clone(), k.clone(), d, cache, is_neox)
    v_before = qkv[:, (hq + hk) * d :].clone()
    ops.rotary_embedding(pos, q, k, d, cache, is_neox)
    _close(q, q_ref, dtype)
    _close(k, k_ref, dtype)
    assert torch.equal(qkv[:, (hq + hk) * d :], v_before)  # v untouched


def test_rotary_int32_positions_and_3d_views():
    d = 64
    cache = ops.build_cos_sin_cache(d, 512, 1e4, device="cuda")
    pos = torch.randint(0, 512, (7,), device="cuda", dtype=torch.int32)
    q = torch.randn(7, 4, d, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(7, 2, d, device="cuda", dtype=torch.bfloat16)
    q_ref, k_ref = ops.rotary_embedding_ref(pos.long(), q.clone(), k.clone(), d, cache, True)
    ops.rotary_embedding(pos, q, k, d, cache, True)
    _close(q, q_ref, torch.bfloat16)
    _close(k, k_ref, torch.bfloat16)


@pytest.mark.parametrize(
    "dtype,cache_dtype",
    [
        (torch.bfloat16, None),
        (torch.float16, None),
        (torch.float32, None),
        (torch.bfloat16, torch.float8_e4m3fn),
        (torch.float16, torch.float8_e4m3fn),
    ],
)
@pytest.mark.parametrize("is_neox", [True, False])
@pytest.mark.parametrize("hq,hk,d", [(32, 32, 128), (28, 4, 128), (8, 2, 64), (4, 4, 80), (4, 2, 72)])
@pytest.mark.parametrize("pos_dtype", [torch.int64, torch.int32])
def test_rotary_and_cache_equals_the_two_ops(dtype, cache_dtype, is_neox, hq, hk, d, pos_dtype):
    """One launch, bit for bit what rotary_embedding then reshape_and_cache produce: q, k (rotated in
    place), the K/V cache rows, padding rows (slot -1: rotated, not written) and untouched rows."""
    k_ = kernels.get()
    T, nb, bs = 21, 16, 16
    cache_dtype = cache_dtype or dtype
    scales = (0.37, 1.3) if cache_dtype == torch.float8_e4m3fn else (1.0, 1.0)
    cos_sin = ops.build_cos_sin_cache(d, 4096, 1e6, device="cuda")
    pos = torch.randint(0, 4096, (T,), device="cuda").to(pos_dtype)
    slots = torch.randperm(nb * bs, device="cuda")[:T]
    slots[3] = slots[11] = -1
    qkv = torch.randn(T, (hq + 2 * hk) * d, device="cuda", dtype=dtype)
    fresh = torch.randn(nb, bs, hk, d, device="cuda").to(cache_dtype)
    outs = []
    for fused in (False, True):
        x = qkv.clone()
        q, k, v = x[:, : hq * d], x[:, hq * d : (hq + hk) * d].view(T, hk, d), x[:, (hq + hk) * d :].view(T, hk, d)
        kc, vc = fresh.clone(), fresh.clone()
        if fused:
            k_.rotary_embedding_and_cache(pos, q, k, v, kc, vc, slots, d, cos_sin, is_neox, *scales)
        else:
            k_.rotary_embedding(pos, q, k, d, cos_sin, is_neox)
            k_.reshape_and_cache(k, v, kc, vc, slots, *scales)
        outs.append((x, kc, vc))
    (x0, kc0, vc0), (x1, kc1, vc1) = outs
    assert torch.equal(x0, x1)
    assert torch.equal(
        kc0.view(torch.uint8) if cache_dtype == torch.float8_e4m3fn else kc0,
        kc1.view(torch.uint8) if cache_dtype == torch.float8_e4m3fn else kc1,
    )
    assert torch.equal(
        vc0.view(torch.uint8) if cache_dtype == torch.float8_e4m3fn else vc0,
        vc1.view(torch.uint8) if cache_dtype == torch.float8_e4m3fn else vc1,
    )
    assert not torch.equal(x1, qkv)  # something was rotated
    written = (kc1.view(torch.uint8) != fresh.view(torch.uint8)).flatten(1).any(1)
    assert written.sum() >= 1


def test_rotary_and_cache_argument_checks():
    k_ = kernels.get()
    cos_sin = ops.build_cos_sin_cache(64, 128, 1e4, device="cuda")
    q = torch.randn(3, 2, 64, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(3, 2, 64, device="cuda", dtype=torch.bfloat16)
    kc = torch.zeros(4, 16, 2, 64, device="cuda", dtype=torch.bfloat16)
    pos = torch.arange(3, device="cuda")
    slots = torch.arange(3, device="cuda")
    with pytest.raises(RuntimeError, match="rotary_embedding_and_cache: slot_mapping"):
        k_.rotary_embedding_and_cache(pos, q, k, k.clone(), kc, kc.clone(), slots[:2], 64, cos_sin, True, 1.0, 1.0)
    with pytest.raises(RuntimeError, match="rotary_embedding_and_cache: k_scale / v_scale apply to an fp8 cache only"):
        k_.rotary_embedding_and_cache(pos, q, k, k.clone(), kc, kc.clone(), slots, 64, cos_sin, True, 0.5, 1.0)
    with pytest.raises(RuntimeError, match="rotary_embedding_and_cache: positions"):
        k_.rotary_embedding_and_cache(pos.float(), q, k, k.clone(), kc, kc.clone(), slots, 64, cos_sin, True, 1.0, 1.0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(64, 2 * 11008), (3, 5, 2 * 4864), (7, 2 * 100)])
def test_silu_and_mul(dtype, shape):
    x = torch.randn(shape, device="cuda", dtype=dtype) * 4
    poison_next_alloc((*shape[:-1], shape[-1] // 2), dtype, "cuda")
    _close(ops.silu_and_mul(x), ops.silu_and_mul_ref(x), dtype)


def test_ops_capture_in_one_cuda_graph():
    """The whole decoder-layer op sequence captures and replays (no host syncs, no stray allocs)."""
    T, hq, hk, d, H = 8, 8, 2, 64, 512
    dt = torch.bfloat16
    x = torch.randn(T, H, device="cuda", dtype=dt)
    res = torch.randn(T, H, device="cuda", dtype=dt)
    w = torch.randn(H, device="cuda", dtype=dt)
    qkv = torch.randn(T, (hq + 2 * hk) * d, device="cuda", dtype=dt)
    pos = torch.arange(T, device="cuda")
    cache = ops.build_cos_sin_cache(d, 128, 1e4, device="cuda")
    kc = torch.zeros(8, 16, hk, d, device="cuda", dtype=dt)
    vc = torch.zeros_like(kc)
    slots = torch.arange(T, device="cuda")
    bt = torch.zeros(T, 2, dtype=torch.int32, device="cuda")
    sl = torch.full((T,), T, dtype=torch.int32, device="cuda")

    def step():
        n, r = ops.fused_add_rms_norm(x, res, w, 1e-6)
        q, k, v = qkv[:, : hq * d], qkv[:, hq * d : (hq + hk) * d], qkv[:, (hq + hk) * d :]
        ops.rotary_embedding(pos, q, k, d, cache, True)
        ops.reshape_and_cache(k.view(T, hk, d), v.view(T, hk, d), kc, vc, slots)
        a = ops.paged_decode_attention(q.view(T, hq, d), kc, vc, bt, sl, d**-0.5)
        return n, r, a, ops.silu_and_mul(torch.cat([n, r], -1))

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        step()
    torch.cuda.current_stream().wait_stream(s)
    qkv_before = qkv.clone()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        outs = step()
    qkv.copy_(qkv_before)
    g.replay()
    torch.cuda.synchronize()
    n_ref, r_ref = ops.fused_add_rms_norm_ref(x, res, w, 1e-6)
    _close(outs[0], n_ref, dt)
    assert torch.equal(outs[1], r_ref)
    a_ref = ops.paged_decode_attention_ref(qkv[:, : hq * d].reshape(T, hq, d), kc, vc, bt, sl, d**-0.5)
    assert rel_err(outs[2], a_ref) < 1.2e-2
