"""The attention-backend contract between the runner (builds metadata) and the models (call forward).

KV cache layout, per decoder layer, two tensors (K and V), each
    [num_blocks, block_size, num_kv_heads, head_dim]
the FlashAttention / torch varlen paged layout, so every backend reads the same pool.
A token's slot is block_id * block_size + offset; slot_mapping lists one slot per packed token.

The cache holds the model's dtype or float8_e4m3fn (an fp8 cache: x / scale rounded, per-tensor
k_scale / v_scale fixed when the backend is built). Every backend writes through `write_kv`, which
also applies the rotary embedding the model passes (in the same kernel on CUDA), and every path that
reads cache rows back in torch goes through `gather_kv`, which dequantizes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .. import ops


@dataclass
class AttentionMetadata:
    """One decoder forward over T packed query tokens from S sequences.

    Sequence i contributes query_lens[i] new tokens whose absolute positions are
    seq_lens[i] - query_lens[i] ... seq_lens[i] - 1; it attends causally over all seq_lens[i]
    KV entries (its cached prefix plus the new tokens, which forward() writes first).
    A pure decode batch has every query_len == 1 (is_decode True).
    """

    slot_mapping: torch.Tensor  # [T] int64, device
    block_tables: torch.Tensor  # [S, max_blocks_per_seq] int32, device, padded with 0
    seq_lens: torch.Tensor  # [S] int32, device: KV length after this step
    query_start_loc: torch.Tensor  # [S + 1] int32, device: cumulative query lengths
    max_query_len: int
    max_seq_len: int
    seq_lens_cpu: list[int]  # host copies, for reference paths and planning
    query_lens_cpu: list[int]
    is_decode: bool  # every sequence has exactly one query token

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens_cpu)


def gather_kv(cache: torch.Tensor, index: torch.Tensor, dtype: torch.dtype, scale: float) -> torch.Tensor:
    """cache[index] (indexing the first dim) as `dtype` values: dequantized for an fp8 cache.

    A float8 cache is indexed through a same-width integer view: index kernels for the float8
    types are missing in some torch builds and devices, and the gather only moves bytes.
    """
    if ops.is_fp8(cache):
        rows = cache.view(torch.uint8)[index].view(cache.dtype)
    else:
        rows = cache[index]
    return ops.dequantize_kv(rows, dtype, scale)


@dataclass(frozen=True)
class Rotary:
    """The rotary embedding write_kv applies to q and k (in place) before it stores k: the two run
    as one kernel on CUDA (ops.rotary_embedding_and_cache)."""

    positions: torch.Tensor  # [T] int64
    cos_sin_cache: torch.Tensor  # [max_pos, head_dim] float32 rows [cos | sin]
    is_neox: bool = True


class AttentionBackend:
    """Writes the new K/V into the paged cache, then attends over the cache (prefix + new).

    k_scale / v_scale: the fp8 cache's per-tensor scales (ignored by a 16/32-bit cache). Plain
    floats fixed for the backend's life, so they are baked into captured CUDA graphs safely.
    """

    name = "base"

    def __init__(self, *, k_scale: float = 1.0, v_scale: float = 1.0):
        for what, value in (("k_scale", k_scale), ("v_scale", v_scale)):
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{what} must be a finite number > 0, got {value!r}")
        self.k_scale, self.v_scale = float(k_scale), float(v_scale)

    def write_kv(self, k, v, k_cache, v_cache, meta: AttentionMetadata, q=None, rotary: Rotary | None = None) -> None:
        """The step's new K/V [T, Hk, D] into their slots (quantized for an fp8 cache); with `rotary`,
        q and k are rotated in place first."""
        if rotary is None:
            ops.reshape_and_cache(k, v, k_cache, v_cache, meta.slot_mapping, self.k_scale, self.v_scale)
        else:
            ops.rotary_embedding_and_cache(
                rotary.positions,
                q,
                k,
                v,
                k_cache,
                v_cache,
                meta.slot_mapping,
                k.shape[-1],
                rotary.cos_sin_cache,
                rotary.is_neox,
                self.k_scale,
                self.v_scale,
            )

    def forward(
        self,
        q: torch.Tensor,  # [T, num_heads, head_dim]
        k: torch.Tensor,  # [T, num_kv_heads, head_dim]
        v: torch.Tensor,  # [T, num_kv_heads, head_dim]
        k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
        v_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
        meta: AttentionMetadata,
        scale: float,
        rotary: Rotary | None = None,  # applied to q and k (in place) with the cache write
    ) -> torch.Tensor:  # [T, num_heads, head_dim]
        raise NotImplementedError
