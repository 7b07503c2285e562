"""Per-model progress (bars on a terminal, a line per model at a bounded rate into a log file)
and the end-of-job summary."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field

MIB = 1 << 20


@dataclass
class ModelStats:
    total: int = 0  # units to do in this run
    rows: int = 0  # rows written in this run
    errors: int = 0
    skipped: int = 0  # done in an earlier run
    first_submit: float | None = None
    last_result: float | None = None
    load_s: float = 0.0  # slowest replica's spawn (they load concurrently)
    peak_vram_bytes: int = 0
    reclaim_residual_bytes: int | None = None
    reclaimed_bytes: int = 0
    unload_s: float = 0.0
    restarts: int = 0
    replicas: int = 0
    backend: str | None = None  # the engine backend its actors ran ("native" or "transformers")
    output_tokens: int = 0  # generated tokens of this run's rows
    max_running_seen: int = 0  # the most sequences one engine step ran (a full batch?)
    decode_steps: int = 0  # over every replica's engine
    decode_tokens: int = 0
    engine_busy_s: float = 0.0  # time the engines spent in steps
    not_loaded: bool = False  # every key was done already: no actor was spawned
    load_error: str | None = None  # why the model could not load (or be planned)
    load_error_permanent: bool = False  # a rerun cannot fix it; fix the cause, then --retry-errors
    notes: list = field(default_factory=list)

    def images_per_s(self) -> float:
        if self.first_submit is None or self.last_result is None or self.last_result <= self.first_submit:
            return 0.0
        return self.rows / (self.last_result - self.first_submit)

    def active_s(self) -> float:
        if self.first_submit is None or self.last_result is None:
            return 0.0
        return max(self.last_result - self.first_submit, 0.0)

    def as_dict(self) -> dict:
        active = self.active_s()
        return {
            "backend": self.backend,
            "rows": self.rows,
            "errors": self.errors,
            "skipped_done": self.skipped,
            "images_per_s": round(self.images_per_s(), 3),
            "load_s": round(self.load_s, 3),
            "output_tokens_per_s": round(self.output_tokens / active, 2) if active else 0.0,
            "mean_new_tokens": round(self.output_tokens / max(self.rows - self.errors, 1), 2),
            "max_running_seen": self.max_running_seen,
            "mean_batch": round(self.decode_tokens / self.decode_steps, 2) if self.decode_steps else None,
            # share of the time this model worked (first request to last row) its engines spent in
            # steps, summed over replicas: near 1 per replica when decoding never waits for input
            "busy_fraction": round(self.engine_busy_s / active, 3) if active else None,
            "peak_vram_bytes": self.peak_vram_bytes,
            "reclaim_residual_bytes": self.reclaim_residual_bytes,
            "reclaimed_bytes": self.reclaimed_bytes,
            "unload_s": round(self.unload_s, 3),
            "restarts": self.restarts,
            "replicas": self.replicas,
            "not_loaded": self.not_loaded,
            "load_error": self.load_error,
            "load_error_permanent": self.load_error_permanent,
            "notes": list(self.notes),
        }


def _peak_vram(info: dict | None, stats: dict | None) -> int:
    vals = []
    for d in (info or {}).get("memory", {}), stats or {}:
        for k in ("peak_vram_bytes", "process_vram_bytes", "max_memory_allocated", "peak_memory_bytes"):
            v = d.get(k)
            if isinstance(v, (int, float)):
                vals.append(int(v))
    return max(vals, default=0)


class Progress:
    """tqdm bars, one per model (position = model order), when stderr is a terminal; otherwise (a
    log file, `ray job submit`) one plain line per active model every `line_interval_s`: done,
    rate, ETA. `enabled=False` shows neither, `True` forces the bars."""

    def __init__(
        self,
        models: list[str],
        totals: dict[str, int],
        skipped: dict[str, int],
        enabled: bool | None,
        line_interval_s: float = 10.0,
    ):
        self.stats = {m: ModelStats(total=totals.get(m, 0), skipped=skipped.get(m, 0)) for m in models}
        tty = sys.stderr.isatty()
        self.enabled = tty if enabled is None else enabled
        self.lines = enabled is None and not tty
        self.line_interval_s = line_interval_s
        self._last_line = time.perf_counter()
        self._bars = {}
        self._order = {m: i for i, m in enumerate(models)}

    def _bar(self, model: str):
        if not self.enabled:
            return None
        if model not in self._bars:
            from tqdm import tqdm

            width = max(len(m) for m in self._order)
            self._bars[model] = tqdm(
                total=self.stats[model].total,
                desc=model.ljust(width),
                unit="img",
                position=self._order[model],
                leave=True,
                dynamic_ncols=True,
                file=sys.stderr,
                smoothing=0.1,
            )
        return self._bars[model]

    def submitted(self, model: str) -> None:
        s = self.stats[model]
        if s.first_submit is None:
            s.first_submit = time.perf_counter()
            self._bar(model)

    def result(self, model: str, error: bool, new_tokens: int = 0) -> None:
        s = self.stats[model]
        s.rows += 1
        s.errors += int(error)
        s.output_tokens += int(new_tokens or 0)
        s.last_result = time.perf_counter()
        bar = self._bar(model)
        if bar is not None:
            bar.update(1)
            if error:
                bar.set_postfix(errors=s.errors, refresh=False)
        elif self.lines and s.last_result - self._last_line >= self.line_interval_s:
            self._last_line = s.last_result
            for line in self.status_lines():
                print(line, file=sys.stderr, flush=True)

    def status_lines(self) -> list[str]:
        """One line per model that has started and is not finished: done/total, rate, ETA."""
        out = []
        for m, s in self.stats.items():
            if s.first_submit is None or s.rows >= s.total:
                continue
            rate = s.images_per_s()
            eta = f"{(s.total - s.rows) / rate:.0f} s" if rate > 0 else "?"
            errors = f", {s.errors} errors" if s.errors else ""
            out.append(
                f"progress {m}: {s.rows}/{s.total} ({100 * s.rows / max(s.total, 1):.0f}%){errors}, "
                f"{rate:.2f} img/s, ETA {eta}"
            )
        return out

    def loaded(self, model: str, info: dict | None) -> None:
        s = self.stats[model]
        s.replicas += 1
        t = (info or {}).get("timings", {})
        s.load_s = max(s.load_s, float(t.get("spawn_s", t.get("load_s", 0.0)) or 0.0))
        s.peak_vram_bytes = max(s.peak_vram_bytes, _peak_vram(info, None))
        engine = (info or {}).get("engine") or {}
        s.backend = engine.get("backend") or s.backend
        if engine.get("backend_reason"):  # backend="auto" chose the fallback: say why, once
            note = f"{s.backend} backend: {engine['backend_reason']}"
            if note not in s.notes:
                s.notes.append(note)

    def engine_stats(self, model: str, stats: dict | None) -> None:
        """A replica's engine stats at its unload (counters over its life)."""
        s = self.stats[model]
        stats = stats or {}
        s.peak_vram_bytes = max(s.peak_vram_bytes, _peak_vram(None, stats))
        s.max_running_seen = max(s.max_running_seen, int(stats.get("max_running_seen") or 0))
        s.decode_steps += int(stats.get("decode_steps") or 0)
        s.decode_tokens += int(stats.get("decode_tokens") or 0)
        s.engine_busy_s += float(stats.get("prefill_seconds") or 0.0) + float(stats.get("decode_seconds") or 0.0)

    def unloaded(self, model: str, result: dict) -> None:
        s = self.stats[model]
        res = result.get("residual_bytes")
        if res is not None:
            s.reclaim_residual_bytes = max(s.reclaim_residual_bytes or 0, int(res))
        s.reclaimed_bytes += int(result.get("reclaimed_bytes") or 0)
        s.unload_s = max(s.unload_s, float(result.get("seconds") or 0.0))
        if result.get("note"):
            s.notes.append(f"unload: {result['note']}")

    def skipped_load(self, model: str) -> str:
        """The model had nothing pending, so it was never spawned; returns the line that says so."""
        s = self.stats[model]
        s.not_loaded = True
        return f"{model}: {_all_done(s.skipped + s.rows)}"

    def load_failed(self, model: str, why: str, permanent: bool) -> None:
        s = self.stats[model]
        if s.load_error is None:
            s.load_error, s.load_error_permanent = why, permanent
        s.notes.append(why)

    def restarted(self, model: str, why: str) -> None:
        self.stats[model].restarts += 1
        self.stats[model].notes.append(f"restart: {why}")

    def close(self) -> None:
        for b in self._bars.values():
            b.close()
        self._bars.clear()

    def summary(self) -> dict[str, dict]:
        return {m: s.as_dict() for m, s in self.stats.items()}


def _all_done(rows: int) -> str:
    return f"all {rows} row{'s' if rows != 1 else ''} already done, not loaded"


def format_summary(summary: dict[str, dict]) -> str:
    """The end-of-job table: per model its engine backend, rows, errors, images/s, output tokens/s, the most sequences
    one engine step ran (batch), the engines' busy share of the model's time, load, memory."""
    head = (
        f"{'model':<20} {'backend':<12} {'rows':>6} {'errors':>6} {'img/s':>8} {'tok/s':>8} {'batch':>5} {'busy':>5} "
        f"{'load s':>7} {'peak VRAM':>10} {'residual':>9} {'restarts':>8}"
    )
    lines = [head, "-" * len(head)]
    # a note every model shares (e.g. CPU actors: no VRAM to verify) is said once, under the table
    shared = set.intersection(*(set(s.get("notes") or ()) for s in summary.values())) if len(summary) > 1 else set()
    for m, s in summary.items():
        res = s.get("reclaim_residual_bytes")
        peak = f"{s['peak_vram_bytes'] / MIB:.0f} MiB" if s["peak_vram_bytes"] else "-"
        busy = s.get("busy_fraction")
        lines.append(
            f"{m:<20} {s.get('backend') or '-':<12} {s['rows']:>6} {s['errors']:>6} {s['images_per_s']:>8.2f} "
            f"{s.get('output_tokens_per_s', 0.0):>8.1f} {s.get('max_running_seen') or '-':>5} "
            f"{'-' if busy is None else f'{busy:.0%}':>5} {s['load_s']:>7.2f} "
            f"{peak:>10} {'-' if res is None else f'{res / MIB:.0f} MiB':>9} {s['restarts']:>8}"
        )
        if s.get("not_loaded"):
            lines.append(f"{'':<20} {_all_done(s['skipped_done'] + s['rows'])}")
        elif s.get("skipped_done"):
            lines.append(f"{'':<20} ({s['skipped_done']} done in an earlier run, skipped)")
        for note in s.get("notes") or ():  # load failures, deaths, unload problems: say why
            if note not in shared:
                lines.append(f"{'':<20} {note}")
    lines += [f"every model: {note}" for note in sorted(shared)]
    return "\n".join(lines)


def describe_outcome(results_path, models: list[str], top: int = 3) -> tuple[list[str], int]:
    """Lines on the job's error rows (the commonest reasons first) and how many rows are
    unfinished work (retryable errors: a model failed to load or ran out of restarts), which the
    same command retries on a rerun. Bad inputs are final error rows, not unfinished work."""
    import pandas as pd

    df = pd.read_parquet(results_path, columns=["model", "finish_reason", "error", "retryable"])
    df = df[df["model"].isin(models)]
    err = df[df["finish_reason"] == "error"]
    if err.empty:
        return [f"{len(df)} rows, no errors"], 0
    lines = [f"{len(err)} of {len(df)} rows are errors (the `error` column says why); most common:"]
    for reason, n in err["error"].fillna("(no reason)").value_counts().head(top).items():
        lines.append(f"  {n:>5} x {reason[:200]}")
    unfinished = int(err["retryable"].fillna(False).astype(bool).sum())
    return lines, unfinished
