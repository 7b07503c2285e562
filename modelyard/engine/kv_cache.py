"""The paged KV pool: one device allocation made at start-up and never grown, and its sizing.

Per decoder layer, K and V are each [num_blocks, block_size, num_kv_heads, head_dim] (the layout
attention/base.py fixes), all views into one [L, 2, num_blocks, block_size, Hk, D] tensor. Its dtype is the model's, or
float8_e4m3fn for an fp8 cache (EngineConfig.kv_cache_dtype; 1 byte per element, so the same
memory holds 2x the blocks of a 16-bit cache, 4x those of float32).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import memory, ops
from .config import EngineConfig, device_budget

GIB = 1024**3
_CPU_RAM_FRACTION = 0.25  # default CPU pool: at most this share of the available RAM


class KVCacheSizeError(RuntimeError):
    pass


@dataclass(frozen=True)
class KVCacheSpec:
    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    dtype: torch.dtype  # the cache's element type (not necessarily the model's)

    @property
    def bytes_per_block(self) -> int:
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        return 2 * self.num_layers * self.block_size * self.num_kv_heads * self.head_dim * itemsize


class KVCache:
    def __init__(self, spec: KVCacheSpec, num_blocks: int, device):
        if num_blocks < 1:
            raise KVCacheSizeError(f"the KV pool needs at least one block, got {num_blocks}")
        self.spec = spec
        self.num_blocks = num_blocks
        # Zeroed, not empty: masked-out slots still enter attention's value matmul with weight 0,
        # and 0 * NaN from uninitialised memory would poison the output.
        shape = (spec.num_layers, 2, num_blocks, spec.block_size, spec.num_kv_heads, spec.head_dim)
        if ops.is_fp8(spec.dtype):
            # Zero bytes through a same-width integer view (all-zero bits are +0.0 in e4m3fn): fill
            # kernels reached the float8 types late and unevenly across torch builds and devices.
            self.storage = torch.zeros(shape, dtype=torch.uint8, device=device).view(spec.dtype)
        else:
            self.storage = torch.zeros(shape, dtype=spec.dtype, device=device)  # [L, 2, NB, BS, Hk, D]
        self.layers: list[tuple[torch.Tensor, torch.Tensor]] = [
            (self.storage[i, 0], self.storage[i, 1]) for i in range(spec.num_layers)
        ]

    @property
    def nbytes(self) -> int:
        return self.storage.numel() * self.storage.element_size()


def estimate_activation_bytes(hf_config, config: EngineConfig, dtype: torch.dtype) -> int:
    """Peak transient memory of the largest step (engine/memory.py has the arithmetic)."""
    text, vision = memory.text_and_vision(hf_config)
    return memory.activation_bytes(
        text,
        vision,
        max_prefill_tokens=config.max_prefill_tokens,
        max_batch_size=config.max_batch_size,
        max_image_batch=config.max_image_batch,
        itemsize=torch.empty((), dtype=dtype).element_size(),
    )


_MIN_PREFILL_TOKENS = 2048
_PREFILL_SHARE = 0.25  # at most this share of the engine's memory goes to a prefill step's activations


def with_device_budgets(
    config: EngineConfig, hf_config, device: torch.device, dtype: torch.dtype, weights_bytes: int
) -> EngineConfig:
    """`config` with an unset max_batch_size / max_prefill_tokens filled for `device` (config.py's
    DEVICE_BUDGETS). On a GPU the prefill budget is halved, down to 2048 tokens, while its activations
    would take more than a quarter of the memory the engine has after its weights (the budget, or
    cache_max_entry_count of what is free), so a small GPU keeps its memory for the KV pool."""
    batch = config.max_batch_size or device_budget("max_batch_size", device.type)
    tokens = config.max_prefill_tokens
    if tokens is None:
        tokens = device_budget("max_prefill_tokens", device.type)
        if device.type == "cuda":
            if config.gpu_memory_budget_gib is not None:
                room = int(config.gpu_memory_budget_gib * GIB) - weights_bytes
            else:
                room = int(torch.cuda.mem_get_info(device)[0] * config.cache_max_entry_count)
            while (
                tokens > _MIN_PREFILL_TOKENS
                and estimate_activation_bytes(
                    hf_config, config.replace(max_batch_size=batch, max_prefill_tokens=tokens), dtype
                )
                > _PREFILL_SHARE * room
            ):
                tokens //= 2
    return config.replace(max_batch_size=batch, max_prefill_tokens=tokens)


def plan_num_blocks(
    config: EngineConfig,
    spec: KVCacheSpec,
    device: torch.device,
    weights_bytes: int,
    activation_bytes: int,
    max_model_len: int,
) -> tuple[int, str]:
    """How many blocks the pool gets, and a sentence saying how that was decided (for logs/stats)."""
    per_block = spec.bytes_per_block
    if config.num_kv_blocks is not None:
        return config.num_kv_blocks, "num_kv_blocks"
    if config.gpu_memory_budget_gib is not None:
        budget = int(config.gpu_memory_budget_gib * GIB)
        kv_bytes = budget - weights_bytes - activation_bytes
        if kv_bytes < per_block:
            raise KVCacheSizeError(
                f"gpu_memory_budget_gib={config.gpu_memory_budget_gib} does not fit: weights take "
                f"{weights_bytes / GIB:.2f} GiB and activations ~{activation_bytes / GIB:.2f} GiB "
                f"(max_prefill_tokens={config.max_prefill_tokens}), leaving nothing for the KV cache "
                f"(one block is {per_block / 2**20:.2f} MiB); raise the budget or lower max_prefill_tokens"
            )
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            if kv_bytes > free:
                raise KVCacheSizeError(
                    f"gpu_memory_budget_gib={config.gpu_memory_budget_gib} wants {kv_bytes / GIB:.2f} GiB "
                    f"of KV cache but only {free / GIB:.2f} GiB is free on {device}"
                )
        return kv_bytes // per_block, f"budget {config.gpu_memory_budget_gib} GiB"
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        kv_bytes = int(free * config.cache_max_entry_count) - activation_bytes
        if kv_bytes < per_block:
            raise KVCacheSizeError(
                f"no room for a KV cache on {device}: {free / GIB:.2f} GiB free after loading weights, "
                f"cache_max_entry_count={config.cache_max_entry_count}, activations need "
                f"~{activation_bytes / GIB:.2f} GiB; lower max_prefill_tokens or free the device"
            )
        return kv_bytes // per_block, f"{config.cache_max_entry_count:.2f} of {free / GIB:.2f} GiB free"
    # CPU (or another host-memory device): enough for max_batch_size full-length sequences,
    # capped by a share of the RAM that is available now.
    import psutil

    wanted = -(-max_model_len * config.max_batch_size // spec.block_size)
    cap = int(psutil.virtual_memory().available * _CPU_RAM_FRACTION) // per_block
    if cap < 1:
        raise KVCacheSizeError("not enough free RAM for even one KV block")
    return min(wanted, cap), "max_model_len * max_batch_size, capped by available RAM"
