"""The `modelyard` argument parser: every command's options, help and examples (cli.py runs them)."""

from __future__ import annotations

import argparse

_IMAGES_HELP = (
    "a directory (walked recursively), a quoted glob ('imgs/**/*.jpg'), a .txt file with one "
    "path per line, or one or more image files"
)
_FMT = argparse.RawDescriptionHelpFormatter


def _job_options(p: argparse.ArgumentParser, multi_model: bool) -> None:
    p.add_argument("images", nargs="+", metavar="IMAGES", help=_IMAGES_HELP)
    p.add_argument(
        "--out",
        default=None,
        help="output directory; rerunning into it resumes (default: modelyard-out/"
        + ("compare-NAME1-vs-NAME2" if multi_model else "caption-NAME")
        + ")",
    )
    p.add_argument(
        "--prompt",
        action="append",
        metavar="[ID=]TEXT",
        help="prompt, repeatable for several; ID=TEXT names it (default: 'Describe the image.')",
    )
    p.add_argument("--max-new-tokens", type=int, default=64, help="default: %(default)s")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument(
        "--engine",
        action="append",
        metavar="KEY=VALUE",
        help="EngineConfig option for every model, repeatable (e.g. backend=transformers, "
        "max_batch_size=32, dtype=bfloat16, gpu_memory_budget_gib=20)",
    )
    p.add_argument(
        "--gpus",
        type=float,
        default=None,
        help="GPUs per model replica, fractions allowed, 0 = CPU (default: the planner decides)",
    )
    p.add_argument("--replicas", type=int, default=1, help="actors per model sharing its images (default 1)")
    p.add_argument(
        "--max-in-flight",
        type=_in_flight,
        default="auto",
        metavar="N|auto",
        help="requests in flight per actor (default auto: what its engine batches, plus a queue)",
    )
    p.add_argument("--max-restarts", type=int, default=2, help="respawns per model after a crash (default 2)")
    p.add_argument("--retry-errors", action="store_true", help="on resume, recompute rows that ended in an error")
    p.add_argument("--no-report", action="store_true", help="skip comparison.parquet and report.html")
    p.add_argument("--name", default=None, help="title of the report")
    _common(p)


def _in_flight(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected 'auto' or an integer >= 1, got {text!r}")
    return n


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--address",
        default=None,
        help="join a running Ray cluster: its GCS host:port (as `ray start --head` prints it) or "
        "'auto' on a cluster node; default: RAY_ADDRESS, else a local Ray started for this run",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars (they show on a terminal only)")


_CAPTION_EPILOG = """\
examples:
  modelyard caption llava-hf/llava-1.5-7b-hf photos/ --out runs/llava
  modelyard caption /models/llava photos/ --prompt "short=Caption in ten words." --prompt "long=Describe it."
  modelyard caption /models/llava 'photos/**/*.jpg' --engine max_batch_size=32 --engine dtype=bfloat16

Outputs in OUT: results.jsonl (while running), results.parquet, comparison.parquet, report.html,
summary.json, job.json.
Exit code: 0 all rows written (bad images are error rows); 1 some rows unfinished or a model
could not run (the message says whether a rerun retries them); 2 a mistake in the command or its
inputs."""

_COMPARE_EPILOG = """\
examples:
  modelyard compare --model llava-hf/llava-1.5-7b-hf \\
      --model llava-hf/llava-interleave-qwen-0.5b-hf photos/ --mode parallel
  modelyard compare --model a=/models/llava --model b=/models/qwen photos/ --out runs/ab

Outputs in OUT: results.parquet (one row per image, model and prompt), comparison.parquet (a
caption column per model), agreement.csv, report.html (self-contained), summary.json."""

_RUN_EPILOG = """\
a job file (TOML; YAML and JSON take the same keys):
  name = "three models"
  mode = "auto"                   # sequential | parallel | auto
  output_dir = "runs/job"         # relative paths resolve against the job file's directory
  [inputs]
  directory = "photos"            # or glob = "photos/**/*.jpg", or file_list = "paths.txt"
  [[prompts]]
  id = "describe"
  text = "Describe the image."
  [sampling]
  max_new_tokens = 64
  [[models]]
  name = "llava"
  path = "llava-hf/llava-1.5-7b-hf"
  engine = { max_batch_size = 32 }

examples:
  modelyard run examples/job.toml
  ray job submit --address http://HEAD:8265 --working-dir . -- modelyard run job.toml"""


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__
    from ..testing import ARCHITECTURES, SIZES

    p = argparse.ArgumentParser(
        prog="modelyard",
        formatter_class=_FMT,
        description=(
            "Run many vision-language models over large image sets: one Ray actor per model,\n"
            "verified VRAM reclaim on unload, resumable captioning and comparison jobs."
        ),
        epilog="start with `modelyard demo` (downloads nothing); `modelyard COMMAND --help` for each command",
    )
    p.add_argument("--version", action="version", version=f"modelyard {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    c = sub.add_parser(
        "caption",
        help="caption images with one model",
        formatter_class=_FMT,
        description="Caption every image with one model. An interrupted run resumes where it "
        "stopped\nwhen rerun into the same --out.",
        epilog=_CAPTION_EPILOG,
    )
    c.add_argument("model", metavar="MODEL", help="checkpoint directory (with config.json) or Hub id (org/name)")
    _job_options(c, multi_model=False)

    m = sub.add_parser(
        "compare",
        help="caption images with several models and write a comparison report",
        formatter_class=_FMT,
        epilog=_COMPARE_EPILOG,
        description="Caption every image with each model, then write a side-by-side table, "
        "pairwise caption\nagreement and a self-contained report.html.",
    )
    m.add_argument(
        "--model",
        action="append",
        required=True,
        metavar="[NAME=]PATH",
        help="checkpoint directory or Hub id, repeatable; NAME= labels it (default: the path's last part)",
    )
    m.add_argument(
        "--mode",
        choices=("sequential", "parallel", "auto"),
        default="sequential",
        help="sequential: one model at a time on the same GPU(s); parallel: all at once, packed "
        "onto the GPUs; auto: parallel waves of what fits (default: %(default)s)",
    )
    _job_options(m, multi_model=True)

    r = sub.add_parser(
        "run",
        help="run a job file (TOML, YAML or JSON)",
        formatter_class=_FMT,
        epilog=_RUN_EPILOG,
        description="Run the job a file describes (examples/job.toml is a full one). Rerunning "
        "resumes.\nWorks under `ray job submit`, which sets RAY_ADDRESS for it.",
    )
    r.add_argument("jobfile", metavar="JOBFILE", help="a .toml, .yaml/.yml or .json job file")
    r.add_argument("--out", default=None, help="override the job's output_dir")
    r.add_argument("--mode", choices=("sequential", "parallel", "auto"), default=None, help="override the job's mode")
    r.add_argument("--retry-errors", action="store_true", help="on resume, recompute rows that ended in an error")
    _common(r)

    d = sub.add_parser(
        "demo",
        help="compare two tiny random-weight models on sample images, sequential and parallel",
        formatter_class=_FMT,
        epilog="example:\n  modelyard demo --images 32 --modes parallel",
        description="Make two tiny random-weight checkpoints of different architectures "
        "(CLIP+Llama, SigLIP+Qwen2)\nand sample images, compare them sequentially "
        "and in parallel (GPU if there is one, else CPU),\nand print where the "
        "report is. Downloads nothing; the captions are gibberish by design.",
    )
    d.add_argument("--out", default="modelyard-out/demo", help="default: %(default)s")
    d.add_argument("--images", type=int, default=8, metavar="N", help="number of sample images (default %(default)s)")
    d.add_argument("--max-new-tokens", type=int, default=12, help="default: %(default)s")
    d.add_argument(
        "--modes",
        nargs="+",
        choices=("sequential", "parallel", "auto"),
        default=["sequential", "parallel"],
        help="default: sequential parallel",
    )
    _common(d)

    k = sub.add_parser(
        "make-model",
        help="write a random-weight HF-format checkpoint of a real architecture",
        formatter_class=_FMT,
        description="Write a complete Hugging Face-format checkpoint with random weights "
        "(config, safetensors,\ntokenizer, chat template, preprocessor config), "
        "loadable offline like a Hub checkpoint.",
        epilog="examples:\n  modelyard make-model llava /tmp/llava-tiny\n"
        "  modelyard make-model llava-qwen2 /tmp/qwen-1.5b --size llava-qwen2-1.5b",
    )
    k.add_argument("arch", choices=sorted(ARCHITECTURES), help="llava: CLIP + Llama; llava-qwen2: SigLIP + Qwen2")
    k.add_argument("path", metavar="PATH", help="directory to write")
    k.add_argument(
        "--size",
        default="tiny",
        choices=SIZES,
        help="tiny: a few MB, for tests (default); the others are real shapes, each for its architecture",
    )
    k.add_argument("--seed", type=int, default=0, help="weight seed (default 0)")
    k.add_argument(
        "--dtype",
        default=None,
        choices=("float32", "bfloat16", "float16"),
        help="default: float32 for tiny, bfloat16 otherwise",
    )
    k.add_argument("--overwrite", action="store_true", help="write into a non-empty directory")

    doc = sub.add_parser(
        "doctor",
        help="check GPU, NVML, attention backend, kernels and Ray",
        formatter_class=_FMT,
        description="Report what modelyard can use here: torch and CUDA, GPUs through NVML, the "
        "attention\nbackend (per checkpoint with --model), the CUDA kernels, and Ray "
        "(starting a local\ninstance, or joining --address). Builds nothing, "
        "downloads nothing.",
        epilog="examples:\n  modelyard doctor\n  modelyard doctor --model /models/llava "
        "--no-ray\n  modelyard doctor --address 10.0.0.1:6379",
    )
    doc.add_argument(
        "--model",
        action="append",
        metavar="PATH",
        help="checkpoint directory (or a Hub id already in the local cache): the attention backend "
        "its head size and dtype get here; repeatable",
    )
    doc.add_argument(
        "--address", default=None, help="join this Ray cluster (host:port or 'auto') instead of starting a local one"
    )
    doc.add_argument("--no-ray", action="store_true", help="skip starting/joining Ray")

    b = sub.add_parser(
        "build-kernels",
        help="build (or find cached) the CUDA kernels",
        formatter_class=_FMT,
        description="JIT-build the csrc CUDA ops and cache them under ~/.cache/modelyard/kernels; "
        "a later\nrun loads them in milliseconds. Without it, the first engine start "
        "on a GPU builds them.",
        epilog="examples:\n  modelyard build-kernels\n  modelyard build-kernels --arch 9.0   "
        "# for an H100/H200, on a machine without one",
    )
    b.add_argument("--arch", default=None, help="GPU compute capability to build for (e.g. 9.0) when none is present")
    return p
