"""Decode GEMMs tuned per batch size.

A decode step's linear layers are skinny (M = the batch, 1..256 rows) and read all their weights
once, so their speed is weight bandwidth, and which cuBLAS kernel runs decides how much of it they
get: on an H200 at M = 64, torch's default for Llama-7B's down_proj (a split-K kernel plus a reduce)
reads 3.0 TB/s, while another algorithm cuBLASLt offers for the same problem reads 3.6
(benchmarks/RESULTS.md, session 5). No single choice wins at every M.

So before the decode CUDA graphs are captured, `tune` times, for every 16-bit linear-layer shape of
the decoder and LM head and every graph batch size, torch's `F.linear` against cuBLASLt's heuristic
candidates (csrc/lt_gemm.cu), on the model's own weights (several layers in turn, so the L2 cache
holds none of them, as in a real step) inside CUDA graphs (as the step runs), and keeps the fastest.
Each candidate's result is checked against `F.linear` first. While the graphs are captured the plan
is active, and `linear` runs the chosen algorithm; everywhere else (prefill, eager decode, CPU) it is
`F.linear`. EngineConfig(tune_decode_gemms=False) turns it off; Engine.stats()["decode_gemms"]
reports what was chosen.

fp8 layers (quantization="fp8") are not tuned: cuBLASLt offers a single algorithm for row-wise
scaled e4m3 GEMMs, the one torch._scaled_mm already runs.
"""
from __future__ import annotations

import statistics
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from . import kernels

_TUNED_DTYPES = (torch.bfloat16, torch.float16)
_MAX_CANDIDATES = 8         # cuBLASLt heuristic candidates timed per (batch size, shape)
_ROTATE = 4                 # weights of this many layers in turn per timing (L2 cold, as in a step)
_MIN_GAIN = 0.02            # keep torch's choice unless an algorithm is at least this much faster
_MAX_REL_ERR = 1e-2         # a candidate whose output differs from F.linear by more is refused


@dataclass(frozen=True)
class GemmShape:
    n: int
    k: int
    dtype: torch.dtype
    bias: bool

    @classmethod
    def of(cls, weight: torch.Tensor, bias: torch.Tensor | None) -> "GemmShape":
        return cls(weight.shape[0], weight.shape[1], weight.dtype, bias is not None)

    def __str__(self) -> str:
        return f"{self.k}->{self.n}{' +bias' if self.bias else ''}"


@dataclass
class GemmPlan:
    """(batch size, shape) -> the cuBLASLt algorithm to run (a uint8 CPU tensor), or None: F.linear."""
    choices: dict[tuple[int, GemmShape], torch.Tensor | None] = field(default_factory=dict)
    timings: list[dict] = field(default_factory=list)   # one row per (batch size, shape), microseconds
    seconds: float = 0.0
    note: str = "off"                                    # why nothing was tuned, when nothing was
    lt_calls: int = 0                                    # linear() calls that ran a cuBLASLt algorithm

    def lookup(self, m: int, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor | None:
        return self.choices.get((m, GemmShape.of(weight, bias)))

    def summary(self) -> str:
        n_lt = sum(a is not None for a in self.choices.values())
        if not self.timings:
            return self.note
        saved = sum(r["torch_us"] - r["chosen_us"] for r in self.timings)
        return (f"tuned in {self.seconds:.1f}s: cuBLASLt for {n_lt} of {len(self.choices)} (batch size, shape) "
                f"pairs, {saved:.0f} us saved summed over one call of each")


_active: GemmPlan | None = None


@contextmanager
def active(plan: GemmPlan | None) -> Iterator[None]:
    """Makes `linear` follow `plan` (the decode graphs' capture)."""
    global _active
    prev, _active = _active, plan
    try:
        yield
    finally:
        _active = prev


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear, or the plan's cuBLASLt algorithm for this batch size and shape while one is active."""
    plan = _active
    if plan is not None and x.dim() == 2:
        algo = plan.lookup(x.shape[0], weight, bias)
        if algo is not None:
            plan.lt_calls += 1
            return kernels.get().lt_gemm(x, weight, bias, None, None, weight.dtype, algo)
    return F.linear(x, weight, bias)


def linear_weights(model: nn.Module) -> dict[GemmShape, list[tuple[torch.Tensor, torch.Tensor | None]]]:
    """The 16-bit (weight, bias) pairs of the decoder's and LM head's linear layers, by shape."""
    lm = model.language_model
    groups: dict[GemmShape, list] = {}
    mods = [m for m in lm.modules() if isinstance(m, nn.Linear)]
    head = lm.embed_tokens.weight if model.lm_head is None else model.lm_head.weight
    pairs = [(m.weight, m.bias) for m in mods] + [(head, None)]
    for w, b in pairs:
        if w.dtype in _TUNED_DTYPES and w.is_cuda:
            groups.setdefault(GemmShape.of(w, b), []).append((w.detach(), None if b is None else b.detach()))
    return groups


def _graph_us(fn: Callable[[], object], calls: int, reps: int = 5) -> float:
    """Median microseconds per call of fn (which makes `calls` calls), replayed as one CUDA graph."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()                                   # lazy initialisation outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(reps):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / calls)
    del graph
    return statistics.median(times)


@torch.inference_mode()
def tune(model: nn.Module, sizes: Sequence[int], device: torch.device) -> GemmPlan:
    """Times F.linear and cuBLASLt's candidates for every (size, shape); see the module docstring."""
    k = kernels.get()
    plan = GemmPlan()
    if k is None:
        plan.note = "off: the csrc kernels are not loaded"
        return plan
    t0 = time.perf_counter()
    gen = torch.Generator(device=device).manual_seed(0)
    for shape, pairs in linear_weights(model).items():
        pairs = pairs[:_ROTATE]
        for m in sizes:
            x = torch.randn(m, shape.k, device=device, dtype=shape.dtype, generator=gen)
            w0, b0 = pairs[0]
            ref = F.linear(x, w0, b0).float()
            torch_us = _graph_us(lambda: [F.linear(x, w, b) for w, b in pairs], len(pairs))
            algos, info = k.lt_gemm_algos(x, w0, b0, None, None, shape.dtype, _MAX_CANDIDATES)
            best, best_us, best_info = None, torch_us, None
            for i in range(algos.shape[0]):
                algo = algos[i].clone()
                try:
                    out = k.lt_gemm(x, w0, b0, None, None, shape.dtype, algo).float()
                except RuntimeError:
                    continue        # the heuristic listed it, the check refused it: not a candidate
                if ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item() > _MAX_REL_ERR:
                    continue
                us = _graph_us(lambda: [k.lt_gemm(x, w, b, None, None, shape.dtype, algo) for w, b in pairs],
                               len(pairs))
                if us < best_us:
                    best, best_us, best_info = algo, us, info[i].tolist()
            if best is not None and best_us > torch_us * (1 - _MIN_GAIN):
                best, best_us, best_info = None, torch_us, None
            plan.choices[(m, shape)] = best
            plan.timings.append({"m": m, "shape": str(shape), "torch_us": round(torch_us, 2),
                                 "chosen_us": round(best_us, 2), "candidates": int(algos.shape[0]),
                                 "lt_algo": best_info})   # tile id, split-k, stages id, workspace bytes
    torch.cuda.synchronize(device)
    plan.seconds = time.perf_counter() - t0
    if not plan.timings:
        plan.note = "off: no 16-bit linear layers (fp8 layers run torch._scaled_mm)"
    return plan
