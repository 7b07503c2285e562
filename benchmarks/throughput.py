"""Throughput, side by side on one GPU: transformers generate (batch 64, left padding, sdpa) vs the
modelyard engine, same random-weight checkpoint, same images (336x336 by default), same prompt,
64 new tokens with ignore_eos. Prints images/s, output tokens/s, the ratio, peak VRAM, the compute
floor (FLOPs per image over a measured bf16 matmul rate), greedy agreement, and the decode-step time
against the weights-read floor.

The engine runs with BENCH_ENGINE (a 256-sequence batch, 16k-token prefill steps) unless --engine
overrides it; if the engine fails to build or run, the next configuration in the fallback chain
(eager, then the sdpa reference) is measured and the failure is recorded in the JSON. The JSON is
rewritten after every phase, so a run cut short still leaves what it measured.

  python benchmarks/throughput.py --arch llava --size llava-1.5-7b --images 512 --out /tmp/bench
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import time
import traceback
from pathlib import Path

import torch

# Continuous batching lets the engine decode far more than transformers' static batch of 64: weight
# reads are shared by more sequences. 16k-token prefill steps keep the GEMMs large.
BENCH_ENGINE = {"max_batch_size": 256, "max_prefill_tokens": 16384}
_T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - _T0:7.1f}s] {msg}", flush=True)


def environment() -> dict:
    """The device and the software versions every results table names."""
    import transformers

    return {
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }


def bench_checkpoint(ckpt_dir, arch: str, size: str) -> Path:
    """The random-weight checkpoint the benchmarks share, <ckpt_dir>/<arch>-<size>, made on first use."""
    from modelyard import testing

    path = Path(ckpt_dir) / f"{arch}-{size}"
    if not (path / "config.json").exists():
        log(f"making checkpoint {path}")
        testing.make_checkpoint(arch, path, size=size)
    return path


def gpu_ms(fn, *args, reps: int, warmup: int = 3) -> float:
    """Milliseconds per call of fn(*args), timed with CUDA events over `reps` calls after `warmup`."""
    for _ in range(warmup):
        fn(*args)
    torch.cuda.synchronize()
    ev0, ev1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    ev0.record()
    for _ in range(reps):
        fn(*args)
    ev1.record()
    torch.cuda.synchronize()
    return ev0.elapsed_time(ev1) / reps


def measure_ceilings() -> dict:
    """bf16 matmul TFLOP/s and copy GB/s (read + write) as measured here: the floors' denominators."""
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    tflops = 2 * 8192**3 / (gpu_ms(torch.matmul, a, b, reps=10) / 1e3) / 1e12
    x = torch.randn(2 * 1024**3 // 2, device="cuda", dtype=torch.bfloat16)  # 2 GiB
    y = torch.empty_like(x)
    gbps = 2 * x.numel() * 2 / (gpu_ms(y.copy_, x, reps=5, warmup=1) / 1e3) / 1e9
    del a, b, x, y
    torch.cuda.empty_cache()
    return {"bf16_matmul_tflops": tflops, "copy_gbps": gbps}


def flops_per_image(cfg, n_prompt_tokens: int, n_new: int) -> float:
    """2 * params * tokens for the linear layers + attention score/value products (causal)."""
    v, t = cfg.vision_config, cfg.text_config
    n_patch = (v.image_size // v.patch_size) ** 2 + 1
    vis_params = v.num_hidden_layers * (4 * v.hidden_size**2 + 2 * v.hidden_size * v.intermediate_size)
    vis = 2 * vis_params * n_patch + v.num_hidden_layers * 4 * n_patch**2 * v.hidden_size
    proj = 2 * n_patch * (v.hidden_size * t.hidden_size + t.hidden_size**2)
    hd = t.hidden_size // t.num_attention_heads
    kvd = t.num_key_value_heads * hd
    layer = 2 * t.hidden_size * t.hidden_size + 2 * t.hidden_size * kvd + 3 * t.hidden_size * t.intermediate_size
    dec_params = t.num_hidden_layers * layer + t.hidden_size * t.vocab_size
    tokens = n_prompt_tokens + n_new
    dec = 2 * dec_params * tokens
    attn = t.num_hidden_layers * 4 * t.hidden_size * tokens * tokens / 2
    return vis + proj + dec + attn


def agreement(a: list[list[int]], b: list[list[int]]) -> float:
    """Mean over sequences of the fraction of tokens identical up to the first divergence."""
    fr = [
        next((i for i, (p, q) in enumerate(zip(x, y)) if p != q), min(len(x), len(y))) / max(1, len(x))
        for x, y in zip(a, b)
    ]
    return sum(fr) / max(1, len(fr))


def run_transformers(path, images, prompt, n_new, batch):
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    proc = AutoProcessor.from_pretrained(path)
    proc.tokenizer.padding_side = "left"
    model = (
        AutoModelForImageTextToText.from_pretrained(path, dtype=torch.bfloat16, attn_implementation="sdpa")
        .cuda()
        .eval()
    )
    conv = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
    text = proc.apply_chat_template(conv, add_generation_prompt=True)

    def gen(chunk):
        pil = [Image.open(p).convert("RGB") for p in chunk]
        inp = proc(images=pil, text=[text] * len(chunk), return_tensors="pt", padding=True).to("cuda")
        inp["pixel_values"] = inp["pixel_values"].to(torch.bfloat16)
        with torch.inference_mode():
            out = model.generate(
                **inp,
                max_new_tokens=n_new,
                min_new_tokens=n_new,
                do_sample=False,
                pad_token_id=proc.tokenizer.pad_token_id,
            )
        return out[:, inp["input_ids"].shape[1] :].tolist(), int(inp["input_ids"].shape[1])

    gen(images[:batch])  # warm-up
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    toks, plen = [], 0
    for i in range(0, len(images), batch):
        t, plen = gen(images[i : i + batch])
        toks += t
    torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated()
    # The noise floor of greedy agreement in bf16: transformers against itself, batch 16 vs batch 64
    # on the first 64 images (different batch shapes round differently).
    small = []
    for i in range(0, min(64, len(images)), 16):
        small += gen(images[i : i + 16])[0]
    self_agreement = agreement(toks[: len(small)], small)
    model = None  # freed before the engine loads; `del` would confuse the closure above for linters
    gc.collect()
    torch.cuda.empty_cache()
    return {
        "seconds": dt,
        "images_per_s": len(images) / dt,
        "tokens_per_s": len(images) * n_new / dt,
        "peak_vram_gib": peak / 2**30,
        "prompt_tokens": plen,
        "self_agreement_batch16_vs_64": self_agreement,
        "self_agreement_images": len(small),
    }, toks


def decode_weight_bytes(model) -> int:
    """Bytes one decode step must read: every decoder weight and the LM head (the embedding table
    is gathered, not read, unless it is the tied LM head)."""
    lm = model.language_model
    # fp8 layers (quantization="fp8") hold their weights and scales as buffers; the rope table is not read
    tensors = [*lm.named_parameters(), *((n, b) for n, b in lm.named_buffers() if n != "cos_sin_cache")]
    n = sum(t.numel() * t.element_size() for name, t in tensors if not name.startswith("embed_tokens"))
    head = lm.embed_tokens.weight if model.lm_head is None else model.lm_head.weight
    return n + head.numel() * head.element_size()


def decode_step_input(eng, batch: int, context: int):
    """A decode step of `batch` made-up sequences at `context` tokens over the first blocks of the
    (idle) pool, or None when the pool is too small or the engine is busy (its blocks are in use)."""
    from modelyard.engine.scheduler import ScheduledSeq, SchedulerOutput

    nblk = -(-context // eng.kv_cache.spec.block_size)
    if batch * nblk > eng.kv_cache.num_blocks or eng.scheduler.has_unfinished():
        return None
    spans = tuple(
        ScheduledSeq(
            seq_id=10**9 + i,
            token_ids=(1 + i,),
            start_pos=context - 1,
            num_prompt_tokens=1,
            block_table=tuple(range(i * nblk, (i + 1) * nblk)),
            sample=True,
        )
        for i in range(batch)
    )
    return SchedulerOutput(is_prefill=False, seqs=spans)


def decode_step_bench(eng, batch: int, context: int, copy_gbps: float, iters: int = 30) -> dict:
    """One decode step of `batch` sequences at `context` tokens: the graph replay alone (CUDA
    events) and the runner's whole step (host packing, copies, replay, sampling sync; wall clock),
    against the bytes-read floors."""
    from modelyard.engine.cuda_graphs import pick_bucket

    spec = eng.kv_cache.spec
    out = decode_step_input(eng, batch, context)
    if out is None:
        return {"batch": batch, "context": context, "skipped": "pool too small or engine busy"}
    runner = eng.runner
    for _ in range(3):
        runner.execute(out)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        runner.execute(out)
    step_ms = (time.perf_counter() - t0) / iters * 1e3
    res = {"batch": batch, "context": context, "full_step_ms": step_ms}
    if runner.graphs is not None:
        b = pick_bucket(batch, runner.graphs.sizes)
        res.update(graph_bucket=b, graph_replay_ms=gpu_ms(runner.graphs.replay, b, reps=iters, warmup=0))
    itemsize = torch.empty((), dtype=spec.dtype).element_size()
    kv = batch * context * 2 * spec.num_layers * spec.num_kv_heads * spec.head_dim * itemsize
    w = decode_weight_bytes(eng.model)
    w_ms, wkv_ms = w / copy_gbps / 1e6, (w + kv) / copy_gbps / 1e6
    t = res.get("graph_replay_ms", step_ms)
    res.update(
        weight_bytes=w,
        kv_bytes=kv,
        weights_floor_ms=w_ms,
        weights_kv_floor_ms=wkv_ms,
        vs_weights_floor=t / w_ms,
        vs_weights_kv_floor=t / wkv_ms,
    )
    return res


def profile_table(fn, path: Path, title: str) -> None:
    """Append the CUDA kernel table of fn() (torch profiler, sorted by total time) to `path`, after
    one unprofiled call (lazy initialisation, allocator growth)."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(f"== {title} ==\n{prof.key_averages().table(sort_by='cuda_time_total', row_limit=30)}\n")


def profile_decode_step(eng, batch: int, context: int, path: Path) -> None:
    """Kernel times of 3 eager decode steps (graphs set aside; kernels run the same inside one)."""
    out = decode_step_input(eng, batch, context)
    if out is None:
        return
    runner, graphs = eng.runner, eng.runner.graphs
    runner.graphs = None
    try:
        profile_table(
            lambda: [runner.execute(out) for _ in range(3)],
            path,
            f"eager decode step, batch {batch}, context {context}, 3 steps",
        )
    finally:
        runner.graphs = graphs


def run_modelyard(path, images, prompt, n_new, engine_kw, copy_gbps, profile_dir=None):
    from modelyard.engine import Engine, EngineConfig, Request, SamplingParams

    t0 = time.perf_counter()
    eng = Engine.from_pretrained(path, EngineConfig(**engine_kw))
    try:
        load_s = time.perf_counter() - t0
        log(
            f"engine loaded in {load_s:.1f}s: "
            + json.dumps({k: v for k, v in eng.stats().items() if isinstance(v, str)})
        )

        def requests(paths, new_tokens=n_new):
            sp = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
            return [Request(image=str(p), prompt=prompt, sampling=sp) for p in paths]

        eng.generate(requests(images[:64]))  # warm-up
        torch.cuda.synchronize()
        warm = eng.stats()
        torch.cuda.reset_peak_memory_stats()
        log("engine warm; timed run")
        t0 = time.perf_counter()
        outs = eng.generate(requests(images))
        torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        errors = [o.error for o in outs if o.finish_reason == "error"]
        stats = eng.stats()
        for k in (
            "prefill_steps",
            "prefill_seconds",
            "prefill_tokens",
            "decode_steps",
            "decode_seconds",
            "decode_tokens",
            "preemptions",
        ):
            stats[k] -= warm[k]  # the timed run alone
        res = {
            "config": engine_kw,
            "seconds": dt,
            "images_per_s": len(images) / dt,
            "tokens_per_s": len(images) * n_new / dt,
            "peak_vram_gib": torch.cuda.max_memory_allocated() / 2**30,
            "load_seconds": load_s,
            "errors": len(errors),
            "first_error": errors[0] if errors else None,
            "prompt_tokens": outs[0].num_prompt_tokens,
            "stats": {k: v for k, v in stats.items() if isinstance(v, (int, float, str))},
        }
        log("modelyard " + json.dumps(res))
        res["decode_step"] = []
        for batch, ctx in ((64, 32), (64, res["prompt_tokens"] + n_new // 2), (256, res["prompt_tokens"] + n_new // 2)):
            try:
                res["decode_step"].append(decode_step_bench(eng, batch, ctx, copy_gbps))
            except Exception as e:  # a broken microbenchmark must not lose the throughput numbers
                res["decode_step"].append({"batch": batch, "context": ctx, "error": f"{type(e).__name__}: {e}"})
            log("decode step " + json.dumps(res["decode_step"][-1]))
        profiles = (
            []
            if profile_dir is None
            else [
                # 64 prompts (~2.5 16k-token prefill steps) + 1 token each, through generate() and its threads
                lambda: profile_table(
                    lambda: eng.generate(requests(images[:64], 1)),
                    Path(profile_dir, "profile-prefill.txt"),
                    "prefill of 64 images + 1 token",
                ),
                *(
                    lambda c=c: profile_decode_step(eng, 64, c, Path(profile_dir, "profile-decode.txt"))
                    for c in (32, res["prompt_tokens"] + n_new // 2)
                ),
            ]
        )
        for profile_one in profiles:
            try:
                profile_one()
            except Exception as e:
                log(f"profile failed: {type(e).__name__}: {e}")
        return res, [o.token_ids for o in outs]
    finally:
        eng.close()
        gc.collect()
        torch.cuda.empty_cache()


def run_modelyard_with_fallbacks(path, images, prompt, n_new, engine_kw, copy_gbps, profile_dir=None):
    """The requested configuration, else eager, else the sdpa reference; every failure recorded."""
    chain = [engine_kw]
    if not engine_kw.get("enforce_eager"):
        chain.append({**engine_kw, "enforce_eager": True})
    if engine_kw.get("attention_backend") != "sdpa":
        chain.append({**engine_kw, "enforce_eager": True, "attention_backend": "sdpa"})
    failures = []
    for kw in chain:
        try:
            res, toks = run_modelyard(path, images, prompt, n_new, kw, copy_gbps, profile_dir)
            res["failed_configs"] = failures
            return res, toks
        except Exception as e:
            tb = traceback.format_exc()
            log(f"engine config {kw} failed:\n{tb}")
            failures.append({"config": kw, "error": f"{type(e).__name__}: {e}", "traceback": tb[-4000:]})
            gc.collect()
            torch.cuda.empty_cache()
    return {"failed_configs": failures, "images_per_s": float("nan")}, None


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="llava")
    ap.add_argument("--size", default="llava-1.5-7b")
    ap.add_argument("--images", type=int, default=512)
    ap.add_argument("--image-size", type=int, default=336)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--hf-batch", type=int, default=64)
    ap.add_argument("--prompt", default="Describe this image in detail, listing objects and colors.")
    ap.add_argument("--ckpt-dir", default="/tmp/modelyard-bench")
    ap.add_argument("--out", default=None)
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument(
        "--engine",
        default="{}",
        help="EngineConfig options as JSON, over BENCH_ENGINE; a JSON list runs each in turn "
        '(the first is the headline, e.g. \'[{}, {"kv_cache_dtype": "fp8"}]\')',
    )
    ap.add_argument(
        "--profile", action="store_true", help="write kernel tables of a prefill and of eager decode steps to --out"
    )
    args = ap.parse_args(argv)

    import transformers

    from modelyard import testing

    root = Path(args.ckpt_dir)
    t0 = time.perf_counter()
    path = bench_checkpoint(root, args.arch, args.size)
    make_s = time.perf_counter() - t0
    log(f"checkpoint ready ({make_s:.1f}s); images")
    images = testing.make_images(
        root / f"images-{args.image_size}", args.images, seed=0, size=(args.image_size, args.image_size)
    )
    info = {
        **environment(),
        "arch": args.arch,
        "size": args.size,
        "images": args.images,
        "new_tokens": args.new_tokens,
        "checkpoint_make_seconds": make_s,
    }
    info.update(measure_ceilings())
    log(json.dumps(info))

    results = {"info": info}
    out_path = Path(args.out, f"throughput-{args.arch}-{args.size}.json") if args.out else None

    def save():
        if out_path is not None:
            out_path.parent.mkdir(parents=True, exist_ok=True)
            out_path.write_text(json.dumps(results, indent=2, default=str))

    overrides = json.loads(args.engine)
    runs = []
    for override in overrides if isinstance(overrides, list) else [overrides]:
        engine_kw = {**BENCH_ENGINE, **override}
        res, toks = run_modelyard_with_fallbacks(
            path, images, args.prompt, args.new_tokens, engine_kw, info["copy_gbps"], args.out if args.profile else None
        )
        runs.append((res, toks))
        results.setdefault("modelyard_runs", []).append(res)
        save()
    results["modelyard"] = ours = runs[0][0]
    if not args.skip_hf:
        log("transformers run")
        hf, hf_toks = run_transformers(path, images, args.prompt, args.new_tokens, args.hf_batch)
        results["transformers"] = hf
        for res, toks in runs:
            res["ratio"] = res["images_per_s"] / hf["images_per_s"]
            if toks is not None:
                res["greedy_agreement"] = agreement(hf_toks, toks)
                res["exact_match_sequences"] = sum(a == b for a, b in zip(hf_toks, toks)) / len(hf_toks)
        results.update({k: ours[k] for k in ("ratio", "greedy_agreement", "exact_match_sequences") if k in ours})
        log("transformers " + json.dumps(hf))
        save()
    cfg = transformers.AutoConfig.from_pretrained(path)
    fpi = flops_per_image(
        cfg, ours.get("prompt_tokens") or results.get("transformers", {}).get("prompt_tokens", 600), args.new_tokens
    )
    results["flops_per_image"] = fpi
    results["compute_floor_images_per_s"] = info["bf16_matmul_tflops"] * 1e12 / fpi
    print("\n| engine | images/s | out tok/s | peak VRAM GiB |")
    print("|---|---|---|---|")
    for k, r in ((k, results.get(k, {})) for k in ("transformers", "modelyard")):
        if "seconds" in r:
            print(f"| {k} | {r['images_per_s']:.1f} | {r['tokens_per_s']:.0f} | {r['peak_vram_gib']:.1f} |")
    print(
        f"ratio {results.get('ratio', float('nan')):.2f}x; "
        f"agreement {results.get('greedy_agreement', float('nan')):.3f}; "
        f"compute floor {results['compute_floor_images_per_s']:.1f} images/s "
        f"({fpi / 1e12:.2f} TFLOP/image at {info['bf16_matmul_tflops']:.0f} TFLOP/s)"
    )
    if "transformers" in results:
        print(
            f"transformers self-agreement (batch 16 vs 64, {results['transformers']['self_agreement_images']} images): "
            f"{results['transformers']['self_agreement_batch16_vs_64']:.3f}"
        )
    for r in results["modelyard_runs"]:
        print(
            f"config {json.dumps(r.get('config'))}: {r['images_per_s']:.1f} images/s, ratio "
            f"{r.get('ratio', float('nan')):.2f}x, agreement {r.get('greedy_agreement', float('nan')):.3f}"
        )
        for d in r.get("decode_step", []):
            if "graph_replay_ms" in d or "full_step_ms" in d:
                print(
                    f"  decode step batch {d['batch']} ctx {d['context']}: "
                    f"graph {d.get('graph_replay_ms', float('nan')):.2f} ms, "
                    f"full {d['full_step_ms']:.2f} ms; floors weights {d['weights_floor_ms']:.2f} ms "
                    f"(x{d['vs_weights_floor']:.2f}), "
                    f"weights+KV {d['weights_kv_floor_ms']:.2f} ms (x{d['vs_weights_kv_floor']:.2f})"
                )
    save()
    return results


if __name__ == "__main__":
    main()
