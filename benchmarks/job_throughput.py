"""The user's path, benchmarked: a folder of camera JPEGs captioned through `run_job`, as the CLI does,
against the engine alone on the same model and the same images decoded in memory, on the same GPU.

For each shape and image set: the job first (JobSpec defaults, no engine options, no max_in_flight;
`report=False`), then, once its actor is unloaded, `Engine.generate` over the same images with a
default `EngineConfig`. Both sides generate --max-new-tokens per image with `ignore_eos`, so they do
the same work. Prints, per run, images/s of both and their ratio (the job's steady-state figure:
first request to last row), the job's wall time including spawn and unload, output tokens/s and mean
new tokens, the engine's busy fraction and NVML's GPU utilization during the job, and the peak RSS
of the driver, the actor and the engine process.

  python benchmarks/job_throughput.py --json /tmp/job_throughput.json              # both real shapes
  python benchmarks/job_throughput.py --shape tiny --images 16 --sets 1024x768 --max-new-tokens 4  # CPU smoke

The driver never imports torch nor touches CUDA, as the CLI's driver does not: checkpoints, images
and the engine side run in child processes, so the driver's RSS is the CLI's and the actor sees the
whole GPU.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import platform
import resource
import shutil
import sys
import threading
import time
import traceback
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

MIB = 1 << 20
SHAPES = {  # --shape: (arch, size) of modelyard.testing.make_checkpoint
    "llava-1.5-7b": ("llava", "llava-1.5-7b"),
    "llava-qwen2-1.5b": ("llava-qwen2", "llava-qwen2-1.5b"),
    "tiny": ("llava", "tiny"),
}
SHARD = 64  # images per writer process when making an image set
ENGINE_WARMUP = 64  # images the engine side generates before the timed run, as throughput.py does
SPAWN = multiprocessing.get_context("spawn")  # children start clean: no inherited Ray or CUDA state


# --- children: checkpoint, images, environment, the engine side -----------------------------------
def _checkpoint(root: str, arch: str, size: str) -> str:
    from throughput import bench_checkpoint  # a sibling script; imports torch, so only in children

    return str(bench_checkpoint(root, arch, size))


def _environment() -> dict:
    from throughput import environment

    # plain str: torch.__version__ is a TorchVersion, whose unpickling would import torch into the driver
    return {k: v if v is None else str(v) for k, v in environment().items()}


def _camera_shard(directory: str, n: int, size: tuple[int, int], seed: int) -> None:
    from modelyard.testing import make_camera_jpegs

    make_camera_jpegs(directory, n, size=size, seed=seed)


def _in_child(fn, *args):
    with ProcessPoolExecutor(1, mp_context=SPAWN) as pool:
        return pool.submit(fn, *args).result()


def _jpegs(directory) -> list[Path]:
    return sorted(Path(directory).rglob("*.jpg"))


def prepare(root: Path, shape: str, sets: list[str], n: int) -> tuple[str, dict[str, Path], dict]:
    """The checkpoint (shared with throughput.py under the same root), each image set of n JPEGs
    (written once, in shards of SHARD by parallel processes: 12 MP files take ~0.3 s each) and the
    device/software description, all made in child processes."""
    from modelyard.testing import CAMERA_SIZES

    arch, size = SHAPES[shape]
    dirs = {s: root / f"camera-{s}-{n}" for s in sets}
    with ProcessPoolExecutor(min(8, os.cpu_count() or 1), mp_context=SPAWN) as pool:
        ckpt, env = pool.submit(_checkpoint, str(root), arch, size), pool.submit(_environment)
        for s, d in dirs.items():
            if (d / "complete").is_file() and len(_jpegs(d)) == n:
                continue
            shutil.rmtree(d, ignore_errors=True)
            print(f"writing {n} JPEGs of {s} to {d}", flush=True)
            parts = [
                pool.submit(_camera_shard, str(d / f"part{k:03d}"), min(SHARD, n - k * SHARD), CAMERA_SIZES[s], k)
                for k in range(math.ceil(n / SHARD))
            ]
            for p in parts:
                p.result()
            (d / "complete").touch()
        return ckpt.result(), dirs, env.result()


def engine_side(ckpt: str, set_dir: str, prompt: str, max_new_tokens: int) -> dict:
    """Engine.generate with a default EngineConfig over the set's images, decoded beforehand with the
    engine's own loader (same pixels as the job's actor); images/s from generate's wall time after a
    warm-up. Runs in a child process, which frees the GPU when it exits."""
    import torch

    from modelyard.engine import Engine, EngineConfig, Request, SamplingParams
    from modelyard.engine.images import load_image

    def sync():
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    t0 = time.perf_counter()
    eng = Engine.from_pretrained(ckpt, EngineConfig())
    load_s = time.perf_counter() - t0
    try:
        t0 = time.perf_counter()
        images = [load_image(p, eng.processor.min_image_size) for p in _jpegs(set_dir)]
        decode_s = time.perf_counter() - t0
        sampling = SamplingParams(max_new_tokens=max_new_tokens, ignore_eos=True)

        def requests(imgs):
            return [Request(image=im, prompt=prompt, sampling=sampling) for im in imgs]

        eng.generate(requests(images[:ENGINE_WARMUP]))
        sync()
        warm = eng.stats()
        t0 = time.perf_counter()
        outs = eng.generate(requests(images))
        sync()
        dt = time.perf_counter() - t0
        stats = eng.stats()
        ok = [o for o in outs if o.ok]
        tokens = sum(len(o.token_ids) for o in ok)
        busy = sum(stats[f"{p}_seconds"] - warm[f"{p}_seconds"] for p in ("prefill", "decode"))
        return {
            "images": len(outs),
            "errors": len(outs) - len(ok),
            "seconds": dt,
            "images_per_s": len(outs) / dt,
            "output_tokens_per_s": tokens / dt,
            "mean_new_tokens": tokens / max(len(ok), 1),
            "busy_fraction": busy / dt,
            "load_s": load_s,
            "decode_images_s": decode_s,
            "max_running_seen": stats.get("max_running_seen"),
            "max_batch_size": stats.get("max_batch_size"),
            "torch_threads": torch.get_num_threads(),
            # ru_maxrss is KiB on Linux: the child's whole life, i.e. weights load + decoded images + engine
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        }
    finally:
        eng.close()


# --- the driver's measurements during the job ------------------------------------------------------
def _vm_hwm(pid="self") -> int | None:
    """The kernel's peak-RSS mark of a process (VmHWM), in bytes; None off Linux or once it is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration, ValueError):
        return None


def _reset_own_hwm() -> bool:
    """Restart this process's VmHWM from its current RSS (Linux >= 4.0), so each job's peak is its own."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _nvml_device():
    """(pynvml, handle) of the GPU the job uses (the first visible one: this is a one-GPU benchmark),
    or (None, None) when NVML is unavailable (CPU machines)."""
    try:
        import pynvml

        pynvml.nvmlInit()
        first = (os.environ.get("CUDA_VISIBLE_DEVICES") or "0").split(",")[0].strip()
        if first.startswith(("GPU-", "MIG-")):
            return pynvml, pynvml.nvmlDeviceGetHandleByUUID(first)
        return pynvml, pynvml.nvmlDeviceGetHandleByIndex(int(first))
    except Exception:
        return None, None


def gpu_description() -> dict:
    nv, h = _nvml_device()
    if nv is None:
        return {"gpu": "n/a (no NVML)", "nvidia_driver": "n/a"}
    return {"gpu": str(nv.nvmlDeviceGetName(h)), "nvidia_driver": str(nv.nvmlSystemGetDriverVersion())}


def _find_actor(psutil):
    for p in psutil.Process().children(recursive=True):
        try:
            if (p.cmdline() or [""])[0].startswith("ray::ModelActor"):
                return p
        except psutil.Error:  # a child that exited or turned zombie meanwhile
            continue
    return None


class JobSampler(threading.Thread):
    """Every `interval` s while the job runs: NVML GPU utilization, the size of the job's results.jsonl
    (one write per row, so the tick its final size appears is the last row's time), and the actor's
    peak RSS. The actor is found as the driver's descendant whose process title Ray set to
    "ray::ModelActor..." (a local Ray's raylet is the driver's child and its workers the raylet's);
    its VmHWM is the kernel's own peak, so only a spike in its last interval before exiting goes
    unseen (psutil's sampled RSS off Linux)."""

    def __init__(self, results: Path, interval: float = 0.2):
        super().__init__(daemon=True)
        self.results, self.interval = results, interval
        self.samples: list[tuple[float, float | None, int]] = []  # (time, GPU util %, results bytes)
        self.actor_pids: set[int] = set()
        self.actor_peak = 0
        self._halt = threading.Event()
        self._actor = None

    def run(self) -> None:
        import psutil

        nv, h = _nvml_device()
        while not self._halt.wait(self.interval):
            util = None
            if nv is not None:
                try:
                    util = float(nv.nvmlDeviceGetUtilizationRates(h).gpu)
                except Exception:
                    pass
            try:
                size = self.results.stat().st_size
            except OSError:
                size = 0
            self.samples.append((time.perf_counter(), util, size))
            try:
                if self._actor is None or not self._actor.is_running():  # spawned, or respawned after a death
                    self._actor = _find_actor(psutil)
                if self._actor is not None:
                    self.actor_pids.add(self._actor.pid)
                    peak = _vm_hwm(self._actor.pid) or self._actor.memory_info().rss
                    self.actor_peak = max(self.actor_peak, peak)
            except (psutil.Error, OSError):
                self._actor = None

    def stop(self) -> None:
        self._halt.set()
        self.join()

    def steady_util(self, active_s: float) -> float | None:
        """Mean GPU utilization from the first request to the last row: the window the summary's
        images/s covers, ending at the tick the results file reached its final size."""
        if not self.samples or active_s <= 0:
            return None
        final = max(s for _, _, s in self.samples)
        t_last = next(t for t, _, s in self.samples if s == final)
        utils = [u for t, u, _ in self.samples if t_last - active_s <= t <= t_last and u is not None]
        return sum(utils) / len(utils) if utils else None


def job_side(shape: str, ckpt: str, set_dir: Path, out_dir: Path, max_new_tokens: int) -> dict:
    """run_job as `modelyard caption` calls it (check_job, then run_job with the default progress),
    with JobSpec defaults except the sampling (ignore_eos, to match the engine side) and report=False
    (the HTML report is written after the last row, so it changes the wall time only)."""
    from modelyard.engine.types import SamplingParams
    from modelyard.orchestration import InputSpec, JobSpec, ModelSpec, run_job
    from modelyard.orchestration.checks.preflight import check_job

    shutil.rmtree(out_dir, ignore_errors=True)
    job = JobSpec(
        models=(ModelSpec(shape, ckpt),),
        inputs=InputSpec(directory=str(set_dir)),
        output_dir=str(out_dir),
        sampling=SamplingParams(max_new_tokens=max_new_tokens, ignore_eos=True),
        report=False,
        name=f"job_throughput {shape}",
    )
    sampler = JobSampler(out_dir / "results.jsonl")
    hwm_reset = _reset_own_hwm()
    t0 = time.perf_counter()
    sampler.start()
    try:
        check_job(job)
        res = run_job(job)
    finally:
        wall = time.perf_counter() - t0
        sampler.stop()
    s = res.summary[shape]
    active_s = s["rows"] / s["images_per_s"] if s["images_per_s"] else 0.0
    return {
        **{
            k: s[k]
            for k in (
                "rows",
                "errors",
                "images_per_s",
                "output_tokens_per_s",
                "mean_new_tokens",
                "max_running_seen",
                "mean_batch",
                "busy_fraction",
                "load_s",
                "unload_s",
                "peak_vram_bytes",
                "restarts",
            )
        },
        "wall_s": wall,
        "wall_images_per_s": s["rows"] / wall,
        "active_s": active_s,
        "nvml_util_mean": sampler.steady_util(active_s),
        "nvml_samples": len(sampler.samples),
        # without the reset, ru_maxrss covers the driver's whole life (KiB on Linux)
        "driver_peak_rss_bytes": (_vm_hwm() if hwm_reset else None)
        or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "actor_peak_rss_bytes": sampler.actor_peak or None,
        "actor_pids": sorted(sampler.actor_pids),
    }


# --- output ------------------------------------------------------------------------------------------
def _f(v, spec: str = ".2f") -> str:
    return "n/a" if v is None else format(v, spec)


def table(run: dict) -> str:
    e, j = run.get("engine") or {}, run.get("job") or {}
    rss = lambda v: "n/a" if v is None else f"{v / MIB:,.0f} MiB"  # noqa: E731
    rows = [
        ("images/s (job: first request to last row)", _f(e.get("images_per_s")), _f(j.get("images_per_s"))),
        ("job / engine images/s", "", _f(run.get("ratio"), ".3f")),
        (
            "images/s over run_job's wall time (spawn, captions, unload)",
            "",
            f"{_f(j.get('wall_images_per_s'))} ({_f(j.get('wall_s'), '.1f')} s)",
        ),
        ("output tokens/s", _f(e.get("output_tokens_per_s"), ".0f"), _f(j.get("output_tokens_per_s"), ".0f")),
        ("mean new tokens", _f(e.get("mean_new_tokens"), ".1f"), _f(j.get("mean_new_tokens"), ".1f")),
        (
            "engine busy fraction (step time / run time)",
            _f(e.get("busy_fraction"), ".3f"),
            _f(j.get("busy_fraction"), ".3f"),
        ),
        (
            "NVML GPU utilization, mean over the job's steady state",
            "",
            _f(j.get("nvml_util_mean"), ".1f") + " %" if j.get("nvml_util_mean") is not None else "n/a",
        ),
        (
            "most sequences in a step / mean decode batch",
            _f(e.get("max_running_seen"), "d"),
            f"{_f(j.get('max_running_seen'), 'd')} / {_f(j.get('mean_batch'), '.1f')}",
        ),
        ("load s (job: actor spawn)", _f(e.get("load_s"), ".1f"), _f(j.get("load_s"), ".1f")),
        (
            "peak RSS (engine: its process; job: driver, actor)",
            rss(e.get("peak_rss_bytes")),
            f"{rss(j.get('driver_peak_rss_bytes'))}, {rss(j.get('actor_peak_rss_bytes'))}",
        ),
        ("error rows", _f(e.get("errors"), "d"), _f(j.get("errors"), "d")),
    ]
    head = (
        f"### {run['shape']}, {run['set']} JPEGs, {run['images']} images, "
        f"{run['max_new_tokens']} new tokens (ignore_eos)"
    )
    lines = [head, "", "| | engine | job |", "| --- | ---: | ---: |"] + [f"| {a} | {b} | {c} |" for a, b, c in rows]
    lines += [f"{side} failed: {run[side + '_error']}" for side in ("job", "engine") if run.get(side + "_error")]
    return "\n".join(lines)


def _measure(run: dict, side: str, save, fn, *args) -> None:
    print(f"\n=== {run['shape']}, {run['set']}: {side} ===", flush=True)
    try:
        run[side] = fn(*args)
    except Exception as e:  # keep what the other side measured
        traceback.print_exc()
        run[side + "_error"] = f"{type(e).__name__}: {e}"
    save()


def main(argv=None) -> int:
    from modelyard.testing import CAMERA_SIZES

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", nargs="+", choices=list(SHAPES), default=["llava-1.5-7b", "llava-qwen2-1.5b"])
    ap.add_argument("--images", type=int, default=512)
    ap.add_argument("--sets", nargs="+", choices=sorted(CAMERA_SIZES), default=["1024x768", "4032x3024"])
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument(
        "--root",
        default="/tmp/modelyard-bench",
        help="checkpoints, image sets and job outputs (checkpoints shared with throughput.py)",
    )
    ap.add_argument("--json", help="write every figure here (rewritten after each run)")
    side = ap.add_mutually_exclusive_group()
    side.add_argument("--engine-only", action="store_true")
    side.add_argument("--job-only", action="store_true")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from modelyard.actors import ensure_ray
    from modelyard.orchestration.spec.job import DEFAULT_PROMPT

    root = Path(args.root).resolve()
    results = {
        "info": {
            **gpu_description(),
            "host": platform.node(),
            "images": args.images,
            "max_new_tokens": args.max_new_tokens,
            "prompt": DEFAULT_PROMPT,
        },
        "runs": [],
    }

    def save():
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps(results, indent=2, default=str))

    if not args.engine_only:
        ensure_ray()  # started once, before any timer: the CLI pays it (seconds) once per command
    for shape in args.shape:
        ckpt, dirs, env = prepare(root, shape, args.sets, args.images)
        results["info"].update(env)
        for s in args.sets:
            run = {"shape": shape, "set": s, "images": args.images, "max_new_tokens": args.max_new_tokens}
            results["runs"].append(run)
            if not args.engine_only:
                _measure(
                    run,
                    "job",
                    save,
                    job_side,
                    shape,
                    ckpt,
                    dirs[s],
                    root / "jobs" / f"{shape}-{s}",
                    args.max_new_tokens,
                )
            if not args.job_only:  # after the job's actor is gone; in a child, so the driver never holds CUDA
                _measure(
                    run, "engine", save, _in_child, engine_side, ckpt, str(dirs[s]), DEFAULT_PROMPT, args.max_new_tokens
                )
            if run.get("job") and run.get("engine") and run["engine"]["images_per_s"]:
                run["ratio"] = run["job"]["images_per_s"] / run["engine"]["images_per_s"]
            save()
    print()
    for run in results["runs"]:
        print(table(run) + "\n")
    i = results["info"]
    print(
        f"device: {i.get('gpu')} (torch: {i.get('device')}), NVIDIA driver {i.get('nvidia_driver')}; "
        f"torch {i.get('torch')} (CUDA {i.get('torch_cuda')}), transformers {i.get('transformers')}, "
        f"Python {i.get('python')}"
    )
    return 1 if any(r.get("job_error") or r.get("engine_error") for r in results["runs"]) else 0


if __name__ == "__main__":
    sys.exit(main())
