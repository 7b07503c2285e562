"""Builders shared by the kernel tests: random paged caches and attention metadata."""

from __future__ import annotations

import math

import pytest
import torch

from modelyard.engine.attention.base import AttentionMetadata

requires_cuda = pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="needs a CUDA GPU: the csrc kernels are built with nvcc on first GPU use (the CPU path runs "
    "the torch references, tested in test_reference_ops.py)",
)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64; NaN anywhere fails."""
    assert not torch.isnan(out).any(), "output has NaN (unwritten or broken)"
    o, r = out.double(), ref.double()
    return float((o - r).norm() / r.norm().clamp_min(1e-30))


def linear_inputs(M, N, K, dtype, bias, seed=0):
    """x [M, K], w [N, K] (scaled so outputs are O(1)) and an optional bias [N], on the GPU."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(M, K, device="cuda", generator=g).to(dtype)
    w = (torch.randn(N, K, device="cuda", generator=g) * K**-0.5).to(dtype)
    b = torch.randn(N, device="cuda", generator=g).to(dtype) if bias else None
    return x, w, b


def linear_ref(x, w, b):
    """x w^T (+ b) in float64."""
    out = x.double() @ w.double().t()
    return out + b.double() if b is not None else out


def poison_next_alloc(like_shape, dtype, device) -> None:
    """Fill and free a block the caching allocator will hand to the op's next output of this size,
    so elements the op forgets to write read back as NaN."""
    torch.full(like_shape, float("nan"), dtype=dtype, device=device)


def make_paged_kv(seq_lens, num_kv_heads, head_dim, block_size, dtype, device, gen, extra_blocks=3):
    """Dense per-sequence K/V and the same rows scattered into a shuffled block pool.

    Returns (dense_k, dense_v, k_cache, v_cache, block_tables [S, MB] int32)."""
    blocks_per = [max(1, math.ceil(n / block_size)) for n in seq_lens]
    num_blocks = sum(blocks_per) + extra_blocks
    perm = torch.randperm(num_blocks, generator=gen).tolist()
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = torch.randn(shape, generator=gen).to(dtype)
    v_cache = torch.randn(shape, generator=gen).to(dtype)
    block_tables = torch.zeros(len(seq_lens), max(blocks_per), dtype=torch.int32)
    dense_k, dense_v = [], []
    nxt = 0
    for i, n in enumerate(seq_lens):
        ids = perm[nxt : nxt + blocks_per[i]]
        nxt += blocks_per[i]
        block_tables[i, : len(ids)] = torch.tensor(ids, dtype=torch.int32)
        k = torch.randn(n, num_kv_heads, head_dim, generator=gen).to(dtype)
        v = torch.randn(n, num_kv_heads, head_dim, generator=gen).to(dtype)
        for t in range(n):
            k_cache[ids[t // block_size], t % block_size] = k[t]
            v_cache[ids[t // block_size], t % block_size] = v[t]
        dense_k.append(k)
        dense_v.append(v)
    to = dict(device=device)
    return (
        [k.to(**to) for k in dense_k],
        [v.to(**to) for v in dense_v],
        k_cache.to(**to),
        v_cache.to(**to),
        block_tables.to(**to),
    )


def dense_attention(q, k, v, scale, causal_offset=None):
    """q [Lq, Hq, D], k/v [Lk, Hk, D] -> [Lq, Hq, D] in float64. With causal_offset c, query i sees
    keys j <= c + i (queries are the last Lq positions when c = Lk - Lq)."""
    hq, hk = q.shape[1], k.shape[1]
    qd, kd, vd = q.double(), k.double().repeat_interleave(hq // hk, 1), v.double().repeat_interleave(hq // hk, 1)
    s = torch.einsum("qhd,khd->hqk", qd, kd) * scale
    if causal_offset is not None:
        lq, lk = q.shape[0], k.shape[0]
        allowed = torch.ones(lq, lk, dtype=torch.bool, device=q.device).tril(causal_offset)
        s = s.masked_fill(~allowed, float("-inf"))
    return torch.einsum("hqk,khd->qhd", s.softmax(-1), vd)


def make_meta(block_tables, seq_lens, query_lens, block_size, device) -> AttentionMetadata:
    """Metadata for sequences whose last query_lens[i] tokens are new this step."""
    slots = []
    for i, (n, q) in enumerate(zip(seq_lens, query_lens)):
        for pos in range(n - q, n):
            slots.append(int(block_tables[i, pos // block_size]) * block_size + pos % block_size)
    qsl = [0]
    for q in query_lens:
        qsl.append(qsl[-1] + q)
    return AttentionMetadata(
        slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
        block_tables=block_tables.to(device),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
        query_start_loc=torch.tensor(qsl, dtype=torch.int32, device=device),
        max_query_len=max(query_lens),
        max_seq_len=max(seq_lens),
        seq_lens_cpu=list(seq_lens),
        query_lens_cpu=list(query_lens),
        is_decode=all(q == 1 for q in query_lens),
    )
