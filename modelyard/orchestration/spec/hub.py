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

from .job import JobSpec, SpecError

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "tokenizer*", "*.model", "*.txt", "*.tiktoken"]


def is_hub_id(path: str) -> bool:
    return not os.path.exists(path) and bool(_HUB_ID.match(path))


def check_local(path: str) -> bool:
    """True for a local checkpoint directory, False for a Hub id; SpecError for anything else.

    Cheap (no network, no Ray), so the CLI calls it before starting anything."""
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise SpecError(
                f"model path {path!r} is a directory but not a Hugging Face checkpoint (no config.json "
                "in it); `modelyard make-model llava DIR` writes a test checkpoint"
            )
        return True
    if os.path.exists(path):
        raise SpecError(f"model path {path!r} is a file; give the checkpoint's directory (the one with config.json)")
    if not is_hub_id(path):
        raise SpecError(f"model path {path!r} does not exist, and it is not a Hub id (org/name) either")
    return False


def resolve_checkpoint(path: str) -> str:
    """A local directory for `path`; downloads a Hub id's weights and configs when needed."""
    if check_local(path):
        return path
    try:
        from huggingface_hub import snapshot_download
    except ImportError as e:  # transformers depends on it, so this is a broken install
        raise SpecError(f"{path!r} looks like a Hub id but huggingface_hub is not importable: {e}") from e
    try:
        return snapshot_download(path, allow_patterns=_PATTERNS)
    except Exception as e:
        why = " ".join(str(e).split())[:300]  # the Hub's messages span lines; the CLI prints one
        raise SpecError(
            f"cannot fetch {path!r} from the Hugging Face Hub ({type(e).__name__}: {why}); "
            "download it first or give a local checkpoint directory"
        ) from e


def resolve_job_paths(job: JobSpec) -> JobSpec:
    """The job with every model path a local directory (Hub ids fetched)."""
    models = tuple(replace(m, path=resolve_checkpoint(m.path)) for m in job.models)
    return replace(job, models=models)
