"""Times the csrc kernels against the torch references and FlashAttention at LLaVA-scale shapes.

    python benchmarks/kernels.py [--json out.json]

Each row: median time of CUDA-event-timed calls after warm-up, and the bytes the op must move
(each input read once, each output written once) over that time, to set against the measured
device-to-device copy bandwidth (the floor for memory-bound ops). Needs a CUDA GPU.
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
    print(f"{group:<28} {name:<34} {ms * 1e3:10.1f} us {bw} {more}", flush=True)


def copy_bandwidth() -> float:
    n = 1 << 30
    a = torch.empty(n, dtype=torch.uint8, device="cuda").random_()
    b = torch.empty_like(a)
    ms = timeit(lambda: b.copy_(a))
    row("ceiling", "device copy 1 GiB (read+write)", ms, 2 * n)
    return 2 * n / ms / 1e6


def paged_case(S, hq, hk, d, block_size, lens, dtype=torch.bfloat16):
    g = torch.Generator(device="cuda").manual_seed(0)
    blocks = [math.ceil(n / block_size) for n in lens]
    nb = sum(blocks)
    perm = torch.randperm(nb, device="cuda", generator=g).to(torch.int32)
    bt = torch.zeros(S, max(blocks), dtype=torch.int32, device="cuda")
    off = 0
    for i, b in enumerate(blocks):
        bt[i, :b] = perm[off:off + b]
        off += b
    kc = torch.randn(nb, block_size, hk, d, device="cuda", dtype=dtype, generator=g)
    vc = torch.randn_like(kc)
    q = torch.randn(S, hq, d, device="cuda", dtype=dtype, generator=g)
    sl = torch.tensor(lens, dtype=torch.int32, device="cuda")
    return q, kc, vc, bt, sl


def decode_attention(label, S, hq, hk, d, lens, block_size=16, sweep=(1, 2, 4, 8), baselines=True, fp8=False):
    """Variants 2 (slot kernel) and 3 (slot kernel + prefetch) and auto; fp8: the e4m3 cache."""
    q, kc, vc, bt, sl = paged_case(S, hq, hk, d, block_size, lens)
    if fp8:
        kc, vc = ops.quantize_kv(kc, ops.FP8_KV_DTYPE), ops.quantize_kv(vc, ops.FP8_KV_DTYPE)
    scale = d ** -0.5
    kv_bytes = sum(lens) * hk * d * 2 * kc.element_size()
    io = 2 * q.numel() * q.element_size()
    group = f"decode {label}" + (" fp8 KV" if fp8 else "")
    k = kernels.get()
    ref = ops.paged_decode_attention_ref(q, kc, vc, bt, sl, scale)
    for variant in (0, 2, 3):
        out = k.paged_decode_attention(q, kc, vc, bt, sl, scale, max(lens), 0, variant)
        err = float((out.double() - ref.double()).norm() / ref.double().norm())
        tag = "auto" if variant == 0 else f"v{variant}"
        row(group, f"csrc {tag} (bs={block_size})",
            timeit(lambda: k.paged_decode_attention(q, kc, vc, bt, sl, scale, max(lens), 0, variant)),
            kv_bytes + io, rel_err=f"{err:.1e}")
        for ns in sweep if variant else ():
            row(group, f"csrc v{variant} splits={ns}",
                timeit(lambda: k.paged_decode_attention(q, kc, vc, bt, sl, scale, -1, ns, variant)), kv_bytes + io)
    if not baselines or fp8:
        return
    row(group, "torch reference (per-seq loop)",
        timeit(lambda: ops.paged_decode_attention_ref(q, kc, vc, bt, sl, scale), min_ms=20, max_reps=5), kv_bytes + io)
    # dense SDPA over pre-gathered, padded K/V (the gather is not timed: a lower bound for SDPA)
    L = max(lens)
    idx = torch.arange(L, device="cuda")
    slots = (bt.long()[:, (idx // block_size).clamp_max(bt.shape[1] - 1)] * block_size + idx % block_size)  # [S, L]
    kd = kc.view(-1, hk, d)[slots].repeat_interleave(hq // hk, 2).transpose(1, 2)   # [S, Hq, L, D]
    vd = vc.view(-1, hk, d)[slots].repeat_interleave(hq // hk, 2).transpose(1, 2)
    mask = (idx[None, :] < sl[:, None])[:, None, None, :]
    qd = q[:, :, None, :]
    row(group, "torch SDPA dense padded (no gather)",
        timeit(lambda: F.scaled_dot_product_attention(qd, kd, vd, attn_mask=mask, scale=scale)), kv_bytes + io)
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
    row(group, "torch varlen_attn (FA2) packed KV",
        timeit(lambda: impl(q, kp, vp, cu_q, cu_k, 1, max(lens), scale)), kv_bytes + io, rel_err=f"{err:.1e}")


def small_ops():
    k = kernels.get()
    dt = torch.bfloat16
    hk, d = 32, 128
    for T in (64, 16384):
        key = torch.randn(T, hk, d, device="cuda", dtype=dt)
        val = torch.randn_like(key)
        nb = T // 16 + 1
        kc = torch.empty(nb, 16, hk, d, device="cuda", dtype=dt)
        vc = torch.empty_like(kc)
        slots = torch.randperm(nb * 16, device="cuda")[:T]
        nbytes = 2 * 2 * key.numel() * 2
        row("reshape_and_cache", f"csrc T={T}", timeit(lambda: k.reshape_and_cache(key, val, kc, vc, slots)), nbytes)
        row("reshape_and_cache", f"torch ref T={T}",
            timeit(lambda: ops.reshape_and_cache_ref(key, val, kc, vc, slots)), nbytes)
    H = 4096
    w = torch.randn(H, device="cuda", dtype=dt)
    for T in (64, 8192):
        x = torch.randn(T, H, device="cuda", dtype=dt)
        r = torch.randn_like(x)
        nb = x.numel() * 2
        row("rms_norm", f"csrc T={T}", timeit(lambda: k.rms_norm(x, w, 1e-6)), 2 * nb)
        row("rms_norm", f"torch ref T={T}", timeit(lambda: ops.rms_norm_ref(x, w, 1e-6)), 2 * nb)
        row("fused_add_rms_norm", f"csrc T={T}", timeit(lambda: k.fused_add_rms_norm(x, r, w, 1e-6)), 4 * nb)
        row("fused_add_rms_norm", f"torch ref T={T}", timeit(lambda: ops.fused_add_rms_norm_ref(x, r, w, 1e-6)),
            4 * nb)
    T, hq = 8192, 32
    cache = ops.build_cos_sin_cache(d, 4096, 1e4, device="cuda")
    pos = torch.randint(0, 4096, (T,), device="cuda")
    q = torch.randn(T, hq * d, device="cuda", dtype=dt)
    kk = torch.randn(T, hk * d, device="cuda", dtype=dt)
    nb = 2 * (q.numel() + kk.numel()) * 2
    row("rotary_embedding", f"csrc T={T}", timeit(lambda: k.rotary_embedding(pos, q, kk, d, cache, True)), nb)
    row("rotary_embedding", f"torch ref T={T}",
        timeit(lambda: ops.rotary_embedding_ref(pos, q, kk, d, cache, True)), nb)
    inter = 11008
    x = torch.randn(T, 2 * inter, device="cuda", dtype=dt)
    nb = x.numel() * 2 * 3 // 2
    row("silu_and_mul", f"csrc T={T} I={inter}", timeit(lambda: k.silu_and_mul(x)), nb)
    row("silu_and_mul", f"torch ref T={T} I={inter}", timeit(lambda: ops.silu_and_mul_ref(x)), nb)


def prefill_attention():
    from modelyard.engine.attention.flash import probe_varlen
    impls = probe_varlen()[0]
    S, L, h, d = 8, 650, 32, 128
    q = torch.randn(S * L, h, d, device="cuda", dtype=torch.bfloat16)
    kk, vv = torch.randn_like(q), torch.randn_like(q)
    cu = torch.arange(0, S * L + 1, L, dtype=torch.int32, device="cuda")
    flops = 4 * S * L * L * h * d / 2  # causal
    for impl in impls:
        ms = timeit(lambda: impl(q, kk, vv, cu, cu, L, L, d ** -0.5))
        row("prefill 8x650 H32 D128", f"varlen {impl.name}", ms, None, tflops=f"{flops / ms / 1e9:.0f}")
    qb, kb, vb = (t.view(S, L, h, d).transpose(1, 2) for t in (q, kk, vv))
    ms = timeit(lambda: F.scaled_dot_product_attention(qb, kb, vb, is_causal=True))
    row("prefill 8x650 H32 D128", "torch SDPA batched causal", ms, None, tflops=f"{flops / ms / 1e9:.0f}")

    def per_seq():  # what a ragged batch costs through plain SDPA: one call per sequence
        for i in range(S):
            F.scaled_dot_product_attention(qb[i:i + 1], kb[i:i + 1], vb[i:i + 1], is_causal=True)
    ms = timeit(per_seq)
    row("prefill 8x650 H32 D128", "torch SDPA per-sequence loop", ms, None, tflops=f"{flops / ms / 1e9:.0f}")


def gemms():
    """The LLaVA-7B decoder projections: bf16 matmul against the fp8 path (csrc per-token quantizer +
    torch._scaled_mm row-wise), at a prefill step (16k tokens) and decode batches 64 and 256."""
    from modelyard.engine.quant import fp8_linear
    k = kernels.get()
    for K, N, name in ((4096, 12288, "qkv"), (4096, 4096, "o"), (4096, 22016, "gate_up"), (11008, 4096, "down")):
        w = (torch.randn(N, K, device="cuda") * K ** -0.5).to(torch.bfloat16)
        wq, ws = k.per_token_quant_fp8(w)
        ws = ws.view(1, -1)
        for M in (64, 256, 16384):
            x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
            flops = 2 * M * N * K
            ms = timeit(lambda: x @ w.t())
            row(f"gemm {name} {K}->{N}", f"bf16 M={M}", ms, 2 * (N * K + M * K + M * N),
                tflops=f"{flops / ms / 1e9:.0f}")
            ms = timeit(lambda: fp8_linear(x, wq, ws, None, torch.bfloat16))
            row(f"gemm {name} {K}->{N}", f"fp8 quant+scaled_mm M={M}", ms, N * K + 3 * M * K + 2 * M * N,
                tflops=f"{flops / ms / 1e9:.0f}")
            xq, xs = k.per_token_quant_fp8(x)
            ms = timeit(lambda: torch._scaled_mm(xq, wq.t(), scale_a=xs, scale_b=ws, out_dtype=torch.bfloat16))
            row(f"gemm {name} {K}->{N}", f"fp8 scaled_mm only M={M}", ms, N * K + M * K + 2 * M * N,
                tflops=f"{flops / ms / 1e9:.0f}")
            if M == 16384:
                row(f"gemm {name} {K}->{N}", f"per_token_quant_fp8 M={M}", timeit(lambda: k.per_token_quant_fp8(x)),
                    3 * M * K)


def _wide_best(k, x, ws, copies: int, top: int = 16) -> tuple[float, list[int], int]:
    """The fastest of cuBLASLt's wide candidate list (lt_gemm_algos(wide=True): the heuristic's list
    and its neighbours in split-k, tile and stages): every candidate screened by its GPU time (calls
    queued behind a sleep, so launch overhead stays hidden), the `top` best re-timed as CUDA graphs."""
    from modelyard.engine.gemm import _graph_us
    algos, info = k.lt_gemm_algos(x, ws[0], None, None, None, torch.bfloat16, 4096, True)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    screened = []
    for i, a in enumerate(algos.clone()):
        for timed in (False, True):                 # a warm-up pass first (lazy initialisation)
            torch.cuda._sleep(400_000)
            start.record()
            for w in ws:
                k.lt_gemm(x, w, None, None, None, torch.bfloat16, a)
            end.record()
        end.synchronize()
        screened.append((start.elapsed_time(end), i))
    best = min((_graph_us(lambda a=algos[i].clone(): [k.lt_gemm(x, w, None, None, None, torch.bfloat16, a)
                                                      for w in ws], copies), i) for _, i in sorted(screened)[:top])
    return best[0], info[best[1]].tolist(), algos.shape[0]


def decode_gemms() -> None:
    """Decode-step GEMMs at M = 1..256: F.linear (cuBLAS's default) against every cuBLASLt
    heuristic candidate (csrc lt_gemm), the best of the wide candidate list (_wide_best) and, at
    M <= 64, every skinny_gemm (config, split_k), each timed as
    engine/gemm.py tunes them (several weight copies in turn, so L2 holds none, replayed as a CUDA
    graph); and the row-scaled e4m3 GEMM both ways."""
    from modelyard.engine.gemm import _graph_us
    k = kernels.get()
    skinny = k.skinny_gemm_configs().tolist()
    for K, N, name in ((4096, 12288, "qkv"), (4096, 4096, "o"), (4096, 22016, "gate_up"), (11008, 4096, "down"),
                       (4096, 32064, "lm_head")):
        copies = max(4, int(1.5e9 // (N * K * 2)))
        ws = [(torch.randn(N, K, device="cuda") * K ** -0.5).to(torch.bfloat16) for _ in range(copies)]
        wq = [(q, s.view(-1)) for q, s in (k.per_token_quant_fp8(w) for w in ws)]
        for M in (1, 16, 32, 64, 128, 256):
            x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
            us = _graph_us(lambda: [F.linear(x, w) for w in ws], copies)
            row(f"decode gemm {name} {K}->{N}", f"bf16 F.linear M={M}", us / 1e3, N * K * 2)
            algos, info = k.lt_gemm_algos(x, ws[0], None, None, None, torch.bfloat16, 8)
            best = min((_graph_us(lambda a=a: [k.lt_gemm(x, w, None, None, None, torch.bfloat16, a) for w in ws],
                                  copies), i) for i, a in enumerate(algos.clone()))
            row(f"decode gemm {name} {K}->{N}", f"bf16 best of {algos.shape[0]} cuBLASLt M={M}", best[0] / 1e3,
                N * K * 2, algo=info[best[1]].tolist())
            us, algo, listed = _wide_best(k, x, ws, copies)
            row(f"decode gemm {name} {K}->{N}", f"bf16 best of {listed} wide cuBLASLt M={M}", us / 1e3, N * K * 2,
                algo=algo)
            for kind, label in ((0, "skinny_gemm mma.sync"), (1, "skinny_gemm TMA"), (2, "skinny_gemm TMA pair"),
                                (3, "skinny_gemm TMA x-shared")):
                runs = [(_graph_us(lambda c=c, s=s: [k.skinny_gemm(x, w, None, c, s) for w in ws], copies), c, bn, s)
                        for c, (bn, _, max_m, max_split, kd, _) in enumerate(skinny) if kd == kind and M <= max_m
                        for s in range(1, max_split + 1)]
                if runs:
                    us, c, bn, s = min(runs)
                    row(f"decode gemm {name} {K}->{N}", f"bf16 best of {len(runs)} {label} M={M}", us / 1e3,
                        N * K * 2, config=f"block_n={bn} split_k={s}")
            xq, xs = k.per_token_quant_fp8(x)
            us = _graph_us(lambda: [torch._scaled_mm(xq, q.t(), scale_a=xs, scale_b=s.view(1, -1),
                                                     out_dtype=torch.bfloat16) for q, s in wq], copies)
            row(f"decode gemm {name} {K}->{N}", f"fp8 _scaled_mm M={M}", us / 1e3, N * K)
            algos, _ = k.lt_gemm_algos(xq, wq[0][0], None, xs.view(-1), wq[0][1], torch.bfloat16, 8)
            best = min(_graph_us(lambda a=a: [k.lt_gemm(xq, q, None, xs.view(-1), s, torch.bfloat16, a) for q, s in wq],
                                 copies) for a in algos.clone())
            row(f"decode gemm {name} {K}->{N}", f"fp8 best of {algos.shape[0]} cuBLASLt M={M}", best / 1e3, N * K)
        del ws, wq
        torch.cuda.empty_cache()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default=None)
    ap.add_argument("--decode-only", action="store_true", help="only the decode attention cases")
    ap.add_argument("--gemm-only", action="store_true", help="only the bf16 / fp8 projection GEMMs")
    ap.add_argument("--decode-gemms", action="store_true",
                    help="only the decode-step GEMMs: F.linear / _scaled_mm against cuBLASLt's and skinny_gemm's candidates")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    props = torch.cuda.get_device_properties(0)
    env = dict(device=props.name, sms=props.multi_processor_count, torch=torch.__version__, cuda=torch.version.cuda)
    print(json.dumps(env), flush=True)
    kernels.get()
    copy = copy_bandwidth()
    if args.decode_gemms:
        decode_gemms()
    elif args.gemm_only:
        gemms()
    else:
        attention_and_small_ops(args.decode_only)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(env=env, copy_gb_s=copy, rows=ROWS), f, indent=1)
    return 0


def attention_and_small_ops(quick: bool) -> None:
    gen = torch.Generator().manual_seed(0)
    lens650 = torch.randint(600, 701, (64,), generator=gen).tolist()
    lens256 = torch.randint(600, 701, (256,), generator=gen).tolist()
    decode_attention("LLaVA-7B S64 H32/32 D128 ~650", 64, 32, 32, 128, lens650, baselines=not quick,
                     sweep=() if quick else (1, 2, 4, 8))
    decode_attention("LLaVA-7B S256 H32/32 D128 ~650", 256, 32, 32, 128, lens256, sweep=(), baselines=False)
    decode_attention("LLaVA-7B S64 H32/32 D128 ctx 32", 64, 32, 32, 128, [32] * 64, sweep=(), baselines=False)
    decode_attention("Qwen2-VL-7B S64 H28/4 D128 ~650", 64, 28, 4, 128, lens650, baselines=not quick,
                     sweep=() if quick else (1, 2, 4, 8))
    decode_attention("S8 H32/8 D128 ctx 8192", 8, 32, 8, 128, [8192] * 8, sweep=(1, 4, 8, 16), baselines=not quick)
    decode_attention("S1 H32/32 D128 ctx 650", 1, 32, 32, 128, [650], sweep=(1, 4, 8), baselines=False)
    for label, S, hq, hk, lens in (("LLaVA-7B S64 H32/32 D128 ~650", 64, 32, 32, lens650),
                                   ("LLaVA-7B S256 H32/32 D128 ~650", 256, 32, 32, lens256),
                                   ("Qwen2-VL-7B S64 H28/4 D128 ~650", 64, 28, 4, lens650),
                                   ("S8 H32/8 D128 ctx 8192", 8, 32, 8, [8192] * 8)):
        decode_attention(label, S, hq, hk, 128, lens, sweep=(), baselines=False, fp8=True)
    if not quick:
        small_ops()
        prefill_attention()


if __name__ == "__main__":
    raise SystemExit(main())
