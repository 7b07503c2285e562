"""Calls a csrc op with invalid arguments in a fresh process; prints the Python exception.

Run as `python error_probe.py CASE`: errors raised by the native code must arrive as RuntimeError
(a crash here would take a whole engine process down on a bad call).
"""

from __future__ import annotations

import sys

import torch

from modelyard.engine import kernels


def main(case: str) -> None:
    k = kernels.get()
    dev = "cuda"
    q = torch.randn(1, 4, 64, device=dev, dtype=torch.bfloat16)
    kc = torch.randn(4, 16, 4, 64, device=dev, dtype=torch.bfloat16)
    bt = torch.zeros(1, 1, dtype=torch.int32, device=dev)
    sl = torch.ones(1, dtype=torch.int32, device=dev)
    try:
        if case == "block_tables_dtype":
            k.paged_decode_attention(q, kc, kc, bt.long(), sl, 1.0, -1, 0, 0)
        elif case == "head_dim":
            k.paged_decode_attention(
                q[..., :48].contiguous(), kc[..., :48].contiguous(), kc[..., :48].contiguous(), bt, sl, 1.0, -1, 0, 0
            )
        elif case == "norm_weight_dtype":
            k.rms_norm(torch.randn(2, 64, device=dev, dtype=torch.bfloat16), torch.ones(64, device=dev), 1e-6)
        else:
            raise SystemExit(f"unknown case {case}")
    except RuntimeError as e:
        print(f"RuntimeError: {str(e).splitlines()[0]}")
        return
    print("no error raised")


if __name__ == "__main__":
    main(sys.argv[1])
