"""Where a CUDA-graph decode step's time goes (GPU only): the kernels of one graph replay, and what the
step would take without the non-GEMM kernels.

1. Kernel table: torch profiler over 5 replays of the step's graph (batch, context), per kernel
   name: calls per step, us each, us per step; then the replay's span against its kernels' sum
   (the graph's launch gaps).
2. Removal bounds (timing only; the logits are wrong in these variants): the step re-captured with
   the same GEMM plan but without the rotary + cache-write kernel, the SiLU kernel, the decode
   attention kernel, and combinations; and with the rotary + cache and SiLU kernels kept but their
   folded-norm scaling left out. Each figure is the most that fusing or hiding that
   work could save, measured rather than summed from kernel durations (PDL overlaps some of them).

Every figure is also given against the weights-read floor (decode weight bytes / measured copy
bandwidth), as benchmarks/throughput.py reports the step. Makes (or reuses) the random checkpoint.

  python benchmarks/step_anatomy.py --batches 1,64 --context 32
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.throughput import bench_checkpoint, decode_step_bench, log, measure_ceilings  # noqa: E402


def kernel_table(eng, batch: int, replays: int = 5) -> list[str]:
    from torch.profiler import ProfilerActivity, profile

    from modelyard.engine.cuda_graphs import pick_bucket
    graphs = eng.runner.graphs
    bucket = pick_bucket(batch, graphs.sizes)
    graphs.replay(bucket)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(replays):
            graphs.replay(bucket)
        torch.cuda.synchronize()
    evs = sorted((e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA),
                 key=lambda e: e.time_range.start)
    agg: dict[str, list] = collections.defaultdict(lambda: [0, 0.0])
    for e in evs:
        agg[e.name][0] += 1
        agg[e.name][1] += e.device_time
    per = len(evs) // replays
    one = evs[per:2 * per]          # the second replay: a whole one, not the first after the warm-up
    span = one[-1].time_range.end - one[0].time_range.start if one else 0.0
    total = sum(t for _, t in agg.values()) / replays
    lines = [f"batch {batch}: {per} kernels per step, {total:.0f} us of kernel time; one replay spans "
             f"{span:.0f} us against its kernels' {sum(e.device_time for e in one):.0f}",
             f"  {'us/step':>8} {'calls':>5} {'us each':>8}  kernel"]
    for name, (calls, t) in sorted(agg.items(), key=lambda kv: -kv[1][1]):
        lines.append(f"  {t / replays:8.1f} {calls // replays:5d} {t / calls:8.2f}  {name[:110]}")
    return lines


@contextlib.contextmanager
def without(rotary: bool, silu: bool, attention: bool, max_batch: int, spec, device="cuda", norms: bool = False):
    """The decoder with the chosen kernels replaced by nothing (a preallocated buffer stands in for
    their outputs, so no other kernel is added); the originals come back on exit. Timing only.
    `norms`: the rotary + cache and SiLU kernels run without their folded-norm scale (as if 1): the
    bound for the scales' cost (in the graphs their rms_scale kernels still run, beside the GEMMs)."""
    from modelyard.engine import ops
    from modelyard.engine.attention import base
    saved = base.AttentionBackend.write_kv, ops.silu_and_mul, ops.paged_decode_attention
    dev, dt = device, torch.bfloat16
    act = torch.zeros(max_batch, spec.intermediate_size, device=dev, dtype=dt)
    att = torch.zeros(max_batch, spec.num_heads, spec.head_dim, device=dev, dtype=dt)
    try:
        if norms:
            write_kv, silu_and_mul = saved[0], saved[1]

            def write_kv_unscaled(self, k, v, k_cache, v_cache, meta, q=None, rotary=None):
                rotary = rotary and dataclasses.replace(rotary, norm_x=None, norm_scale=None)
                return write_kv(self, k, v, k_cache, v_cache, meta, q, rotary)
            base.AttentionBackend.write_kv = write_kv_unscaled
            ops.silu_and_mul = lambda x, *a, **kw: silu_and_mul(x)
        if rotary:
            base.AttentionBackend.write_kv = lambda self, *a, **kw: None
        if silu:
            ops.silu_and_mul = lambda x, *a, **kw: act[:x.shape[0]]
        if attention:
            ops.paged_decode_attention = lambda q, *a, **kw: att[:q.shape[0]]
        yield
    finally:
        base.AttentionBackend.write_kv, ops.silu_and_mul, ops.paged_decode_attention = saved


# (name, rotary, silu, attention, norms): what each re-capture leaves out
VARIANTS = [("every kernel", False, False, False, False), ("no folded-norm scaling", False, False, False, True),
            ("no rotary + cache write", True, False, False, False), ("no SiLU", False, True, False, False),
            ("no decode attention", False, False, True, False), ("no rotary, no SiLU", True, True, False, False),
            ("GEMMs only", True, True, True, False)]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="llava")
    ap.add_argument("--size", default="llava-1.5-7b")
    ap.add_argument("--ckpt-dir", default="/tmp/modelyard-bench")
    ap.add_argument("--batches", default="1,64", help="comma-separated batch sizes")
    ap.add_argument("--context", type=int, default=32)
    ap.add_argument("--no-bounds", action="store_true", help="the kernel table only")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("step_anatomy.py needs a CUDA GPU", file=sys.stderr)
        return 2
    from modelyard.engine import Engine, EngineConfig
    batches = [int(b) for b in args.batches.split(",")]
    path = bench_checkpoint(args.ckpt_dir, args.arch, args.size)
    eng = Engine.from_pretrained(path, EngineConfig(dtype="bfloat16", max_batch_size=max(batches)))
    graphs = eng.runner.graphs
    if graphs is None:
        print("the engine captured no decode graphs", file=sys.stderr)
        return 2
    copy_gbps = measure_ceilings()["copy_gbps"]
    log(f"{torch.cuda.get_device_name()}, copy {copy_gbps / 1e3:.2f} TB/s, torch {torch.__version__}; "
        f"GEMM plan: {graphs.gemm_plan.summary()}")
    for b in batches:
        r = decode_step_bench(eng, b, args.context, copy_gbps)
        log(f"batch {b}, context {args.context}: replay {r['graph_replay_ms']:.3f} ms, "
            f"{r['vs_weights_floor']:.3f}x the weights floor ({r['weights_floor_ms']:.3f} ms)")
        print("\n".join(kernel_table(eng, b)), flush=True)
    if args.no_bounds:
        return 0
    spec = eng.model.language_model.spec
    plan = graphs.gemm_plan
    try:
        for name, rot, silu, attn, norms in VARIANTS:
            with without(rot, silu, attn, max(batches), spec, norms=norms):
                graphs.capture(plan)
                cells = []
                for b in batches:
                    r = decode_step_bench(eng, b, args.context, copy_gbps)
                    cells.append(f"batch {b} {r['graph_replay_ms']:.3f} ms ({r['vs_weights_floor']:.3f}x)")
            print(f"  {name:26s} " + "  ".join(cells), flush=True)
    finally:
        graphs.capture(plan)        # the real graphs back
    return 0


if __name__ == "__main__":
    sys.exit(main())
