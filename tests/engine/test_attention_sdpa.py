"""SdpaBackend against a dense per-sequence reference on random data (CPU, float32)."""

from __future__ import annotations

import math
import random

import pytest
import torch

from modelyard.engine.attention import BackendUnavailable, get_backend, resolve_backend_name
from modelyard.engine.attention.base import AttentionBackend, AttentionMetadata
from modelyard.engine.attention.sdpa import SdpaBackend


def paged_meta(query_lens, seq_lens, block_tables, block_size):
    """Metadata for sequences whose new tokens are the last query_lens[i] of seq_lens[i]."""
    slots = []
    for q_len, n, table in zip(query_lens, seq_lens, block_tables):
        for pos in range(n - q_len, n):
            slots.append(table[pos // block_size] * block_size + pos % block_size)
    width = max(len(t) for t in block_tables)
    tables = torch.tensor([t + [0] * (width - len(t)) for t in block_tables], dtype=torch.int32)
    starts = [0]
    for q_len in query_lens:
        starts.append(starts[-1] + q_len)
    return AttentionMetadata(
        slot_mapping=torch.tensor(slots, dtype=torch.int64),
        block_tables=tables,
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
        query_start_loc=torch.tensor(starts, dtype=torch.int32),
        max_query_len=max(query_lens),
        max_seq_len=max(seq_lens),
        seq_lens_cpu=list(seq_lens),
        query_lens_cpu=list(query_lens),
        is_decode=all(q == 1 for q in query_lens),
    )


def scattered_tables(seq_lens, block_size, num_blocks, rng):
    """Each sequence gets distinct, shuffled (non-contiguous) block ids; block 0 is left unused."""
    need = [math.ceil(n / block_size) for n in seq_lens]
    ids = list(range(1, num_blocks))
    rng.shuffle(ids)
    assert sum(need) <= len(ids)
    out, i = [], 0
    for k in need:
        out.append(ids[i : i + k])
        i += k
    return out


def dense_reference(q_seq, k_seq, v_seq, scale):
    """One sequence: q [ql, Hq, D] (the last ql positions), k/v [n, Hk, D]; plain softmax in float64."""
    ql, Hq, D = q_seq.shape
    n, Hk, _ = k_seq.shape
    g = Hq // Hk
    k = k_seq.double().repeat_interleave(g, dim=1)
    v = v_seq.double().repeat_interleave(g, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q_seq.double(), k) * scale  # [Hq, ql, n]
    pos_q = torch.arange(n - ql, n)[:, None]
    allowed = torch.arange(n)[None, :] <= pos_q
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v).float()


def run_case(query_lens, seq_lens, Hq, Hk, D, block_size, seed=0):
    """Fill the cache with each sequence's prefix, run one step over the new tokens, compare."""
    gen = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    num_blocks = sum(math.ceil(n / block_size) for n in seq_lens) + 3
    k_cache = torch.randn(num_blocks, block_size, Hk, D, generator=gen)  # garbage outside written slots
    v_cache = torch.randn(num_blocks, block_size, Hk, D, generator=gen)
    tables = scattered_tables(seq_lens, block_size, num_blocks, rng)
    full_k = [torch.randn(n, Hk, D, generator=gen) for n in seq_lens]
    full_v = [torch.randn(n, Hk, D, generator=gen) for n in seq_lens]
    prefix_lens = [n - q for q, n in zip(query_lens, seq_lens)]
    if any(prefix_lens):  # the cached prefix, written by earlier steps
        pre = [(p, n, t) for p, n, t in zip(prefix_lens, prefix_lens, tables) if p > 0]
        meta = paged_meta([p for p, _, _ in pre], [n for _, n, _ in pre], [t for _, _, t in pre], block_size)
        ks = torch.cat([full_k[i][:p] for i, p in enumerate(prefix_lens) if p > 0])
        vs = torch.cat([full_v[i][:p] for i, p in enumerate(prefix_lens) if p > 0])
        k_cache.view(-1, Hk, D)[meta.slot_mapping] = ks
        v_cache.view(-1, Hk, D)[meta.slot_mapping] = vs
    q = torch.randn(sum(query_lens), Hq, D, generator=gen)
    k_new = torch.cat([full_k[i][p:] for i, p in enumerate(prefix_lens)])
    v_new = torch.cat([full_v[i][p:] for i, p in enumerate(prefix_lens)])
    meta = paged_meta(query_lens, seq_lens, tables, block_size)
    scale = D**-0.5
    out = SdpaBackend().forward(q, k_new, v_new, k_cache, v_cache, meta, scale)
    start = 0
    for i, ql in enumerate(query_lens):
        ref = dense_reference(q[start : start + ql], full_k[i], full_v[i], scale)
        torch.testing.assert_close(out[start : start + ql], ref, atol=1e-5, rtol=1e-5)
        start += ql
    # the new K/V landed in their slots
    assert torch.equal(k_cache.view(-1, Hk, D)[meta.slot_mapping], k_new)
    assert torch.equal(v_cache.view(-1, Hk, D)[meta.slot_mapping], v_new)


@pytest.mark.parametrize("Hq,Hk", [(4, 4), (4, 2), (8, 1)])
@pytest.mark.parametrize("block_size", [4, 16])
def test_full_prefill_ragged(Hq, Hk, block_size):
    run_case(query_lens=[7, 1, 20], seq_lens=[7, 1, 20], Hq=Hq, Hk=Hk, D=16, block_size=block_size)


@pytest.mark.parametrize("Hq,Hk", [(4, 4), (6, 2)])
def test_chunked_prefill_with_cached_prefix(Hq, Hk):
    run_case(query_lens=[5, 9], seq_lens=[13, 9 + 16], Hq=Hq, Hk=Hk, D=8, block_size=4, seed=1)


@pytest.mark.parametrize("Hq,Hk", [(4, 4), (8, 2)])
@pytest.mark.parametrize("block_size", [4, 16])
def test_decode_batch(Hq, Hk, block_size):
    run_case(query_lens=[1, 1, 1, 1], seq_lens=[1, 5, 16, 33], Hq=Hq, Hk=Hk, D=32, block_size=block_size, seed=2)


def test_mixed_batch_prefill_chunk_and_decodes():
    run_case(query_lens=[1, 6, 1, 11], seq_lens=[9, 6, 17, 30], Hq=4, Hk=2, D=16, block_size=8, seed=3)


def test_query_lens_must_cover_q():
    meta = paged_meta([2], [2], [[1]], 4)
    q = torch.randn(3, 2, 4)
    kv = torch.randn(3, 2, 4)
    cache = torch.zeros(2, 4, 2, 4)
    meta.slot_mapping = torch.tensor([4, 5, 6])
    with pytest.raises(ValueError, match="sum to 2"):
        SdpaBackend().forward(q, kv, kv, cache, cache.clone(), meta, 0.5)


def test_registry_resolves_and_reports():
    assert resolve_backend_name("auto", "cpu") == "sdpa"
    assert isinstance(get_backend("auto", "cpu"), SdpaBackend)
    assert isinstance(get_backend("sdpa", torch.device("cpu")), SdpaBackend)
    with pytest.raises(ValueError, match="unknown attention backend"):
        get_backend("paged-magic", "cpu")
    for name in ("flash", "csrc"):
        try:
            backend = get_backend(name, "cpu")
        except BackendUnavailable as e:  # module or its dependency absent: the error names the backend
            assert name in str(e)
        else:
            assert isinstance(backend, AttentionBackend)
