"""Compare three models on one GPU, one at a time: spawn, caption everything, unload (with the
NVML-verified reclaim), next.

    python examples/compare_sequential.py PHOTOS_DIR [--out runs/compare-seq]

Each model gets the whole GPU in turn, so the GPU only has to hold the largest of them. The three
Hub checkpoints below are LLaVA-style models of three language-model families (Llama, Mistral,
Qwen2); give local directories instead to run offline. Same as:

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
args = ap.parse_args()

job = JobSpec(
    models=tuple(ModelSpec(name, path) for name, path in MODELS.items()),
    inputs=InputSpec(directory=args.images),
    prompts=(PromptSpec("describe", "Describe the image."),
             PromptSpec("short", "Caption this image in at most ten words.")),
    sampling=SamplingParams(max_new_tokens=64),
    output_dir=args.out,
    mode="sequential",
)
result = run_job(job)
print("side-by-side table:", result.report["comparison"])
print("HTML report:       ", result.report["report"])
