"""Comparison of several models' captions: side-by-side table, pairwise agreement, per-model stats.

Agreement uses rapidfuzz (a maintained C++ string-metric library):
  word_similarity = 1 - normalized Levenshtein distance over the captions' word sequences
                    (order-sensitive; 1.0 = identical wording),
  token_set       = rapidfuzz.fuzz.token_set_ratio / 100 (bag-of-words overlap, order-free).
Both are averaged over the (image, prompt) pairs where both models produced a caption.
"""

from __future__ import annotations

import itertools
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import pandas as pd

_WORD = re.compile(r"\w+|[^\w\s]", re.UNICODE)


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def word_similarity(a: str, b: str) -> float:
    from rapidfuzz.distance import Levenshtein

    wa, wb = words(a), words(b)
    if not wa and not wb:
        return 1.0
    return float(Levenshtein.normalized_similarity(wa, wb))


def token_set(a: str, b: str) -> float:
    from rapidfuzz import fuzz

    if not a.strip() and not b.strip():
        return 1.0
    return float(fuzz.token_set_ratio(a, b)) / 100.0


METRICS = {"word_similarity": word_similarity, "token_set": token_set}


def side_by_side(results: pd.DataFrame, models: Sequence[str] | None = None) -> pd.DataFrame:
    """One row per (image_id, prompt_id); per model a caption column and an error column.

    Columns: image_id, prompt_id, source, then `<model>` (caption, "" on error) and
    `<model>.error` (None when captioned) for each model in `models` order.
    """
    models = list(models) if models is not None else sorted(results["model"].unique())
    base = results[["image_id", "prompt_id", "source"]].drop_duplicates(["image_id", "prompt_id"])
    out = base.set_index(["image_id", "prompt_id"])
    for m in models:
        r = results[results["model"] == m].set_index(["image_id", "prompt_id"])
        err = r["finish_reason"] == "error"
        cap = r["caption"].where(~err, "").reindex(out.index)
        msg = r["error"].fillna("error").where(err, None).reindex(out.index)
        out[m] = cap.fillna("")
        out[f"{m}.error"] = msg.where(cap.notna(), "no result for this model").astype(object)
        out.loc[out[f"{m}.error"].isna(), f"{m}.error"] = None
    return out.reset_index().sort_values(["image_id", "prompt_id"], kind="stable").reset_index(drop=True)


def agreement(table: pd.DataFrame, models: Sequence[str], metric: str = "word_similarity") -> pd.DataFrame:
    """Symmetric models x models matrix of mean `metric` over rows both models captioned."""
    fn = METRICS[metric]
    mat = pd.DataFrame(1.0, index=list(models), columns=list(models), dtype="float64")
    for a, b in itertools.combinations(models, 2):
        both = table[table[f"{a}.error"].isna() & table[f"{b}.error"].isna()]
        vals = [fn(x, y) for x, y in zip(both[a], both[b])]
        v = float(sum(vals) / len(vals)) if vals else float("nan")
        mat.loc[a, b] = mat.loc[b, a] = v
    return mat


def model_stats(results: pd.DataFrame, models: Sequence[str], summary: Mapping | None = None) -> pd.DataFrame:
    """Per model: rows, captions, errors, mean words / new tokens / latency, plus the run summary's
    engine backend, images/s, load seconds, peak VRAM and reclaim residual when given."""
    rows = []
    for m in models:
        r = results[results["model"] == m]
        ok = r[r["finish_reason"] != "error"]
        row = {
            "model": m,
            "rows": len(r),
            "captions": len(ok),
            "errors": len(r) - len(ok),
            "mean_words": float(ok["caption"].map(lambda c: len(c.split())).mean()) if len(ok) else 0.0,
            "mean_new_tokens": float(ok["num_generated_tokens"].mean()) if len(ok) else 0.0,
            "mean_latency_s": float(ok["latency_s"].mean()) if len(ok) else 0.0,
        }
        s = (summary or {}).get(m) or {}
        for k in (
            "backend",
            "images_per_s",
            "output_tokens_per_s",
            "max_running_seen",
            "mean_batch",
            "busy_fraction",
            "load_s",
            "peak_vram_bytes",
            "reclaim_residual_bytes",
            "restarts",
        ):
            if k in s:
                row[k] = s[k]
        rows.append(row)
    return pd.DataFrame(rows).set_index("model")


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    write(tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_comparison(
    out_dir: str | os.PathLike,
    results: pd.DataFrame,
    models: Sequence[str],
    summary: Mapping | None = None,
    title: str = "modelyard comparison",
    max_images: int = 200,
    meta: Mapping | None = None,
) -> dict:
    """Write comparison.parquet (side by side), agreement.csv and report.html; return their paths."""
    from .report import render_report

    out = Path(out_dir)
    table = side_by_side(results, models)
    agree = {name: agreement(table, models, name) for name in METRICS} if len(models) > 1 else {}
    stats = model_stats(results, models, summary)
    paths = {"comparison": out / "comparison.parquet", "report": out / "report.html"}
    _atomic_write(paths["comparison"], lambda p: table.to_parquet(p, index=False))
    if agree:
        paths["agreement"] = out / "agreement.csv"
        long = pd.concat({k: v for k, v in agree.items()}, names=["metric", "model"])
        _atomic_write(paths["agreement"], lambda p: long.to_csv(p))
    html = render_report(
        title=title, table=table, models=models, stats=stats, agreement=agree, max_images=max_images, meta=meta or {}
    )
    _atomic_write(paths["report"], lambda p: Path(p).write_text(html, encoding="utf-8"))
    return {k: str(v) for k, v in paths.items()}
