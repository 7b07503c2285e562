"""Times the csrc kernels against their torch references (and FlashAttention / SDPA where they
compete) at LLaVA-scale shapes. Needs a CUDA GPU; builds the kernels on first use.

    python benchmarks/csrc_kernels.py [--only decode small prefill fp8] [--json out.json]

Groups:
  decode   paged decode attention (csrc, each variant and split count) against the torch reference,
           dense SDPA and FlashAttention varlen; bf16 and fp8 caches
  small    cache write, rotary + cache write, RMSNorm, add + RMSNorm, SiLU-and-mul, and the fp8
           quantizers (alone and fused into the norm / activation kernels)
  prefill  varlen FlashAttention against batched and per-sequence SDPA (causal prefill)
  fp8      the 7B projections in bf16 against the fp8 path (quantizer + torch._scaled_mm row-wise);
           needs compute capability 8.9+

Each row: the median of CUDA-event-timed calls after warm-up, and the bytes the op must move (each
input read once, each output written once) over that time, to set against the measured
device-to-device copy bandwidth (the floor of a memory-bound op).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys

import torch
import torch.nn.functional as F

from modelyard.engine import kernels, ops

ROWS: list[dict] = []
GROUPS = ("decode", "small", "prefill", "fp8")


def timeit(fn, min_ms: float = 40.0, max_reps: int = 200) -> float:
    """Median milliseconds per call."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    reps = int(min(max_reps, max(5, min_ms / max(start.elapsed_time(end), 1e-3))))
    times = []
    for _ in range(reps):
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def row(group: str, name: str, ms: float, nbytes: float | None = None, **extra) -> None:
    gbs = nbytes / ms / 1e6 if nbytes else None
    ROWS.append(dict(group=group, name=name, ms=ms, gb_s=gbs, **extra))
    bw = f"{gbs:8.0f} GB/s" if gbs else " " * 13
    more = " ".join(f"{k}={v}" for k, v in extra.items())
    print(f"{group:<34} {name:<36} {ms * 1e3:10.1f} us {bw} {more}", flush=True)


def copy_bandwidth() -> float:
    n = 1 << 30
    a = torch.empty(n, dtype=torch.uint8, device="cuda").random_()
    b = torch.empty_like(a)
    ms = timeit(lambda: b.copy_(a))
    row("ceiling", "device copy 1 GiB (read+write)", ms, 2 * n)
    return 2 * n / ms / 1e6


def paged_case(S, hq, hk, d, block_size, lens, dtype=torch.bfloat16):
    """A random paged cache of S sequences of the given lengths, blocks scattered over the pool."""
    g = torch.Generator(device="cuda").manual_seed(0)
    blocks = [math.ceil(n / block_size) for n in lens]
    nb = sum(blocks)
    perm = torch.randperm(nb, device="cuda", generator=g).to(torch.int32)
    bt = torch.zeros(S, max(blocks), dtype=torch.int32, device="cuda")
    off = 0
    for i, b in enumerate(blocks):
        bt[i, :b] = perm[off : off + b]
        off += b
    kc = torch.randn(nb, block_size, hk, d, device="cuda", dtype=dtype, generator=g)
    vc = torch.randn_like(kc)
    q = torch.randn(S, hq, d, device="cuda", dtype=dtype, generator=g)
    sl = torch.tensor(lens, dtype=torch.int32, device="cuda")
    return q, kc, vc, bt, sl


def decode_attention(label, S, hq, hk, d, lens, block_size=16, sweep=(1, 2, 4, 8), baselines=True, fp8=False):
    """The csrc kernel's variants (2: slot kernel, 3: slot kernel with the next tile prefetched;
    auto: the launcher's choice) and forced split counts; with baselines, the torch alternatives."""
    q, kc, vc, bt, sl = paged_case(S, hq, hk, d, block_size, lens)
    if fp8:
        kc, vc = ops.quantize_kv(kc, ops.FP8_KV_DTYPE), ops.quantize_kv(vc, ops.FP8_KV_DTYPE)
    scale = d**-0.5
    kv_bytes = sum(lens) * hk * d * 2 * kc.element_size()
    io = 2 * q.numel() * q.element_size()
    group = f"decode {label}" + (" fp8 KV" if fp8 else "")
    k = kernels.get()
    ref = ops.paged_decode_attention_ref(q, kc, vc, bt, sl, scale)
    for variant in (0, 2, 3):
        out = k.paged_decode_attention(q, kc, vc, bt, sl, scale, max(lens), 0, variant)
        err = float((out.double() - ref.double()).norm() / ref.double().norm())
        tag = "auto" if variant == 0 else f"v{variant}"
        row(
            group,
            f"csrc {tag} (bs={block_size})",
            timeit(lambda: k.paged_decode_attention(q, kc, vc, bt, sl, scale, max(lens), 0, variant)),
            kv_bytes + io,
            rel_err=f"{err:.1e}",
        )
        for ns in sweep if variant else ():
            row(
                group,
                f"csrc v{variant} splits={ns}",
                timeit(lambda: k.paged_decode_attention(q, kc, vc, bt, sl, scale, -1, ns, variant)),
                kv_bytes + io,
            )
    if not baselines or fp8:
        return
    row(
        group,
        "torch reference (per-seq loop)",
        timeit(lambda: ops.paged_decode_attention_ref(q, kc, vc, bt, sl, scale), min_ms=20, max_reps=5),
        kv_bytes + io,
    )
    # dense SDPA over pre-gathered, padded K/V (the gather is not timed: a lower bound for SDPA)
    L = max(lens)
    idx = torch.arange(L, device="cuda")
    slots = bt.long()[:, (idx // block_size).clamp_max(bt.shape[1] - 1)] * block_size + idx % block_size  # [S, L]
    kd = kc.view(-1, hk, d)[slots].repeat_interleave(hq // hk, 2).transpose(1, 2)  # [S, Hq, L, D]
    vd = vc.view(-1, hk, d)[slots].repeat_interleave(hq // hk, 2).transpose(1, 2)
    mask = (idx[None, :] < sl[:, None])[:, None, None, :]
    qd = q[:, :, None, :]
    row(
        group,
        "torch SDPA dense padded (no gather)",
        timeit(lambda: F.scaled_dot_product_attention(qd, kd, vd, attn_mask=mask, scale=scale)),
        kv_bytes + io,
    )
    from modelyard.engine.attention.flash import probe_varlen

    impl = next((i for i in probe_varlen()[0] if i.name == "torch"), None)
    if impl is None:
        return
    packed = torch.cat([torch.arange(n, device="cuda") for n in lens])
    seq_of = torch.repeat_interleave(torch.arange(S, device="cuda"), sl.long())
    pslots = bt.long()[seq_of, packed // block_size] * block_size + packed % block_size
    kp, vp = kc.view(-1, hk, d)[pslots], vc.view(-1, hk, d)[pslots]
    cu_q = torch.arange(S + 1, dtype=torch.int32, device="cuda")
    cu_k = F.pad(sl.cumsum(0, dtype=torch.int32), (1, 0))
    o = impl(q, kp, vp, cu_q, cu_k, 1, max(lens), scale)
    err = float((o.double() - ref.double()).norm() / ref.double().norm())
    row(
        group,
        "torch varlen_attn (FA2) packed KV",
        timeit(lambda: impl(q, kp, vp, cu_q, cu_k, 1, max(lens), scale)),
        kv_bytes + io,
        rel_err=f"{err:.1e}",
    )


def decode_cases() -> None:
    gen = torch.Generator().manual_seed(0)
    lens650 = torch.randint(600, 701, (64,), generator=gen).tolist()
    lens256 = torch.randint(600, 701, (256,), generator=gen).tolist()
    decode_attention("LLaVA-7B S64 H32/32 D128 ~650", 64, 32, 32, 128, lens650)
    decode_attention("LLaVA-7B S256 H32/32 D128 ~650", 256, 32, 32, 128, lens256, sweep=(), baselines=False)
    decode_attention("LLaVA-7B S64 H32/32 D128 ctx 32", 64, 32, 32, 128, [32] * 64, sweep=(), baselines=False)
    decode_attention("Qwen2-VL-7B S64 H28/4 D128 ~650", 64, 28, 4, 128, lens650)
    decode_attention("S8 H32/8 D128 ctx 8192", 8, 32, 8, 128, [8192] * 8, sweep=(1, 4, 8, 16))
    decode_attention("S1 H32/32 D128 ctx 650", 1, 32, 32, 128, [650], sweep=(1, 4, 8), baselines=False)
    for label, S, hq, hk, lens in (
        ("LLaVA-7B S64 H32/32 D128 ~650", 64, 32, 32, lens650),
        ("LLaVA-7B S256 H32/32 D128 ~650", 256, 32, 32, lens256),
        ("Qwen2-VL-7B S64 H28/4 D128 ~650", 64, 28, 4, lens650),
        ("S8 H32/8 D128 ctx 8192", 8, 32, 8, [8192] * 8),
    ):
        decode_attention(label, S, hq, hk, 128, lens, sweep=(), baselines=False, fp8=True)


def small_ops() -> None:
    """At a decode step (T = 64 tokens) and a prefill step (T = 8192-16384), LLaVA-7B sizes, bf16."""
    k = kernels.get()
    dt = torch.bfloat16
    hq, hk, d, H, inter = 32, 32, 128, 4096, 11008
    cache = ops.build_cos_sin_cache(d, 4096, 1e4, device="cuda")
    for T in (64, 16384):
        key = torch.randn(T, hk, d, device="cuda", dtype=dt)
        val = torch.randn_like(key)
        nb = T // 16 + 1
        kc = torch.empty(nb, 16, hk, d, device="cuda", dtype=dt)
        vc = torch.empty_like(kc)
        slots = torch.randperm(nb * 16, device="cuda")[:T]
        nbytes = 2 * 2 * key.numel() * 2
        row("reshape_and_cache", f"csrc T={T}", timeit(lambda: k.reshape_and_cache(key, val, kc, vc, slots)), nbytes)
        row(
            "reshape_and_cache",
            f"torch ref T={T}",
            timeit(lambda: ops.reshape_and_cache_ref(key, val, kc, vc, slots)),
            nbytes,
        )
        # the decoder's layout: q, k, v are column slices of the fused qkv projection's output
        qkv = torch.randn(T, (hq + 2 * hk) * d, device="cuda", dtype=dt)
        q, kk, vv = (
            qkv[:, : hq * d],
            qkv[:, hq * d : (hq + hk) * d].view(T, hk, d),
            qkv[:, (hq + hk) * d :].view(T, hk, d),
        )
        pos = torch.randint(0, 4096, (T,), device="cuda")
        nbytes = 2 * (q.numel() + kk.numel()) * 2 + 3 * vv.numel() * 2  # q, k rotated in place; v read; k, v cached
        row(
            "rotary + cache write",
            f"csrc fused T={T}",
            timeit(lambda: k.rotary_embedding_and_cache(pos, q, kk, vv, kc, vc, slots, d, cache, True)),
            nbytes,
        )
        row(
            "rotary + cache write",
            f"csrc rotary, then cache T={T}",
            timeit(
                lambda: (k.rotary_embedding(pos, q, kk, d, cache, True), k.reshape_and_cache(kk, vv, kc, vc, slots))
            ),
            nbytes,
        )
        row(
            "rotary + cache write",
            f"torch ref T={T}",
            timeit(lambda: ops.rotary_embedding_and_cache_ref(pos, q, kk, vv, kc, vc, slots, d, cache, True)),
            nbytes,
        )
    w = torch.randn(H, device="cuda", dtype=dt)
    for T in (64, 8192):
        x = torch.randn(T, H, device="cuda", dtype=dt)
        r = torch.randn_like(x)
        nb = x.numel() * 2
        row("rms_norm", f"csrc T={T}", timeit(lambda: k.rms_norm(x, w, 1e-6)), 2 * nb)
        row("rms_norm", f"torch ref T={T}", timeit(lambda: ops.rms_norm_ref(x, w, 1e-6)), 2 * nb)
        row("fused_add_rms_norm", f"csrc T={T}", timeit(lambda: k.fused_add_rms_norm(x, r, w, 1e-6)), 4 * nb)
        row("fused_add_rms_norm", f"torch ref T={T}", timeit(lambda: ops.fused_add_rms_norm_ref(x, r, w, 1e-6)), 4 * nb)
        # fp8 linear inputs: e4m3 + one scale per row written instead of the 16-bit row
        row("fp8 quantize", f"per_token_quant_fp8 T={T}", timeit(lambda: k.per_token_quant_fp8(x)), 3 * nb // 2)
        row("fp8 quantize", f"rms_norm_quant_fp8 T={T}", timeit(lambda: k.rms_norm_quant_fp8(x, w, 1e-6)), 3 * nb // 2)
        row(
            "fp8 quantize",
            f"fused_add_rms_norm_quant_fp8 T={T}",
            timeit(lambda: k.fused_add_rms_norm_quant_fp8(x, r, w, 1e-6)),
            7 * nb // 2,
        )
        g = torch.randn(T, 2 * inter, device="cuda", dtype=dt)
        nb = g.numel() * 2
        row("silu_and_mul", f"csrc T={T} I={inter}", timeit(lambda: k.silu_and_mul(g)), nb * 3 // 2)
        row("silu_and_mul", f"torch ref T={T} I={inter}", timeit(lambda: ops.silu_and_mul_ref(g)), nb * 3 // 2)
        row(
            "fp8 quantize",
            f"silu_and_mul_quant_fp8 T={T} I={inter}",
            timeit(lambda: k.silu_and_mul_quant_fp8(g)),
            nb * 5 // 4,
        )


def prefill_attention() -> None:
    from modelyard.engine.attention.flash import probe_varlen

    S, L, h, d = 8, 650, 32, 128
    q = torch.randn(S * L, h, d, device="cuda", dtype=torch.bfloat16)
    kk, vv = torch.randn_like(q), torch.randn_like(q)
    cu = torch.arange(0, S * L + 1, L, dtype=torch.int32, device="cuda")
    flops = 4 * S * L * L * h * d / 2  # causal
    for impl in probe_varlen()[0]:
        ms = timeit(lambda: impl(q, kk, vv, cu, cu, L, L, d**-0.5))
        row("prefill 8x650 H32 D128", f"varlen {impl.name}", ms, None, tflops=f"{flops / ms / 1e9:.0f}")
    qb, kb, vb = (t.view(S, L, h, d).transpose(1, 2) for t in (q, kk, vv))
    ms = timeit(lambda: F.scaled_dot_product_attention(qb, kb, vb, is_causal=True))
    row("prefill 8x650 H32 D128", "torch SDPA batched causal", ms, None, tflops=f"{flops / ms / 1e9:.0f}")

    def per_seq():  # what a ragged batch costs through plain SDPA: one call per sequence
        for i in range(S):
            F.scaled_dot_product_attention(qb[i : i + 1], kb[i : i + 1], vb[i : i + 1], is_causal=True)

    ms = timeit(per_seq)
    row("prefill 8x650 H32 D128", "torch SDPA per-sequence loop", ms, None, tflops=f"{flops / ms / 1e9:.0f}")


def fp8_gemms() -> None:
    """The LLaVA-7B decoder projections: bf16 matmul against the fp8 path (csrc per-token quantizer +
    torch._scaled_mm row-wise), at a prefill step (16k tokens) and decode batches 64 and 256."""
    if torch.cuda.get_device_capability() < (8, 9):
        print("fp8: skipped (needs compute capability 8.9+)", flush=True)
        return
    from modelyard.engine.quant import fp8_linear

    k = kernels.get()
    for K, N, name in ((4096, 12288, "qkv"), (4096, 4096, "o"), (4096, 22016, "gate_up"), (11008, 4096, "down")):
        w = (torch.randn(N, K, device="cuda") * K**-0.5).to(torch.bfloat16)
        wq, ws = k.per_token_quant_fp8(w)
        ws = ws.view(1, -1)
        for M in (64, 256, 16384):
            x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
            flops = 2 * M * N * K
            ms = timeit(lambda: x @ w.t())
            row(
                f"gemm {name} {K}->{N}",
                f"bf16 M={M}",
                ms,
                2 * (N * K + M * K + M * N),
                tflops=f"{flops / ms / 1e9:.0f}",
            )
            ms = timeit(lambda: fp8_linear(x, wq, ws, None, torch.bfloat16))
            row(
                f"gemm {name} {K}->{N}",
                f"fp8 quant+scaled_mm M={M}",
                ms,
                N * K + 3 * M * K + 2 * M * N,
                tflops=f"{flops / ms / 1e9:.0f}",
            )
            xq, xs = k.per_token_quant_fp8(x)
            ms = timeit(lambda: torch._scaled_mm(xq, wq.t(), scale_a=xs, scale_b=ws, out_dtype=torch.bfloat16))
            row(
                f"gemm {name} {K}->{N}",
                f"fp8 scaled_mm only M={M}",
                ms,
                N * K + M * K + 2 * M * N,
                tflops=f"{flops / ms / 1e9:.0f}",
            )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="+", choices=GROUPS, default=list(GROUPS), help="groups to run (default: all)")
    ap.add_argument("--json", default=None, help="also write every row, the device and the versions here")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    props = torch.cuda.get_device_properties(0)
    env = dict(device=props.name, sms=props.multi_processor_count, torch=torch.__version__, cuda=torch.version.cuda)
    print(json.dumps(env), flush=True)
    kernels.get()
    copy = copy_bandwidth()
    runs = {"decode": decode_cases, "small": small_ops, "prefill": prefill_attention, "fp8": fp8_gemms}
    for group in GROUPS:
        if group in args.only:
            runs[group]()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(env=env, copy_gb_s=copy, rows=ROWS), f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
