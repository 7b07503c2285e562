"""Device-memory estimate of one model actor, from its checkpoint and engine options.

Weights: the checkpoint's tensors at the engine's dtype (read from the 8-byte-length + JSON headers
of its safetensors files; nothing is loaded). KV budget: per-token K/V bytes of every decoder layer
(1 byte per element for an fp8 KV cache) x the tokens the pool should hold. Plus the engine's own
activation estimate for its options (engine/memory.py, the arithmetic the engine sizes its pool
with) and the CUDA context / library workspaces.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from ...engine import memory as engine_memory
from ...engine.config import FP8_KV_CACHE_DTYPES, EngineConfig, device_budget
from ..spec.validation import SpecError

GIB = 1024**3
_DTYPE_BYTES = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
}
_FLOAT = {"F64", "F32", "F16", "BF16"}
_ENGINE_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


@dataclass(frozen=True)
class PlannerConfig:
    kv_tokens_per_seq: int = 1024  # image tokens + prompt + caption, typical for captioning
    max_kv_seqs: int = 32  # sequences the KV budget is sized for (capped by max_batch_size)
    context_bytes: int = 600 * 1024**2  # CUDA context, cuBLAS workspaces, allocator slack
    fraction_step: float = 0.01  # fractional GPUs are rounded up to this step

    def __post_init__(self):
        if self.kv_tokens_per_seq < 1 or self.max_kv_seqs < 1:
            raise ValueError("kv_tokens_per_seq and max_kv_seqs must be >= 1")


DEFAULT_PLANNER_CONFIG = PlannerConfig()


@dataclass(frozen=True)
class MemoryEstimate:
    weights_bytes: int
    kv_bytes: int
    activation_bytes: int
    context_bytes: int
    source: str = "checkpoint"  # checkpoint | budget (engine.gpu_memory_budget_gib) | unknown

    @property
    def total_bytes(self) -> int:
        return self.weights_bytes + self.kv_bytes + self.activation_bytes + self.context_bytes

    def describe(self) -> str:
        if self.source == "unknown":
            return "unknown size (a whole GPU)"
        g = lambda b: f"{b / GIB:.2f}"  # noqa: E731
        return (
            f"{g(self.total_bytes)} GiB = weights {g(self.weights_bytes)} + KV {g(self.kv_bytes)} "
            f"+ activations {g(self.activation_bytes)} + context {g(self.context_bytes)}"
            + (" (engine budget)" if self.source == "budget" else "")
        )


def _safetensors_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [path / n for n in names]
    return sorted(path.glob("*.safetensors"))


def _header(file: Path) -> dict:
    try:
        with open(file, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
        if not isinstance(header, dict):
            raise ValueError("the header is not a table")
        return header
    except (OSError, ValueError, struct.error) as e:  # a truncated download, an HTML error page, ...
        raise SpecError(
            f"{file} is not a readable safetensors file ({type(e).__name__}: {e}); "
            "the checkpoint is incomplete or corrupt"
        ) from e


def weights_bytes(path: str | os.PathLike, dtype: str | None) -> int:
    """Bytes the checkpoint's tensors take at `dtype` (None: as stored); floats are converted."""
    files = _safetensors_files(Path(path))
    if not files:
        raise FileNotFoundError(f"no .safetensors files in {path}")
    target = _ENGINE_DTYPE_BYTES.get(dtype) if dtype else None
    total = 0
    for f in files:
        for name, t in _header(f).items():
            if name == "__metadata__":
                continue
            numel = math.prod(t["shape"])
            width = target if (target and t["dtype"] in _FLOAT) else _DTYPE_BYTES.get(t["dtype"], 4)
            total += numel * width
    return total


def estimate_memory(
    path: str | os.PathLike,
    engine: Mapping | None = None,
    on_gpu: bool = True,
    cfg: PlannerConfig = DEFAULT_PLANNER_CONFIG,
) -> MemoryEstimate:
    """Estimate one actor's device memory from a local checkpoint dir and its engine options.

    An explicit `gpu_memory_budget_gib` is the answer as given. A path that is not a local
    directory (a Hub id not downloaded here) gives source="unknown": the planner then gives the
    model a whole GPU rather than guess.
    """
    engine = dict(engine or {})
    if engine.get("gpu_memory_budget_gib"):
        return MemoryEstimate(int(engine["gpu_memory_budget_gib"] * GIB), 0, 0, 0, source="budget")
    p = Path(path)
    if not (p / "config.json").is_file() or not _safetensors_files(p):  # e.g. weights only as .bin
        return MemoryEstimate(0, 0, 0, 0, source="unknown")
    dtype = engine.get("dtype") or ("bfloat16" if on_gpu else "float32")
    w = weights_bytes(p, dtype)
    config = json.loads((p / "config.json").read_text())
    if engine.get("num_kv_blocks"):
        tokens = int(engine["num_kv_blocks"]) * int(engine.get("block_size", 16))
    else:
        seqs = min(int(engine.get("max_batch_size") or cfg.max_kv_seqs), cfg.max_kv_seqs)
        tokens = seqs * cfg.kv_tokens_per_seq
    # an fp8 KV cache (engine kv_cache_dtype) takes 1 byte per element whatever the model dtype
    kv_width = 1 if engine.get("kv_cache_dtype") in FP8_KV_CACHE_DTYPES else _ENGINE_DTYPE_BYTES[dtype]
    text, vision = engine_memory.text_and_vision(config)
    kv = tokens * engine_memory.kv_bytes_per_token(text, kv_width)
    device_type = "cuda" if on_gpu else "cpu"
    act = engine_memory.activation_bytes(
        text,
        vision,
        itemsize=_ENGINE_DTYPE_BYTES[dtype],
        max_prefill_tokens=int(engine.get("max_prefill_tokens") or device_budget("max_prefill_tokens", device_type)),
        max_batch_size=int(engine.get("max_batch_size") or device_budget("max_batch_size", device_type)),
        max_image_batch=int(engine.get("max_image_batch") or EngineConfig().max_image_batch),
    )
    return MemoryEstimate(w, kv, act, cfg.context_bytes if on_gpu else 0)
