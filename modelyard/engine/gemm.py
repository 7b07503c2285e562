"""Decode GEMMs tuned per batch size.

A decode step's linear layers are skinny (M = the batch, 1..256 rows) and read all their weights
once, so their speed is weight bandwidth, and which kernel runs decides how much of it they get: on
an H200 at M = 64, torch's default for Llama-7B's down_proj (a split-K kernel plus a reduce) reads
3.0 TB/s, while another algorithm cuBLASLt offers for the same problem reads 3.6 (benchmarks/
RESULTS.md, session 5); at M <= 16 our own skinny GEMM (csrc/skinny_gemm.cu) beats both on o_proj and
down_proj (session 6). No single choice wins at every M.

So before the decode CUDA graphs are captured, `tune` times, for every 16-bit linear-layer shape of
the decoder and LM head and every graph batch size, torch's `F.linear` against cuBLASLt's heuristic
candidates (csrc/lt_gemm.cu) and the skinny GEMM's (config, split_k) candidates (its mma.sync kernels
up to batch 32; on sm_90a builds its TMA + wgmma kernels, csrc/tma_gemm.cu, up to 64), on the model's own weights (several layers in turn, so the L2 cache holds none of them,
as in a real step) inside CUDA graphs (as the step runs), and keeps the fastest. Each candidate's
result is checked against `F.linear` first. While the graphs are captured the plan is active, and
`linear` runs the chosen kernel; everywhere else (prefill, eager decode, CPU) it is `F.linear`.
`linear_add_` (out += x W^T in place: the residual adds of a decoder with folded norms, see
models/decoder.py) is tuned the same way, as separate shapes, against torch's `addmm_`.
With programmatic dependent launch (kernels.pdl, EngineConfig.pdl) skinny_gemm requests its first
weight stages before the kernel ahead of it has finished, so at batch sizes up to _PDL_TUNE_MAX_M it
is timed with PDL on, as the graphs run it. Not above: a chain of the same GEMM overlaps better than
a real step does, and at M = 32 the choices made that way made the step 2% slower (H200, session 8).
A wider list, the heuristic's candidates and their neighbours in split-k, tile and stages
(lt_gemm_algos(wide=True), 550-850 configurations per 7B shape at M = 64), held nothing faster than
the heuristic's own best (within 0.3%, H200, benchmarks/RESULTS.md session 8), so only the
heuristic's list is timed here. EngineConfig(tune_decode_gemms=False) turns it off;
Engine.stats()["decode_gemms"] reports what was chosen.

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
_SKINNY_MAX_M = 32          # skinny_gemm candidates up to this batch size (it loses to cuBLAS above)
_SKINNY_SPLITS = 3          # split_k values timed per skinny config: the largest giving <= 2 CTAs per SM
_PDL_TUNE_MAX_M = 16        # with PDL, time skinny_gemm with it up to this batch size (see tune)
_TMA_PDL_MAX_M = 8          # PDL-timed TMA candidates only up to this batch size (see _skinny_candidates)
_PAIR_MIN_M = 33            # the TMA pair kernels (kind 2: 32 rows per CTA of a pair) from this batch size


@dataclass(frozen=True)
class GemmShape:
    n: int
    k: int
    dtype: torch.dtype
    bias: bool
    add: bool = False       # out += x W^T (linear_add_) rather than out = x W^T (+ bias)

    @classmethod
    def of(cls, weight: torch.Tensor, bias: torch.Tensor | None, add: bool = False) -> "GemmShape":
        return cls(weight.shape[0], weight.shape[1], weight.dtype, bias is not None, add)

    def __str__(self) -> str:
        return f"{self.k}->{self.n}{' +bias' if self.bias else ''}{' +=' if self.add else ''}"


class LtAlgo:
    """A cuBLASLt algorithm (csrc lt_gemm): the 64-byte descriptor as a uint8 CPU tensor."""
    kind = "cublaslt"

    def __init__(self, algo: torch.Tensor, info: Sequence[int] = ()):
        self.algo, self.info = algo, list(info)     # info: lt_gemm_algos's row (csrc/ops.h)

    def __call__(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        return kernels.get().lt_gemm(x, w, b, None, None, w.dtype, self.algo)

    def add_(self, out: torch.Tensor, x: torch.Tensor, w: torch.Tensor) -> None:
        kernels.get().lt_gemm_add_(out, x, w, self.algo)

    def __repr__(self) -> str:
        return f"cublaslt{self.info}"


@dataclass(frozen=True)
class Skinny:
    """csrc skinny_gemm with one of its configs (block_n columns per CTA; tma: one of the TMA + wgmma
    kernels of csrc/tma_gemm.cu rather than an mma.sync one) and split_k CTAs per cluster."""
    config: int
    split_k: int
    block_n: int = 0
    tma: bool = False
    kind = "skinny"

    def __call__(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        return kernels.get().skinny_gemm(x, w, b, self.config, self.split_k)

    def add_(self, out: torch.Tensor, x: torch.Tensor, w: torch.Tensor) -> None:
        kernels.get().skinny_gemm_add_(out, x, w, self.config, self.split_k)

    def __repr__(self) -> str:
        return f"{'tma' if self.tma else 'skinny'}[block_n={self.block_n}, split_k={self.split_k}]"


Choice = LtAlgo | Skinny


@dataclass
class GemmPlan:
    """(batch size, shape) -> the kernel to run (a Choice), or None: F.linear."""
    choices: dict[tuple[int, GemmShape], Choice | None] = field(default_factory=dict)
    timings: list[dict] = field(default_factory=list)   # one row per (batch size, shape), microseconds
    seconds: float = 0.0
    note: str = "off"                                    # why nothing was tuned, when nothing was
    tuned_calls: int = 0                                 # linear() calls that ran a plan's choice

    def lookup(self, m: int, weight: torch.Tensor, bias: torch.Tensor | None, add: bool = False) -> Choice | None:
        return self.choices.get((m, GemmShape.of(weight, bias, add)))

    def summary(self) -> str:
        if not self.timings:
            return self.note
        kinds = [c.kind for c in self.choices.values() if c is not None]
        tma = sum(isinstance(c, Skinny) and c.tma for c in self.choices.values())
        saved = sum(r["torch_us"] - r["chosen_us"] for r in self.timings)
        return (f"tuned in {self.seconds:.1f}s: cuBLASLt for {kinds.count('cublaslt')}, skinny_gemm for "
                f"{kinds.count('skinny')} ({tma} TMA) of {len(self.choices)} (batch size, shape) pairs, {saved:.0f} us saved "
                f"summed over one call of each")


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


def _planned(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, add: bool) -> Choice | None:
    """The active plan's kernel for this call, counted as a tuned call, or None."""
    plan = _active
    if plan is None or x.dim() != 2:
        return None
    choice = plan.lookup(x.shape[0], weight, bias, add)
    if choice is not None:
        plan.tuned_calls += 1
    return choice


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear, or the plan's kernel for this batch size and shape while one is active."""
    choice = _planned(x, weight, bias, add=False)
    return F.linear(x, weight, bias) if choice is None else choice(x, weight, bias)


def linear_add_(out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """out += x @ weight.T in place (one rounding of the float32 sum, as a GEMM with beta 1), by the
    plan's kernel for this batch size and shape while one is active, else torch's addmm_."""
    choice = _planned(x, weight, None, add=True)
    if choice is None:
        return out.addmm_(x, weight.t())
    choice.add_(out, x, weight)
    return out


def linear_weights(model: nn.Module) -> dict[GemmShape, list[tuple[torch.Tensor, torch.Tensor | None]]]:
    """The 16-bit (weight, bias) pairs of the decoder's and LM head's linear layers, by shape (layers
    that accumulate into their output, `accumulates`, are shapes of their own)."""
    lm = model.language_model
    groups: dict[GemmShape, list] = {}
    mods = [m for m in lm.modules() if isinstance(m, nn.Linear)]
    head = lm.embed_tokens.weight if model.lm_head is None else model.lm_head.weight
    pairs = [(m.weight, m.bias, getattr(m, "accumulates", False)) for m in mods] + [(head, None, False)]
    for w, b, add in pairs:
        if w.dtype in _TUNED_DTYPES and w.is_cuda:
            groups.setdefault(GemmShape.of(w, b, add), []).append((w.detach(), None if b is None else b.detach()))
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


def _skinny_candidates(configs: list[list[int]], m: int, shape: GemmShape, sms: int) -> list[Skinny]:
    """skinny_gemm (config, split_k) pairs for an m-row problem: per config the _SKINNY_SPLITS largest
    split_k filling the SMs with as many CTAs as one holds (at most 2; split_k 1 when even that gives
    more). The mma.sync configs up to _SKINNY_MAX_M rows; the TMA ones up to their most rows (64),
    except at sizes in (_TMA_PDL_MAX_M, _PDL_TUNE_MAX_M]: timed with PDL there, at 16 they were
    picked where the step then ran 1-4% slower (H100, benchmarks/RESULTS.md session 9), while at
    1..8 the step got 1.6-2.2% faster; the same for the x-sharing ones (kind 3). The pair kernels
    (kind 2) from _PAIR_MIN_M rows: below, one CTA of each pair would only help load the weights."""
    if shape.n % 8 or shape.k % 8:
        return []
    out = []
    for config, (block_n, _threads, max_m, max_split, kind, per_sm) in enumerate(configs):
        if (m > max_m or (kind == 0 and m > _SKINNY_MAX_M) or (kind == 2 and m < _PAIR_MIN_M)
                or (kind in (1, 3) and _TMA_PDL_MAX_M < m <= _PDL_TUNE_MAX_M)):
            continue
        tiles = -(-shape.n // block_n)
        top = max(1, min(max_split, -(-shape.k // 64), per_sm * sms // tiles))
        out += [Skinny(config, s, block_n, kind >= 1) for s in range(top, max(0, top - _SKINNY_SPLITS), -1)]
    return out


def _addmm_(out: torch.Tensor, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return out.addmm_(x, w.t())


class _Case:
    """One (batch size, shape) being tuned, run as the step runs it: out = x W^T (+ b) with
    kernel(x, w, b), or, for an `add` shape, out += x W^T with kernel(out, x, w), each timed call
    accumulating into a buffer of its own."""

    def __init__(self, shape: GemmShape, pairs: list, x: torch.Tensor, gen: torch.Generator):
        self.shape, self.pairs, self.x = shape, pairs, x
        w0, b0 = pairs[0]
        self.ref = F.linear(x, w0, b0).float()
        if shape.add:
            self.base = (torch.randn(self.ref.shape, device=x.device, generator=gen) * self.ref.std()).to(x.dtype)
            self.ref += self.base.float()
            self.outs = [self.base.clone() for _ in pairs]
        self.torch_kernel = _addmm_ if shape.add else F.linear

    def rel_err(self, kernel) -> float:
        """|kernel's result - F.linear's| / |F.linear's| on the first pair."""
        w0, b0 = self.pairs[0]
        if self.shape.add:
            out = self.base.clone()
            kernel(out, self.x, w0)
        else:
            out = kernel(self.x, w0, b0)
        return ((out.float() - self.ref).norm() / self.ref.norm().clamp_min(1e-30)).item()

    def us(self, kernel) -> float:
        x, pairs = self.x, self.pairs
        if self.shape.add:
            return _graph_us(lambda: [kernel(o, x, w) for o, (w, _) in zip(self.outs, pairs)], len(pairs))
        return _graph_us(lambda: [kernel(x, w, b) for w, b in pairs], len(pairs))


def _tune_one(k, case: _Case, skinny: list[Skinny]) -> tuple[Choice | None, dict]:
    """The fastest correct kernel for one (batch size, shape), None where torch's is within _MIN_GAIN,
    and its timings row."""
    shape = case.shape
    torch_us = case.us(case.torch_kernel)
    w0, b0 = case.pairs[0]
    algos, info = k.lt_gemm_algos(case.x, w0, b0, None, None, shape.dtype, _MAX_CANDIDATES)
    candidates: list[Choice] = [LtAlgo(algos[i].clone(), info[i].tolist()) for i in range(algos.shape[0])]
    candidates += skinny
    best, best_us = None, torch_us
    for cand in candidates:
        kernel = cand.add_ if shape.add else cand
        try:
            err = case.rel_err(kernel)
        except RuntimeError:
            continue        # listed, but refused for this problem (cuBLASLt's check, a cluster
                            # that does not fit): not a candidate
        if err > _MAX_REL_ERR:
            continue
        us = case.us(kernel)
        if us < best_us:
            best, best_us = cand, us
    if best is not None and best_us > torch_us * (1 - _MIN_GAIN):
        best, best_us = None, torch_us
    return best, {"torch_us": round(torch_us, 2), "chosen_us": round(best_us, 2), "candidates": len(candidates),
                  "skinny": len(skinny), "chosen": repr(best) if best is not None else "F.linear"}


@torch.inference_mode()
def tune(model: nn.Module, sizes: Sequence[int], device: torch.device, pdl: bool = False) -> GemmPlan:
    """Times F.linear, cuBLASLt's candidates and skinny_gemm's for every (size, shape); see the
    module docstring. pdl: the graphs will run with programmatic dependent launch (kernels.pdl), so
    skinny_gemm is timed with it at sizes up to _PDL_TUNE_MAX_M."""
    k = kernels.get()
    plan = GemmPlan()
    if k is None:
        plan.note = "off: the csrc kernels are not loaded"
        return plan
    t0 = time.perf_counter()
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    skinny_configs = k.skinny_gemm_configs().tolist()      # rows: csrc/ops.h
    gen = torch.Generator(device=device).manual_seed(0)
    for shape, pairs in linear_weights(model).items():
        pairs = pairs[:_ROTATE]
        for m in sizes:
            x = torch.randn(m, shape.k, device=device, dtype=shape.dtype, generator=gen)
            with kernels.pdl(pdl and m <= _PDL_TUNE_MAX_M):
                best, row = _tune_one(k, _Case(shape, pairs, x, gen), _skinny_candidates(skinny_configs, m, shape, sms))
            plan.choices[(m, shape)] = best
            plan.timings.append({"m": m, "shape": str(shape), **row})
    torch.cuda.synchronize(device)
    plan.seconds = time.perf_counter() - t0
    if not plan.timings:
        plan.note = "off: no 16-bit linear layers (fp8 layers run torch._scaled_mm)"
    return plan
