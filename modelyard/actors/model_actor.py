"""ModelActor: one Engine in one process, stepped in a background thread while calls keep arriving.

Used as a Ray async actor (`ray.remote(ModelActor)`, created by lifecycle.py). Requests from every caller
join the same continuous batch: `generate()` coroutines wait for a FIFO slot, have their image
decoded and preprocessed on a thread pool (Engine.prepare; sized from the actor's CPUs), hand the
request to the stepping thread through an inbox, and await their Output. So decoding runs beside
the engine's steps, ahead of it by at most what the caller keeps in flight. The engine's state is
touched only by the stepping thread (it is not thread-safe); the event loop stays free to accept
calls while a step computes.
"""

from __future__ import annotations

import asyncio
import functools
import os
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor

from ..engine import EngineConfig, Output, Request, SamplingParams
from .errors import EngineFailed
from .gpu import NvmlSession
from .limiter import FifoLimiter


class ModelActor:
    def __init__(self, path: str, engine_config: dict | None = None, max_concurrent_requests: int = 64, name: str = ""):
        self._init_wall = time.time()
        self.path, self.name = str(path), name or os.path.basename(str(path).rstrip("/"))
        self.config = EngineConfig.from_dict(engine_config)
        self._limiter = FifoLimiter(max_concurrent_requests)
        # Baseline of every device before this process touches CUDA: the reference for remote
        # nodes where the driver cannot read NVML itself.
        with NvmlSession.open() as nv:
            self._nvml_reason = nv.reason
            self._baseline = nv.snapshot_all() if nv.ok else {}
        self._engine = None
        self._engine_stats: dict = {}
        self._failed: BaseException | None = None
        self._cv = threading.Condition()
        self._inbox: list[tuple[Request, object, asyncio.Future]] = []  # (request, prepared or None, future)
        self._prep_pool = ThreadPoolExecutor(prep_workers(), thread_name_prefix="modelyard-prep")
        self._stop = False
        self._active_ids: set[str] = set()
        self._counts = {"submitted": 0, "completed": 0, "errors": 0}
        self._loop: asyncio.AbstractEventLoop | None = None

    # --- lifecycle -------------------------------------------------------------------------
    async def load(self) -> dict:
        """Build the engine (weights + KV pool) off the event loop; start the stepping thread."""
        if self._engine is not None:
            raise RuntimeError(f"model actor {self.name!r} is already loaded")
        self._loop = asyncio.get_running_loop()
        t0 = time.perf_counter()
        self._engine = await self._loop.run_in_executor(None, _build_engine, self.path, self.config)
        build_s = time.perf_counter() - t0
        self._engine_stats = dict(self._engine.stats())
        threading.Thread(target=self._step_loop, name=f"modelyard-step-{self.name}", daemon=True).start()
        # The engine times its own phases (weights, KV pool); build_s also holds the rest of its
        # construction (CUDA-graph capture, wiring). None: an engine that does not report a phase.
        return {
            "pid": os.getpid(),
            "node_id": _node_id(),
            "init_wall": self._init_wall,
            "load_s": self._engine_stats.get("load_seconds"),
            "kv_alloc_s": self._engine_stats.get("kv_alloc_seconds"),
            "build_s": build_s,
            "weights_bytes": self._engine_stats.get("weights_bytes"),
            "kv_bytes": self._engine_stats.get("kv_bytes"),
            "device": self._device_info(),
            "nvml": self._nvml_reason,
            "engine_stats": self._engine_stats,
        }

    async def ping(self) -> dict:
        return {"pid": os.getpid(), "loaded": self._engine is not None, "failed": self._failed is not None}

    async def shutdown(self) -> None:
        """Stop stepping and release the engine in-process. Unloading does not rely on this
        (it kills the process); it exists for orderly teardown in tests."""
        with self._cv:
            self._stop = True
            self._cv.notify()

    # --- work ------------------------------------------------------------------------------
    async def generate(
        self, image, prompt: str = "Describe the image.", sampling=None, request_id: str | None = None
    ) -> Output:
        if self._engine is None:
            raise RuntimeError(f"model actor {self.name!r} is not loaded (call load() first)")
        if self._failed is not None:
            raise EngineFailed(f"engine of {self.name!r} failed earlier: {self._failed!r}; respawn the actor")
        if isinstance(sampling, dict) or sampling is None:
            sampling = SamplingParams.from_dict(sampling)
        req = Request(image=await _resolve_refs(image), prompt=prompt, sampling=sampling, request_id=request_id)
        if req.request_id in self._active_ids:
            raise ValueError(f"request id {req.request_id!r} is already in flight on {self.name!r}")
        self._active_ids.add(req.request_id)
        self._counts["submitted"] += 1
        try:
            t_arrive = time.perf_counter()
            await self._limiter.acquire()
            fut = self._loop.create_future()
            wait_s = time.perf_counter() - t_arrive
            prepared = None
            if hasattr(self._engine, "prepare"):
                try:
                    prepared = await self._loop.run_in_executor(self._prep_pool, self._engine.prepare, req)
                except Exception as e:  # the step thread turns it into this request's error Output
                    prepared = e
            with self._cv:
                failed = self._failed  # set (under this lock) before the stepping thread exits
                if failed is None:
                    self._inbox.append((req, prepared, fut))
                    self._cv.notify()
            if failed is not None:
                self._limiter.release()
                raise EngineFailed(f"engine of {self.name!r} is no longer running: {failed!r}; respawn the actor")
            out: Output = await asyncio.shield(fut)  # a cancelled caller must not drop the slot
            out.timings["actor_queue"] = wait_s
            return out
        finally:
            self._active_ids.discard(req.request_id)

    async def stats(self) -> dict:
        lim = self._limiter
        return {
            **self._engine_stats,
            "name": self.name,
            "pid": os.getpid(),
            "in_flight": lim.in_flight,
            "max_in_flight_seen": lim.max_in_flight_seen,
            "queued": lim.queued,
            "max_queued_seen": lim.max_queued_seen,
            "max_concurrent_requests": lim.limit,
            **self._counts,
            "failed": None if self._failed is None else repr(self._failed),
            "uptime_s": time.time() - self._init_wall,
        }

    # --- the stepping thread ---------------------------------------------------------------
    def _step_loop(self) -> None:
        eng = self._engine
        pending: dict[str, asyncio.Future] = {}
        try:
            while True:
                with self._cv:
                    while not self._inbox and not pending and not self._stop:
                        self._cv.wait()
                    if self._stop:
                        break
                    new, self._inbox = self._inbox, []
                for req, prepared, fut in new:
                    try:
                        if isinstance(prepared, Exception):
                            raise prepared
                        if prepared is None:
                            eng.add_request(req)
                        else:
                            eng.add_prepared(req, prepared)
                        pending[req.request_id] = fut
                    except Exception as e:  # rejected at admission: this request's error, not the engine's
                        self._deliver(
                            fut, Output(req.request_id, finish_reason="error", error=f"{type(e).__name__}: {e}")
                        )
                if not eng.has_unfinished():
                    for rid in list(pending):  # an engine that finished without an output: say so
                        self._deliver(
                            pending.pop(rid), Output(rid, finish_reason="error", error="engine produced no output")
                        )
                    continue
                for out in eng.step():
                    fut = pending.pop(out.request_id, None)
                    if fut is not None:
                        self._deliver(fut, out)
                self._engine_stats = dict(eng.stats())
        except BaseException as e:  # the engine is in an unknown state: fail everything, take no more
            self._fail_all(
                pending, EngineFailed(f"engine step failed: {type(e).__name__}: {e}\n{traceback.format_exc()}")
            )
            return
        self._fail_all(pending, EngineFailed(f"model actor {self.name!r} was shut down"))
        eng.close()

    def _fail_all(self, pending: dict, err: BaseException) -> None:
        with self._cv:
            self._failed = err
            futs = list(pending.values()) + [fut for _, _, fut in self._inbox]
            self._inbox = []
        pending.clear()
        for fut in futs:
            self._loop.call_soon_threadsafe(_fail, fut, err, self._limiter)

    def _deliver(self, fut: asyncio.Future, out: Output) -> None:
        self._loop.call_soon_threadsafe(self._on_output, fut, out)

    def _on_output(self, fut: asyncio.Future, out: Output) -> None:
        self._limiter.release()
        self._counts["completed"] += 1
        self._counts["errors"] += int(not out.ok)
        if not fut.done():
            fut.set_result(out)

    def _device_info(self) -> dict | None:
        """UUID/index of the CUDA device the engine uses, None for a CPU engine."""
        import torch

        if not torch.cuda.is_initialized():
            return None
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        raw = str(getattr(props, "uuid", "") or "")
        info = {
            "uuid": None,
            "index": None,
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
            "baseline": None,
            "loaded": None,
        }
        with NvmlSession.open() as nv:
            if not nv.ok:
                return info
            candidates = [raw] if raw.startswith(("GPU-", "MIG-")) else [f"GPU-{raw}", f"MIG-{raw}"]
            uuid = next((u for u in candidates if raw and _nvml_has(nv, u)), None)
            uuid = uuid or nv.device_for_visible(info["cuda_visible_devices"])
            if uuid is None:
                return info
            snap = nv.snapshot(uuid)
            info.update(uuid=uuid, index=snap.index, baseline=self._baseline.get(uuid), loaded=snap)
        return info


@functools.lru_cache(maxsize=1)
def remote_actor_class():
    """ModelActor as a Ray actor class (made once per process; Ray exports it on first use)."""
    import ray

    return ray.remote(ModelActor)


def prep_workers() -> int:
    """Threads that decode and preprocess images: the CPUs Ray reserved for this actor where it
    reserved whole ones, else those the process may use; at least 2 (PIL's decoding and resizing
    release the GIL), at most 8."""
    cpus = 0
    try:
        import ray

        if ray.is_initialized():
            cpus = int(ray.get_runtime_context().get_assigned_resources().get("CPU", 0))
    except Exception:  # outside a Ray worker (in-process use, tests)
        cpus = 0
    if cpus < 1:
        try:
            cpus = len(os.sched_getaffinity(0))
        except AttributeError:
            cpus = os.cpu_count() or 2
    return max(2, min(8, cpus))


def _fail(fut: asyncio.Future, err: BaseException, limiter: FifoLimiter) -> None:
    limiter.release()
    if not fut.done():
        fut.set_exception(err)


def _nvml_has(nv: NvmlSession, uuid: str) -> bool:
    try:
        nv.snapshot(uuid)
        return True
    except Exception:
        return False


def _build_engine(path: str, config: EngineConfig):
    from ..engine import Engine  # dispatches on config.backend (native or transformers)

    return Engine.from_pretrained(path, config)


async def _resolve_refs(image):
    """Object refs nested in a list are not resolved by Ray; resolve them here (top-level ones are)."""
    import ray

    if isinstance(image, ray.ObjectRef):
        return await image
    if isinstance(image, (list, tuple)):
        return [await _resolve_refs(x) for x in image]
    return image


def _node_id() -> str | None:
    import ray

    # get_runtime_context() would start a whole local Ray when there is none (in-process use)
    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
