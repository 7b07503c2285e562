"""The attention-backend contract between the runner (builds metadata) and the models (call forward).

KV cache layout, per decoder layer, two tensors (K and V), each
    [num_blocks, block_size, num_kv_heads, head_dim]
the FlashAttention / torch varlen paged layout, so every backend reads the same pool.
A token's slot is block_id * block_size + offset; slot_mapping lists one slot per packed token.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class AttentionMetadata:
    """One decoder forward over T packed query tokens from S sequences.

    Sequence i contributes query_lens[i] new tokens whose absolute positions are
    seq_lens[i] - query_lens[i] ... seq_lens[i] - 1; it attends causally over all seq_lens[i]
    KV entries (its cached prefix plus the new tokens, which forward() writes first).
    A pure decode batch has every query_len == 1 (is_decode True).
    """
    slot_mapping: torch.Tensor      # [T] int64, device
    block_tables: torch.Tensor      # [S, max_blocks_per_seq] int32, device, padded with 0
    seq_lens: torch.Tensor          # [S] int32, device: KV length after this step
    query_start_loc: torch.Tensor   # [S + 1] int32, device: cumulative query lengths
    max_query_len: int
    max_seq_len: int
    seq_lens_cpu: list[int]         # host copies, for reference paths and planning
    query_lens_cpu: list[int]
    is_decode: bool                 # every sequence has exactly one query token

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens_cpu)


class AttentionBackend:
    """Writes the new K/V into the paged cache, then attends over the cache (prefix + new)."""

    name = "base"

    def forward(
        self,
        q: torch.Tensor,        # [T, num_heads, head_dim]
        k: torch.Tensor,        # [T, num_kv_heads, head_dim]
        v: torch.Tensor,        # [T, num_kv_heads, head_dim]
        k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
        v_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
        meta: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:          # [T, num_heads, head_dim]
        raise NotImplementedError
