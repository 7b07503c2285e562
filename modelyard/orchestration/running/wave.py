"""WaveRunner: one wave's actors — spawn, stream units, collect rows, handle deaths, unload.

The loop keeps at most `max_in_flight` requests per actor ("auto": what that actor's engine runs in
one step, plus a queue for its next steps, from what the actor reports after loading; see
in_flight_limit) and waits on all of them with one
`ray.wait`; an ObjectRef is dropped as soon as its row is written, so the driver's memory does not
grow with the data set. Actor death: the unfinished units of that actor are retried (suspects one
at a time, see work.py) on a respawned actor, within a per-model restart budget; past it, the
model's remaining units become retryable error rows. A model that cannot load gives error rows
that are retryable only when a rerun could load it (not for an unsupported architecture, a
missing package or an unreadable checkpoint: those need a fix, then `--retry-errors`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from ..outputs.progress import Progress
from ..outputs.store import ResultStore
from ..planning.planner import Placement
from ..spec.job import JobSpec, ModelSpec
from .work import ModelWork, Unit, failed_row, output_row

HandleFactory = Callable[[ModelSpec, Placement], Any]


def remote_cause(e: BaseException) -> BaseException:
    """The actor's own exception behind a Ray error (directly, or behind the handle's error), else `e`."""
    remote = getattr(e, "cause", None) or getattr(e.__cause__, "cause", None)
    return remote if isinstance(remote, BaseException) else e


def first_line(e: BaseException) -> str:
    # a remote failure's text starts with Ray's "ray::Actor.method() (pid=...)" header: say the real error
    e = remote_cause(e)
    s = str(e).strip().splitlines()
    return f"{type(e).__name__}: {s[0] if s else ''}"


def record(store: ResultStore, progress: Progress, row: dict) -> None:
    """Write one row and count it in the model's progress."""
    store.add(row)
    progress.result(row["model"], row.get("finish_reason") == "error", row.get("num_generated_tokens", 0))


@dataclass
class _Worker:
    model: str
    replica: int
    handle: Any
    refs: set = field(default_factory=set)
    isolating: bool = False  # a suspect unit is in flight alone
    dead: bool = False
    seq: int = 0
    limit: int = 1  # requests kept in flight (set once the actor has loaded)

    @property
    def label(self) -> str:
        return f"{self.model}#{self.replica}"


def in_flight_limit(job: JobSpec, engine: dict) -> int:
    """Requests to keep in one actor: the job's max_in_flight, or for "auto" the most sequences its
    engine runs in a step (capped by how many full-length captions its KV pool holds), plus a
    quarter more (at least 8) queued, so finished sequences are replaced at once and the actor's
    preprocessing works ahead. The driver holds refs and paths only, so this costs it nothing."""
    if job.max_in_flight != "auto":
        return job.max_in_flight
    batch = int(engine.get("max_batch_size") or 8)
    kv_tokens = engine.get("kv_tokens")
    if kv_tokens:
        batch = max(1, min(batch, kv_tokens // max(job.sampling.max_new_tokens, 1)))
    return batch + max(8, batch // 4)


class WaveRunner:
    """Runs the placements of one wave to the end, writing one row per unit into the store.

    `restarts` counts actor deaths per model; it is the job's, shared by all waves, so the
    max_restarts budget is per model and per job, not per wave.
    """

    def __init__(
        self,
        job: JobSpec,
        wave: tuple[Placement, ...],
        *,
        factory: HandleFactory,
        store: ResultStore,
        progress: Progress,
        restarts: dict[str, int],
        log: Callable[[str], None],
    ):
        self.job, self.wave, self.factory, self.log = job, wave, factory, log
        self._store, self._progress, self._restarts = store, progress, restarts
        self._works: dict[str, ModelWork] = {}
        self._workers: list[_Worker] = []
        self._inflight: dict[Any, tuple[_Worker, Unit]] = {}

    def run(self) -> None:
        import ray

        job, progress = self.job, self._progress
        works = {p.model: ModelWork(job, job.model(p.model), self._store) for p in self.wave}
        # A model with nothing pending is not spawned (a load costs seconds to minutes, for no row).
        # None pending at the start of the run stays none (the done set only grows): no second pass
        # over the inputs then; otherwise the check stops at the first pending key.
        for m, work in works.items():
            if progress.stats[m].total == 0 or not work.has_pending():
                self.log(progress.skipped_load(m))
        wave = tuple(p for p in self.wave if not progress.stats[p.model].not_loaded)
        if not wave:
            return
        workers = [_Worker(p.model, p.replica, self.factory(job.model(p.model), p)) for p in wave]
        self._works, self._workers = works, workers
        inflight = self._inflight
        try:
            with ThreadPoolExecutor(max_workers=len(workers)) as pool:
                spawned = list(pool.map(self._spawn, workers))
            load_errors: dict[str, tuple[str, bool]] = {}
            for w, err in zip(workers, spawned):
                if err is not None:
                    w.dead = True
                    load_errors.setdefault(w.model, err)
                    progress.load_failed(w.model, f"{w.label} failed to load: {err[0]}", permanent=err[1])
            for m, (err, permanent) in load_errors.items():
                self._abandon_if_dead(m, f"the model failed to load: {err}", retryable=not permanent)
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
                    if ref in inflight:  # a death handled earlier in this batch may have taken it
                        self._collect(ref)
        finally:
            for w in workers:
                self._unload(w)
            self._inflight = {}

    def _spawn(self, w: _Worker) -> tuple[str, bool] | None:
        """None once loaded, else (why, permanent)."""
        from ...actors import is_permanent

        try:
            info = w.handle.spawn(timeout=self.job.spawn_timeout_s)
        except Exception as e:
            # a LoadFailed says itself; other handles' errors are judged by their remote cause
            permanent = getattr(e, "permanent", False) or is_permanent(remote_cause(e)) or is_permanent(e.__cause__)
            return first_line(e), bool(permanent)
        w.limit = in_flight_limit(self.job, (info or {}).get("engine") or {})
        self._progress.loaded(w.model, info)
        return None

    def _unload(self, w: _Worker) -> None:
        try:
            try:
                self._progress.engine_stats(w.model, w.handle.stats())
            except Exception:
                pass  # a dead actor has no stats; its unload still counts
            res = w.handle.unload()
        except Exception as e:  # UnloadError carries the measured numbers
            res = dict(getattr(e, "result", {}) or {})
            res["note"] = first_line(e)
        self._progress.unloaded(w.model, res)

    def _fill(self, w: _Worker) -> None:
        work = self._works[w.model]
        while len(w.refs) < w.limit and not w.isolating:
            unit = work.take(allow_suspect=not w.refs)
            if unit is None:
                return
            w.isolating = unit.attempts > 0
            w.seq += 1
            unit.request_id = f"{w.label}/{w.seq}"
            unit.submitted_at = time.perf_counter()
            try:
                ref = w.handle.submit(unit.item.source, unit.text, self.job.sampling, request_id=unit.request_id)
            except Exception as e:  # e.g. an argument Ray cannot serialise: this unit only
                w.isolating = False
                work.finish(unit)
                self._write(
                    failed_row(unit, w.model, f"submit failed: {first_line(e)}", retryable=False, worker=w.label)
                )
                continue
            self._inflight[ref] = (w, unit)
            w.refs.add(ref)
            self._progress.submitted(w.model)

    def _write(self, row: dict) -> None:
        record(self._store, self._progress, row)

    def _collect(self, ref) -> None:
        from ...actors import ActorDied, EngineFailed

        w, unit = self._inflight.pop(ref)
        w.refs.discard(ref)
        try:
            (out,) = w.handle.get([ref])
        except ActorDied as e:
            self._on_death(w, [(ref, unit)], e)
            return
        except EngineFailed as e:  # the actor refuses further work: like a death
            self._on_death(w, [(ref, unit)], e)
            return
        except Exception as e:  # this request failed; the actor lives on
            row = failed_row(unit, w.model, first_line(e), retryable=False, worker=w.label)
        else:
            row = output_row(unit, w.model, out, time.perf_counter() - unit.submitted_at, w.label)
        w.isolating = False
        self._works[w.model].finish(unit)
        self._write(row)

    def _on_death(self, w: _Worker, first: list, exc: BaseException) -> None:
        from ...actors import ActorDied

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
                why = f"the model actor died {unit.attempts} times while captioning this item" + (
                    ", the last time with nothing else in flight" if alone else ""
                )
                self._write(failed_row(unit, w.model, why, retryable=False, worker=w.label))
            else:
                work.put_back(unit)
        self._restarts[w.model] += 1
        why = first_line(exc)
        if self._restarts[w.model] > job.max_restarts:
            w.dead = True
            self._progress.stats[w.model].notes.append(f"{w.label} died, no restarts left: {why}")
        else:
            self._progress.restarted(w.model, f"{w.label}: {why}")
            try:
                w.handle.respawn()
            except Exception as e:
                w.dead = True
                self._progress.stats[w.model].notes.append(f"{w.label} respawn failed: {first_line(e)}")
        self._abandon_if_dead(
            w.model, f"the model actor died {self._restarts[w.model]} time(s) (max_restarts={job.max_restarts}): {why}"
        )

    def _abandon_if_dead(self, model: str, reason: str, retryable: bool = True) -> None:
        """No live replica left: every remaining unit of the model becomes an error row."""
        if any(not w.dead for w in self._workers if w.model == model):
            return
        if any(w.refs for w in self._workers if w.model == model):
            return
        fail_all(self._works[model], reason, retryable, self._write)


def fail_all(work: ModelWork, reason: str, retryable: bool, write: Callable[[dict], None]) -> None:
    """An error row for every unit of the model not yet submitted (it cannot run)."""
    for unit in work.drain():
        work.finish(unit)
        write(failed_row(unit, work.model.name, reason, retryable=retryable))
