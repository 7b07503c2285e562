"""JobSpec / ModelSpec / InputSpec / PromptSpec: what a captioning or comparison job is.

Frozen, validated dataclasses. Built in Python, or loaded from a TOML, YAML or JSON job file
(`jobfile.load_job`), whose layout mirrors the dataclasses:

    mode = "sequential"            # sequential | parallel | auto
    output_dir = "runs/compare"
    [inputs]
    directory = "images"           # or: glob = "images/**/*.jpg", or: file_list = "paths.txt"
    [[prompts]]
    id = "short"
    text = "Describe the image in one sentence."
    [sampling]
    max_new_tokens = 48
    [[models]]
    name = "llava"
    path = "llava-hf/llava-1.5-7b-hf"
    engine = { max_batch_size = 32 }
    replicas = 2

Relative paths in a job file are resolved against the file's directory.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from ...engine.config import EngineConfig
from ...engine.types import SamplingParams
from .validation import SpecError, build, check_types

MODES = ("sequential", "parallel", "auto")
DEFAULT_PROMPT = "Describe the image."
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


def _check_name(what: str, name: str) -> None:
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise SpecError(
            f"{what} {name!r} must be 1-100 characters of letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )


@dataclass(frozen=True)
class PromptSpec:
    id: str
    text: str

    def __post_init__(self):
        _check_name("prompt id", self.id)
        if not isinstance(self.text, str) or not self.text.strip():
            raise SpecError(f"prompt {self.id!r}: text must be a non-empty string")


@dataclass(frozen=True)
class ModelSpec:
    """One model of a job.

    `engine`: EngineConfig options, passed through to the actor unchanged.
    `prompt`: per-model override, either one text for every prompt id or {prompt_id: text}
      (models phrase instructions differently); results keep the job's prompt ids.
    `gpus`: GPUs per replica (fractions allowed, 0 = CPU); None lets the planner decide.
    `replicas`: actors of this model sharing its work (data parallel).
    """

    name: str
    path: str
    engine: Mapping[str, Any] = field(default_factory=dict)
    prompt: str | Mapping[str, str] | None = None
    gpus: float | None = None
    replicas: int = 1

    def __post_init__(self):
        _check_name("model name", self.name)
        if not isinstance(self.path, str) or not self.path:
            raise SpecError(f"model {self.name!r}: path must be a non-empty string")
        if not isinstance(self.engine, Mapping):
            raise SpecError(f"model {self.name!r}: engine must be a table/dict of EngineConfig options")
        object.__setattr__(self, "engine", dict(self.engine))
        # the actor builds its EngineConfig from these; a bad option fails here, by name, not in the actor
        build(f"model {self.name!r}: engine options", EngineConfig, self.engine)
        if self.prompt is not None and not isinstance(self.prompt, (str, Mapping)):
            raise SpecError(f"model {self.name!r}: prompt must be a string or a table of prompt_id -> text")
        if isinstance(self.prompt, Mapping):
            object.__setattr__(self, "prompt", dict(self.prompt))
        if self.gpus is not None and (not isinstance(self.gpus, (int, float)) or self.gpus < 0):
            raise SpecError(f"model {self.name!r}: gpus must be a number >= 0, got {self.gpus!r}")
        if not isinstance(self.replicas, int) or self.replicas < 1:
            raise SpecError(f"model {self.name!r}: replicas must be an integer >= 1, got {self.replicas!r}")

    def prompt_text(self, prompt: PromptSpec) -> str:
        if isinstance(self.prompt, str):
            return self.prompt
        if isinstance(self.prompt, dict):
            return self.prompt.get(prompt.id, prompt.text)
        return prompt.text


@dataclass(frozen=True)
class InputSpec:
    """Where the images come from: exactly one source.

    directory (walked, `recursive` by default, files filtered by `extensions`), glob (recursive
    `**` allowed), file_list (a text file, one path or `id<TAB>path` a line), items (a Python list
    of paths, bytes, (id, path-or-bytes) pairs or {"id", "path"|"bytes"} dicts), or dataset
    (a Ray Dataset whose rows have a "path" or "bytes" column and optionally "id").
    """

    directory: str | None = None
    glob: str | None = None
    file_list: str | None = None
    items: tuple | None = None
    dataset: Any = None
    recursive: bool = True
    extensions: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp", ".tif", ".tiff")

    def __post_init__(self):
        given = [n for n in ("directory", "glob", "file_list", "items", "dataset") if getattr(self, n) is not None]
        if len(given) != 1:
            raise SpecError(
                f"inputs: give exactly one of directory, glob, file_list, items, dataset (got {given or 'none'})"
            )
        if self.items is not None:
            object.__setattr__(self, "items", tuple(self.items))
        if not isinstance(self.recursive, bool):
            raise SpecError(f"inputs.recursive must be true or false, got {self.recursive!r}")
        if isinstance(self.extensions, str) or not all(isinstance(e, str) and e for e in self.extensions):
            raise SpecError(
                f"inputs.extensions must be a list of file extensions like ['.jpg', '.png'], got {self.extensions!r}"
            )
        exts = tuple(e.lower() if e.startswith(".") else "." + e.lower() for e in self.extensions)
        object.__setattr__(self, "extensions", exts)
        for n in ("directory", "glob", "file_list"):
            v = getattr(self, n)
            if v is not None and not isinstance(v, (str, os.PathLike)):
                raise SpecError(f"inputs.{n} must be a path string, got {type(v).__name__}")
            if v is not None:
                object.__setattr__(self, n, os.fspath(v))

    @classmethod
    def from_any(cls, src: Any) -> InputSpec:
        """A directory, a glob, a .txt list of paths, a list of items or a Ray Dataset."""
        if isinstance(src, InputSpec):
            return src
        if isinstance(src, (str, os.PathLike)):
            s = os.fspath(src)
            if any(c in s for c in "*?["):
                return cls(glob=s)
            if os.path.isdir(s):
                return cls(directory=s)
            if s.endswith((".txt", ".lst")):
                return cls(file_list=s)
            return cls(items=(s,))
        if isinstance(src, (list, tuple)):
            return cls(items=tuple(src))
        if hasattr(src, "iter_rows") and hasattr(src, "count"):
            return cls(dataset=src)
        raise SpecError(
            f"cannot make an input from {type(src).__name__}: give a directory, glob, "
            "path-list file, list of paths/bytes or a Ray Dataset"
        )


@dataclass(frozen=True)
class JobSpec:
    models: tuple[ModelSpec, ...]
    inputs: InputSpec
    output_dir: str
    prompts: tuple[PromptSpec, ...] = (PromptSpec("default", DEFAULT_PROMPT),)
    sampling: SamplingParams = field(default_factory=SamplingParams)
    mode: str = "sequential"
    # items in flight per actor; "auto": as many as the actor's engine batches, plus a queue to cover
    # its next steps (from what the actor reports after loading)
    max_in_flight: int | str = "auto"
    max_restarts: int = 2  # respawns per model after its actor dies
    max_item_attempts: int = 3  # an item in flight during this many actor deaths becomes an error row
    retry_errors: bool = False  # on resume, recompute rows that ended in an error too
    report: bool = True  # write comparison.parquet + report.html at the end
    report_max_images: int = 200  # images shown in the HTML report (the tables keep all)
    gpu_memory_gib: float | None = None  # per-GPU memory for planning; None: measured through NVML
    spawn_timeout_s: float = 1800.0  # placement + weights + KV pool; past it the model's rows are errors
    name: str = "job"

    def __post_init__(self):
        models = tuple(self.models)
        if not models:
            raise SpecError("a job needs at least one model")
        if not all(isinstance(m, ModelSpec) for m in models):
            raise SpecError("models must be ModelSpec objects")
        names = [m.name for m in models]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise SpecError(f"model names must be unique; repeated: {dup}")
        object.__setattr__(self, "models", models)
        if not isinstance(self.inputs, InputSpec):
            object.__setattr__(self, "inputs", InputSpec.from_any(self.inputs))
        prompts = tuple(self.prompts)
        if not all(isinstance(p, PromptSpec) for p in prompts):
            raise SpecError("prompts must be PromptSpec objects")
        if not prompts:
            raise SpecError("a job needs at least one prompt")
        ids = [p.id for p in prompts]
        if len(set(ids)) != len(ids):
            raise SpecError(f"prompt ids must be unique, got {ids}")
        object.__setattr__(self, "prompts", prompts)
        for m in models:
            if isinstance(m.prompt, dict):
                unknown = set(m.prompt) - set(ids)
                if unknown:
                    raise SpecError(
                        f"model {m.name!r}: prompt override for unknown prompt ids {sorted(unknown)}; "
                        f"the job's prompt ids are {ids}"
                    )
        if not isinstance(self.sampling, SamplingParams):
            raise SpecError("sampling must be a SamplingParams")
        if self.mode not in MODES:
            raise SpecError(f"mode must be one of {MODES}, got {self.mode!r}")
        if not isinstance(self.output_dir, (str, os.PathLike)) or not os.fspath(self.output_dir):
            raise SpecError(f"output_dir must be a non-empty path, got {self.output_dir!r}")
        object.__setattr__(self, "output_dir", os.fspath(self.output_dir))
        check_types(
            "job",
            JobSpec,
            {f.name: getattr(self, f.name) for f in fields(self)},
            skip=("models", "inputs", "prompts", "sampling", "output_dir"),
        )
        if self.max_in_flight != "auto" and (not isinstance(self.max_in_flight, int) or self.max_in_flight < 1):
            raise SpecError(f'max_in_flight must be "auto" or an integer >= 1, got {self.max_in_flight!r}')
        for n in ("max_item_attempts", "report_max_images"):
            if not isinstance(getattr(self, n), int) or getattr(self, n) < 1:
                raise SpecError(f"{n} must be an integer >= 1, got {getattr(self, n)!r}")
        if not isinstance(self.max_restarts, int) or self.max_restarts < 0:
            raise SpecError(f"max_restarts must be an integer >= 0, got {self.max_restarts!r}")
        if not self.spawn_timeout_s > 0:
            raise SpecError(f"spawn_timeout_s must be > 0, got {self.spawn_timeout_s!r}")
        if self.gpu_memory_gib is not None and self.gpu_memory_gib <= 0:
            raise SpecError(f"gpu_memory_gib must be > 0, got {self.gpu_memory_gib}")

    def model(self, name: str) -> ModelSpec:
        for m in self.models:
            if m.name == name:
                return m
        raise KeyError(name)

    def to_dict(self) -> dict:
        """A JSON-able description (a dataset input is described, not serialised)."""
        inputs = {
            f.name: getattr(self.inputs, f.name)
            for f in fields(InputSpec)
            if f.name not in ("items", "dataset") and getattr(self.inputs, f.name) is not None
        }
        if self.inputs.items is not None:
            inputs["items"] = f"<{len(self.inputs.items)} python items>"
        if self.inputs.dataset is not None:
            inputs["dataset"] = "<ray dataset>"
        inputs["extensions"] = list(self.inputs.extensions)
        d = {
            f.name: getattr(self, f.name)
            for f in fields(self)
            if f.name not in ("models", "inputs", "prompts", "sampling")
        }
        d["models"] = [{f.name: getattr(m, f.name) for f in fields(ModelSpec)} for m in self.models]
        d["prompts"] = [{"id": p.id, "text": p.text} for p in self.prompts]
        d["sampling"] = {f.name: getattr(self.sampling, f.name) for f in fields(SamplingParams)}
        d["inputs"] = inputs
        return d
