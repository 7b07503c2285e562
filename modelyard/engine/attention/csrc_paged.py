"""CsrcBackend: the csrc kernels for the cache write and the paged decode; prefill by varlen
FlashAttention when one is importable (and the dtype is 16-bit), else torch SDPA per sequence over
the context gathered from the cache (dequantized for an fp8 cache; the csrc kernels read fp8 themselves)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import kernels, ops
from . import BackendUnavailable
from .base import AttentionBackend, AttentionMetadata, Rotary, gather_kv
from .flash import VarlenImpl, context_slots, decode_len_hint, prefill_varlen, probe_varlen, select_varlen


def sdpa_prefill(
    q, k_cache, v_cache, meta: AttentionMetadata, scale: float, k_scale: float = 1.0, v_scale: float = 1.0
) -> torch.Tensor:
    """q [T, Hq, D] over each sequence's cached context (new tokens included) -> [T, Hq, D]."""
    block_size, hk, d = k_cache.shape[1], k_cache.shape[2], k_cache.shape[3]
    slots = context_slots(meta.block_tables, meta.seq_lens, meta.seq_lens_cpu, block_size)
    k_ctx = gather_kv(k_cache.view(-1, hk, d), slots, q.dtype, k_scale)  # [sum(seq_lens), Hk, D]
    v_ctx = gather_kv(v_cache.view(-1, hk, d), slots, q.dtype, v_scale)
    group = q.shape[1] // hk
    out = torch.empty_like(q)
    q_start = k_start = 0
    for q_len, k_len in zip(meta.query_lens_cpu, meta.seq_lens_cpu):
        qi = q[q_start : q_start + q_len].transpose(0, 1)  # [Hq, q_len, D]
        ki = k_ctx[k_start : k_start + k_len].repeat_interleave(group, 1).transpose(0, 1)
        vi = v_ctx[k_start : k_start + k_len].repeat_interleave(group, 1).transpose(0, 1)
        # queries are the last q_len positions: key j is visible to query i iff j <= k_len - q_len + i
        mask = torch.ones(q_len, k_len, dtype=torch.bool, device=q.device).tril(k_len - q_len)
        oi = F.scaled_dot_product_attention(qi, ki, vi, attn_mask=mask, scale=scale)
        out[q_start : q_start + q_len] = oi.transpose(0, 1)
        q_start += q_len
        k_start += k_len
    return out


class CsrcBackend(AttentionBackend):
    name = "csrc"
    cuda_graph_safe = True  # decode launches without host syncs

    def __init__(self, varlen: VarlenImpl | None = None, *, k_scale: float = 1.0, v_scale: float = 1.0):
        super().__init__(k_scale=k_scale, v_scale=v_scale)
        if not torch.cuda.is_available():
            raise BackendUnavailable("the csrc kernels need a CUDA device")
        if kernels.get() is None:  # a failed build raises KernelBuildError here instead
            raise BackendUnavailable(f"the csrc kernels are disabled ({kernels.ENV_SWITCH}=0)")
        if varlen is None and probe_varlen()[0]:
            varlen = select_varlen()
        self.varlen = varlen

    def forward(
        self, q, k, v, k_cache, v_cache, meta: AttentionMetadata, scale: float, rotary: Rotary | None = None
    ) -> torch.Tensor:
        self.write_kv(k, v, k_cache, v_cache, meta, q, rotary)
        if meta.is_decode:
            return ops.paged_decode_attention(
                q,
                k_cache,
                v_cache,
                meta.block_tables,
                meta.seq_lens,
                scale,
                max_seq_len=decode_len_hint(meta),
                k_scale=self.k_scale,
                v_scale=self.v_scale,
            )
        if self.varlen is not None and q.dtype in (torch.float16, torch.bfloat16):
            return prefill_varlen(
                self.varlen, q, k, v, k_cache, v_cache, meta, scale, k_scale=self.k_scale, v_scale=self.v_scale
            )
        return sdpa_prefill(q, k_cache, v_cache, meta, scale, self.k_scale, self.v_scale)
