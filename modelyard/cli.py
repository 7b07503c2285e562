"""`modelyard` command line: caption | compare | run | demo | make-model | doctor | build-kernels."""
from __future__ import annotations

import argparse
import json
import os
import sys

_EPILOG_IMAGES = ("IMAGES: a directory (walked recursively), a quoted glob ('imgs/**/*.jpg'), a .txt file "
                  "with one path per line, or image files.")


def _cmd_make_model(args) -> int:
    from .testing import make_checkpoint
    path = make_checkpoint(args.arch, args.path, size=args.size, seed=args.seed, dtype=args.dtype)
    print(f"wrote a random-weight {args.arch} checkpoint ({args.size}) to {path}")
    return 0


def _parse_value(v: str):
    try:
        return json.loads(v)
    except ValueError:
        return v


def _kv(items: list[str] | None, what: str) -> dict:
    out = {}
    for it in items or []:
        k, sep, v = it.partition("=")
        if not sep or not k:
            raise SystemExit(f"modelyard: {what} must look like KEY=VALUE, got {it!r}")
        out[k.strip()] = _parse_value(v)
    return out


def _inputs(images: list[str]):
    from .orchestration import InputSpec
    if len(images) == 1:
        return InputSpec.from_any(images[0])
    missing = [p for p in images if not os.path.isfile(p)]
    if missing:
        raise SystemExit(f"modelyard: several IMAGES must all be files; not files: {missing[:5]}")
    return InputSpec(items=tuple(images))


def _prompts(items: list[str] | None):
    from .orchestration import DEFAULT_PROMPT, PromptSpec
    if not items:
        return (PromptSpec("default", DEFAULT_PROMPT),)
    out = []
    for i, p in enumerate(items):
        pid, sep, text = p.partition("=")
        ok_id = sep and pid and " " not in pid and len(pid) <= 40
        out.append(PromptSpec(pid, text) if ok_id else PromptSpec("default" if len(items) == 1 else f"p{i}", p))
    return tuple(out)


def _models(items: list[str], engine: dict, gpus, replicas: int):
    from .orchestration import ModelSpec
    models = []
    for it in items:
        name, sep, path = it.partition("=")
        if not sep or "/" in name or os.path.exists(it):
            name, path = os.path.basename(it.rstrip("/")), it
        models.append(ModelSpec(name=name, path=path, engine=dict(engine), gpus=gpus, replicas=replicas))
    return tuple(models)


def _job_from_args(args, model_items: list[str], mode: str):
    from .engine.types import SamplingParams
    from .orchestration import JobSpec
    sampling = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature)
    return JobSpec(models=_models(model_items, _kv(args.engine, "--engine"), args.gpus, args.replicas),
                   inputs=_inputs(args.images), output_dir=args.out, prompts=_prompts(args.prompt),
                   sampling=sampling, mode=mode, max_in_flight=args.max_in_flight, max_restarts=args.max_restarts,
                   retry_errors=args.retry_errors, report=not args.no_report, name=args.name or "modelyard job")


def _run(job, args) -> int:
    from .orchestration import run_job
    res = run_job(job, address=args.address, progress=False if args.no_progress else None)
    _print_outputs(res)
    return 0


def _print_outputs(res) -> None:
    print(f"\nresults: {res.results_path}  ({res.wall_s:.1f} s)")
    for k, v in sorted(res.report.items()):
        print(f"{k + ':':<11} {v}")


def _cmd_caption(args) -> int:
    return _run(_job_from_args(args, [args.model], "sequential"), args)


def _cmd_compare(args) -> int:
    if len(args.model) < 2:
        print("modelyard compare: give at least two --model (use `modelyard caption` for one)", file=sys.stderr)
        return 2
    return _run(_job_from_args(args, args.model, args.mode), args)


def _cmd_run(args) -> int:
    from .orchestration import load_job, run_job
    job = load_job(args.jobfile, output_dir=args.out, mode=args.mode, retry_errors=args.retry_errors or None)
    res = run_job(job, address=args.address, progress=False if args.no_progress else None)
    _print_outputs(res)
    return 0


def _cmd_demo(args) -> int:
    from .orchestration.demo import run_demo
    return run_demo(out=args.out, num_images=args.images, max_new_tokens=args.max_new_tokens,
                    address=args.address, modes=args.modes, progress=False if args.no_progress else None)


def _cmd_doctor(args) -> int:
    from .orchestration.doctor import run_doctor
    return run_doctor(address=args.address, start_ray=not args.no_ray)


def _cmd_build_kernels(args) -> int:
    try:
        from .engine import kernels
    except ImportError as e:
        print(f"modelyard build-kernels: the kernels module is not available in this install ({e})", file=sys.stderr)
        return 1
    try:
        path = kernels.build(arch=args.arch, verbose=True)
    except Exception as e:
        print(f"modelyard build-kernels: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    print(f"kernels built and loaded: {path}")
    return 0


def _job_options(p: argparse.ArgumentParser, multi_model: bool) -> None:
    p.add_argument("images", nargs="+", metavar="IMAGES", help=_EPILOG_IMAGES)
    p.add_argument("--out", default="modelyard-out/" + ("compare" if multi_model else "caption"),
                   help="output directory; rerunning into it resumes (default: %(default)s)")
    p.add_argument("--prompt", action="append", metavar="[ID=]TEXT",
                   help="prompt, repeatable for several; ID=TEXT names it (default: 'Describe the image.')")
    p.add_argument("--max-new-tokens", type=int, default=64, help="default: %(default)s")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--engine", action="append", metavar="KEY=VALUE",
                   help="EngineConfig option for every model, repeatable (e.g. backend=transformers, "
                        "max_batch_size=32, dtype=bfloat16)")
    p.add_argument("--gpus", type=float, default=None, help="GPUs per model replica (default: planned)")
    p.add_argument("--replicas", type=int, default=1, help="actors per model sharing its images (default 1)")
    p.add_argument("--max-in-flight", type=int, default=8, help="requests in flight per actor (default 8)")
    p.add_argument("--max-restarts", type=int, default=2, help="respawns per model after a crash (default 2)")
    p.add_argument("--retry-errors", action="store_true", help="on resume, recompute rows that ended in an error")
    p.add_argument("--no-report", action="store_true", help="skip comparison.parquet and report.html")
    p.add_argument("--name", default=None, help="title of the report")
    _common(p)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--address", default=None,
                   help="join this Ray cluster (host:port or 'auto'); default: RAY_ADDRESS or a local one")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    from .testing import ARCHITECTURES, SIZES
    p = argparse.ArgumentParser(prog="modelyard", description=(
        "Run many vision-language models over large image sets: one Ray actor per model, "
        "verified VRAM reclaim on unload, resumable captioning and comparison jobs."),
        epilog="Start with `modelyard demo`; `modelyard COMMAND --help` for each command.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    c = sub.add_parser("caption", help="caption images with one model",
                       description="Caption every image with one model. Results go to OUT/results.parquet "
                                   "(JSONL while running); an interrupted run resumes where it stopped.",
                       epilog="example: modelyard caption llava-hf/llava-1.5-7b-hf photos/ --out runs/llava")
    c.add_argument("model", metavar="MODEL", help="checkpoint directory or Hub id (org/name)")
    _job_options(c, multi_model=False)
    c.set_defaults(func=_cmd_caption)

    m = sub.add_parser("compare", help="caption images with several models and write a comparison report",
                       description="Caption every image with each model, then write a side-by-side table "
                                   "(comparison.parquet), pairwise caption agreement and a self-contained "
                                   "report.html.",
                       epilog="example: modelyard compare --model llava-hf/llava-1.5-7b-hf "
                              "--model llava-hf/llava-interleave-qwen-0.5b-hf photos/ --mode parallel")
    m.add_argument("--model", action="append", required=True, metavar="[NAME=]PATH",
                   help="checkpoint directory or Hub id, repeatable; NAME= labels it")
    m.add_argument("--mode", choices=("sequential", "parallel", "auto"), default="sequential",
                   help="sequential: one model at a time on the same GPU(s); parallel: all at once, packed "
                        "onto the GPUs; auto: parallel waves of what fits (default: %(default)s)")
    _job_options(m, multi_model=True)
    m.set_defaults(func=_cmd_compare)

    r = sub.add_parser("run", help="run a job file (TOML, YAML or JSON)",
                       description="Run the job a file describes (see examples/ for the format). Works under "
                                   "`ray job submit --working-dir . -- modelyard run job.toml`.")
    r.add_argument("jobfile")
    r.add_argument("--out", default=None, help="override the job's output_dir")
    r.add_argument("--mode", choices=("sequential", "parallel", "auto"), default=None, help="override the job's mode")
    r.add_argument("--retry-errors", action="store_true", help="on resume, recompute rows that ended in an error")
    _common(r)
    r.set_defaults(func=_cmd_run)

    d = sub.add_parser("demo", help="compare two tiny random-weight models on sample images, sequential and parallel",
                       description="Make two tiny random-weight checkpoints of different architectures and "
                                   "sample images, compare them sequentially and in parallel (GPU if there "
                                   "is one, else CPU), and print where the report is. Downloads nothing.")
    d.add_argument("--out", default="modelyard-out/demo", help="default: %(default)s")
    d.add_argument("--images", type=int, default=8, help="sample images (default %(default)s)")
    d.add_argument("--max-new-tokens", type=int, default=12, help="default: %(default)s")
    d.add_argument("--modes", nargs="+", choices=("sequential", "parallel", "auto"),
                   default=["sequential", "parallel"], help="default: sequential parallel")
    _common(d)
    d.set_defaults(func=_cmd_demo)

    k = sub.add_parser("make-model", help="write a random-weight HF-format checkpoint of a real architecture",
                       description="Write a complete Hugging Face-format checkpoint with random weights "
                                   "(config, safetensors, tokenizer, chat template, preprocessor config).")
    k.add_argument("arch", choices=sorted(ARCHITECTURES))
    k.add_argument("path")
    k.add_argument("--size", default="tiny", help=f"one of: {', '.join(SIZES)} (default tiny)")
    k.add_argument("--seed", type=int, default=0)
    k.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: float32 for tiny, bfloat16 otherwise)")
    k.set_defaults(func=_cmd_make_model)

    doc = sub.add_parser("doctor", help="check GPU, NVML, attention backend, kernels and Ray",
                         description="Report what modelyard can use here: torch and CUDA, GPUs through NVML, "
                                     "the attention backend, the CUDA kernels, and Ray (starting a local "
                                     "instance, or joining --address).")
    doc.add_argument("--address", default=None, help="join this Ray cluster instead of starting a local one")
    doc.add_argument("--no-ray", action="store_true", help="skip starting/joining Ray")
    doc.set_defaults(func=_cmd_doctor)

    b = sub.add_parser("build-kernels", help="build (or find cached) the CUDA kernels",
                       description="JIT-build the csrc CUDA ops and cache them; a later run loads them in "
                                   "milliseconds.")
    b.add_argument("--arch", default=None, help="GPU compute capability to build for (e.g. 9.0) when none is present")
    b.set_defaults(func=_cmd_build_kernels)
    return p


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    from .orchestration.spec import SpecError
    try:
        return args.func(args)
    except SpecError as e:
        print(f"modelyard {args.command}: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\nmodelyard {args.command}: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
