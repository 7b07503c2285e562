"""JIT build and load of the csrc CUDA ops, registered as `torch.ops.modelyard.*`.

`get()` returns that op namespace on a CUDA machine (building it on first use), or None on a machine
without CUDA or when the user opted out with MODELYARD_KERNELS=0. A failed build on a CUDA machine
raises KernelBuildError with the compiler output: it is never silently replaced by the torch
references, which would hide a broken fast path behind a 10x slower one.

Builds are cached under ~/.cache/modelyard/kernels/<key>, the key hashing every csrc file, the
torch and CUDA versions, the GPU architecture and the compile flags, so a changed source or a
different GPU gets its own build and an unchanged one loads in milliseconds. `build()` prebuilds
(`modelyard build-kernels`), `status()` reports for `modelyard doctor`.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading
from pathlib import Path

import torch

ENV_SWITCH = "MODELYARD_KERNELS"
_LIB_NAME = "modelyard_kernels"
_OK_MARKER = "BUILD_OK"
# Fast math is safe here: the kernels' only approximations (exp2/exp in softmax and SiLU, rsqrt in
# RMSNorm) are far below bf16/fp16 rounding and within the float32 tests' tolerance.
_CUDA_FLAGS = ("-O3", "--use_fast_math", "-lineinfo")
_CXX_FLAGS = ("-O3",)


class KernelBuildError(RuntimeError):
    """The csrc ops failed to build or load on a CUDA machine."""


def enabled() -> bool:
    return os.environ.get(ENV_SWITCH, "1").strip().lower() not in ("0", "false", "off", "no")


def csrc_dir() -> Path:
    """The csrc/ sources: beside the package in a checkout, or shipped inside it."""
    pkg = Path(__file__).resolve().parents[1]  # .../modelyard
    for cand in (pkg.parent / "csrc", pkg / "csrc"):
        if (cand / "torch_bindings.cpp").is_file():
            return cand
    return pkg.parent / "csrc"


def _source_files(src: Path) -> list[Path]:
    return sorted(p for p in src.iterdir() if p.suffix in (".cu", ".cpp"))


def _all_files(src: Path) -> list[Path]:
    return sorted(p for p in src.iterdir() if p.suffix in (".cu", ".cpp", ".cuh", ".h"))


def _parse_arch(arch: str | tuple[int, int] | None) -> tuple[int, int]:
    if arch is None:
        return torch.cuda.get_device_capability()
    if isinstance(arch, tuple):
        return arch
    major, _, minor = arch.partition(".")
    return int(major), int(minor or 0)


def _cuda_flags(arch: tuple[int, int]) -> list[str]:
    cc = f"{arch[0]}{arch[1]}"
    # Naming the exact target keeps cpp_extension from adding its own list and makes the build
    # native machine code for this GPU (no PTX JIT at load, Hopper instructions available).
    return [*_CUDA_FLAGS, f"-gencode=arch=compute_{cc},code=sm_{cc}"]


def build_key(arch: tuple[int, int], src: Path | None = None) -> str:
    src = src or csrc_dir()
    h = hashlib.sha256()
    for p in _all_files(src):
        h.update(p.name.encode())
        h.update(p.read_bytes())
    from torch.utils.cpp_extension import CUDA_HOME

    for part in (
        torch.__version__,
        str(torch.version.cuda),
        str(CUDA_HOME),
        f"sm_{arch[0]}{arch[1]}",
        *_CUDA_FLAGS,
        *_CXX_FLAGS,
    ):
        h.update(part.encode())
    return h.hexdigest()[:16]


def cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "modelyard" / "kernels"


def build_dir(arch: tuple[int, int]) -> Path:
    return cache_root() / f"sm{arch[0]}{arch[1]}-{build_key(arch)}"


class _Loader:
    """Process-wide: a shared library can be loaded into a process once, so the loaded op namespace
    (or the build error, re-raised on every later call) is cached here behind a lock."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._ops = None
        self._error: KernelBuildError | None = None
        self._path: Path | None = None

    @property
    def loaded_path(self) -> Path | None:
        return self._path

    @property
    def error(self) -> KernelBuildError | None:
        return self._error

    def get(self):
        if self._ops is not None:
            return self._ops
        if not enabled() or not torch.cuda.is_available():
            return None
        return self.load(arch=None, verbose=False)

    def load(self, arch, verbose: bool):
        with self._lock:
            if self._ops is not None:
                return self._ops
            if self._error is not None:
                raise self._error
            try:
                self._path = _build_and_load(_parse_arch(arch), verbose)
            except Exception as e:  # the compiler output is in the message
                self._error = KernelBuildError(
                    f"building the modelyard CUDA kernels failed (set {ENV_SWITCH}=0 to run on the torch "
                    f"reference ops instead):\n{e}"
                )
                raise self._error from e
            self._ops = torch.ops.modelyard
            return self._ops


def _build_and_load(arch: tuple[int, int], verbose: bool) -> Path:
    src = csrc_dir()
    if not (src / "torch_bindings.cpp").is_file():
        raise FileNotFoundError(f"csrc sources not found at {src}")
    out = build_dir(arch)
    lib = out / f"{_LIB_NAME}.so"
    if (out / _OK_MARKER).is_file() and lib.is_file():
        torch.ops.load_library(str(lib))
        return lib
    out.mkdir(parents=True, exist_ok=True)
    from torch.utils.cpp_extension import load

    # cpp_extension serializes concurrent builders (a lock file in `out`), so actors starting
    # together on a fresh machine build once and the others wait, then load.
    load(
        name=_LIB_NAME,
        sources=[str(p) for p in _source_files(src)],
        extra_cflags=list(_CXX_FLAGS),
        extra_cuda_cflags=_cuda_flags(arch),
        extra_include_paths=[str(src)],
        build_directory=str(out),
        is_python_module=False,
        verbose=verbose,
    )
    (out / _OK_MARKER).write_text(
        json.dumps(
            {
                "torch": torch.__version__,
                "cuda": torch.version.cuda,
                "arch": f"sm_{arch[0]}{arch[1]}",
            }
        )
    )
    return lib


_LOADER = _Loader()


def get():
    """torch.ops.modelyard when the kernels can run here (built on first call), else None."""
    return _LOADER.get()


def build(arch: str | None = None, verbose: bool = True) -> Path:
    """Build (or find the cached build of) the kernels and load them; returns the library path.

    Runs even when MODELYARD_KERNELS=0 (an explicit request). `arch` ("9.0") builds for a GPU other
    than the one present, e.g. while preparing an image on a machine without one.
    """
    if arch is None and not torch.cuda.is_available():
        raise KernelBuildError("no CUDA device: pass arch (e.g. '9.0') to build for a GPU that is not present")
    _LOADER.load(arch=arch, verbose=verbose)
    return _LOADER.loaded_path


def status() -> dict:
    """What `modelyard doctor` prints about the kernels; never builds anything."""
    from torch.utils.cpp_extension import CUDA_HOME

    src = csrc_dir()
    info: dict = {
        "enabled": enabled(),
        "cuda_available": torch.cuda.is_available(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "csrc_dir": str(src),
        "sources_found": (src / "torch_bindings.cpp").is_file(),
        "nvcc": str(Path(CUDA_HOME) / "bin" / "nvcc") if CUDA_HOME else None,
        "ninja": shutil.which("ninja"),
        "loaded": _LOADER.loaded_path is not None,
        "error": str(_LOADER.error) if _LOADER.error is not None else None,
    }
    if info["cuda_available"] and info["sources_found"]:
        arch = torch.cuda.get_device_capability()
        out = build_dir(arch)
        info.update(arch=f"sm_{arch[0]}{arch[1]}", build_dir=str(out), built=(out / _OK_MARKER).is_file())
    if info["loaded"]:
        info["library"] = str(_LOADER.loaded_path)
    return info
