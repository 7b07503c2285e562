"""EngineConfig: the one object passed down through the engine. Frozen, validated, picklable."""
from __future__ import annotations

from dataclasses import dataclass, field, replace

_BACKENDS = ("native", "transformers")
_ATTN = ("auto", "sdpa", "flash", "csrc")


@dataclass(frozen=True)
class EngineConfig:
    device: str | None = None              # None: cuda if available, else cpu
    dtype: str | None = None               # None: bfloat16 on cuda, float32 on cpu
    max_batch_size: int = 64               # running sequences at once
    max_prefill_tokens: int = 8192         # tokens per prefill step; longer prompts are chunked
    cache_max_entry_count: float = 0.8     # fraction of free memory after weights load for the KV pool
    gpu_memory_budget_gib: float | None = None  # absolute budget (weights + KV + activations)
    block_size: int = 16
    max_model_len: int | None = None       # None: the checkpoint's max_position_embeddings
    backend: str = "native"                # "native" engine or the "transformers" fallback
    attention_backend: str = "auto"        # auto | sdpa | flash | csrc
    num_kv_blocks: int | None = None       # explicit pool size (tests, packing); overrides the fractions
    enforce_eager: bool = False            # True: no CUDA graphs
    seed: int = 0                          # default seed for requests without one
    max_image_batch: int = 64              # images per vision-encoder batch

    def __post_init__(self):
        if self.backend not in _BACKENDS:
            raise ValueError(f"backend must be one of {_BACKENDS}, got {self.backend!r}")
        if self.attention_backend not in _ATTN:
            raise ValueError(f"attention_backend must be one of {_ATTN}, got {self.attention_backend!r}")
        if self.dtype is not None and self.dtype not in ("float32", "float16", "bfloat16"):
            raise ValueError(f"dtype must be float32, float16 or bfloat16, got {self.dtype!r}")
        for name in ("max_batch_size", "max_prefill_tokens", "block_size", "max_image_batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 < self.cache_max_entry_count <= 1.0:
            raise ValueError(f"cache_max_entry_count must be in (0, 1], got {self.cache_max_entry_count}")
        if self.gpu_memory_budget_gib is not None and self.gpu_memory_budget_gib <= 0:
            raise ValueError(f"gpu_memory_budget_gib must be > 0, got {self.gpu_memory_budget_gib}")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise ValueError(f"num_kv_blocks must be >= 1, got {self.num_kv_blocks}")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ValueError(f"max_model_len must be >= 1, got {self.max_model_len}")

    def resolved_device(self) -> str:
        if self.device is not None:
            return self.device
        import torch
        return "cuda" if torch.cuda.is_available() else "cpu"

    def resolved_dtype(self):
        import torch
        if self.dtype is not None:
            return getattr(torch, self.dtype)
        return torch.bfloat16 if self.resolved_device().startswith("cuda") else torch.float32

    def replace(self, **changes) -> "EngineConfig":
        return replace(self, **changes)

    @classmethod
    def from_dict(cls, d: dict | None) -> "EngineConfig":
        d = dict(d or {})
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown engine options: {sorted(unknown)}; known: {sorted(cls.__dataclass_fields__)}")
        return cls(**d)
