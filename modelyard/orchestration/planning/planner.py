"""Placement: which actor runs where, in which wave. Pure functions over plain data (memory
estimates from memory.py), unit-tested on a CPU.

Packing: models in decreasing size, each onto the GPU with the most room left (capacity 1.0 per
GPU), so models spread over the GPUs and share one only when they outnumber them. Then each GPU's
unplanned memory goes to the actors on it. An actor that shares a GPU gets `num_gpus` = its
fraction and an absolute `gpu_memory_budget_gib` for the engine, because Ray's fractional GPUs do
not limit memory by themselves.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from .memory import DEFAULT_PLANNER_CONFIG, GIB, MemoryEstimate, PlannerConfig


class PlanError(ValueError):
    """The models cannot be placed as asked; the message says what does not fit and what to change."""


@dataclass(frozen=True)
class Placement:
    """One actor: a replica of a model, its Ray GPU request and the engine budget that goes with it."""

    model: str
    replica: int
    num_gpus: float
    gpu_memory_budget_gib: float | None = None
    gpu_slot: int | None = None  # the planner's bin; Ray picks the physical device


@dataclass(frozen=True)
class Plan:
    mode: str
    waves: tuple[tuple[Placement, ...], ...]
    estimates: Mapping[str, MemoryEstimate] = field(default_factory=dict)
    notes: tuple[str, ...] = ()

    def describe(self) -> str:
        lines = [f"plan ({self.mode}): {len(self.waves)} wave(s)"]
        for i, wave in enumerate(self.waves):
            lines.append(f"  wave {i + 1}:")
            for p in wave:
                where = "cpu" if p.num_gpus == 0 else f"gpu slot {p.gpu_slot}, {p.num_gpus:g} GPU"
                budget = f", budget {p.gpu_memory_budget_gib:.2f} GiB" if p.gpu_memory_budget_gib else ""
                est = self.estimates.get(p.model)
                lines.append(f"    {p.model}#{p.replica}: {where}{budget}" + (f"  [{est.describe()}]" if est else ""))
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


@dataclass(frozen=True)
class ModelDemand:
    """What the planner needs of a ModelSpec: its name, replicas, explicit GPUs and estimate."""

    name: str
    replicas: int
    gpus: float | None
    estimate: MemoryEstimate
    has_budget: bool = False  # the user fixed engine.gpu_memory_budget_gib


def _fraction(d: ModelDemand, gpu_bytes: int, step: float) -> float:
    if d.gpus is not None:
        return float(d.gpus)
    if d.estimate.source == "unknown":
        return 1.0
    frac = math.ceil(d.estimate.total_bytes / gpu_bytes / step - 1e-9) * step
    if frac > 1.0:
        raise PlanError(
            f"model {d.name!r} needs about {d.estimate.total_bytes / GIB:.1f} GiB "
            f"({d.estimate.describe()}), more than one GPU's {gpu_bytes / GIB:.1f} GiB; one model runs on "
            "one GPU here: lower its KV budget (engine.max_batch_size or engine.gpu_memory_budget_gib) "
            "or use a bigger GPU"
        )
    # a model that cannot share its GPU anyway takes all of it and lets the engine size its KV pool
    return 1.0 if frac > 0.5 else round(frac, 6)


def _placements(d: ModelDemand, frac: float, gpu_bytes: int) -> list[Placement]:
    budget = None
    if 0 < frac < 1 and not d.has_budget:
        budget = round(frac * gpu_bytes / GIB, 3)
    return [Placement(d.name, r, frac, budget) for r in range(d.replicas)]


def _pack(items: list[Placement], bins: list[float]) -> list[Placement] | None:
    """Place each item on the GPU with the most room left that fits it (worst fit: models spread over
    the GPUs and share one only when they outnumber them). `bins` holds remaining capacities and is
    updated on success only."""
    trial = list(bins)
    placed = []
    for p in items:
        need = max(p.num_gpus, 0.0)
        if need > 1.0:  # multi-GPU replica: whole empty GPUs
            k = int(math.ceil(need))
            empty = [i for i, c in enumerate(trial) if c >= 1.0 - 1e-9][:k]
            if len(empty) < k:
                return None
            for i in empty:
                trial[i] = 0.0
            placed.append(Placement(p.model, p.replica, p.num_gpus, p.gpu_memory_budget_gib, empty[0]))
            continue
        i = max(range(len(trial)), key=lambda j: (trial[j], -j))
        if trial[i] + 1e-9 < need:
            return None
        trial[i] -= need
        placed.append(Placement(p.model, p.replica, p.num_gpus, p.gpu_memory_budget_gib, i))
    bins[:] = trial
    return placed


def plan(
    demands: Sequence[ModelDemand],
    mode: str,
    num_gpus: int,
    gpu_memory_bytes: int | None,
    cfg: PlannerConfig = DEFAULT_PLANNER_CONFIG,
) -> Plan:
    """Waves of placements. num_gpus=0 plans for CPU actors (everything fits; memory is the host's)."""
    estimates = {d.name: d.estimate for d in demands}
    if num_gpus == 0:
        cpu = [[Placement(d.name, r, 0.0) for r in range(d.replicas)] for d in demands]
        waves = cpu if mode == "sequential" else [[p for w in cpu for p in w]]
        return Plan(mode, tuple(tuple(w) for w in waves), estimates, ("no GPU: every actor runs on the CPU",))
    if gpu_memory_bytes is None:
        raise PlanError("planning for GPUs needs the per-GPU memory (NVML, or gpu_memory_gib in the job)")
    notes = []
    fracs = {}
    for d in demands:
        fracs[d.name] = _fraction(d, gpu_memory_bytes, cfg.fraction_step)
        if d.estimate.source == "unknown" and d.gpus is None:
            notes.append(f"{d.name}: not a local checkpoint, size unknown here: given a whole GPU")
        if fracs[d.name] > 1 and fracs[d.name] != int(fracs[d.name]):
            raise PlanError(f"model {d.name!r}: gpus={fracs[d.name]} — above 1, use a whole number of GPUs")
    groups = {d.name: _placements(d, fracs[d.name], gpu_memory_bytes) for d in demands}

    def need(d: ModelDemand) -> float:
        return fracs[d.name] * d.replicas

    if mode == "sequential":
        waves = []
        for d in demands:
            placed = _pack(groups[d.name], [1.0] * num_gpus)
            if placed is None:
                raise PlanError(
                    f"model {d.name!r}: {d.replicas} replica(s) x {fracs[d.name]:g} GPU do not fit "
                    f"on {num_gpus} GPU(s); lower replicas"
                )
            waves.append(placed)
    elif mode == "parallel":
        bins = [1.0] * num_gpus
        waves = [[]]
        for d in sorted(demands, key=need, reverse=True):
            placed = _pack(groups[d.name], bins)
            if placed is None:
                total = sum(need(x) for x in demands)
                raise PlanError(
                    f"parallel: the models need about {total:.2f} GPU(s) together but {num_gpus} "
                    f"GPU(s) are here ({d.name!r} did not fit); use mode='auto' (waves) or 'sequential'"
                )
            waves[0].extend(placed)
        order = {d.name: i for i, d in enumerate(demands)}
        waves[0].sort(key=lambda p: (order[p.model], p.replica))
    elif mode == "auto":
        wave_bins: list[list[float]] = []
        waves = []
        for d in sorted(demands, key=need, reverse=True):
            for bins, wave in zip(wave_bins, waves):
                placed = _pack(groups[d.name], bins)
                if placed is not None:
                    wave.extend(placed)
                    break
            else:
                bins = [1.0] * num_gpus
                placed = _pack(groups[d.name], bins)
                if placed is None:
                    raise PlanError(
                        f"model {d.name!r}: {d.replicas} replica(s) x {fracs[d.name]:g} GPU do not "
                        f"fit on {num_gpus} GPU(s) even alone; lower replicas"
                    )
                wave_bins.append(bins)
                waves.append(placed)
    else:
        raise PlanError(f"unknown mode {mode!r}")
    fixed = {d.name for d in demands if d.gpus is not None or d.has_budget}
    waves = [_fill_gpus(w, fixed, gpu_memory_bytes, cfg.fraction_step) for w in waves]
    return Plan(mode, tuple(tuple(w) for w in waves), estimates, tuple(notes))


def _fill_gpus(wave: list[Placement], fixed: set[str], gpu_bytes: int, step: float) -> list[Placement]:
    """Hand each GPU's unplanned memory to the actors on it, in proportion to their estimates: a
    bigger KV pool means bigger batches. An actor alone on its GPU takes all of it (no budget: the
    engine sizes its pool from the free memory); explicit `gpus` or budgets stay as given."""
    by_slot: dict[int, list[Placement]] = {}
    for p in wave:
        by_slot.setdefault(p.gpu_slot, []).append(p)
    out = []
    for p in wave:
        mates = by_slot[p.gpu_slot]
        if p.model in fixed or p.num_gpus >= 1.0:
            out.append(p)
            continue
        if len(mates) == 1:
            out.append(Placement(p.model, p.replica, 1.0, None, p.gpu_slot))
            continue
        flexible = [m for m in mates if m.model not in fixed]
        room = 1.0 - sum(m.num_gpus for m in mates if m.model in fixed)
        total = sum(m.num_gpus for m in flexible)
        frac = math.floor(p.num_gpus * room / total / step + 1e-9) * step
        frac = round(max(frac, p.num_gpus), 6)
        out.append(Placement(p.model, p.replica, frac, round(frac * gpu_bytes / GIB, 3), p.gpu_slot))
    return out
