"""csrc paged decode attention against the torch reference: dtypes, head dims, block sizes, GQA
ratios, ragged and long lengths, forced split counts, CUDA graph replay, and the fp8 cache."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from kernel_helpers import make_paged_kv, poison_next_alloc, rel_err, requires_cuda

from modelyard.engine import kernels, ops

pytestmark = requires_cuda

TOL = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 1.2e-2}


def _case(seq_lens, hq, hk, d, block_size, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    _, _, kc, vc, bt = make_paged_kv(seq_lens, hk, d, block_size, dtype, "cuda", gen)
    q = torch.randn(len(seq_lens), hq, d, generator=gen).to(dtype).cuda()
    return q, kc, vc, bt, torch.tensor(seq_lens, dtype=torch.int32, device="cuda")


def _check(q, kc, vc, bt, sl, scale, dtype, k_scale=1.0, v_scale=1.0, **kw):
    ref = ops.paged_decode_attention_ref(q, kc, vc, bt, sl, scale, k_scale, v_scale)
    poison_next_alloc(q.shape, dtype, "cuda")
    out = kernels.get().paged_decode_attention(
        q,
        kc,
        vc,
        bt,
        sl,
        scale,
        kw.get("max_seq_len", -1),
        kw.get("num_splits", 0),
        kw.get("variant", 0),
        k_scale,
        v_scale,
    )
    err = rel_err(out, ref)
    assert err < TOL[dtype], f"rel err {err:.2e}"
    return out


def _to_fp8(kc, vc, k_scale, v_scale):
    """The cache an fp8 engine would hold for these K/V values (the reference then reads it too)."""
    return ops.quantize_kv(kc, ops.FP8_KV_DTYPE, k_scale), ops.quantize_kv(vc, ops.FP8_KV_DTYPE, v_scale)


@pytest.mark.parametrize("variant", [2, 3])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("d", [64, 80, 128])
@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("hq,hk", [(8, 8), (8, 2), (28, 4), (12, 1)])
def test_matches_reference(variant, dtype, d, block_size, hq, hk):
    seq_lens = [1, block_size - 1, block_size, block_size + 1, 77, 300, 1000]
    q, kc, vc, bt, sl = _case(seq_lens, hq, hk, d, block_size, dtype, seed=d * hq + block_size)
    _check(q, kc, vc, bt, sl, d**-0.5, dtype, variant=variant)


@pytest.mark.parametrize("variant", [2, 3])
@pytest.mark.parametrize("num_splits", [1, 2, 3, 7, 64])
def test_result_does_not_depend_on_split_count(variant, num_splits):
    seq_lens = [5, 129, 700, 2100]
    q, kc, vc, bt, sl = _case(seq_lens, 16, 4, 128, 16, torch.float32, seed=11)
    _check(q, kc, vc, bt, sl, 0.1, torch.float32, num_splits=num_splits, variant=variant)


@pytest.mark.parametrize("variant", [2, 3])
def test_head_dim_256_and_odd_scale(variant):
    q, kc, vc, bt, sl = _case([3, 250, 513], 8, 1, 256, 16, torch.bfloat16, seed=12)
    _check(q, kc, vc, bt, sl, 0.37, torch.bfloat16, variant=variant)


@pytest.mark.parametrize("variant", [2, 3])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("d", [64, 80, 128, 256])
@pytest.mark.parametrize("hq,hk", [(8, 8), (8, 4), (28, 4), (16, 1)])
def test_fp8_cache_matches_reference(variant, dtype, d, hq, hk):
    """Same rounded cache contents for both sides; scales fold into q and the output in the kernel."""
    seq_lens = [1, 15, 16, 17, 200, 1000]
    q, kc, vc, bt, sl = _case(seq_lens, hq, hk, d, 16, dtype, seed=d + hq)
    k_scale, v_scale = 0.5, 1.7
    kc8, vc8 = _to_fp8(kc * 3, vc, k_scale, v_scale)
    _check(q, kc8, vc8, bt, sl, d**-0.5, dtype, k_scale=k_scale, v_scale=v_scale, variant=variant)


@pytest.mark.parametrize("variant", [2, 3])
@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize("d,hq,hk", [(128, 8, 8), (80, 8, 2), (64, 16, 2)])
@pytest.mark.parametrize("num_splits", [0, 5])
def test_rows_outside_the_sequences_are_never_read(variant, fp8, d, hq, hk, num_splits):
    """Every cache row that holds no token of its sequence is NaN: the tail of each last block and
    the spare blocks. The kernel's branch-free loads re-read a sequence's last token past its end;
    reading any other row would put NaN into the output."""
    seq_lens = [1, 3, 16, 17, 35, 129, 650]
    bs = 16
    q, kc, vc, bt, sl = _case(seq_lens, hq, hk, d, bs, torch.bfloat16, seed=d + hk)
    if fp8:
        kc, vc = _to_fp8(kc, vc, 1.0, 1.0)
    used = torch.zeros(kc.shape[0] * bs, dtype=torch.bool, device="cuda")
    for i, n in enumerate(seq_lens):
        t = torch.arange(n, device="cuda")
        used[bt[i, t // bs].long() * bs + t % bs] = True
    for cache in (kc, vc):
        rows = cache.view(-1, hk, d)
        if fp8:
            rows.view(torch.uint8)[~used] = 0x7F  # e4m3fn NaN
        else:
            rows[~used] = float("nan")
    _check(q, kc, vc, bt, sl, d**-0.5, torch.bfloat16, num_splits=num_splits, variant=variant)


@pytest.mark.parametrize("num_splits", [1, 3, 64])
def test_fp8_cache_split_count(num_splits):
    seq_lens = [5, 129, 700, 2100]
    q, kc, vc, bt, sl = _case(seq_lens, 32, 32, 128, 16, torch.bfloat16, seed=21)
    kc8, vc8 = _to_fp8(kc, vc, 1.0, 1.0)
    _check(q, kc8, vc8, bt, sl, 0.1, torch.bfloat16, num_splits=num_splits)


def test_scales_rejected_for_16bit_cache():
    q, kc, vc, bt, sl = _case([10], 8, 8, 64, 16, torch.bfloat16, seed=22)
    with pytest.raises(RuntimeError, match="fp8 cache only"):
        kernels.get().paged_decode_attention(q, kc, vc, bt, sl, 0.1, -1, 0, 0, 2.0, 1.0)


def test_strided_query_view():
    """q as the model produces it: a column slice of the fused qkv projection."""
    seq_lens = [20, 400]
    hq, hk, d = 8, 2, 64
    _, kc, vc, bt, sl = _case(seq_lens, hq, hk, d, 16, torch.bfloat16, seed=13)
    qkv = torch.randn(len(seq_lens), (hq + 2 * hk) * d, device="cuda", dtype=torch.bfloat16)
    q = qkv[:, : hq * d].view(len(seq_lens), hq, d)
    assert not q.is_contiguous()
    _check(q, kc, vc, bt, sl, d**-0.5, torch.bfloat16)


@pytest.mark.parametrize("variant", [2, 3])
def test_cuda_graph_replay_with_new_lengths(variant):
    """Captured once with max_seq_len unknown; replayed for other lengths and contents."""
    hq, hk, d, bs = 8, 2, 128, 16
    seq_lens = [50, 600, 1, 333]
    q, kc, vc, bt, sl = _case(seq_lens, hq, hk, d, bs, torch.bfloat16, seed=14)
    big_bt = torch.zeros(len(seq_lens), 128, dtype=torch.int32, device="cuda")  # room for 2048 tokens
    big_bt[:, : bt.shape[1]] = bt
    scale = d**-0.5
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            kernels.get().paged_decode_attention(q, kc, vc, big_bt, sl, scale, -1, 0, variant)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = kernels.get().paged_decode_attention(q, kc, vc, big_bt, sl, scale, -1, 0, variant)
    for lens in ([50, 600, 1, 333], [7, 60, 1024, 2]):
        sl.copy_(torch.tensor(lens, dtype=torch.int32))
        q.copy_(torch.randn_like(q))
        g.replay()
        torch.cuda.synchronize()
        ref = ops.paged_decode_attention_ref(q, kc, vc, big_bt, sl, scale)
        assert rel_err(out, ref) < TOL[torch.bfloat16]


@pytest.mark.parametrize(
    "case,message", [("block_tables_dtype", "int32"), ("head_dim", "head_dim 48"), ("norm_weight_dtype", "dtype")]
)
def test_bad_arguments_raise_runtime_error(case, message):
    """In a child process, so a native crash fails this test instead of killing the session."""
    probe = Path(__file__).with_name("error_probe.py")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    res = subprocess.run([sys.executable, str(probe), case], capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 0, f"probe died ({res.returncode}): {res.stderr[-2000:]}"
    assert res.stdout.startswith("RuntimeError") and message in res.stdout, res.stdout
