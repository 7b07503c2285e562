"""The same three-model comparison, all models at once across the GPUs.

    python examples/compare_parallel.py PHOTOS_DIR [--out runs/compare-par] [--address HOST:6379]
                                        [--model NAME=PATH ...]

The planner estimates each model's memory (weights from the checkpoint, a KV budget, activation
and CUDA-context margins) and packs the actors onto the GPUs: a model that needs more than half a
GPU gets a whole one; smaller ones share a GPU, each with an engine memory budget (Ray's fractional
GPUs do not limit memory by themselves). `replicas=2` runs two actors of the small model that split
its images (data parallel). With --address, the job joins an existing Ray cluster and the actors
spread over its nodes (checkpoints and images must be readable on every node).

The default models need two or more GPUs (or one with about 40 GB free) and download about 30 GB
on first use. On a CPU, offline, give tiny random-weight checkpoints instead (see
compare_sequential.py): `--model llava=/tmp/llava-tiny --model qwen=/tmp/qwen-tiny`. Same as:

    modelyard compare --model ... --model ... --model ... PHOTOS_DIR --mode parallel
"""

import argparse

from modelyard.engine import SamplingParams
from modelyard.orchestration import InputSpec, JobSpec, ModelSpec, PromptSpec, run_job

DEFAULT_MODELS = (
    ModelSpec("llava-1.5-7b", "llava-hf/llava-1.5-7b-hf", engine={"max_batch_size": 32}),
    ModelSpec("bakllava", "llava-hf/bakLlava-v1-hf", engine={"max_batch_size": 32}),
    ModelSpec(
        "interleave-qwen-0.5b",
        "llava-hf/llava-interleave-qwen-0.5b-hf",
        replicas=2,
        # models phrase instructions differently: a per-model prompt override
        prompt={"short": "Give a short caption (under ten words)."},
    ),
)

ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
ap.add_argument("images")
ap.add_argument("--out", default="runs/compare-par")
ap.add_argument("--address", default=None, help="Ray cluster to join, host:port (default: start a local one)")
ap.add_argument("--model", action="append", metavar="NAME=PATH", help="replaces the default models; repeatable")
args = ap.parse_args()
models = tuple(ModelSpec(*m.split("=", 1)) for m in args.model) if args.model else DEFAULT_MODELS

job = JobSpec(
    models=models,
    inputs=InputSpec(directory=args.images),
    prompts=(
        PromptSpec("describe", "Describe the image."),
        PromptSpec("short", "Caption this image in at most ten words."),
    ),
    sampling=SamplingParams(max_new_tokens=64),
    output_dir=args.out,
    mode="parallel",  # "auto": parallel waves of what fits, sequential between waves
    max_in_flight=16,
)
result = run_job(job, address=args.address)
print("HTML report:", result.report["report"])
