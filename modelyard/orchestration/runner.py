"""JobRunner: plan, spawn, stream, collect, unload — wave after wave; then Parquet and the report.

The loop keeps at most `max_in_flight` requests per actor and waits on all of them with one
`ray.wait`; an ObjectRef is dropped as soon as its row is written, and inputs are enumerated
lazily, so the driver's memory does not grow with the data set. Actor death: the unfinished units
of that actor are retried (suspects one at a time, see work.py) on a respawned actor, within a
per-model restart budget; past it, the model's remaining units become retryable error rows.
A model whose keys are all in the store already (a resumed job) is not spawned at all.
"""
from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .memory import GIB, estimate_memory
from .planner import ModelDemand, Plan, Placement, plan
from .hub import resolve_job_paths
from .progress import Progress, format_summary
from .resume import check_resume
from .spec import JobSpec, ModelSpec
from .store import ResultStore, write_json_atomic
from .work import ModelWork, Unit, count_pending, failed_row, output_row

HandleFactory = Callable[[ModelSpec, Placement], Any]


def default_handle_factory(model: ModelSpec, placement: Placement, max_concurrent: int = 64):
    from ..actors import ModelHandle
    # num_cpus left to the handle: its actors hold (almost) no CPU, so parallel CPU models never wait
    # for each other's slots.
    return ModelHandle(model.path, name=f"{model.name}-{placement.replica}", engine_config=dict(model.engine),
                       num_gpus=placement.num_gpus, gpu_memory_budget_gib=placement.gpu_memory_budget_gib,
                       max_concurrent_requests=max_concurrent)


def _first_line(e: BaseException) -> str:
    # a remote failure's text starts with Ray's "ray::Actor.method() (pid=...)" header: say the real error
    remote = getattr(e, "cause", None) or getattr(e.__cause__, "cause", None)
    e = remote if isinstance(remote, BaseException) else e
    s = str(e).strip().splitlines()
    return f"{type(e).__name__}: {s[0] if s else ''}"


def _smallest_gpu_bytes() -> int | None:
    """Memory of the smallest GPU this process's node has, through NVML (no CUDA context)."""
    from ..actors.gpu import NvmlSession
    with NvmlSession.open() as nv:
        return min(nv.snapshot(i).total_bytes for i in range(nv.device_count())) if nv.ok else None


@dataclass
class _Worker:
    model: str
    replica: int
    handle: Any
    refs: set = field(default_factory=set)
    isolating: bool = False       # a suspect unit is in flight alone
    dead: bool = False
    seq: int = 0

    @property
    def label(self) -> str:
        return f"{self.model}#{self.replica}"


@dataclass
class JobResult:
    output_dir: Path
    results_path: Path
    summary: dict
    plan: Plan
    report: dict = field(default_factory=dict)
    wall_s: float = 0.0


class JobRunner:
    def __init__(self, job: JobSpec, *, address: str | None = None, progress: bool | None = None,
                 handle_factory: HandleFactory | None = None, log: Callable[[str], None] = print):
        self.job = job
        self.address = address
        self.progress_enabled = progress
        self.factory = handle_factory or (lambda m, p: default_handle_factory(m, p, max(64, job.max_in_flight)))
        self.log = log

    # -- planning ---------------------------------------------------------------------------------
    def _gpus(self) -> tuple[int, int | None]:
        import ray
        n = int(ray.cluster_resources().get("GPU", 0))
        if n == 0:
            return 0, None
        if self.job.gpu_memory_gib:
            return n, int(self.job.gpu_memory_gib * GIB)
        local = _smallest_gpu_bytes()
        if local is not None:
            return n, local
        # a driver without GPUs (a cluster's CPU head node): ask a GPU node, through NVML only
        import ray
        try:
            remote = ray.get(ray.remote(num_gpus=0.01, num_cpus=0)(_smallest_gpu_bytes).remote(), timeout=120)
        except Exception as e:
            remote, why = None, _first_line(e)
        else:
            why = "NVML unavailable there"
        if remote is None:
            raise RuntimeError(f"the cluster has GPUs but their memory could not be read ({why}); "
                               "set gpu_memory_gib in the job")
        return n, remote

    def make_plan(self) -> Plan:
        n, mem = self._gpus()
        demands = [ModelDemand(m.name, m.replicas, m.gpus, estimate_memory(m.path, m.engine, on_gpu=n > 0),
                               has_budget=bool(m.engine.get("gpu_memory_budget_gib"))) for m in self.job.models]
        return plan(demands, self.job.mode, n, mem)

    # -- the job ----------------------------------------------------------------------------------
    def run(self) -> JobResult:
        from ..actors import ensure_ray
        t0 = time.perf_counter()
        ensure_ray(self.address)
        self.job = job = resolve_job_paths(self.job)
        out = Path(job.output_dir)
        for warning in check_resume(job, out):      # SpecError if out holds another job's rows
            self.log(f"warning: {warning}")
        store = ResultStore(out, retry_errors=job.retry_errors)
        if store.resumed_rows:
            self.log(f"resuming: {store.num_done} key(s) already done in {store.jsonl}"
                     + (f" (dropped a torn last row of {store.dropped_torn_bytes} bytes)" if store.dropped_torn_bytes else ""))
        write_json_atomic(out / "job.json", job.to_dict())
        the_plan = self.make_plan()
        self.log(the_plan.describe())
        pending, total = count_pending(job, store)
        progress = Progress([m.name for m in job.models], pending,
                            {m: total - pending[m] for m in pending}, self.progress_enabled)
        self._restarts = {m.name: 0 for m in job.models}
        try:
            for wave in the_plan.waves:
                self._run_wave(wave, store, progress)
        finally:
            progress.close()
            store.close()
        results_path = store.finalize()
        summary = progress.summary()
        result = JobResult(out, results_path, summary, the_plan, wall_s=time.perf_counter() - t0)
        if job.report:
            import pandas as pd

            from .compare import write_comparison
            df = pd.read_parquet(results_path)
            result.report = write_comparison(out, df, [m.name for m in job.models], summary, title=job.name,
                                             max_images=job.report_max_images,
                                             meta={"mode": job.mode, "prompts": len(job.prompts)})
        write_json_atomic(out / "summary.json", {"wall_s": round(result.wall_s, 3), "mode": job.mode,
                                                 "plan": the_plan.describe(), "models": summary})
        self.log(format_summary(summary))
        return result

    # -- one wave ---------------------------------------------------------------------------------
    def _run_wave(self, wave: tuple[Placement, ...], store: ResultStore, progress: Progress) -> None:
        import ray
        job = self.job
        works = {p.model: ModelWork(job, job.model(p.model), store) for p in wave}
        # A model with nothing pending is not spawned (a load costs seconds to minutes, for no row).
        # None pending at the start of the run stays none (the done set only grows): no second pass
        # over the inputs then; otherwise the check stops at the first pending key.
        for m, work in works.items():
            if progress.stats[m].total == 0 or not work.has_pending():
                self.log(progress.skipped_load(m))
        wave = tuple(p for p in wave if not progress.stats[p.model].not_loaded)
        if not wave:
            return
        workers = [_Worker(p.model, p.replica, self.factory(job.model(p.model), p)) for p in wave]
        self._store, self._progress, self._works, self._workers = store, progress, works, workers
        inflight: dict[Any, tuple[_Worker, Unit]] = {}
        self._inflight = inflight
        try:
            with ThreadPoolExecutor(max_workers=len(workers)) as pool:
                spawned = list(pool.map(self._spawn, workers))
            load_errors: dict[str, str] = {}
            for w, err in zip(workers, spawned):
                if err is not None:
                    w.dead = True
                    load_errors.setdefault(w.model, err)
                    progress.stats[w.model].notes.append(f"{w.label} failed to load: {err}")
            for m, err in load_errors.items():
                self._abandon_if_dead(m, f"the model failed to load: {err}")
            while True:
                for w in workers:
                    if not w.dead:
                        self._fill(w)
                if not inflight:
                    break
                refs = list(inflight)
                ready, rest = ray.wait(refs, num_returns=1, timeout=1.0)
                if ready and rest:
                    more, _ = ray.wait(rest, num_returns=len(rest), timeout=0)
                    ready += more
                for ref in ready:
                    if ref in inflight:         # a death handled earlier in this batch may have taken it
                        self._collect(ref)
        finally:
            for w in workers:
                self._unload(w)
            self._inflight = {}

    def _spawn(self, w: _Worker) -> str | None:
        try:
            info = w.handle.spawn(timeout=self.job.spawn_timeout_s)
        except Exception as e:
            return _first_line(e)
        self._progress.loaded(w.model, info)
        return None

    def _unload(self, w: _Worker) -> None:
        try:
            try:
                self._progress.engine_stats(w.model, w.handle.stats())
            except Exception:
                pass                            # a dead actor has no stats; its unload still counts
            res = w.handle.unload()
        except Exception as e:                  # UnloadError carries the measured numbers
            res = dict(getattr(e, "result", {}) or {})
            res["note"] = _first_line(e)
        self._progress.unloaded(w.model, res)

    def _fill(self, w: _Worker) -> None:
        work = self._works[w.model]
        while len(w.refs) < self.job.max_in_flight and not w.isolating:
            unit = work.take(allow_suspect=not w.refs)
            if unit is None:
                return
            w.isolating = unit.attempts > 0
            w.seq += 1
            unit.request_id = f"{w.label}/{w.seq}"
            unit.submitted_at = time.perf_counter()
            try:
                ref = w.handle.submit(unit.item.source, unit.text, self.job.sampling, request_id=unit.request_id)
            except Exception as e:              # e.g. an argument Ray cannot serialise: this unit only
                w.isolating = False
                work.finish(unit)
                self._write(failed_row(unit, w.model, f"submit failed: {_first_line(e)}", retryable=False,
                                       worker=w.label))
                continue
            self._inflight[ref] = (w, unit)
            w.refs.add(ref)
            self._progress.submitted(w.model)

    def _write(self, row: dict) -> None:
        self._store.add(row)
        self._progress.result(row["model"], row.get("finish_reason") == "error")

    def _collect(self, ref) -> None:
        from ..actors import ActorDied, EngineFailed
        w, unit = self._inflight.pop(ref)
        w.refs.discard(ref)
        try:
            (out,) = w.handle.get([ref])
        except ActorDied as e:
            self._on_death(w, [(ref, unit)], e)
            return
        except EngineFailed as e:               # the actor refuses further work: like a death
            self._on_death(w, [(ref, unit)], e)
            return
        except Exception as e:                  # this request failed; the actor lives on
            row = failed_row(unit, w.model, _first_line(e), retryable=False, worker=w.label)
        else:
            row = output_row(unit, w.model, out, time.perf_counter() - unit.submitted_at, w.label)
        w.isolating = False
        self._works[w.model].finish(unit)
        self._write(row)

    def _on_death(self, w: _Worker, first: list, exc: BaseException) -> None:
        from ..actors import ActorDied
        job, work = self.job, self._works[w.model]
        units = list(first)
        for r in list(w.refs):
            units.append((r, self._inflight.pop(r)[1]))
        w.refs.clear()
        alone = w.isolating and len(units) == 1
        w.isolating = False
        completed = dict(getattr(exc, "completed", {}) or {})
        others = [r for r, _ in units[1:]]
        if others:
            try:
                outs = w.handle.get(others)
                completed.update({o.request_id: o for o in outs})
            except ActorDied as e2:
                completed.update(e2.completed)
            except Exception:
                pass
        for _, unit in units:
            out = completed.get(unit.request_id)
            if out is not None:
                work.finish(unit)
                self._write(output_row(unit, w.model, out, time.perf_counter() - unit.submitted_at, w.label))
                continue
            unit.attempts += 1
            if unit.attempts >= job.max_item_attempts:
                work.finish(unit)
                why = (f"the model actor died {unit.attempts} times while captioning this item"
                       + (", the last time with nothing else in flight" if alone else ""))
                self._write(failed_row(unit, w.model, why, retryable=False, worker=w.label))
            else:
                work.put_back(unit)
        self._restarts[w.model] += 1
        why = _first_line(exc)
        if self._restarts[w.model] > job.max_restarts:
            w.dead = True
            self._progress.stats[w.model].notes.append(f"{w.label} died, no restarts left: {why}")
        else:
            self._progress.restarted(w.model, f"{w.label}: {why}")
            try:
                w.handle.respawn()
            except Exception as e:
                w.dead = True
                self._progress.stats[w.model].notes.append(f"{w.label} respawn failed: {_first_line(e)}")
        self._abandon_if_dead(w.model, f"the model actor died {self._restarts[w.model]} time(s) "
                                       f"(max_restarts={job.max_restarts}): {why}")

    def _abandon_if_dead(self, model: str, reason: str) -> None:
        """No live replica left: every remaining unit of the model becomes a retryable error row."""
        if any(not w.dead for w in self._workers if w.model == model):
            return
        if any(w.refs for w in self._workers if w.model == model):
            return
        work = self._works[model]
        for unit in work.drain():
            work.finish(unit)
            self._write(failed_row(unit, model, reason, retryable=True))


def run_job(job: JobSpec, **kwargs) -> JobResult:
    """Run a job to the end (resuming what an earlier run into the same output_dir did)."""
    return JobRunner(job, **kwargs).run()
