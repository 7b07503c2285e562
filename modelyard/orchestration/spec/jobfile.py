"""Job files: TOML, YAML or JSON -> JobSpec, with errors that name the key and the file.

Relative paths (inputs, output_dir, model directories) resolve against the job file's directory;
a model path that looks like a Hub id ("org/name") and is not a local directory is kept as is.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import fields
from pathlib import Path

from ...engine.types import SamplingParams
from .job import DEFAULT_PROMPT, InputSpec, JobSpec, ModelSpec, PromptSpec, SpecError
from .validation import build, check_types, unknown_keys

_JOB_KEYS = {f.name for f in fields(JobSpec)}
_MODEL_KEYS = {f.name for f in fields(ModelSpec)}
_INPUT_KEYS = {f.name for f in fields(InputSpec)} - {"dataset"}


def _read_mapping(path: Path) -> dict:
    suffix = path.suffix.lower()
    text = path.read_text(encoding="utf-8")
    try:
        if suffix == ".toml":
            try:
                import tomllib
            except ModuleNotFoundError:  # Python 3.10
                import tomli as tomllib
            data = tomllib.loads(text)
        elif suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        elif suffix == ".json":
            data = json.loads(text)
        else:
            raise SpecError(f"{path}: unknown job file type {suffix!r}; use .toml, .yaml/.yml or .json")
    except SpecError:
        raise
    except Exception as e:  # parser errors carry line numbers; keep them
        raise SpecError(f"{path}: cannot parse: {e}") from e
    if not isinstance(data, dict):
        raise SpecError(f"{path}: the top level must be a table/mapping")
    return data


def job_from_dict(d: Mapping, base_dir: str | os.PathLike | None = None, **overrides) -> JobSpec:
    """Build a JobSpec from plain data; relative paths resolve against `base_dir`."""
    d = {**d, **{k: v for k, v in overrides.items() if v is not None}}
    unknown_keys("job", d, _JOB_KEYS)
    base = Path(base_dir) if base_dir is not None else None

    def resolve(p: str) -> str:
        if base is None or os.path.isabs(p):
            return p
        cand = base / p
        # a model path may be a Hub id ("org/name") rather than a directory
        return os.path.normpath(cand) if cand.exists() or not re.match(r"^[\w.-]+/[\w.-]+$", p) else p

    models = d.get("models")
    if not isinstance(models, list) or not models:
        raise SpecError("job: `models` must be a non-empty list of model tables")
    mspecs = []
    for i, m in enumerate(models):
        if not isinstance(m, Mapping):
            raise SpecError(f"models[{i}] must be a table/mapping")
        unknown_keys(f"models[{i}]", m, _MODEL_KEYS)
        if "path" not in m:
            raise SpecError(f"models[{i}]: `path` is required")
        check_types(f"models[{i}]", ModelSpec, m)
        m = dict(m)
        m.setdefault("name", Path(m["path"].rstrip("/")).name)
        m["path"] = resolve(m["path"])
        mspecs.append(ModelSpec(**m))

    inputs = d.get("inputs")
    if isinstance(inputs, (str, list)):
        inputs = {"items": inputs} if isinstance(inputs, list) else {"directory": inputs}
    if not isinstance(inputs, Mapping):
        raise SpecError("job: `inputs` is required (a table with directory, glob, file_list or items)")
    unknown_keys("inputs", inputs, _INPUT_KEYS)
    check_types("inputs", InputSpec, inputs)
    inputs = dict(inputs)
    for k in ("directory", "glob", "file_list"):
        if inputs.get(k) is not None:
            inputs[k] = (
                os.path.normpath(base / inputs[k]) if base is not None and not os.path.isabs(inputs[k]) else inputs[k]
            )
    if "extensions" in inputs:
        inputs["extensions"] = tuple(inputs["extensions"])

    prompts = d.get("prompts", None)
    if prompts is None:
        pspecs = (PromptSpec("default", DEFAULT_PROMPT),)
    elif isinstance(prompts, str):
        pspecs = (PromptSpec("default", prompts),)
    elif isinstance(prompts, Mapping):
        pspecs = tuple(PromptSpec(str(k), v) for k, v in prompts.items())
    elif isinstance(prompts, list):
        pspecs = tuple(
            PromptSpec(f"p{i}", p) if isinstance(p, str) else _prompt(f"prompts[{i}]", p) for i, p in enumerate(prompts)
        )
    else:
        raise SpecError("job: `prompts` must be a string, a list or a table of id -> text")

    sampling = d.get("sampling") or {}
    if not isinstance(sampling, Mapping):
        raise SpecError(f"job: `sampling` must be a table of sampling options, got {sampling!r}")
    sampling = build("sampling", SamplingParams, sampling)
    rest = {k: v for k, v in d.items() if k not in ("models", "inputs", "prompts", "sampling")}
    if "output_dir" not in rest:
        raise SpecError("job: `output_dir` is required")
    out = rest["output_dir"]
    if not isinstance(out, str) or not out:
        raise SpecError(f"job: output_dir must be a non-empty path string, got {out!r}")
    rest["output_dir"] = os.path.normpath(base / out) if base is not None and not os.path.isabs(out) else out
    return JobSpec(models=tuple(mspecs), inputs=InputSpec(**inputs), prompts=pspecs, sampling=sampling, **rest)


def _prompt(where: str, p) -> PromptSpec:
    if not isinstance(p, Mapping):
        raise SpecError(f"{where} must be a string or a table with `id` and `text`, got {p!r}")
    unknown_keys(where, p, {"id", "text"})
    if "text" not in p:
        raise SpecError(f"{where}: `text` is required")
    return PromptSpec(p.get("id", where.replace("prompts[", "p").rstrip("]")), p["text"])


def load_job(path: str | os.PathLike, **overrides) -> JobSpec:
    """Load a job file (.toml, .yaml/.yml, .json). `overrides` replace top-level keys (None: keep)."""
    p = Path(path)
    if not p.is_file():
        raise SpecError(f"job file not found: {p}")
    return job_from_dict(_read_mapping(p), base_dir=p.resolve().parent, **overrides)
