"""Attention backends behind one interface (see base.py), chosen by name.

Backends are imported only when asked for, so a missing optional dependency (flash-attn, the
compiled csrc ops) only matters to the one backend that needs it. Each backend class is constructed
with no arguments.
"""
from __future__ import annotations

import importlib

import torch

from .base import AttentionBackend, AttentionMetadata

# name -> (module relative to this package, class name)
_BACKENDS = {
    "sdpa": (".sdpa", "SdpaBackend"),
    "flash": (".flash", "FlashBackend"),
    "csrc": (".csrc_paged", "CsrcBackend"),
}
BACKEND_NAMES = ("auto", *_BACKENDS)


class BackendUnavailable(RuntimeError):
    """The requested attention backend cannot run here (module or dependency missing, wrong device)."""


def _auto(device: torch.device) -> str:
    if device.type != "cuda":
        return "sdpa"
    # KERNELS: choose the CUDA fast path here (e.g. "flash" for prefill-heavy work, "csrc" for paged
    # decode) once those backends exist and are verified; until then CUDA uses the sdpa reference.
    return "sdpa"


def resolve_backend_name(name: str, device) -> str:
    """The concrete backend `name` stands for on `device` ("auto" resolved)."""
    if name not in BACKEND_NAMES:
        raise ValueError(f"unknown attention backend {name!r}; choose from {BACKEND_NAMES}")
    return _auto(torch.device(device)) if name == "auto" else name


def get_backend(name: str, device) -> AttentionBackend:
    resolved = resolve_backend_name(name, device)
    module_name, class_name = _BACKENDS[resolved]
    try:
        module = importlib.import_module(module_name, __package__)
    except ImportError as e:
        raise BackendUnavailable(
            f"attention backend {resolved!r} is not available ({type(e).__name__}: {e}); "
            f"use attention_backend=\"sdpa\" or \"auto\"") from e
    return getattr(module, class_name)()


__all__ = ["AttentionBackend", "AttentionMetadata", "BackendUnavailable", "BACKEND_NAMES", "get_backend",
           "resolve_backend_name"]
