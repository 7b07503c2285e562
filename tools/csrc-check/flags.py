"""Print the compile commands torch.utils.cpp_extension.load() would use for csrc, as bash arrays.

Used by check.sh. Two sources, both read at run time so the checker follows the real build:
  * the project's flags: _CUDA_FLAGS, _CXX_FLAGS and _cuda_flags(arch) from
    modelyard/engine/kernels.py, read with `ast` (the module is not imported: it needs torch.cuda);
  * torch's flags: cpp_extension's own ninja writer (_write_ninja_file_to_build_library, the function
    load() calls), run into a scratch dir with CUDA_HOME pointed at the local toolkit, because the CPU
    wheel leaves cpp_extension.CUDA_HOME unset. Its cflags / cuda_cflags lines are parsed back.

Output (stdout), eval'd by check.sh:  CXX=... NVCC=... CXX_ARGS=(...) NVCC_ARGS=(...) FLAGS_NOTE=...
"""

from __future__ import annotations

import ast
import os
import shlex
import sys
import tempfile
from pathlib import Path

# Used only when kernels.py can't be found/parsed (e.g. checking a csrc outside the repo).
_DEFAULT_CUDA_FLAGS = ("-O3", "--use_fast_math", "-lineinfo")
_DEFAULT_CXX_FLAGS = ("-O3",)
_EXT_NAME = "modelyard_kernels"


def project_flags(kernels_py: Path, arch: str) -> tuple[list[str], list[str], str]:
    """(extra_cflags, extra_cuda_cflags, note) as kernels._build_and_load passes them."""
    digits, suffix = (arch[:-1], arch[-1]) if arch[-1:] in ("a", "f") else (arch, "")
    if not digits.isdigit() or len(digits) < 2:
        sys.exit(f"flags.py: ARCH must look like 90, 90a, 100a; got {arch!r}")
    arch_t = (int(digits[:-1]), int(digits[-1]))
    if kernels_py.is_file():
        tree = ast.parse(kernels_py.read_text(), str(kernels_py))
        consts: dict = {}
        fn = None
        for node in tree.body:
            if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
                if node.targets[0].id in ("_CUDA_FLAGS", "_CXX_FLAGS"):
                    consts[node.targets[0].id] = ast.literal_eval(node.value)
            elif isinstance(node, ast.FunctionDef) and node.name == "_cuda_flags":
                fn = node
        if fn is None or set(consts) != {"_CUDA_FLAGS", "_CXX_FLAGS"}:
            sys.exit(f"flags.py: {kernels_py} no longer defines _CUDA_FLAGS/_CXX_FLAGS/_cuda_flags; update cuda-check")
        fn.returns = None  # drop annotations that name types not in scope
        for a in fn.args.args:
            a.annotation = None
        ns = dict(consts)
        exec(compile(ast.Module(body=[fn], type_ignores=[]), str(kernels_py), "exec"), ns)
        cuda = list(ns["_cuda_flags"](arch_t))
        cxx = list(consts["_CXX_FLAGS"])
        note = f"flags from {kernels_py}"
    else:
        cc = f"{arch_t[0]}{arch_t[1]}"
        cuda = [*_DEFAULT_CUDA_FLAGS, f"-gencode=arch=compute_{cc},code=sm_{cc}"]
        cxx = list(_DEFAULT_CXX_FLAGS)
        note = f"{kernels_py} not found: built-in copy of its flags"
    if suffix:  # ARCH=90a: retarget the -gencode kernels.py produced (it only knows plain sm_XY)
        cc = f"{arch_t[0]}{arch_t[1]}"
        cuda = [
            f if not f.startswith("-gencode") else f"-gencode=arch=compute_{cc}{suffix},code=sm_{cc}{suffix}"
            for f in cuda
        ]
        note += f" (gencode overridden to sm_{cc}{suffix})"
    return cxx, cuda, note


def main() -> None:
    src, kernels_py, arch, cuda_home = sys.argv[1:5]
    import torch.utils.cpp_extension as ce

    ce.CUDA_HOME = cuda_home  # None on a CPU wheel; include_paths("cuda") and the nvcc path need it
    cxx_extra, cuda_extra, note = project_flags(Path(kernels_py), arch)
    srcs = sorted(str(p) for p in Path(src).iterdir() if p.suffix in (".cu", ".cpp"))
    with tempfile.TemporaryDirectory() as d:
        ninja = os.path.join(d, "build.ninja")
        # Same call load() makes (via _write_ninja_file_and_build_library) for
        # load(name, sources, extra_cflags, extra_cuda_cflags, extra_include_paths=[src]).
        ce._write_ninja_file_to_build_library(
            path=ninja,
            name=_EXT_NAME,
            sources=srcs,
            extra_cflags=cxx_extra,
            extra_cuda_cflags=cuda_extra,
            extra_sycl_cflags=[],
            extra_ldflags=[],
            extra_include_paths=[src],
            with_cuda=True,
            with_sycl=False,
            is_standalone=False,
        )
        vars_ = {}
        for line in Path(ninja).read_text().splitlines():
            k, sep, v = line.partition(" = ")
            if sep and k in ("cxx", "nvcc", "cflags", "cuda_cflags"):
                vars_[k] = v
    q = shlex.quote
    print(f"CXX={q(vars_['cxx'])}")
    print(f"NVCC={q(vars_['nvcc'])}")
    print("CXX_ARGS=(" + " ".join(q(a) for a in shlex.split(vars_["cflags"])) + ")")
    print("NVCC_ARGS=(" + " ".join(q(a) for a in shlex.split(vars_["cuda_cflags"])) + ")")
    print(f"FLAGS_NOTE={q(note)}")


if __name__ == "__main__":
    main()
