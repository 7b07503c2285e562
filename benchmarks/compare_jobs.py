"""Three-model comparison job: sequential on one GPU vs parallel across GPUs, wall times side by side.

    python benchmarks/compare_jobs.py --out /tmp/cj                     # real shapes, needs >= 1 GPU (2 for parallel)
    python benchmarks/compare_jobs.py --out /tmp/cj-cpu --size tiny --images 8 --max-new-tokens 8   # CPU smoke

Models: random-weight checkpoints of real shapes, written by `modelyard make-model` in child
processes (the driver never creates a CUDA context, so NVML's view of every GPU is the actors'):
LLaVA-1.5-7B (CLIP-L/336 + Llama-2-7B) and two LLaVA-Qwen2-1.5B (SigLIP-so400m + Qwen2-1.5B, seeds 0
and 1). Sampling is greedy with ignore_eos, so every caption is exactly --max-new-tokens long and
the two jobs do the same work. Sequential: one model at a time, each on one GPU, unloaded with the
verified reclaim before the next. Parallel: the planner packs the three onto the GPUs at once.

Writes <out>/compare_jobs.json and <out>/compare_jobs.md (for benchmarks/RESULTS.md) and prints the
markdown.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

MIB = 1 << 20
SHAPES = {  # name: (arch, real size, seed)
    "llava-7b": ("llava", "llava-1.5-7b", 0),
    "qwen2-1.5b-s0": ("llava-qwen2", "llava-qwen2-1.5b", 0),
    "qwen2-1.5b-s1": ("llava-qwen2", "llava-qwen2-1.5b", 1),
}


def _checkpoints(root: Path, tiny: bool) -> dict[str, str]:
    out = {}
    for name, (arch, size, seed) in SHAPES.items():
        size = "tiny" if tiny else size
        path = root / "checkpoints" / f"{name}-{size}"
        if not (path / "config.json").is_file():
            t = time.perf_counter()
            subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "modelyard.cli",
                    "make-model",
                    arch,
                    str(path),
                    "--size",
                    size,
                    "--seed",
                    str(seed),
                ],
                check=True,
            )
            print(f"wrote {path} in {time.perf_counter() - t:.1f} s", flush=True)
        out[name] = str(path)
    return out


def _gpu_names() -> list[str]:
    from modelyard.actors.gpu import NvmlSession

    with NvmlSession.open() as nv:
        if not nv.ok:
            return []
        h = nv._nvml
        return [str(h.nvmlDeviceGetName(h.nvmlDeviceGetHandleByIndex(i))) for i in range(nv.device_count())]


def _run(mode: str, models: dict, images: Path, out: Path, args):
    from modelyard.engine.types import SamplingParams
    from modelyard.orchestration import InputSpec, JobSpec, ModelSpec, PromptSpec, run_job

    shutil.rmtree(out, ignore_errors=True)
    job = JobSpec(
        models=tuple(ModelSpec(n, p, engine=dict(args.engine)) for n, p in models.items()),
        inputs=InputSpec(directory=str(images)),
        output_dir=str(out),
        prompts=(PromptSpec("describe", "Describe the image in detail."),),
        sampling=SamplingParams(max_new_tokens=args.max_new_tokens, ignore_eos=True),
        mode=mode,
        max_in_flight=args.max_in_flight,
        name=f"compare_jobs ({mode})",
    )
    print(f"\n=== {mode} ===", flush=True)
    return run_job(job, progress=False)


def _md(res: dict) -> str:
    lines = [
        f"### Three-model comparison job: sequential (1 GPU) vs parallel ({res['gpus']} GPUs)",
        "",
        f"{res['images']} images x 3 models, greedy, {res['max_new_tokens']} new tokens each (ignore_eos); "
        f"GPUs: {', '.join(res['gpu_names']) or 'none'}; engine options: {res['engine'] or 'defaults'}.",
        "",
        "| mode | wall s | images/s (all models) | captions identical to sequential |",
        "| --- | ---: | ---: | ---: |",
    ]
    n = res["images"] * len(SHAPES)
    for mode, r in res["runs"].items():
        same = r.get("identical_to_sequential")
        lines.append(
            f"| {mode} | {r['wall_s']:.1f} | {n / r['wall_s']:.1f} | {'-' if same is None else f'{same:.0%}'} |"
        )
    lines += [
        "",
        "| mode | model | images/s | load s | peak VRAM MiB | reclaim residual MiB (per unload, max) | restarts |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for mode, r in res["runs"].items():
        for m, s in r["models"].items():
            resid = s["reclaim_residual_bytes"]
            lines.append(
                f"| {mode} | {m} | {s['images_per_s']:.2f} | {s['load_s']:.1f} | "
                f"{s['peak_vram_bytes'] / MIB:,.0f} | {'n/a' if resid is None else f'{resid / MIB:.0f}'} | "
                f"{s['restarts']} |"
            )
    for mode, r in res["runs"].items():
        lines += ["", f"{mode} plan:", "```", r["plan"], "```"]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--size", choices=("real", "tiny"), default="real")
    ap.add_argument("--images", type=int, default=128)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--max-in-flight", type=int, default=32)
    ap.add_argument(
        "--engine",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="EngineConfig option for every model (e.g. backend=transformers)",
    )
    ap.add_argument("--modes", nargs="+", default=["sequential", "parallel"])
    args = ap.parse_args()
    args.engine = {
        k: json.loads(v) if v[:1].isdigit() or v in ("true", "false") else v
        for k, _, v in (e.partition("=") for e in args.engine)
    }
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import pandas as pd
    import ray

    from modelyard.actors import ensure_ray
    from modelyard.testing import make_images

    root = Path(args.out).resolve()
    models = _checkpoints(root, args.size == "tiny")
    images = root / "images"
    if not images.is_dir() or len(os.listdir(images)) != args.images:
        shutil.rmtree(images, ignore_errors=True)
        make_images(images, args.images, seed=0)
    ensure_ray()
    gpus = int(ray.cluster_resources().get("GPU", 0))
    res = {
        "images": args.images,
        "max_new_tokens": args.max_new_tokens,
        "gpus": gpus,
        "gpu_names": _gpu_names(),
        "engine": args.engine,
        "host": platform.node(),
        "runs": {},
    }
    captions = {}
    for mode in args.modes:
        r = _run(mode, models, images, root / mode, args)
        df = pd.read_parquet(r.results_path).set_index(["image_id", "model"]).sort_index()
        captions[mode] = df["caption"]
        res["runs"][mode] = {
            "wall_s": r.wall_s,
            "models": r.summary,
            "plan": r.plan.describe(),
            "errors": int((df["finish_reason"] == "error").sum()),
        }
    if "sequential" in captions:
        for mode, c in captions.items():
            res["runs"][mode]["identical_to_sequential"] = float((c == captions["sequential"]).mean())
    (root / "compare_jobs.json").write_text(json.dumps(res, indent=2, default=str))
    md = _md(res)
    (root / "compare_jobs.md").write_text(md + "\n")
    print("\n" + md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
