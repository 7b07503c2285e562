"""JobRunner: resolve, resume, plan, then run the waves (wave.py); then Parquet and the report.

Inputs are enumerated lazily and rows stream into the store, so the driver's memory does not grow
with the data set. A model whose keys are all in the store already (a resumed job) is not spawned
at all. What happens inside one wave (spawn, in-flight bound, actor deaths, unload) is wave.py's.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ..checks.resume import check_resume
from ..outputs.progress import Progress, format_summary
from ..outputs.store import ResultStore, write_json_atomic
from ..planning.memory import GIB, estimate_memory
from ..planning.planner import ModelDemand, Placement, Plan, plan
from ..spec.hub import resolve_job_paths
from ..spec.job import JobSpec, ModelSpec
from .wave import HandleFactory, WaveRunner, fail_all, first_line, record
from .work import ModelWork, count_pending

PREP_CPUS = 4  # image decoding threads a GPU actor reserves: ~4 x 30 ms per 12 MP JPEG outruns the GPU


def gpu_actor_cpus(cluster: dict) -> float | None:
    """CPUs a GPU actor reserves for its image decoding: PREP_CPUS, or the cluster's CPUs per GPU
    where that is less, so that reserving them can never leave a GPU without an actor; None (the
    handle's default, no reservation) on a cluster without a whole CPU per GPU."""
    gpus, cpus = float(cluster.get("GPU", 0)), float(cluster.get("CPU", 0))
    share = int(cpus // gpus) if gpus else 0
    return float(min(PREP_CPUS, share)) if share >= 1 else None


def default_handle_factory(model: ModelSpec, placement: Placement, max_concurrent: int = 64):
    import ray

    from ...actors import ModelHandle

    # CPU actors keep the handle's sliver of a CPU, so parallel CPU models never wait for each
    # other's slots; GPU actors reserve the cores their image decoding uses (gpu_actor_cpus), in
    # proportion to their share of the GPU.
    num_cpus = gpu_actor_cpus(ray.cluster_resources()) if placement.num_gpus > 0 else None
    if num_cpus is not None and placement.num_gpus < 1:
        num_cpus *= placement.num_gpus  # actors sharing a GPU share its CPUs: all of them still fit
    return ModelHandle(
        model.path,
        name=f"{model.name}-{placement.replica}",
        engine_config=dict(model.engine),
        num_gpus=placement.num_gpus,
        num_cpus=num_cpus,
        gpu_memory_budget_gib=placement.gpu_memory_budget_gib,
        max_concurrent_requests=max_concurrent,
    )


def _smallest_gpu_bytes() -> int | None:
    """Memory of the smallest GPU this process's node has, through NVML (no CUDA context)."""
    from ...actors.gpu import NvmlSession

    with NvmlSession.open() as nv:
        return min(nv.snapshot(i).total_bytes for i in range(nv.device_count())) if nv.ok else None


@dataclass
class JobResult:
    output_dir: Path
    results_path: Path
    summary: dict
    plan: Plan
    report: dict = field(default_factory=dict)
    wall_s: float = 0.0


class JobRunner:
    def __init__(
        self,
        job: JobSpec,
        *,
        address: str | None = None,
        progress: bool | None = None,
        handle_factory: HandleFactory | None = None,
        log: Callable[[str], None] = print,
    ):
        self.job = job
        self.address = address
        self.progress_enabled = progress
        # the driver bounds what each actor holds (max_in_flight); the actor's own limit only queues
        limit = 4096 if job.max_in_flight == "auto" else max(64, job.max_in_flight)
        self.factory = handle_factory or (lambda m, p: default_handle_factory(m, p, limit))
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
        try:
            remote = ray.get(ray.remote(num_gpus=0.01, num_cpus=0)(_smallest_gpu_bytes).remote(), timeout=120)
        except Exception as e:
            remote, why = None, first_line(e)
        else:
            why = "NVML unavailable there"
        if remote is None:
            raise RuntimeError(
                f"the cluster has GPUs but their memory could not be read ({why}); set gpu_memory_gib in the job"
            )
        return n, remote

    def make_plan(self) -> Plan:
        """The placement of every model whose checkpoint can be sized; a model whose checkpoint is
        unreadable goes into `self.unplanned` (name -> why) and gets error rows instead, as it would
        if its actor failed to load: the other models run."""
        n, mem = self._gpus()
        demands, self.unplanned = [], {}
        for m in self.job.models:
            try:
                estimate = estimate_memory(m.path, m.engine, on_gpu=n > 0)
            except (OSError, ValueError) as e:  # SpecError is a ValueError
                self.unplanned[m.name] = f"the model failed to load: {type(e).__name__}: {e}"
                continue
            demands.append(
                ModelDemand(
                    m.name, m.replicas, m.gpus, estimate, has_budget=bool(m.engine.get("gpu_memory_budget_gib"))
                )
            )
        return plan(demands, self.job.mode, n, mem)

    def _fail_unplanned(self, store: ResultStore, progress: Progress) -> None:
        for name, why in self.unplanned.items():
            progress.load_failed(name, why, permanent=True)
            fail_all(
                ModelWork(self.job, self.job.model(name), store),
                why,
                retryable=False,
                write=functools.partial(record, store, progress),
            )

    # -- the job ----------------------------------------------------------------------------------
    def run(self) -> JobResult:
        from ...actors import ensure_ray

        t0 = time.perf_counter()
        out = Path(self.job.output_dir)
        # the lock first: a second driver on this directory stops here, before Ray or any download
        store = ResultStore(out, retry_errors=self.job.retry_errors)
        progress = None
        try:
            ensure_ray(self.address)
            self.job = job = resolve_job_paths(self.job)
            for warning in check_resume(job, out):  # SpecError if out holds another job's rows
                self.log(f"warning: {warning}")
            if store.resumed_rows:
                self.log(
                    f"resuming: {store.num_done} key(s) already done in {store.jsonl}"
                    + (
                        f" (dropped a torn last row of {store.dropped_torn_bytes} bytes)"
                        if store.dropped_torn_bytes
                        else ""
                    )
                )
            write_json_atomic(out / "job.json", job.to_dict())
            the_plan = self.make_plan()
            self.log(the_plan.describe())
            pending, total = count_pending(job, store)
            progress = Progress(
                [m.name for m in job.models], pending, {m: total - pending[m] for m in pending}, self.progress_enabled
            )
            self._restarts = {m.name: 0 for m in job.models}
            self._fail_unplanned(store, progress)
            for wave in the_plan.waves:
                WaveRunner(
                    job,
                    wave,
                    factory=self.factory,
                    store=store,
                    progress=progress,
                    restarts=self._restarts,
                    log=self.log,
                ).run()
            progress.close()
            results_path = store.finalize()
            summary = progress.summary()
            result = JobResult(out, results_path, summary, the_plan, wall_s=time.perf_counter() - t0)
            if job.report:
                import pandas as pd

                from ..outputs.compare import write_comparison

                df = pd.read_parquet(results_path)
                result.report = write_comparison(
                    out,
                    df,
                    [m.name for m in job.models],
                    summary,
                    title=job.name,
                    max_images=job.report_max_images,
                    meta={"mode": job.mode, "prompts": len(job.prompts)},
                )
            write_json_atomic(
                out / "summary.json",
                {"wall_s": round(result.wall_s, 3), "mode": job.mode, "plan": the_plan.describe(), "models": summary},
            )
        finally:
            if progress is not None:
                progress.close()
            store.close()
        self.log(format_summary(summary))
        return result


def run_job(job: JobSpec, **kwargs) -> JobResult:
    """Run a job to the end (resuming what an earlier run into the same output_dir did)."""
    return JobRunner(job, **kwargs).run()
