"""Reference attention backend: torch scaled_dot_product_attention over K/V gathered from the paged pool.

Runs anywhere torch runs (the CPU path and the oracle the fast backends are tested against).
Prefill and mixed batches go sequence by sequence (each query block sits at the end of its
sequence, so the causal mask is offset by the cached prefix); pure decode batches are gathered
into one padded batch with a key-length mask. Both read every key and value back from the
cache (gather_kv: dequantized for an fp8 cache), the step's own rows included.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import AttentionBackend, AttentionMetadata, Rotary, gather_kv


def _expand_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    """[..., Hk, n, D] -> [..., Hk * groups, n, D]: each KV head serves `groups` consecutive query heads."""
    return x if groups == 1 else x.repeat_interleave(groups, dim=-3)


class SdpaBackend(AttentionBackend):
    name = "sdpa"

    def forward(
        self, q, k, v, k_cache, v_cache, meta: AttentionMetadata, scale: float, rotary: Rotary | None = None
    ) -> torch.Tensor:
        self.write_kv(k, v, k_cache, v_cache, meta, q, rotary)
        if meta.is_decode:
            return self._decode(q, k_cache, v_cache, meta, scale)
        return self._varlen(q, k_cache, v_cache, meta, scale)

    def _varlen(self, q, k_cache, v_cache, meta, scale):
        T, Hq, D = q.shape
        Hk, bs = k_cache.shape[2], k_cache.shape[1]
        out = torch.empty_like(q)  # [T, Hq, D]
        start = 0
        for i, (q_len, n) in enumerate(zip(meta.query_lens_cpu, meta.seq_lens_cpu)):
            if q_len == 0:
                continue
            if q_len > n:
                raise ValueError(f"sequence {i}: query_len {q_len} > seq_len {n}")
            blocks = meta.block_tables[i, : (n + bs - 1) // bs].long()
            key = gather_kv(k_cache, blocks, q.dtype, self.k_scale).flatten(0, 1)[:n]  # [n, Hk, D]
            val = gather_kv(v_cache, blocks, q.dtype, self.v_scale).flatten(0, 1)[:n]
            key = _expand_kv(key.transpose(0, 1), Hq // Hk)  # [Hq, n, D]
            val = _expand_kv(val.transpose(0, 1), Hq // Hk)
            query = q[start : start + q_len].transpose(0, 1)  # [Hq, q_len, D]
            mask, causal = None, False
            if q_len == n:
                causal = True  # no cached prefix: plain causal (lets CUDA pick flash)
            elif q_len > 1:
                # Query j sits at absolute position n - q_len + j and sees keys 0 .. n - q_len + j.
                mask = torch.ones(q_len, n, dtype=torch.bool, device=q.device).tril(diagonal=n - q_len)
            # (q_len == 1 with a prefix: the one new token sees the whole sequence, no mask)
            o = F.scaled_dot_product_attention(query, key, val, attn_mask=mask, is_causal=causal, scale=scale)
            out[start : start + q_len] = o.transpose(0, 1)
            start += q_len
        if start != T:
            raise ValueError(f"query_lens sum to {start} but q has {T} tokens")
        return out

    def _decode(self, q, k_cache, v_cache, meta, scale):
        S, Hq, D = q.shape
        Hk, bs = k_cache.shape[2], k_cache.shape[1]
        max_blocks = (meta.max_seq_len + bs - 1) // bs
        blocks = meta.block_tables[:, :max_blocks].long()  # [S, MB]
        key = gather_kv(k_cache, blocks, q.dtype, self.k_scale).flatten(1, 2).transpose(1, 2)  # [S, Hk, L, D]
        val = gather_kv(v_cache, blocks, q.dtype, self.v_scale).flatten(1, 2).transpose(1, 2)
        L = key.shape[2]
        valid = torch.arange(L, device=q.device)[None, :] < meta.seq_lens.to(q.device)[:, None]  # [S, L]
        o = F.scaled_dot_product_attention(
            q[:, :, None, :],  # [S, Hq, 1, D]
            _expand_kv(key, Hq // Hk),
            _expand_kv(val, Hq // Hk),
            attn_mask=valid[:, None, None, :],
            scale=scale,
        )
        return o[:, :, 0, :]  # [S, Hq, D]
