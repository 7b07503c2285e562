"""What a decode step would take if each of its memory-bound kernels streamed its bytes at full speed
(GPU only): the yardstick for the decode step's distance from the weights-read floor.

1. Streaming step: one CUDA graph of plain read kernels with the step's byte counts and kernel
   boundaries: per decoder layer one kernel per linear layer's weights (in the model's order) and,
   after the first (qkv), one over the KV cache that `batch` sequences at `context` tokens read;
   then the LM head. Every kernel reads its own buffer, so nothing is served from L2 that the step
   would not also find there. Replayed with and without the KV reads, against the weights floor
   (decode weight bytes / measured copy bandwidth, as benchmarks/throughput.py reports the step).
2. Per GEMM shape: cuBLAS's decode GEMM at `batch` rows (F.linear, or addmm for the layers that add
   into their output) against the streaming read of the same weights, each as a graph chain over
   distinct weight copies (so every call reads its weights from DRAM, as in the step).

The layout comes from the engine's own model class for the checkpoint (built on the meta device, no
weights read), so it follows the architecture: fused qkv and gate_up, GQA, tied LM heads.

  python benchmarks/stream_floor.py --batch 64 --context 32
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.throughput import bench_checkpoint, decode_weight_bytes, log, measure_ceilings  # noqa: E402

_SRC = r"""
#include <ATen/cuda/CUDAContext.h>
#include <torch/extension.h>
""" + (Path(__file__).resolve().parent / "stream_read.cuh").read_text() + r"""
void stream_read_op(torch::Tensor p, int64_t blocks, torch::Tensor out) {
  TORCH_CHECK(p.is_cuda() && p.is_contiguous() && p.numel() * p.element_size() % 16 == 0);
  stream_read<<<blocks, 256, 0, at::cuda::getCurrentCUDAStream()>>>(
      (const V16*)p.data_ptr(), p.numel() * p.element_size() / 16, (unsigned*)out.data_ptr());
}
"""


def _stream_op():
    from torch.utils.cpp_extension import load_inline
    major, minor = torch.cuda.get_device_capability()
    arch = f"{major}{minor}" + ("a" if major >= 9 else "")
    mod = load_inline("modelyard_stream_floor", cpp_sources="void stream_read_op(torch::Tensor p, int64_t blocks, torch::Tensor out);",
                      cuda_sources=_SRC, functions=["stream_read_op"],
                      extra_cuda_cflags=["-O3", f"-gencode=arch=compute_{arch},code=sm_{arch}"])
    return mod.stream_read_op


def meta_model(path):
    """The engine's native model for the checkpoint at `path`, on the meta device (no memory, no weights)."""
    from modelyard.engine.loader import read_config
    from modelyard.engine.models.registry import get_model_class
    cfg = read_config(path)
    with torch.device("meta"):
        model = get_model_class(cfg)(cfg).to(torch.bfloat16)
    model.language_model.fold_norms()   # as the engine does in bf16: o_proj and down_proj add into the residual
    return model


def step_reads(model, batch: int, context: int) -> list[tuple[str, int, tuple[int, int] | None, bool]]:
    """(name, bytes, (n, k) of the GEMM or None, adds into its output) for each memory-bound kernel of a
    decode step, in order: per layer its linear layers, with the KV read after the first; the LM head."""
    lm = model.language_model
    spec = lm.spec
    itemsize = torch.empty((), dtype=torch.bfloat16).element_size()
    kv = batch * context * 2 * spec.num_kv_heads * spec.head_dim * itemsize
    reads = []
    for i, layer in enumerate(lm.layers):
        names = [(n, m) for n, m in layer.named_modules() if isinstance(m, nn.Linear)]
        for j, (n, m) in enumerate(names):
            w = m.weight
            reads.append((f"layer{i}.{n}", w.numel() * w.element_size(), tuple(w.shape), getattr(m, "accumulates", False)))
            if j == 0:
                reads.append((f"layer{i}.kv", kv, None, False))
    head = lm.embed_tokens.weight if model.lm_head is None else model.lm_head.weight
    reads.append(("lm_head", head.numel() * head.element_size(), tuple(head.shape), False))
    return reads


def _graph_ms(fn, calls: int = 1) -> float:
    """Milliseconds per call of fn (which makes `calls` calls), timed as the decode-GEMM tuner times:
    one CUDA graph, median of 10 replays."""
    from modelyard.engine.gemm import _graph_us
    return _graph_us(fn, calls, reps=10) / 1e3


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="llava")
    ap.add_argument("--size", default="llava-1.5-7b")
    ap.add_argument("--ckpt-dir", default="/tmp/modelyard-bench")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--context", type=int, default=32)
    ap.add_argument("--copies", type=int, default=8, help="weight copies per GEMM chain")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("stream_floor.py needs a CUDA GPU", file=sys.stderr)
        return 2
    model = meta_model(bench_checkpoint(args.ckpt_dir, args.arch, args.size))
    reads = step_reads(model, args.batch, args.context)
    floor_bytes = decode_weight_bytes(model)
    streamed = sum(n for name, n, shape, _ in reads if shape is not None)
    read, sms = _stream_op(), torch.cuda.get_device_properties(0).multi_processor_count
    sink = torch.zeros(4, dtype=torch.int32, device="cuda")
    bw = measure_ceilings()["copy_gbps"]   # as throughput.py: an eager copy (captured in a graph: 2.7 TB/s, H200)
    floor_ms = floor_bytes / bw / 1e6
    log(f"{torch.cuda.get_device_name()}, copy {bw / 1e3:.2f} TB/s, torch {torch.__version__}; weights floor "
        f"{floor_ms:.3f} ms ({floor_bytes / 1e9:.4f} GB, of which {(floor_bytes - streamed) / 1e6:.2f} MB of norm and "
        f"bias vectors that no GEMM reads)")

    bufs = [torch.empty(n // 2, dtype=torch.bfloat16, device="cuda").normal_() for _, n, _, _ in reads]
    for blocks in (4 * sms, 8 * sms):
        for with_kv in (True, False):
            def step():
                for (_, _, shape, _), t in zip(reads, bufs):
                    if shape is not None or with_kv:
                        read(t, blocks, sink)
            ms = _graph_ms(step)
            log(f"streaming step, {blocks // sms} CTAs per SM, {'weights + KV' if with_kv else 'weights only'}: "
                f"{ms:.3f} ms = {ms / floor_ms:.3f}x the weights floor")
    del bufs

    log(f"{'GEMM (n, k)':<22} {'cuBLAS us':>10} {'stream us':>10} {'ratio':>6}   graph chains of {args.copies} "
        f"over distinct weight copies, {args.batch} rows")
    seen = set()
    for name, n, shape, add in reads:
        if shape is None or (shape, add) in seen:
            continue
        seen.add((shape, add))
        ws = [torch.randn(shape, dtype=torch.bfloat16, device="cuda") for _ in range(args.copies)]
        xin = torch.randn(args.batch, shape[1], dtype=torch.bfloat16, device="cuda")
        out = torch.zeros(args.batch, shape[0], dtype=torch.bfloat16, device="cuda")
        if add:
            gemm = lambda: [out.addmm_(xin, w.t()) for w in ws]  # noqa: E731
        else:
            gemm = lambda: [F.linear(xin, w) for w in ws]  # noqa: E731
        g_us = _graph_ms(gemm, args.copies) * 1e3
        s_us = _graph_ms(lambda: [read(w, 8 * sms, sink) for w in ws], args.copies) * 1e3
        label = f"{name.split('.')[-1]} {shape}{' +=' if add else ''}"
        log(f"{label:<22} {g_us:10.2f} {s_us:10.2f} {g_us / s_us:6.3f}")
        del ws
    return 0


if __name__ == "__main__":
    sys.exit(main())
