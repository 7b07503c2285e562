"""Builds and runs benchmarks/gemm_stream.cu (GPU only, sm_90): where an M = 64 decode GEMM's time goes,
the weight stream, x, the wgmma and the epilogue added one at a time, in the row-major layout (2D TMA
boxes, as cuBLAS and csrc/tma_gemm.cu read) and in a tiled one (one contiguous bulk copy per stage),
against cuBLAS and a plain read of the same bytes. See the .cu file's header for what each row is.

  python benchmarks/gemm_stream.py [--out FILE]
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

SRC = Path(__file__).resolve().parent / "gemm_stream.cu"


def build(binary: Path) -> None:
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        sys.exit("gemm_stream: nvcc not found (CUDA toolkit needed)")
    cmd = [nvcc, "-O3", "-std=c++17", "-gencode", "arch=compute_90a,code=sm_90a", str(SRC), "-lcublas", "-o", str(binary)]
    subprocess.run(cmd, check=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, help="also write the output here")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        binary = Path(tmp) / "gemm_stream"
        build(binary)
        run = subprocess.run([str(binary)], capture_output=True, text=True)
    sys.stdout.write(run.stdout + run.stderr)
    if args.out:
        args.out.write_text(run.stdout + run.stderr)
    return run.returncode


if __name__ == "__main__":
    sys.exit(main())
