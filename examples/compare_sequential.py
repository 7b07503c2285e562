"""Compare three models on one GPU, one at a time: spawn, caption everything, unload (with the
NVML-verified reclaim), next.

    python examples/compare_sequential.py PHOTOS_DIR [--out runs/compare-seq] [--model NAME=PATH ...]

Each model gets the whole GPU in turn, so the GPU only has to hold the largest of them. The default
models are three LLaVA-style Hub checkpoints of three language-model families (Llama, Mistral,
Qwen2): they need a GPU with about 20 GB free (the 7B models in bfloat16) and download about 30 GB
into the Hugging Face cache on first use. To try the script on a CPU, offline, give tiny
random-weight checkpoints instead (their captions are gibberish):

    modelyard make-model llava /tmp/llava-tiny && modelyard make-model llava-qwen2 /tmp/qwen-tiny
    python examples/compare_sequential.py PHOTOS_DIR --model llava=/tmp/llava-tiny --model qwen=/tmp/qwen-tiny

Same as:

    modelyard compare --model llava-hf/llava-1.5-7b-hf --model llava-hf/bakLlava-v1-hf \\
        --model llava-hf/llava-interleave-qwen-0.5b-hf PHOTOS_DIR --mode sequential
"""

import argparse

from modelyard.engine import SamplingParams
from modelyard.orchestration import InputSpec, JobSpec, ModelSpec, PromptSpec, run_job

MODELS = {
    "llava-1.5-7b": "llava-hf/llava-1.5-7b-hf",
    "bakllava": "llava-hf/bakLlava-v1-hf",
    "interleave-qwen-0.5b": "llava-hf/llava-interleave-qwen-0.5b-hf",
}

ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
ap.add_argument("images")
ap.add_argument("--out", default="runs/compare-seq")
ap.add_argument("--model", action="append", metavar="NAME=PATH", help="replaces the default models; repeatable")
args = ap.parse_args()
models = dict(m.split("=", 1) for m in args.model) if args.model else MODELS

job = JobSpec(
    models=tuple(ModelSpec(name, path) for name, path in models.items()),
    inputs=InputSpec(directory=args.images),
    prompts=(
        PromptSpec("describe", "Describe the image."),
        PromptSpec("short", "Caption this image in at most ten words."),
    ),
    sampling=SamplingParams(max_new_tokens=64),
    output_dir=args.out,
    mode="sequential",
)
result = run_job(job)
print("side-by-side table:", result.report["comparison"])
print("HTML report:       ", result.report["report"])
