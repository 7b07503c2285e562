"""`modelyard` command line."""
from __future__ import annotations

import argparse
import sys


def _cmd_make_model(args) -> int:
    from .testing import ARCHITECTURES, SIZES, make_checkpoint
    path = make_checkpoint(args.arch, args.path, size=args.size, seed=args.seed, dtype=args.dtype)
    print(f"wrote a random-weight {args.arch} checkpoint ({args.size}) to {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .testing import ARCHITECTURES, SIZES
    p = argparse.ArgumentParser(prog="modelyard", description=(
        "Run many vision-language models over large image sets: one Ray actor per model, "
        "verified VRAM reclaim on unload, resumable captioning and comparison jobs."))
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    m = sub.add_parser("make-model", help="write a random-weight HF-format checkpoint of a real architecture",
                       description="Write a complete Hugging Face-format checkpoint with random weights "
                                   "(config, safetensors, tokenizer, chat template, preprocessor config).")
    m.add_argument("arch", choices=sorted(ARCHITECTURES))
    m.add_argument("path")
    m.add_argument("--size", default="tiny", help=f"one of: {', '.join(SIZES)} (default tiny)")
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: float32 for tiny, bfloat16 otherwise)")
    m.set_defaults(func=_cmd_make_model)
    return p


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
