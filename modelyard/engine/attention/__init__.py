"""Attention backends behind one interface (see base.py), chosen by name.

Backends are imported only when asked for, so a missing optional dependency (flash-attn, the
compiled csrc ops) only matters to the one backend that needs it. Each backend class is constructed
with keyword arguments only: the fp8 KV cache's k_scale / v_scale (defaults 1.0).
"""

from __future__ import annotations

import importlib

import torch

from .base import AttentionBackend, AttentionMetadata, gather_kv

# name -> (module relative to this package, class name)
_BACKENDS = {
    "sdpa": (".sdpa", "SdpaBackend"),
    "flash": (".flash", "FlashBackend"),
    "csrc": (".csrc_paged", "CsrcBackend"),
}
BACKEND_NAMES = ("auto", *_BACKENDS)


class BackendUnavailable(RuntimeError):
    """The requested attention backend cannot run here (module or dependency missing, wrong device)."""


# Head sizes csrc/paged_attention.cu instantiates (256 only for 16-bit types). Keep in step with it.
_CSRC_DECODE_HEAD_DIMS = (64, 80, 96, 128)
_CSRC_DECODE_HEAD_DIMS_16BIT = (*_CSRC_DECODE_HEAD_DIMS, 256)
_16BIT = (torch.float16, torch.bfloat16)


def csrc_decode_supports(head_dim: int, dtype: torch.dtype | None) -> bool:
    dims = _CSRC_DECODE_HEAD_DIMS_16BIT if dtype in _16BIT else _CSRC_DECODE_HEAD_DIMS
    return head_dim in dims


def _auto(device: torch.device, head_dim: int | None, dtype: torch.dtype | None) -> str:
    """CPU: the sdpa reference. CUDA: "flash" (varlen FlashAttention prefill + csrc paged decode)
    for 16-bit models when a varlen implementation is importable, else "csrc"; "sdpa" when the
    kernels are switched off or their decode has no instance for this head size. The model's
    head_dim and dtype refine the choice; without them (doctor) the answer is for a typical model."""
    if device.type != "cuda":
        return "sdpa"
    from .. import kernels
    from .flash import probe_varlen

    if not kernels.enabled() or (head_dim is not None and not csrc_decode_supports(head_dim, dtype)):
        return "sdpa"
    if (dtype is None or dtype in _16BIT) and probe_varlen()[0]:
        return "flash"
    return "csrc"


def resolve_backend_name(name: str, device, *, head_dim: int | None = None, dtype: torch.dtype | None = None) -> str:
    """The concrete backend `name` stands for on `device` ("auto" resolved, for this head size and
    dtype when given)."""
    if name not in BACKEND_NAMES:
        raise ValueError(f"unknown attention backend {name!r}; choose from {BACKEND_NAMES}")
    return _auto(torch.device(device), head_dim, dtype) if name == "auto" else name


def get_backend(
    name: str,
    device,
    *,
    head_dim: int | None = None,
    dtype: torch.dtype | None = None,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> AttentionBackend:
    """dtype: the model's (queries'); k_scale / v_scale: the fp8 KV cache's scales, if it is one."""
    resolved = resolve_backend_name(name, device, head_dim=head_dim, dtype=dtype)
    module_name, class_name = _BACKENDS[resolved]
    try:
        module = importlib.import_module(module_name, __package__)
    except ImportError as e:
        raise BackendUnavailable(
            f"attention backend {resolved!r} is not available ({type(e).__name__}: {e}); "
            f'use attention_backend="sdpa" or "auto"'
        ) from e
    try:
        backend = getattr(module, class_name)(k_scale=k_scale, v_scale=v_scale)
    except BackendUnavailable as e:  # the constructor's reason, with the backend named
        raise BackendUnavailable(f"attention backend {resolved!r} is not available: {e}") from e
    if (
        head_dim is not None
        and getattr(backend, "csrc_decode", resolved == "csrc")
        and not csrc_decode_supports(head_dim, dtype)
    ):
        raise BackendUnavailable(
            f"attention backend {resolved!r} decodes with the csrc kernel, which has no instance for "
            f'head_dim {head_dim} ({dtype}); use attention_backend="sdpa" or "auto"'
        )
    return backend


def describe_backend(backend: AttentionBackend) -> dict:
    """What a constructed backend runs, for Engine.stats() and `modelyard doctor`: plain strings."""
    varlen = getattr(backend, "varlen", None)
    if backend.name == "sdpa":
        prefill = decode = "torch sdpa over gathered KV (reference)"
    else:
        prefill = f"varlen {varlen.name}" if varlen is not None else "torch sdpa per sequence"
        csrc_decode = getattr(backend, "csrc_decode", backend.name == "csrc")
        if csrc_decode:
            decode = "csrc paged split-KV"
        else:  # FlashBackend with MODELYARD_KERNELS=0
            decode = (
                f"varlen {varlen.name} paged if the block size allows (not with an fp8 cache), else the torch reference"
            )
    return {
        "attention_backend": backend.name,
        "prefill_attention": prefill,
        "decode_attention": decode,
        "attention_graph_safe": bool(getattr(backend, "cuda_graph_safe", False)),
    }


__all__ = [
    "AttentionBackend",
    "AttentionMetadata",
    "BackendUnavailable",
    "BACKEND_NAMES",
    "csrc_decode_supports",
    "describe_backend",
    "gather_kv",
    "get_backend",
    "resolve_backend_name",
]
