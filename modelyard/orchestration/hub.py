"""Model paths: a local checkpoint directory, or a Hugging Face Hub id fetched into the local cache.

Actors read checkpoints from their node's filesystem, so a Hub id is resolved once on the driver
(safetensors, configs, tokenizer and processor files only) and the local snapshot path goes to the
actors. On a multi-node cluster that path must be on a shared filesystem (or the same snapshot
pre-fetched on every node); HF_HUB_OFFLINE=1 resolves from the cache without the network.
"""
from __future__ import annotations

import os
import re
from dataclasses import replace

from .spec import JobSpec, SpecError

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "tokenizer*", "*.model", "*.txt", "*.tiktoken"]


def is_hub_id(path: str) -> bool:
    return not os.path.exists(path) and bool(_HUB_ID.match(path))


def resolve_checkpoint(path: str) -> str:
    """A local directory for `path`; downloads a Hub id's weights and configs when needed."""
    if os.path.isdir(path):
        return path
    if not is_hub_id(path):
        raise SpecError(f"model path {path!r} is neither a checkpoint directory nor a Hub id (org/name)")
    try:
        from huggingface_hub import snapshot_download
    except ImportError as e:  # transformers depends on it, so this is a broken install
        raise SpecError(f"{path!r} looks like a Hub id but huggingface_hub is not importable: {e}") from e
    try:
        return snapshot_download(path, allow_patterns=_PATTERNS)
    except Exception as e:
        raise SpecError(f"cannot fetch {path!r} from the Hugging Face Hub ({type(e).__name__}: {e}); "
                        "download it first or give a local checkpoint directory") from e


def resolve_job_paths(job: JobSpec) -> JobSpec:
    """The job with every model path a local directory (Hub ids fetched)."""
    models = tuple(replace(m, path=resolve_checkpoint(m.path)) for m in job.models)
    return replace(job, models=models)
