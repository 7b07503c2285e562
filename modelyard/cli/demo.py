"""`modelyard demo`: the whole machinery on two tiny random-weight models, downloading nothing.

Writes two checkpoints of different architectures (CLIP+Llama and SigLIP+Qwen2, both LLaVA-style)
and sample images, runs the same comparison sequentially and in parallel (GPU when Ray sees one,
else CPU), checks the two runs agree caption for caption, and prints where the report is.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path

REAL_MODELS = ("llava-hf/llava-1.5-7b-hf", "llava-hf/llava-interleave-qwen-0.5b-hf")
_BANNER = """\
==============================================================================
 modelyard demo — the demo checkpoints have RANDOM WEIGHTS.
 Their captions are gibberish by construction: this run shows the machinery
 (actors, sequential vs parallel placement, verified unload, resumable store,
 comparison report), not what a real model would say.
=============================================================================="""


def _prepare(out: Path, num_images: int) -> tuple[dict[str, str], Path]:
    from ..testing import make_checkpoint, make_images

    models = {}
    for name, arch, seed in (("llava-tiny", "llava", 0), ("qwen2-tiny", "llava-qwen2", 1)):
        path = out / "checkpoints" / name
        if not (path / "config.json").is_file():
            make_checkpoint(arch, path, size="tiny", seed=seed)
        models[name] = str(path)
    images = out / "images"
    if not images.is_dir() or len(os.listdir(images)) != num_images:
        shutil.rmtree(images, ignore_errors=True)
        make_images(images, num_images, seed=0)
    return models, images


def run_demo(
    out: str = "modelyard-out/demo",
    num_images: int = 8,
    max_new_tokens: int = 12,
    address: str | None = None,
    modes=("sequential", "parallel"),
    progress: bool | None = None,
) -> int:
    import pandas as pd
    import ray

    from ..actors import ensure_ray
    from ..engine.types import SamplingParams
    from ..orchestration.running.job import run_job
    from ..orchestration.spec.job import InputSpec, JobSpec, ModelSpec, PromptSpec

    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing in the demo needs the network
    print(_BANNER, flush=True)
    root = Path(out).resolve()
    t0 = time.perf_counter()
    models, images = _prepare(root, num_images)
    print(
        f"checkpoints: {', '.join(models.values())}\nimages:      {images} ({num_images} files)"
        f"  [{time.perf_counter() - t0:.1f} s]",
        flush=True,
    )
    ensure_ray(address)
    gpus = int(ray.cluster_resources().get("GPU", 0))
    print(
        f"devices:     {f'{gpus} GPU(s)' if gpus else 'no GPU visible to Ray: the models run on the CPU'}", flush=True
    )

    results = {}
    for mode in modes:
        run_dir = root / mode
        shutil.rmtree(run_dir, ignore_errors=True)  # a demo starts fresh (a real job would resume)
        job = JobSpec(
            models=tuple(ModelSpec(n, p) for n, p in models.items()),
            inputs=InputSpec(directory=str(images)),
            output_dir=str(run_dir),
            prompts=(PromptSpec("describe", "Describe the image."),),
            sampling=SamplingParams(max_new_tokens=max_new_tokens),
            mode=mode,
            name=f"modelyard demo ({mode}; random-weight models)",
        )
        print(f"\n--- {mode} ---", flush=True)
        results[mode] = run_job(job, progress=progress)

    print("\n=== demo summary ===")
    for mode, res in results.items():
        print(f"{mode:<11} wall {res.wall_s:6.1f} s   report: {res.report.get('report', '(none)')}")
    if len(results) > 1:
        frames = [
            pd.read_parquet(r.results_path).set_index(["image_id", "model", "prompt_id"]).sort_index()["caption"]
            for r in results.values()
        ]
        same = all(f.equals(frames[0]) for f in frames[1:])
        print(f"captions identical across {', '.join(results)}: {'yes' if same else 'NO'} ({len(frames[0])} rows)")
    last = list(results.values())[-1]
    print(f"\nopen the report: {last.report.get('report')}")
    print(
        "\nThe same comparison on real models from the Hugging Face Hub (downloads the weights):\n"
        f"  modelyard compare --model {REAL_MODELS[0]} --model {REAL_MODELS[1]} "
        f"{images} --mode parallel --out modelyard-out/real"
    )
    print(f"\n(demo done in {time.perf_counter() - t0:.1f} s; the demo checkpoints have random weights)")
    # the demo's images are all valid: any error row means the machinery is broken here
    errors = sum(s["errors"] for r in results.values() for s in r.summary.values())
    if errors:
        print(
            f"modelyard demo: {errors} row(s) ended in an error; the `error` column of results.parquet says why",
            file=sys.stderr,
        )
        return 1
    return 0
