"""`modelyard doctor`: what this machine (and Ray cluster) offers modelyard, in plain lines.

It asks the same functions the engine asks (resolve_backend_name, describe_backends,
kernels.status), so what it prints is what an engine started here would do. It never builds the
kernels or downloads anything: a backend is only constructed (for its exact description) where
that costs nothing, i.e. on the CPU or once the kernels are built.
"""

from __future__ import annotations

import os
import platform

MIB = 1 << 20


def _line(ok: bool | None, what: str, detail: str) -> None:
    mark = {True: "ok  ", False: "FAIL", None: "--  "}[ok]
    print(f"[{mark}] {what:<14} {detail}", flush=True)


def _more(detail: str) -> None:
    print(f"{'':<22}{detail}", flush=True)


def _torch_and_gpus() -> bool:
    import torch

    build = f"CUDA {torch.version.cuda} build" if torch.version.cuda else "CPU-only build"
    _line(True, "torch", f"{torch.__version__} ({build})")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            cap = torch.cuda.get_device_capability(i)
            _line(True, f"GPU {i}", f"{torch.cuda.get_device_name(i)} (sm_{cap[0]}{cap[1]})")
        return True
    if not torch.version.cuda:
        why = "this torch is a CPU-only build (install a CUDA build of torch to use a GPU)"
    else:
        vis = os.environ.get("CUDA_VISIBLE_DEVICES")
        why = "torch sees no CUDA device" + (
            f" (CUDA_VISIBLE_DEVICES={vis!r})" if vis is not None else " (no NVIDIA driver or GPU here?)"
        )
    _line(None, "GPU", f"none: {why}. Models run on the CPU: fine for the demo and tests, slow for real models")
    return False


def _nvml() -> None:
    from ..actors.gpu import NvmlSession

    with NvmlSession.open() as nv:
        if nv.ok:
            for i in range(nv.device_count()):
                s = nv.snapshot(i)
                _line(
                    True,
                    f"NVML GPU {s.index}",
                    f"{s.used_bytes / MIB:,.0f} / {s.total_bytes / MIB:,.0f} MiB used, {len(s.processes)} process(es)",
                )
        else:
            _line(None, "NVML", f"unavailable: {nv.reason}")
            _more("unload then verifies only that the actor's process exited, not that VRAM came back")


def _processor_packages() -> None:
    """Packages some transformers processors need, which modelyard does not install (informational:
    only checkpoints of those families fail to load without them)."""
    from ..engine.backends import missing_processor_packages

    missing = missing_processor_packages()
    if not missing:
        _line(True, "processors", "the optional processor packages (torchvision, num2words) are installed")
        return
    for pkg, families in missing.items():
        _line(None, "processors", f"{pkg} not installed: {families} cannot load (pip install {pkg})")


def _attention_here(cuda: bool) -> int:
    """The backend `attention_backend="auto"` resolves to on this machine, and what it runs."""
    from ..engine.attention import describe_backend, get_backend, resolve_backend_name
    from ..engine.attention.flash import describe_backends
    from ..engine.config import EngineConfig

    device = "cuda" if cuda else "cpu"
    dtype = EngineConfig(device=device).resolved_dtype()
    info = describe_backends()
    name = resolve_backend_name("auto", device)
    if not cuda:
        d = describe_backend(get_backend(name, device))
        _line(
            True,
            "attention",
            f"auto -> {name} on cpu ({str(dtype).removeprefix('torch.')}): prefill and decode "
            f"by {d['prefill_attention']}",
        )
        _more("flash / csrc (FlashAttention varlen prefill, csrc paged decode) need a CUDA GPU")
    else:
        _line(
            True,
            "attention",
            f"auto -> {name} on cuda for a typical model ({str(dtype).removeprefix('torch.')}); "
            "per checkpoint: doctor --model PATH",
        )
        _more(f"prefill varlen: {info['prefill_varlen'] or 'none importable'}; decode: {info['decode']}")
    cands = ", ".join(f"{k}: {v}" for k, v in info["varlen_candidates"].items())
    _line(None, "varlen impls", f"{cands} (force one with {info['varlen_override_env']}=NAME)")
    return 0


def _kernels(cuda: bool) -> int:
    from ..engine import kernels

    st = kernels.status()
    if not st["sources_found"]:
        _line(False if cuda else None, "CUDA kernels", f"csrc sources not found at {st['csrc_dir']}")
        return int(cuda)
    if not cuda:
        _line(
            None,
            "CUDA kernels",
            "no CUDA device: the torch reference ops run instead "
            "(`modelyard build-kernels --arch 9.0` prebuilds for a GPU elsewhere)",
        )
        return 0
    if not st["enabled"]:
        _line(
            None,
            "CUDA kernels",
            f"switched off ({kernels.ENV_SWITCH}=0): decode and fused ops run the torch references (slower)",
        )
        return 0
    if st.get("error"):
        _line(False, "CUDA kernels", f"build failed: {st['error'].splitlines()[0][:200]}")
        return 1
    if st.get("loaded") or st.get("built"):
        _line(
            True,
            "CUDA kernels",
            f"{st['arch']}: {'loaded' if st.get('loaded') else 'built (cached)'} in {st['build_dir']}",
        )
        return 0
    if not st["nvcc"]:
        _line(
            False,
            "CUDA kernels",
            f"{st['arch']}: not built, and no nvcc to build them (set CUDA_HOME, or "
            f"{kernels.ENV_SWITCH}=0 to run the torch references)",
        )
        return 1
    _line(
        None,
        "CUDA kernels",
        f"{st['arch']}: not built yet; the first engine start builds them (minutes), "
        "`modelyard build-kernels` does it now",
    )
    _more(f"nvcc {st['nvcc']}; ninja {st['ninja'] or 'not found (slower build)'}")
    return 0


def _model_attention(path: str, cuda: bool) -> int:
    """The backend a checkpoint's head size and the engine's default dtype get, here and on a GPU."""
    import torch

    from ..engine import kernels
    from ..engine.attention import csrc_decode_supports, describe_backend, get_backend, resolve_backend_name
    from ..engine.config import EngineConfig

    try:
        from transformers import AutoConfig

        cfg = AutoConfig.from_pretrained(path, local_files_only=True)
        text = cfg.get_text_config()
        heads = text.num_attention_heads
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
        kv_heads = getattr(text, "num_key_value_heads", None) or heads
    except Exception as e:
        _line(False, "model", f"{path}: cannot read its config ({type(e).__name__}: {str(e).splitlines()[0][:160]})")
        return 1
    device = "cuda" if cuda else "cpu"
    dtype = EngineConfig(device=device).resolved_dtype()
    name = resolve_backend_name("auto", device, head_dim=head_dim, dtype=dtype)
    arch = cfg.model_type if text is cfg else f"{cfg.model_type} + {text.model_type}"
    shape = f"{arch}, {heads} heads / {kv_heads} KV heads, head_dim {head_dim}"
    dt = str(dtype).removeprefix("torch.")
    if cuda and name != "sdpa" and not (kernels.status().get("built") or kernels.status().get("loaded")):
        _line(
            True,
            "model",
            f"{path} ({shape}): auto -> {name} on cuda ({dt}); exact prefill/decode paths "
            "print once the kernels are built",
        )
        return 0
    try:
        d = describe_backend(get_backend(name, device, head_dim=head_dim, dtype=dtype))
    except Exception as e:
        _line(
            False,
            "model",
            f"{path} ({shape}): auto -> {name} on {device} but it cannot start: "
            f"{type(e).__name__}: {str(e).splitlines()[0][:200]}",
        )
        return 1
    _line(True, "model", f"{path} ({shape}): auto -> {name} on {device} ({dt})")
    _more(
        f"prefill: {d['prefill_attention']}; decode: {d['decode_attention']}; "
        f"CUDA-graph safe: {d['attention_graph_safe']}"
    )
    if not cuda:
        fits = csrc_decode_supports(head_dim, torch.bfloat16)
        _more(
            f"on a CUDA GPU (bfloat16): the csrc paged-decode kernel {'has an' if fits else 'has no'} instance for "
            f"head_dim {head_dim}, so auto picks {'flash or csrc' if fits else 'sdpa (the slow reference)'} there"
        )
    return 0


def _ray(address: str | None, start_ray: bool, cuda: bool) -> int:
    try:
        import ray
    except Exception as e:
        _line(False, "ray", f"import failed: {e}")
        return 1
    _line(True, "ray", ray.__version__)
    if not start_ray:
        _line(None, "ray cluster", "not checked (--no-ray)")
        return 0
    from ..actors import ensure_ray

    try:
        info = ensure_ray(address)
        res = ray.cluster_resources()
        nodes = sum(1 for n in ray.nodes() if n.get("Alive"))
        _line(
            True,
            "ray cluster",
            f"{'started locally' if info['started'] else 'joined'} at {info['address']} "
            f"(auth: {info['auth']}); {nodes} node(s), {res.get('CPU', 0):g} CPU, {res.get('GPU', 0):g} GPU",
        )
        failed = 0
        if cuda and not res.get("GPU"):
            _line(False, "ray GPUs", "torch sees a GPU but Ray offers none: actors would run on the CPU")
            failed = 1
        if info["started"]:
            ray.shutdown()
        return failed
    except Exception as e:
        _line(False, "ray cluster", f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}")
        return 1


def run_doctor(address: str | None = None, start_ray: bool = True, models=()) -> int:
    from .. import __version__

    _line(None, "modelyard", f"{__version__} (python {platform.python_version()}, {platform.platform()})")
    try:
        cuda = _torch_and_gpus()
    except Exception as e:
        _line(False, "torch", f"import failed: {e}")
        return 1
    failures = 0
    _nvml()
    _processor_packages()
    for check in (_attention_here, _kernels):
        try:
            failures += check(cuda)
        except Exception as e:  # doctor reports a broken piece and goes on to the next
            _line(False, check.__name__.strip("_"), f"{type(e).__name__}: {e}")
            failures += 1
    for path in models:
        failures += _model_attention(path, cuda)
    failures += _ray(address, start_ray, cuda)
    print(f"\n{'all checks passed' if not failures else f'{failures} check(s) failed'}")
    return 1 if failures else 0
