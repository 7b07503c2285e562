"""`modelyard` command line: caption | compare | run | demo | make-model | doctor | build-kernels.

User mistakes (a missing directory, a typo in a job file, a bad --engine value) end in one line on
stderr and exit code 2, before Ray starts where possible; a job whose rows are all written exits 0,
one with unfinished rows (a model failed to load or ran out of restarts) exits 1, and a rerun of
the same command finishes them.
"""

from __future__ import annotations

import errno
import json
import os
import sys

from .parser import build_parser


def _spec_error(msg: str):
    from ..orchestration.spec.job import SpecError

    return SpecError(msg)


# -- turning arguments into a job --------------------------------------------------------------------
def _parse_value(v: str):
    try:
        return json.loads(v)
    except ValueError:
        return v


def _kv(items: list[str] | None, what: str) -> dict:
    out = {}
    for it in items or []:
        k, sep, v = it.partition("=")
        if not sep or not k.strip():
            raise _spec_error(f"{what} must look like KEY=VALUE (e.g. max_batch_size=32), got {it!r}")
        out[k.strip()] = _parse_value(v)
    return out


def _inputs(images: list[str]):
    from ..orchestration import InputSpec

    for p in images:
        if not any(c in p for c in "*?[") and not os.path.exists(p):
            raise _spec_error(f"IMAGES: {p!r} does not exist")
    if len(images) == 1:
        return InputSpec.from_any(images[0])
    not_files = [p for p in images if not os.path.isfile(p)]
    if not_files:
        raise _spec_error(
            f"several IMAGES must all be image files; not files: {not_files[:5]} "
            "(give a directory or a quoted glob as the only IMAGES instead)"
        )
    return InputSpec(items=tuple(images))


def _prompts(items: list[str] | None):
    from ..orchestration import DEFAULT_PROMPT, PromptSpec

    if not items:
        return (PromptSpec("default", DEFAULT_PROMPT),)
    out = []
    for i, p in enumerate(items):
        pid, sep, text = p.partition("=")
        ok_id = sep and pid and " " not in pid and len(pid) <= 40
        out.append(PromptSpec(pid, text) if ok_id else PromptSpec("default" if len(items) == 1 else f"p{i}", p))
    return tuple(out)


def _model_items(items: list[str]) -> list[tuple[str, str]]:
    """[NAME=]PATH -> (name, path); the name defaults to the path's last component."""
    out = []
    for it in items:
        name, sep, path = it.partition("=")
        if not sep or "/" in name or os.path.exists(it):
            name, path = os.path.basename(it.rstrip("/")), it
        out.append((name, path))
    names = [n for n, _ in out]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise _spec_error(f"two models are both named {dup[0]!r}; label them with --model NAME=PATH")
    return out


def _default_out(kind: str, names: list[str]) -> str:
    return os.path.join("modelyard-out", f"{kind}-" + "-vs-".join(names)[:120])


def _job_from_args(args, model_items: list[str], mode: str):
    from ..engine.types import SamplingParams
    from ..orchestration import JobSpec, ModelSpec
    from ..orchestration.spec.validation import build

    models = _model_items(model_items)
    engine = _kv(args.engine, "--engine")
    sampling = build(
        "sampling", SamplingParams, {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature}
    )
    out = args.out or _default_out("caption" if len(models) == 1 else "compare", [n for n, _ in models])
    return JobSpec(
        models=tuple(ModelSpec(n, p, engine=dict(engine), gpus=args.gpus, replicas=args.replicas) for n, p in models),
        inputs=_inputs(args.images),
        output_dir=out,
        prompts=_prompts(args.prompt),
        sampling=sampling,
        mode=mode,
        max_in_flight=args.max_in_flight,
        max_restarts=args.max_restarts,
        retry_errors=args.retry_errors,
        report=not args.no_report,
        name=args.name or "modelyard job",
    )


# -- running -----------------------------------------------------------------------------------------
def _run(job, args) -> int:
    from ..orchestration import run_job
    from ..orchestration.checks.preflight import check_job
    from ..orchestration.outputs.progress import describe_outcome

    check_job(job, args.address)
    res = run_job(job, address=args.address, progress=False if args.no_progress else None)
    print(f"\nresults: {res.results_path}  ({res.wall_s:.1f} s)")
    for k, v in sorted(res.report.items()):
        print(f"{k + ':':<11} {v}")
    lines, unfinished = describe_outcome(res.results_path, [m.name for m in job.models])
    print("\n".join(lines))
    broken = {m: s["load_error"] for m, s in res.summary.items() if s.get("load_error_permanent")}
    for m, why in broken.items():
        print(
            f"modelyard {args.command}: model {m!r} cannot run here ({why}); a rerun alone will not fix "
            "this: fix the cause, then rerun with --retry-errors",
            file=sys.stderr,
        )
    if unfinished:
        print(
            f"\nmodelyard {args.command}: {unfinished} row(s) are unfinished work (see the reasons above); "
            "rerun the same command to retry them",
            file=sys.stderr,
        )
    return 1 if unfinished or broken else 0


def _cmd_caption(args) -> int:
    return _run(_job_from_args(args, [args.model], "sequential"), args)


def _cmd_compare(args) -> int:
    if len(args.model) < 2:
        raise _spec_error("give at least two --model (use `modelyard caption` for one)")
    return _run(_job_from_args(args, args.model, args.mode), args)


def _cmd_run(args) -> int:
    from ..orchestration import load_job

    job = load_job(args.jobfile, output_dir=args.out, mode=args.mode, retry_errors=args.retry_errors or None)
    return _run(job, args)


def _cmd_demo(args) -> int:
    from ..orchestration.checks.preflight import check_address
    from .demo import run_demo

    if args.images < 1 or args.max_new_tokens < 1:
        raise _spec_error("--images and --max-new-tokens must be >= 1")
    check_address(args.address)
    return run_demo(
        out=args.out,
        num_images=args.images,
        max_new_tokens=args.max_new_tokens,
        address=args.address,
        modes=args.modes,
        progress=False if args.no_progress else None,
    )


def _cmd_make_model(args) -> int:
    from ..testing import make_checkpoint

    if os.path.isdir(args.path) and os.listdir(args.path) and not args.overwrite:
        raise _spec_error(
            f"{args.path} exists and is not empty; pass --overwrite to write the checkpoint "
            "into it anyway (files of the same name are replaced)"
        )
    try:
        path = make_checkpoint(args.arch, args.path, size=args.size, seed=args.seed, dtype=args.dtype)
    except ValueError as e:  # e.g. a size this architecture does not define
        raise _spec_error(str(e)) from e
    print(f"wrote a random-weight {args.arch} checkpoint ({args.size}) to {path}")
    return 0


def _cmd_doctor(args) -> int:
    from ..orchestration.checks.preflight import check_address
    from .doctor import run_doctor

    check_address(args.address)
    return run_doctor(address=args.address, start_ray=not args.no_ray, models=args.model or ())


def _cmd_build_kernels(args) -> int:
    from ..engine import kernels

    try:
        path = kernels.build(arch=args.arch, verbose=True)
    except kernels.KernelBuildError as e:
        print(f"modelyard build-kernels: {e}", file=sys.stderr)
        return 1
    print(f"kernels built and loaded: {path}")
    return 0


_COMMANDS = {
    "caption": _cmd_caption,
    "compare": _cmd_compare,
    "run": _cmd_run,
    "demo": _cmd_demo,
    "make-model": _cmd_make_model,
    "doctor": _cmd_doctor,
    "build-kernels": _cmd_build_kernels,
}


_OS_HINTS = {
    errno.EACCES: "no permission to write there: choose another output directory (--out)",
    errno.EPERM: "no permission to write there: choose another output directory (--out)",
    errno.EROFS: "that file system is read-only: choose another output directory (--out)",
    errno.ENOSPC: "the disk is full: free space, then rerun the same command (it resumes)",
    errno.EDQUOT: "the disk quota is used up: free space, then rerun the same command (it resumes)",
}


def _os_error(e: OSError) -> str:
    where = f": {e.filename}" if e.filename else ""
    hint = _OS_HINTS.get(e.errno)
    return f"{e.strerror or e}{where}" + (f"; {hint}" if hint else "")


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    from ..orchestration.spec.job import SpecError

    try:
        return _COMMANDS[args.command](args)
    except SpecError as e:
        print(f"modelyard {args.command}: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # the output directory: unwritable, read-only, full
        print(f"modelyard {args.command}: {_os_error(e)}", file=sys.stderr)
        return 1 if e.errno in (errno.ENOSPC, errno.EDQUOT) else 2
    except KeyboardInterrupt:
        print(
            f"\nmodelyard {args.command}: interrupted; rows written so far are kept, and rerunning the same "
            "command resumes",
            file=sys.stderr,
        )
        return 130
