"""benchmarks/gemm_stream.cu: its GEMM-shaped kernel, complete (split 1, with the epilogue; with
m64n64 wgmmas and with one m64n<block_n> wgmma per k16 step), must reproduce cuBLAS's product in both
weight layouts, the row-major one read by 2D TMA and the tiled one
(repacked and pre-swizzled on the GPU, read by 1D bulk copies); the binary checks it on every shape
and exits 1 otherwise. Needs an sm_90 GPU and nvcc."""
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

_SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gemm_stream.py"


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0),
                    reason="needs an sm_90 GPU (TMA, wgmma): the benchmark is built for sm_90a")
@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc to build the benchmark")
def test_gemm_stream_kernel_matches_cublas_in_both_layouts():
    run = subprocess.run([sys.executable, str(_SCRIPT)], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    checks = [line for line in run.stdout.splitlines() if "check " in line]
    # 7 split-1 configs with the epilogue, 7 of them again with one wide wgmma per k16 (block_n > 64)
    assert len(checks) == 2 * 14 and all(line.endswith(": ok") for line in checks), checks
    assert run.stdout.rstrip().endswith("all checks ok")
