"""`modelyard doctor`: what this machine (and Ray cluster) offers modelyard, in plain lines."""
from __future__ import annotations

import platform
import sys

MIB = 1 << 20


def _line(ok: bool | None, what: str, detail: str) -> None:
    mark = {True: "ok  ", False: "FAIL", None: "--  "}[ok]
    print(f"[{mark}] {what:<18} {detail}", flush=True)


def run_doctor(address: str | None = None, start_ray: bool = True) -> int:
    from .. import __version__
    failures = 0
    _line(None, "modelyard", f"{__version__} (python {platform.python_version()}, {platform.platform()})")
    try:
        import torch
        cuda = torch.cuda.is_available()
        devs = [f"{i}: {torch.cuda.get_device_name(i)}" for i in range(torch.cuda.device_count())] if cuda else []
        _line(True, "torch", f"{torch.__version__}, CUDA {'available' if cuda else 'not available'}"
              + (f" (CUDA {torch.version.cuda}; {', '.join(devs)})" if cuda else ""))
    except Exception as e:
        _line(False, "torch", f"import failed: {e}")
        return 1

    from ..actors.gpu import NvmlSession
    with NvmlSession.open() as nv:
        if nv.ok:
            snaps = [nv.snapshot(i) for i in range(nv.device_count())]
            _line(True, "NVML", "; ".join(f"GPU {s.index}: {s.used_bytes / MIB:,.0f}/{s.total_bytes / MIB:,.0f} MiB used, "
                                          f"{len(s.processes)} process(es)" for s in snaps))
        else:
            _line(None, "NVML", f"{nv.reason} — unload verification falls back to waiting for process exit")

    try:
        from ..engine.attention import resolve_backend_name
        device = "cuda" if cuda else "cpu"
        _line(True, "attention", f"auto -> {resolve_backend_name('auto', device)} on {device}")
    except Exception as e:
        _line(False, "attention", f"{type(e).__name__}: {e}")
        failures += 1
    try:
        import flash_attn  # noqa: F401
        _line(True, "flash-attn", getattr(flash_attn, "__version__", "installed"))
    except Exception as e:
        _line(None, "flash-attn", f"not usable ({type(e).__name__})")
    try:
        from ..engine import kernels
        st = kernels.status()
        if not st["cuda_available"]:
            _line(None, "CUDA kernels", "no CUDA device: the torch reference ops run instead")
        else:
            state = "loaded" if st.get("loaded") else ("built (cached)" if st.get("built") else "not built yet")
            _line(st.get("error") is None, "CUDA kernels", f"{state}; nvcc {st.get('nvcc') or 'not found'}"
                  + (f"; error: {st['error']}" if st.get("error") else "") + " — `modelyard build-kernels` prebuilds")
    except ImportError as e:
        _line(None, "CUDA kernels", f"kernels module unavailable ({e})")

    try:
        import ray
        _line(True, "ray", ray.__version__)
    except Exception as e:
        _line(False, "ray", f"import failed: {e}")
        return 1
    if start_ray:
        from ..actors import ensure_ray
        try:
            info = ensure_ray(address)
            res = ray.cluster_resources()
            nodes = sum(1 for n in ray.nodes() if n.get("Alive"))
            _line(True, "ray cluster", f"{'started locally' if info['started'] else 'joined'} at {info['address']} "
                  f"(auth: {info['auth']}); {nodes} node(s), {res.get('CPU', 0):g} CPU, {res.get('GPU', 0):g} GPU")
            if info["started"]:
                ray.shutdown()
        except Exception as e:
            _line(False, "ray cluster", f"{type(e).__name__}: {e}")
            failures += 1
    else:
        _line(None, "ray cluster", "not checked (--no-ray)")
    print(f"\n{'all checks passed' if not failures else f'{failures} check(s) failed'}", file=sys.stdout)
    return 1 if failures else 0
