"""Where does the GPU idle during engine steps, and what was the host doing meanwhile?

Runs a callable under torch.profiler (CPU + CUDA), with the engine's step phases marked by
`my.*` record_function ranges, and reads the exported Chrome trace back: the GPU busy time is the
union of all kernel / memcpy / memset intervals (every stream), the idle gaps are the holes in that
union, and each gap >= min_gap_ms is attributed to the innermost `my.*` range the host was in, plus
the CUDA runtime calls and CPU ops that overlapped it.

    from timeline import profile_timeline, format_report
    res = profile_timeline(lambda: eng.generate(reqs), "/tmp/prefill.json.gz", engine=eng)
    print(format_report(res))

    python benchmarks/timeline.py /tmp/prefill.json.gz --min-gap-ms 0.5      # an existing trace
"""
from __future__ import annotations

import argparse
import bisect
import contextlib
import gzip
import json
import os
import shutil
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function

GPU_CATS = {"kernel", "gpu_memcpy", "gpu_memset"}   # not gpu_user_annotation: that is a label, not work
RUNTIME_CATS = {"cuda_runtime", "cuda_driver"}      # cudaStreamSynchronize, cudaMemcpyAsync, cuLaunchKernel...
MARK = "my."
NONE = "(no my.* range)"
_PER_GAP_NAMES = 5                                   # names listed per gap in each category

# (path from the engine, label). Instance attributes shadow the class's methods, so calls made
# through `self.<name>` inside the engine go through the marked wrappers too.
_METHODS = (
    ("scheduler", "schedule"), ("", "_encode_new_images"), ("runner", "execute"),
    ("runner", "_pack"), ("runner", "_metadata"), ("runner", "_sample"), ("scheduler", "update"),
    ("", "_finish"), ("", "step"),
)
_MISSING = object()


def _marked(fn, label: str):
    def wrapper(*args, **kwargs):
        with record_function(label):
            return fn(*args, **kwargs)
    return wrapper


class _MarkedCallable:
    """Stands in for a callable object (the Sampler): `__call__` is looked up on the type, so it
    cannot be patched on the instance; other attribute reads go to the wrapped object."""

    def __init__(self, obj, label: str):
        self._obj, self._label = obj, label

    def __call__(self, *args, **kwargs):
        with record_function(self._label):
            return self._obj(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._obj, name)


@contextlib.contextmanager
def annotate(engine):
    """Mark the engine's step phases as `my.<owner>.<method>` ranges while active; the instances
    get their own attributes back on exit (the classes are never touched)."""
    saved = []                                   # (object, attribute, its own previous value or _MISSING)
    try:
        for owner, name in _METHODS:
            obj = getattr(engine, owner) if owner else engine
            wrapped = _marked(getattr(obj, name), f"{MARK}{owner or 'engine'}.{name}")
            saved.append((obj, name, vars(obj).get(name, _MISSING)))
            setattr(obj, name, wrapped)
        runner = engine.runner
        wrapped = _MarkedCallable(runner.sampler, f"{MARK}runner.sampler")
        saved.append((runner, "sampler", vars(runner).get("sampler", _MISSING)))
        runner.sampler = wrapped
        yield engine
    finally:
        for obj, name, old in reversed(saved):
            if old is _MISSING:
                delattr(obj, name)               # back to the class's method
            else:
                setattr(obj, name, old)


def _events(trace: dict):
    """Complete ("X") events as (cat, name, start_us, end_us); metadata, flows and instants dropped."""
    for e in trace.get("traceEvents", []):
        if e.get("ph") == "X" and "dur" in e:
            ts = float(e["ts"])
            yield e.get("cat", ""), e.get("name", ""), ts, ts + float(e["dur"])


def _merge(gpu: list[tuple[float, float, str]]) -> list[list]:
    """Union of GPU intervals (any stream, any order) as [start, end, first_name, last_name]:
    the names of the event that opens each busy span and of the one that ends it last."""
    spans: list[list] = []
    for s, e, name in sorted(gpu):
        if spans and s <= spans[-1][1]:          # overlapping or touching: same busy span
            if e > spans[-1][1]:
                spans[-1][1], spans[-1][3] = e, name
        else:
            spans.append([s, e, name, name])
    return spans


def _innermost(gap_s: float, gap_e: float, ranges: list[tuple[float, float, str]]) -> dict[str, float]:
    """us of [gap_s, gap_e) spent with each my.* range innermost. Nested ranges on one thread: the
    innermost active one started last (ties: the one ending first); uncovered time goes to NONE."""
    cuts = sorted({gap_s, gap_e, *(min(max(t, gap_s), gap_e) for s, e, _ in ranges for t in (s, e))})
    out: dict[str, float] = defaultdict(float)
    for a, b in zip(cuts, cuts[1:]):
        active = [(s, -e, n) for s, e, n in ranges if s <= a and e >= b]
        out[max(active)[2] if active else NONE] += b - a
    return out


def _top(d: dict[str, float], n: int | None = None) -> list[tuple[str, float]]:
    """name -> us as [(name, ms)], largest first."""
    return [(k, v / 1e3) for k, v in sorted(d.items(), key=lambda kv: (-kv[1], kv[0]))[:n]]


def analyze_trace(trace: dict, min_gap_ms: float = 0.5, top: int = 15) -> dict:
    """GPU busy/idle over the GPU window of a Chrome trace, and host attribution of its gaps."""
    gpu, host = [], []
    for cat, name, s, e in _events(trace):
        if cat in GPU_CATS:
            gpu.append((s, e, name))
        elif (cat == "user_annotation" and name.startswith(MARK)) or cat in RUNTIME_CATS or cat == "cpu_op":
            host.append((cat, name, s, e))
    if not gpu:
        return {"gpu_events": 0, "window_ms": 0.0, "busy_ms": 0.0, "idle_ms": 0.0, "busy_fraction": 0.0,
                "min_gap_ms": min_gap_ms, "num_gaps": 0, "gap_ms": 0.0, "small_gap_idle_ms": 0.0,
                "gaps": [], "by_annotation": [], "by_runtime": [], "by_kernel": [],
                "note": "no GPU activity in trace"}
    spans = _merge(gpu)
    t0, t1 = spans[0][0], spans[-1][1]
    by_kernel: dict[str, float] = defaultdict(float)     # GPU time per kernel name (the kernel table)
    for s, e, name in gpu:
        by_kernel[name] += e - s
    busy = sum(e - s for s, e, _, _ in spans)
    gaps = [{"s": a[1], "e": b[0], "before": a[3], "after": b[2], "ranges": [],
             "runtime": defaultdict(float), "cpu_ops": defaultdict(float)}
            for a, b in zip(spans, spans[1:]) if b[0] - a[1] >= min_gap_ms * 1e3]
    # Gaps are disjoint and sorted, so each host event finds the ones it overlaps by bisection:
    # O(events x log gaps), which matters for traces of a million events.
    ends = [g["e"] for g in gaps]
    for cat, name, s, e in host:
        j = bisect.bisect_right(ends, s)
        while j < len(gaps) and gaps[j]["s"] < e:
            g = gaps[j]
            overlap = min(e, g["e"]) - max(s, g["s"])
            if overlap > 0:
                if cat == "user_annotation":
                    g["ranges"].append((s, e, name))
                else:   # nested cpu_ops (aten::to > aten::copy_) each count their own overlap
                    g["runtime" if cat in RUNTIME_CATS else "cpu_ops"][name] += overlap
            j += 1
    by_ann: dict[str, float] = defaultdict(float)
    by_rt: dict[str, float] = defaultdict(float)
    for g in gaps:
        g["host"] = _innermost(g["s"], g["e"], g["ranges"])
        for k, v in g["host"].items():
            by_ann[k] += v
        for k, v in g["runtime"].items():
            by_rt[k] += v
    gap_us = sum(g["e"] - g["s"] for g in gaps)
    shown = sorted(gaps, key=lambda g: (g["s"] - g["e"], g["s"]))[:top]
    return {
        "gpu_events": len(gpu), "window_ms": (t1 - t0) / 1e3, "busy_ms": busy / 1e3,
        "idle_ms": (t1 - t0 - busy) / 1e3, "busy_fraction": busy / (t1 - t0) if t1 > t0 else 1.0,
        "min_gap_ms": min_gap_ms, "num_gaps": len(gaps), "gap_ms": gap_us / 1e3,
        "small_gap_idle_ms": (t1 - t0 - busy - gap_us) / 1e3,     # idle in gaps under min_gap_ms
        "gaps": [{"start_ms": (g["s"] - t0) / 1e3, "length_ms": (g["e"] - g["s"]) / 1e3,
                  "before": g["before"], "after": g["after"], "host": _top(g["host"]),
                  "runtime": _top(g["runtime"], _PER_GAP_NAMES), "cpu_ops": _top(g["cpu_ops"], _PER_GAP_NAMES)}
                 for g in shown],
        "by_annotation": _top(by_ann), "by_runtime": _top(by_rt), "by_kernel": _top(by_kernel, 25),
    }


def _short(name: str, n: int = 70) -> str:
    return name if len(name) <= n else name[:n - 3] + "..."


def _pairs(items) -> str:
    return ", ".join(f"{_short(k, 50)} {v:.2f}" for k, v in items) or "-"


def format_report(a: dict) -> str:
    lines = [f"wall {a['wall_ms']:.1f} ms (profiled)"] if "wall_ms" in a else []
    if not a["gpu_events"]:
        return "\n".join(lines + [a.get("note", "no GPU activity in trace")])
    lines += [f"GPU window {a['window_ms']:.2f} ms: busy {a['busy_ms']:.2f} ms ({a['busy_fraction']:.1%}), "
              f"idle {a['idle_ms']:.2f} ms = {a['num_gaps']} gaps >= {a['min_gap_ms']} ms totalling "
              f"{a['gap_ms']:.2f} ms + {a['small_gap_idle_ms']:.2f} ms in smaller gaps",
              "", f"idle (gaps >= {a['min_gap_ms']} ms) by innermost host range, ms:"]
    lines += [f"  {v:9.2f}  {k}" for k, v in a["by_annotation"]]
    lines += ["", "CUDA runtime/driver calls overlapping those gaps, ms:"]
    lines += [f"  {v:9.2f}  {k}" for k, v in a["by_runtime"]] or ["  -"]
    lines += ["", "GPU time by kernel, ms (top 25):"]
    lines += [f"  {v:9.2f}  {_short(k, 110)}" for k, v in a.get("by_kernel", [])]
    lines += ["", f"largest {len(a['gaps'])} gaps (ms):"]
    for i, g in enumerate(a["gaps"], 1):
        lines += [f"#{i:<3} +{g['start_ms']:.2f}  {g['length_ms']:.2f} ms idle",
                  f"      prev GPU {_short(g['before'])}", f"      next GPU {_short(g['after'])}",
                  f"      host     {_pairs(g['host'])}", f"      runtime  {_pairs(g['runtime'])}",
                  f"      cpu_ops  {_pairs(g['cpu_ops'])}"]
    return "\n".join(lines)


def load_trace(path) -> dict:
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rt") as f:
        return json.load(f)


def profile_timeline(fn, trace_path, engine=None, min_gap_ms: float = 0.5, top: int = 15) -> dict:
    """Run fn() under the profiler (engine phases marked if given), write the Chrome trace to
    trace_path (gzipped if it ends in .gz) and return analyze_trace(...) plus "wall_ms"."""
    cuda = torch.cuda.is_available()     # without a GPU there is nothing to trace but the host
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    marks = annotate(engine) if engine is not None else contextlib.nullcontext()
    with profile(activities=activities) as prof, marks:
        t0 = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()     # the last step's kernels belong in the trace and in wall_ms
        wall_ms = (time.perf_counter() - t0) * 1e3
    path = Path(trace_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".gz":             # torch writes plain JSON: export beside it, then compress
        tmp = path.with_name(path.name + ".tmp.json")
        prof.export_chrome_trace(str(tmp))
        with open(tmp, "rb") as src, gzip.open(path, "wb") as dst:
            shutil.copyfileobj(src, dst)
        os.remove(tmp)
    else:
        prof.export_chrome_trace(str(path))
    return {**analyze_trace(load_trace(path), min_gap_ms, top), "wall_ms": wall_ms}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description="GPU idle gaps of a torch.profiler Chrome trace")
    ap.add_argument("trace", help="trace .json or .json.gz from export_chrome_trace")
    ap.add_argument("--min-gap-ms", type=float, default=0.5)
    ap.add_argument("--top", type=int, default=15)
    args = ap.parse_args(argv)
    print(format_report(analyze_trace(load_trace(args.trace), args.min_gap_ms, args.top)))


if __name__ == "__main__":
    main()
