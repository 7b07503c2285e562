"""Spawn -> caption -> unload, again and again: after every unload the GPU is back to its baseline.

Each cycle creates a model actor (ModelHandle.spawn: process start, weights, KV pool), captions
the images through it, and unloads it (ray.kill, then NVML until the process is gone and the
device's used memory is back to the pre-spawn baseline). For contrast, the same model is then run
in a plain process and released the usual in-process way (close + del + gc.collect +
torch.cuda.empty_cache); what that process still holds on the device is measured while it lives.

  python benchmarks/actor_cycles.py --arch llava --size llava-1.5-7b --cycles 20 --images 64 --out /tmp/cycles
  python benchmarks/actor_cycles.py --size tiny --cycles 2 --images 4 --out /tmp/cycles-cpu   # CPU smoke

The driver never touches CUDA (checkpoint writing and the in-process contrast run in child
processes), so the only GPU memory that comes and goes is the actors'.
Writes <out>/actor_cycles.json and <out>/actor_cycles.md, and prints the markdown.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

MIB = 1 << 20


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="llava")
    ap.add_argument("--size", default="llava-1.5-7b")
    ap.add_argument("--cycles", type=int, default=20)
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--out", required=True)
    ap.add_argument("--ckpt", help="existing checkpoint dir (default: <out>/ckpt-<arch>-<size>, written if missing)")
    ap.add_argument("--backend", default="native", choices=["native", "transformers"])
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--num-gpus", type=float, default=None, help="default: 1 if Ray sees a GPU, else 0")
    ap.add_argument("--cache-max-entry-count", type=float, default=None)
    ap.add_argument("--unload-timeout", type=float, default=120.0)
    ap.add_argument(
        "--via",
        default="handle",
        choices=["handle", "pipeline"],
        help="drive each cycle through ModelHandle or a `with modelyard.pipeline()` block",
    )
    ap.add_argument("--no-inprocess", action="store_true", help="skip the in-process release contrast")
    ap.add_argument("--inprocess-child", action="store_true", help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def engine_options(args) -> dict:
    opts = {"backend": args.backend}
    if args.cache_max_entry_count is not None:
        opts["cache_max_entry_count"] = args.cache_max_entry_count
    return opts


def ensure_checkpoint(args, out: Path) -> Path:
    ckpt = Path(args.ckpt) if args.ckpt else out / f"ckpt-{args.arch}-{args.size}"
    if not (ckpt / "config.json").exists():
        dtype = None if args.size == "tiny" else "bfloat16"
        code = (
            "import sys; from modelyard.testing import make_checkpoint; "
            "make_checkpoint(sys.argv[1], sys.argv[2], size=sys.argv[3], dtype=sys.argv[4] or None)"
        )
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", code, args.arch, str(ckpt), args.size, dtype or ""], check=True)
        print(f"wrote {args.size} checkpoint to {ckpt} in {time.perf_counter() - t0:.1f}s", flush=True)
    return ckpt


def run_cycles(args, ckpt: Path, images: list[str]) -> list[dict]:
    from modelyard.actors import ModelHandle, UnloadError

    sampling = {"max_new_tokens": args.max_new_tokens, "ignore_eos": True}
    rows = []
    for c in range(args.cycles):
        opts = dict(
            name=f"cycle{c}",
            engine_config=engine_options(args),
            num_gpus=args.num_gpus,
            max_concurrent_requests=max(1, len(images)),
            unload_timeout_s=args.unload_timeout,
        )
        if args.via == "pipeline":
            info, outs, caption_s, res, unload_error = _pipeline_cycle(ckpt, opts, images, sampling)
        else:
            h = ModelHandle(ckpt, **opts)
            info = h.spawn()
            t0 = time.perf_counter()
            outs = h.caption(images, sampling=sampling)
            caption_s = time.perf_counter() - t0
            try:
                res, unload_error = h.unload(), None
            except UnloadError as e:
                res, unload_error = e.result, str(e)
        mem, tim = info["memory"], info["timings"]
        row = {
            "cycle": c,
            "pid": info["pid"],
            "device": info["device"],
            "verified_by": res.get("verified_by"),
            "process_start_s": tim["process_start_s"],
            "load_s": tim["load_s"],
            "kv_alloc_s": tim["kv_alloc_s"],
            "spawn_s": tim["spawn_s"],
            "caption_s": caption_s,
            "images_per_s": len(images) / caption_s,
            "errors": sum(not o.ok for o in outs),
            "weights_bytes": mem["weights_bytes"],
            "kv_bytes": mem["kv_bytes"],
            "process_vram_bytes": mem["process_vram_bytes"],
            "baseline_used_bytes": mem["baseline_used_bytes"],
            "loaded_used_bytes": mem["device_used_bytes"],
            "reclaim_s": res.get("seconds"),
            "reclaimed_bytes": res.get("reclaimed_bytes"),
            "residual_bytes": res.get("residual_bytes"),
            "others_drift_bytes": res.get("others_drift_bytes"),
            "note": res.get("note"),
            "unload_error": unload_error,
        }
        rows.append(row)
        print(
            f"cycle {c}: spawn {row['spawn_s']:.2f}s (load {row['load_s']:.2f}s) caption {caption_s:.2f}s "
            f"reclaim {row['reclaim_s']:.3f}s residual {_cell(_mib(row['residual_bytes']))} MiB "
            f"[{row['verified_by']}]" + (f" ERROR {unload_error}" if unload_error else ""),
            flush=True,
        )
    return rows


def _pipeline_cycle(ckpt, opts, images, sampling):
    import modelyard
    from modelyard.actors import UnloadError

    pipe = modelyard.pipeline(ckpt, **opts)
    info = pipe.spawn_info
    try:
        with pipe:
            t0 = time.perf_counter()
            outs = pipe(images, sampling=sampling)
            caption_s = time.perf_counter() - t0
        res, unload_error = pipe.reclaim, None
    except UnloadError as e:
        res, unload_error = e.result, str(e)
    return info, outs, caption_s, res, unload_error


def inprocess_child(args) -> None:
    """Run in a child process: load, caption, release in-process, report what is still held."""
    import gc

    import torch

    from modelyard.actors.gpu import NvmlSession
    from modelyard.engine import Engine, EngineConfig, Request, SamplingParams

    out = Path(args.out)
    images = [str(p) for p in sorted((out / "images").iterdir())]
    nv = NvmlSession.open()
    base = nv.snapshot_all() if nv.ok else {}
    eng = Engine.from_pretrained(args.ckpt, EngineConfig(**engine_options(args)))
    sp = SamplingParams(max_new_tokens=args.max_new_tokens, ignore_eos=True)
    outs = eng.generate([Request(image=p, sampling=sp) for p in images])
    res = {"ok": nv.ok, "reason": nv.reason, "errors": sum(not o.ok for o in outs), "pid": os.getpid()}
    if nv.ok and torch.cuda.is_initialized():
        raw = str(torch.cuda.get_device_properties(torch.cuda.current_device()).uuid)
        uuid = raw if raw.startswith(("GPU-", "MIG-")) else f"GPU-{raw}"
        loaded = nv.snapshot(uuid)
        eng.close()
        del eng, outs
        gc.collect()
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        time.sleep(1.0)
        after = nv.snapshot(uuid)
        res.update(
            uuid=uuid,
            baseline_used_bytes=base[uuid].used_bytes,
            loaded_used_bytes=loaded.used_bytes,
            released_used_bytes=after.used_bytes,
            residual_bytes=after.used_bytes - base[uuid].used_bytes,
            torch_reserved_bytes=torch.cuda.memory_reserved(),
            torch_allocated_bytes=torch.cuda.memory_allocated(),
        )
    nv.close()
    print("INPROCESS_RESULT " + json.dumps(res), flush=True)


def run_inprocess(args, ckpt: Path) -> dict:
    cmd = [
        sys.executable,
        os.path.abspath(__file__),
        "--inprocess-child",
        "--out",
        args.out,
        "--ckpt",
        str(ckpt),
        "--backend",
        args.backend,
        "--max-new-tokens",
        str(args.max_new_tokens),
    ]
    if args.cache_max_entry_count is not None:
        cmd += ["--cache-max-entry-count", str(args.cache_max_entry_count)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    line = next((l for l in proc.stdout.splitlines() if l.startswith("INPROCESS_RESULT ")), None)
    if line is None:
        return {"ok": False, "reason": f"child failed (rc {proc.returncode}): {proc.stderr[-2000:]}"}
    return json.loads(line.split(" ", 1)[1])


def summarize(rows: list[dict], inproc: dict | None) -> dict:
    def stat(key):
        vals = [r[key] for r in rows if r.get(key) is not None]
        return {"p50": statistics.median(vals), "max": max(vals), "min": min(vals)} if vals else None

    residuals = [r["residual_bytes"] for r in rows if r["residual_bytes"] is not None]
    return {
        "cycles": len(rows),
        "unload_errors": sum(bool(r["unload_error"]) for r in rows),
        "caption_errors": sum(r["errors"] for r in rows),
        "residual_mib_max": _mib(max(residuals)) if residuals else None,
        "all_residuals_zero": all(x == 0 for x in residuals) if residuals else None,  # None: no GPU measured
        "reclaim_s": stat("reclaim_s"),
        "spawn_s": stat("spawn_s"),
        "load_s": stat("load_s"),
        "process_start_s": stat("process_start_s"),
        "kv_alloc_s": stat("kv_alloc_s"),
        "images_per_s": stat("images_per_s"),
        "process_vram_mib": _mib((stat("process_vram_bytes") or {}).get("p50")),
        "inprocess_residual_mib": _mib(inproc.get("residual_bytes")) if inproc else None,
    }


def markdown(meta: dict, rows: list[dict], summary: dict, inproc: dict | None) -> str:
    f = lambda x, d=2: "n/a" if x is None else f"{x:.{d}f}"  # noqa: E731
    lines = [
        f"### Actor spawn -> caption -> unload cycles ({meta['arch']} {meta['size']}, {meta['backend']}, "
        f"{meta['images']} images x {meta['max_new_tokens']} tokens, via {meta['via']}, {meta['device']})",
        "",
        "| cycle | spawn s | load s | caption s | img/s | process VRAM MiB | reclaim s | reclaimed MiB "
        "| residual MiB | verified by |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['cycle']} | {f(r['spawn_s'])} | {f(r['load_s'])} | {f(r['caption_s'])} | "
            f"{f(r['images_per_s'], 1)} | {_cell(_mib(r['process_vram_bytes']))} | {f(r['reclaim_s'], 3)} | "
            f"{_cell(_mib(r['reclaimed_bytes']))} | {_cell(_mib(r['residual_bytes']))} | {r['verified_by']} |"
        )
    s = summary
    p = lambda k, d=2: "n/a" if not s[k] else f"p50 {s[k]['p50']:.{d}f} / max {s[k]['max']:.{d}f}"  # noqa: E731
    lines += [
        "",
        f"- residual over baseline after unload: max {_cell(s['residual_mib_max'])} MiB over {s['cycles']} cycles "
        f"(all zero: {s['all_residuals_zero']}); unload errors: {s['unload_errors']}",
        f"- reclaim seconds (kill -> memory back): {p('reclaim_s', 3)}",
        f"- spawn seconds: {p('spawn_s')}; load seconds: {p('load_s')}; process start: {p('process_start_s')}",
        f"- caption throughput images/s: {p('images_per_s', 1)}",
    ]
    if inproc is not None:
        if inproc.get("residual_bytes") is not None:
            lines.append(
                f"- contrast, in-process release (close + del + gc.collect + empty_cache): "
                f"{_mib(inproc['residual_bytes'])} MiB still held by the live process "
                f"(torch reserved {_mib(inproc['torch_reserved_bytes'])} MiB)"
            )
        else:
            lines.append(f"- contrast, in-process release: n/a ({inproc.get('reason')})")
    return "\n".join(lines) + "\n"


def _mib(x):
    return None if x is None else round(x / MIB, 1)


def _cell(x) -> str:
    return "n/a" if x is None else str(x)


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.inprocess_child:
        inprocess_child(args)
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ckpt = ensure_checkpoint(args, out)
    from modelyard.actors import ensure_ray
    from modelyard.testing import make_images

    images = [str(p) for p in make_images(out / "images", args.images, seed=0)]
    ray_info = ensure_ray(log_to_driver=False)
    import ray

    n_gpu = ray.cluster_resources().get("GPU", 0)
    rows = run_cycles(args, ckpt, images)
    inproc = None if args.no_inprocess else run_inprocess(args, ckpt)
    summary = summarize(rows, inproc)
    meta = {
        "arch": args.arch,
        "size": args.size,
        "backend": args.backend,
        "via": args.via,
        "images": args.images,
        "max_new_tokens": args.max_new_tokens,
        "cycles": args.cycles,
        "ray_gpus": n_gpu,
        "device": (rows[0]["device"] or {}).get("uuid", "cpu") if rows and rows[0]["device"] else "cpu",
        "host": platform.node(),
        "ray_address": ray_info["address"],
        "auth": ray_info["auth"],
    }
    md = markdown(meta, rows, summary, inproc)
    (out / "actor_cycles.json").write_text(
        json.dumps({"meta": meta, "summary": summary, "rows": rows, "inprocess": inproc}, indent=1, default=str)
    )
    (out / "actor_cycles.md").write_text(md)
    print(md)
    return 0 if summary["unload_errors"] == 0 and summary["caption_errors"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
