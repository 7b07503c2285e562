"""EngineConfig: the one object passed down through the engine. Frozen, validated, picklable."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

_BACKENDS = ("auto", "native", "transformers")
_ATTN = ("auto", "sdpa", "flash", "csrc")
# "auto": the model dtype. The fp8 names both mean float8_e4m3fn (ops.FP8_KV_DTYPE), as in vLLM.
FP8_KV_CACHE_DTYPES = ("fp8", "fp8_e4m3")
KV_CACHE_DTYPES = ("auto", *FP8_KV_CACHE_DTYPES)
QUANTIZATION_METHODS = (None, "fp8")  # the methods themselves live in quant.py
# What an unset max_batch_size / max_prefill_tokens becomes. On a GPU the configuration the benchmarks
# run: the KV pool and the scheduler's decode reserve decide how many of the 256 run at once, and the
# prefill budget shrinks where its activations would crowd out the pool (kv_cache.with_device_budgets).
# On a CPU, values that keep a step's activations small.
DEVICE_BUDGETS = {
    "cuda": {"max_batch_size": 256, "max_prefill_tokens": 16384},
    "cpu": {"max_batch_size": 64, "max_prefill_tokens": 8192},
}


def device_budget(name: str, device_type: str) -> int:
    """The default of `name` (max_batch_size or max_prefill_tokens) on a device of this type."""
    return DEVICE_BUDGETS["cuda" if device_type == "cuda" else "cpu"][name]


@dataclass(frozen=True)
class EngineConfig:
    device: str | None = None  # None: cuda if available, else cpu
    dtype: str | None = None  # None: bfloat16 on cuda, float32 on cpu
    max_batch_size: int | None = None  # running sequences at once; None: the device's default below
    max_prefill_tokens: int | None = None  # tokens per prefill step (longer prompts are chunked); likewise
    cache_max_entry_count: float = 0.8  # fraction of free memory after weights load for the KV pool
    gpu_memory_budget_gib: float | None = None  # absolute budget (weights + KV + activations)
    block_size: int = 16
    max_model_len: int | None = None  # None: the checkpoint's max_position_embeddings
    # "auto": the native engine where it implements the checkpoint, else the "transformers" fallback
    # (engine/backends.py); "native" or "transformers" insists on one.
    backend: str = "auto"
    attention_backend: str = "auto"  # auto | sdpa | flash | csrc
    num_kv_blocks: int | None = None  # explicit pool size (tests, packing); overrides the fractions
    enforce_eager: bool = False  # True: no CUDA graphs
    # Admit a sequence only while the pool can also hold the decode growth expected of everything
    # admitted (engine/scheduler.py): a pool too small for the batch at full length then runs fewer
    # sequences at once instead of preempting and recomputing. False admits on current length only.
    reserve_decode_blocks: bool = True
    seed: int = 0  # default seed for requests without one
    max_image_batch: int = 64  # images per vision-encoder batch
    kv_cache_dtype: str = "auto"  # auto (the model dtype) | fp8 | fp8_e4m3 (both float8_e4m3fn)
    # Per-tensor scales of an fp8 cache, fixed for the engine's life: it stores x / scale, readers
    # multiply back. 1.0 is vLLM's default without calibration (K/V of typical models fit +-448).
    kv_cache_k_scale: float = 1.0
    kv_cache_v_scale: float = 1.0
    # None: the checkpoint's weights as loaded. "fp8": the decoder's linear layers run e4m3 weights
    # (per-row scales, quantized at load) and e4m3 activations (per-token scales); see quant.py.
    quantization: str | None = None

    def __post_init__(self):
        if self.backend not in _BACKENDS:
            raise ValueError(f"backend must be one of {_BACKENDS}, got {self.backend!r}")
        if self.attention_backend not in _ATTN:
            raise ValueError(f"attention_backend must be one of {_ATTN}, got {self.attention_backend!r}")
        if self.dtype is not None and self.dtype not in ("float32", "float16", "bfloat16"):
            raise ValueError(f"dtype must be float32, float16 or bfloat16, got {self.dtype!r}")
        for name in ("max_batch_size", "max_prefill_tokens", "block_size", "max_image_batch"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 < self.cache_max_entry_count <= 1.0:
            raise ValueError(f"cache_max_entry_count must be in (0, 1], got {self.cache_max_entry_count}")
        if self.gpu_memory_budget_gib is not None and self.gpu_memory_budget_gib <= 0:
            raise ValueError(f"gpu_memory_budget_gib must be > 0, got {self.gpu_memory_budget_gib}")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise ValueError(f"num_kv_blocks must be >= 1, got {self.num_kv_blocks}")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ValueError(f"max_model_len must be >= 1, got {self.max_model_len}")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype must be one of {KV_CACHE_DTYPES}, got {self.kv_cache_dtype!r}")
        if self.quantization not in QUANTIZATION_METHODS:
            raise ValueError(f"quantization must be one of {QUANTIZATION_METHODS}, got {self.quantization!r}")
        for name in ("kv_cache_k_scale", "kv_cache_v_scale"):
            value = getattr(self, name)
            if (
                isinstance(value, bool)
                or not isinstance(value, (int, float))
                or not (math.isfinite(value) and value > 0)
            ):
                raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
            if value != 1.0 and not self.kv_cache_is_fp8:
                # Scales only mean something for the fp8 cache; ignoring one quietly would hide a typo.
                raise ValueError(
                    f'{name}={value} only applies to an fp8 KV cache; set kv_cache_dtype="fp8" or leave {name} at 1.0'
                )

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

    @property
    def kv_cache_is_fp8(self) -> bool:
        return self.kv_cache_dtype in FP8_KV_CACHE_DTYPES

    def resolved_kv_cache_dtype(self):
        """The torch dtype the KV pool is allocated in."""
        import torch

        model_dtype = self.resolved_dtype()
        if not self.kv_cache_is_fp8:
            return model_dtype
        if self.resolved_device().startswith("cuda") and model_dtype not in (torch.float16, torch.bfloat16):
            # csrc/cache_kernels.cu and paged_attention.cu convert to and from e4m3 for 16-bit K/V/q only
            raise ValueError(
                f"kv_cache_dtype={self.kv_cache_dtype!r} on CUDA needs a float16 or bfloat16 model "
                f"(the CUDA kernels read and write fp8 K/V for 16-bit models only), got {model_dtype}"
            )
        from .ops import FP8_KV_DTYPE

        return FP8_KV_DTYPE

    def replace(self, **changes) -> EngineConfig:
        return replace(self, **changes)

    @classmethod
    def from_dict(cls, d: dict | None) -> EngineConfig:
        d = dict(d or {})
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            # TypeError, as EngineConfig(**d) itself raises for an unknown keyword
            raise TypeError(f"unknown engine options: {sorted(unknown)}; known: {sorted(cls.__dataclass_fields__)}")
        return cls(**d)
