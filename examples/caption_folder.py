"""Caption a folder of images with one model.

    python examples/caption_folder.py PHOTOS_DIR [MODEL] [--out runs/caption]

MODEL is a checkpoint directory or a Hub id (default llava-hf/llava-1.5-7b-hf: a GPU with about
16 GB free, and a 14 GB download on first use). Offline on a CPU, caption with a tiny random-weight
checkpoint instead (gibberish captions): `modelyard make-model llava /tmp/llava-tiny`, then pass
/tmp/llava-tiny as MODEL. Results go to OUT/results.parquet (OUT/results.jsonl while running);
interrupt and rerun to resume. Same as:

    modelyard caption llava-hf/llava-1.5-7b-hf PHOTOS_DIR --out runs/caption
"""

import argparse

import pandas as pd

from modelyard.engine import SamplingParams
from modelyard.orchestration import InputSpec, JobSpec, ModelSpec, PromptSpec, run_job

ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
ap.add_argument("images")
ap.add_argument("model", nargs="?", default="llava-hf/llava-1.5-7b-hf")
ap.add_argument("--out", default="runs/caption")
args = ap.parse_args()

job = JobSpec(
    models=(ModelSpec(name="captioner", path=args.model),),
    inputs=InputSpec(directory=args.images),  # walked recursively; ids are relative paths
    prompts=(PromptSpec("caption", "Write a one-sentence caption for this image."),),
    sampling=SamplingParams(max_new_tokens=48),
    output_dir=args.out,
    report=False,  # one model: no comparison to draw
)
result = run_job(job)
df = pd.read_parquet(result.results_path)
print(df[["image_id", "caption", "finish_reason", "error"]].head(20).to_string())
