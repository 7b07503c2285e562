"""Is an output directory's earlier work valid for this job? Checked before a rerun resumes.

A rerun skips every (image_id, model, prompt_id) key already in results.jsonl. That is right only
while what produced those rows is unchanged: the same checkpoint under the model's name, the same
prompt text under the prompt id, the same sampling, and every model and prompt of the earlier job
still in it (job.json, summary.json and the comparison describe one job: a rerun may add models or
prompts to it, but a job without some of them would leave their rows undescribed).
Otherwise the "resumed" output would silently mix captions of two different jobs, so the rerun is
refused, naming what changed. Engine options
that do not change what a model says (batch sizes, memory fractions) are not compared; dtype and
backend can change the wording a little, so they only warn.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..spec.job import JobSpec
from ..spec.validation import SpecError

_WARN_ENGINE_KEYS = (
    "dtype",
    "backend",
    "attention_backend",
    "kv_cache_dtype",
    "kv_cache_k_scale",
    "kv_cache_v_scale",
    "quantization",
)


def _same_path(a: str, b: str) -> bool:
    return a == b or (os.path.exists(a) and os.path.exists(b) and os.path.samefile(a, b))


def _prompts(d: dict) -> dict[str, dict[str, str]]:
    """model name -> {prompt id -> the text that model gets} (its override, else the job's)."""
    texts = {p["id"]: p["text"] for p in d.get("prompts", [])}
    out = {}
    for m in d.get("models", []):
        over = m.get("prompt")
        out[m["name"]] = {
            pid: (over if isinstance(over, str) else (over or {}).get(pid, t)) for pid, t in texts.items()
        }
    return out


def check_resume(job: JobSpec, out_dir: str | os.PathLike | None = None) -> list[str]:
    """SpecError when out_dir holds rows this job must not reuse; else warnings (maybe none).

    Call with the job's model paths already resolved (Hub ids fetched): job.json records them so.
    """
    out = Path(out_dir if out_dir is not None else job.output_dir)
    jsonl, meta = out / "results.jsonl", out / "job.json"
    if not jsonl.is_file() or jsonl.stat().st_size == 0 or not meta.is_file():
        return []
    try:
        old = json.loads(meta.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise SpecError(
            f"{meta} is unreadable ({e}); it describes the results in {out}: restore it, or give a new output directory"
        ) from e
    new = json.loads(json.dumps(job.to_dict(), default=str))
    problems, warnings = [], []
    if old.get("sampling") != new["sampling"]:
        diff = {
            k: (old.get("sampling", {}).get(k), v)
            for k, v in new["sampling"].items()
            if old.get("sampling", {}).get(k) != v
        }
        problems.append("sampling changed: " + ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in diff.items()))
    old_models = {m["name"]: m for m in old.get("models", [])}
    for what, before, now in (
        ("models", list(old_models), [m["name"] for m in new["models"]]),
        ("prompts", [p["id"] for p in old.get("prompts", [])], [p["id"] for p in new["prompts"]]),
    ):
        if not set(before) <= set(now):
            problems.append(
                f"its {what} are {', '.join(before) or 'none'}; this run's are {', '.join(now)} "
                f"(a rerun keeps every {what[:-1]} already there and may add more)"
            )
    old_prompts, new_prompts = _prompts(old), _prompts(new)
    for m in new["models"]:
        was = old_models.get(m["name"])
        if was is None:
            continue
        if not _same_path(str(was.get("path")), m["path"]):
            problems.append(f"model {m['name']!r} was {was.get('path')!r}, now {m['path']!r}")
        for pid, text in new_prompts[m["name"]].items():
            before = old_prompts.get(m["name"], {}).get(pid)
            if before is not None and before != text:
                problems.append(f"prompt {pid!r} of model {m['name']!r} was {before!r}, now {text!r}")
        for k in _WARN_ENGINE_KEYS:
            a, b = (was.get("engine") or {}).get(k), (m.get("engine") or {}).get(k)
            if a != b:
                warnings.append(
                    f"model {m['name']!r}: engine {k} was {a!r}, now {b!r}; rows done before keep their captions"
                )
    if problems:
        raise SpecError(
            f"{out} holds results of a different job, which a rerun would mix with this one's: "
            + "; ".join(problems)
            + ". Give a new output directory (--out), or delete "
            f"{out} to start over (or edit {meta.name} if the change does not matter)"
        )
    return warnings
