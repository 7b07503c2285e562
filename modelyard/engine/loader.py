"""HF-format checkpoint dir -> a native model on the target device, weights streamed from safetensors.

The model is built on the meta device (no memory, no init compute), materialised uninitialised on the
target device in the target dtype, then filled one checkpoint tensor at a time: host memory holds at
most one tensor beyond what safetensors memory-maps, never a second copy of the model.
Pickle checkpoints (pytorch_model.bin, *.pt) are refused: unpickling runs arbitrary code.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch

from .models.base import NativeVLM
from .models.registry import SUPPORTED_ARCHITECTURES, UnsupportedArchitecture, get_model_class
from .models.weights import CheckpointMismatch

__all__ = [
    "read_config",
    "load_model",
    "build_model",
    "checkpoint_files",
    "iter_checkpoint_tensors",
    "UnsupportedArchitecture",
    "CheckpointFormatError",
    "CheckpointMismatch",
    "RemoteCodeRequired",
    "SUPPORTED_ARCHITECTURES",
]

_INDEX = "model.safetensors.index.json"
_PICKLE_PATTERNS = ("*.bin", "*.pt", "*.pth", "*.ckpt")


class CheckpointFormatError(ValueError):
    """The checkpoint dir has no usable safetensors weights."""


class RemoteCodeRequired(ValueError):
    """The checkpoint ships its own modelling code, which modelyard never runs."""


def read_config(path):
    """The checkpoint's HF config, read offline; remote code is never trusted."""
    import transformers
    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} is not a checkpoint directory (no config.json)")
    raw = json.loads((path / "config.json").read_text())
    model_type = raw.get("model_type")
    # transformers' own refusal spans several lines and says to pass trust_remote_code=True, which
    # modelyard never does (it would run code from the checkpoint); say so in one line instead.
    if raw.get("auto_map"):
        raise RemoteCodeRequired(
            f"{path} needs remote code (config.json auto_map names {sorted(raw['auto_map'])}); modelyard loads "
            "with trust_remote_code=False and never runs a checkpoint's own code: use a version of the model "
            "that transformers implements (often a '-hf' repository)"
        )
    if isinstance(model_type, str) and model_type not in CONFIG_MAPPING:
        raise RemoteCodeRequired(
            f"{path}: model_type {model_type!r} is unknown to transformers {transformers.__version__}, so it "
            "would need remote code (trust_remote_code), which modelyard never enables: use a version of the "
            "model that transformers implements, or a transformers release that knows it"
        )
    return AutoConfig.from_pretrained(str(path), trust_remote_code=False, local_files_only=True)


def checkpoint_files(path) -> list[Path]:
    """The safetensors files holding the weights (every shard named by the index, or the single file)."""
    path = Path(path)
    index = path / _INDEX
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map") or {}
        if not weight_map:
            raise CheckpointFormatError(f"{index} has an empty weight_map")
        files = [path / name for name in sorted(set(weight_map.values()))]
        absent = [f.name for f in files if not f.is_file()]
        if absent:
            raise CheckpointFormatError(f"shards named in {index.name} are missing: {absent}")
        return files
    single = path / "model.safetensors"
    if single.is_file():
        return [single]
    found = sorted(path.glob("*.safetensors"))
    if found:
        return found
    pickles = sorted({p.name for pat in _PICKLE_PATTERNS for p in path.glob(pat)})
    if pickles:
        raise CheckpointFormatError(
            f"{path} holds only pickle weights ({', '.join(pickles[:5])}); the native engine loads safetensors "
            "only, because unpickling can run arbitrary code. Convert the checkpoint to safetensors first "
            "(e.g. load it once with transformers and save_pretrained() it: recent versions write safetensors), "
            'or use EngineConfig(backend="transformers").'
        )
    raise CheckpointFormatError(f"no weights found in {path} (expected model.safetensors or {_INDEX})")


def iter_checkpoint_tensors(files: list[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, CPU tensor) pairs, one tensor materialised at a time."""
    from safetensors import safe_open

    for file in files:
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)


def _as_dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    value = getattr(torch, str(dtype).replace("torch.", ""), None)
    if not isinstance(value, torch.dtype):
        raise ValueError(f"unknown dtype {dtype!r}")
    return value


def build_model(hf_config, dtype, device, max_model_len: int | None = None) -> NativeVLM:
    """The native model for `hf_config`, allocated (uninitialised) on `device` in `dtype`."""
    cls = get_model_class(hf_config)
    dtype, device = _as_dtype(dtype), torch.device(device)
    with torch.device("meta"):
        model = cls(hf_config)
    if max_model_len is not None:
        model.check_max_model_len(max_model_len)
    model = model.to(dtype=dtype).to_empty(device=device)  # meta tensors: the cast costs nothing
    model.init_buffers(max_model_len)
    return model.eval().requires_grad_(False)


def load_model(path, dtype, device, max_model_len: int | None = None) -> NativeVLM:
    """Build the checkpoint's native model on `device` and stream its safetensors weights into it.

    max_model_len: the longest context the engine will run (default: the checkpoint's
    max_position_embeddings); refused where the model would not be exact over it (sliding windows).
    Raises UnsupportedArchitecture (use EngineConfig(backend="transformers")), CheckpointFormatError
    (no safetensors) or CheckpointMismatch (missing / unexpected / misshapen tensors).
    """
    path = Path(path)
    hf_config = read_config(path)
    get_model_class(hf_config)  # refuse unsupported checkpoints before touching weights
    files = checkpoint_files(path)
    if max_model_len is None:
        max_model_len = int(hf_config.text_config.max_position_embeddings)
    model = build_model(hf_config, dtype, device, max_model_len)
    model.load_weights(iter_checkpoint_tensors(files))
    return model
