"""ModelHandle: the driver side of one model actor (spawn, caption, stats, unload with verified reclaim).

Images: a path (str / Path), bytes, a PIL image, a ray.ObjectRef of one of those, or a list of
those for a multi-image request. Decoding happens in the actor.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import uuid as _uuid
from collections.abc import AsyncIterator, Iterable, Iterator
from pathlib import Path
from typing import Any

from ..engine import EngineConfig, Output, SamplingParams
from .errors import ActorDied, UnloadError
from .lifecycle import default_num_cpus, start_actor, stop_actor
from .reclaim import GpuFootprint

DEFAULT_PROMPT = "Describe the image."


class ModelHandle:
    """One model in one Ray actor process.

    Args:
        path: HF-format checkpoint directory (read by the actor, so it must exist on its node).
        name: label used in actor names, logs and errors (default: the directory name).
        engine_config: EngineConfig, a dict of its fields, or None (defaults). With num_gpus=0
            the engine device defaults to "cpu".
        num_gpus: GPUs for the actor (whole or fractional). None: 1 if Ray sees a GPU, else 0.
        num_cpus: Ray CPUs the actor holds for its lifetime. None: 0 for a GPU actor, 0.01 for a
            CPU actor, so actors never wait for each other's CPUs (lifecycle.py says why).
        gpu_memory_budget_gib: absolute VRAM budget enforced by the engine (weights + KV +
            activations). Required when num_gpus is fractional: Ray does not limit memory.
        max_concurrent_requests: requests inside the engine at once; more wait in a FIFO queue
            inside the actor (never an OOM).
        ray_options: extra `.options()` for the actor: resources, runtime_env,
            scheduling_strategy, max_concurrency, ... (not num_gpus/num_cpus: use the arguments).
        unload_timeout_s: default timeout of unload()'s reclaim verification.
        reclaim_tolerance_bytes: residual over baseline that unload() still accepts (default 0).
    """

    def __init__(
        self,
        path,
        *,
        name: str | None = None,
        engine_config: EngineConfig | dict | None = None,
        num_gpus: float | None = None,
        num_cpus: float | None = None,
        gpu_memory_budget_gib: float | None = None,
        max_concurrent_requests: int = 64,
        ray_options: dict | None = None,
        unload_timeout_s: float = 60.0,
        reclaim_tolerance_bytes: int = 0,
    ):
        self.path = str(path)
        self.name = name or Path(self.path).name
        if engine_config is None or isinstance(engine_config, dict):
            engine_config = EngineConfig.from_dict(engine_config)
        if not isinstance(engine_config, EngineConfig):
            raise TypeError(f"engine_config must be an EngineConfig, a dict or None, got {type(engine_config)}")
        if gpu_memory_budget_gib is not None:
            engine_config = engine_config.replace(gpu_memory_budget_gib=gpu_memory_budget_gib)
        if max_concurrent_requests < 1:
            raise ValueError(f"max_concurrent_requests must be >= 1, got {max_concurrent_requests}")
        for arg, value in (("num_gpus", num_gpus), ("num_cpus", num_cpus)):
            if value is not None and value < 0:
                raise ValueError(f"{arg} must be >= 0, got {value}")
        ray_options = dict(ray_options or {})
        for arg in ("num_gpus", "num_cpus"):
            if arg in ray_options:
                raise ValueError(f"pass {arg} as ModelHandle({arg}=...), not in ray_options")
        self.engine_config = engine_config
        self.num_gpus, self.num_cpus = num_gpus, num_cpus
        self.max_concurrent_requests = max_concurrent_requests
        self.ray_options = ray_options
        self.unload_timeout_s = unload_timeout_s
        self.reclaim_tolerance_bytes = reclaim_tolerance_bytes
        self._check_budget(num_gpus)
        self._actor = None
        self._info: dict | None = None
        self._gpu: GpuFootprint | None = None
        self._outstanding: dict = {}  # ObjectRef -> request id, for submit()/get()
        self._ids = itertools.count()
        self._id_prefix = f"{self.name}-{_uuid.uuid4().hex[:8]}"

    # --- lifecycle -------------------------------------------------------------------------
    def spawn(self, timeout: float | None = None) -> dict:
        """Create the actor and wait until weights are loaded and the KV pool is allocated.

        Starts Ray through `ensure_ray()` when it is not initialized. Returns:
            {"name", "actor_name", "pid", "node_id", "local", "num_gpus", "num_cpus",
             "device": {"uuid", "index"} | None,
             "timings": {"process_start_s", "load_s", "kv_alloc_s", "engine_build_s", "spawn_s"},
             "memory": {"weights_bytes", "kv_bytes", "process_vram_bytes",
                        "baseline_used_bytes", "device_used_bytes", "device_total_bytes"},
             "nvml": "ok" | "<why unavailable>", "verified_by": <how unload will verify>, "engine"}
        load_s / kv_alloc_s are the engine's own weights-load and KV-pool times; engine_build_s
        is its whole construction (those plus CUDA-graph capture and wiring).
        Raises RuntimeError (chained to the actor's error) when loading fails; the actor is killed.
        """
        from .ray_init import ensure_ray

        if self._actor is not None:
            raise RuntimeError(f"{self.name!r} is already spawned; unload() or respawn() first")
        ensure_ray()
        num_gpus = self._resolve_num_gpus()
        cfg = self.engine_config
        if num_gpus == 0 and cfg.device is None:
            cfg = cfg.replace(device="cpu")  # an actor without a GPU share must not touch one
        self._actor, self._info, self._gpu = start_actor(
            path=self.path,
            name=self.name,
            actor_name=f"modelyard:{self._id_prefix}",
            config=cfg,
            num_gpus=num_gpus,
            num_cpus=default_num_cpus(num_gpus) if self.num_cpus is None else self.num_cpus,
            max_concurrent_requests=self.max_concurrent_requests,
            ray_options=self.ray_options,
            timeout=timeout,
        )
        return dict(self._info)

    def unload(self, timeout: float | None = None) -> dict:
        """ray.kill the actor, then wait until NVML shows its process gone from the GPU and the
        device's used memory back to the pre-spawn baseline (corrected for other processes'
        changes meanwhile).

        Returns {"reclaimed_bytes", "residual_bytes", "seconds", "verified_by", "note", ...}.
        verified_by: "nvml-pid" | "nvml-new-process" | "nvml-used-memory" (PID namespaces
        differ and the process could not be identified) | "process-exit" (no GPU / no NVML:
        reclaimed/residual_bytes are None, host_rss_bytes says what the process held).
        Raises UnloadError carrying those numbers when it does not happen within `timeout`.
        Calling it on a handle that is not loaded returns {"seconds": 0.0, "note": "not loaded", ...}.
        """
        if self._actor is None:
            return {
                "reclaimed_bytes": 0,
                "residual_bytes": 0,
                "seconds": 0.0,
                "verified_by": "none",
                "note": "not loaded",
            }
        actor, info, gpu = self._actor, self._info, self._gpu
        self._actor, self._info, self._gpu = None, None, None
        self._outstanding.clear()
        return stop_actor(
            self.name,
            actor,
            info,
            gpu,
            self.unload_timeout_s if timeout is None else timeout,
            self.reclaim_tolerance_bytes,
        )

    def respawn(self, timeout: float | None = None) -> dict:
        """Unload (if an actor exists, dead or alive) and spawn again; returns spawn()'s dict."""
        self.unload()
        return self.spawn(timeout=timeout)

    @property
    def alive(self) -> bool:
        """True when spawned, not unloaded, and the actor answers (or is busy answering) a ping."""
        import ray
        from ray.exceptions import GetTimeoutError, RayActorError

        if self._actor is None:
            return False
        try:
            ray.get(self._actor.ping.remote(), timeout=5.0)
        except GetTimeoutError:
            return True  # alive but its event loop is slow to answer
        except RayActorError:
            return False
        return True

    @property
    def info(self) -> dict | None:
        """spawn()'s dict for the current actor, or None."""
        return None if self._info is None else dict(self._info)

    @property
    def actor(self):
        """The Ray actor handle of the current actor, or None."""
        return self._actor

    @property
    def pid(self) -> int | None:
        """OS pid of the actor process (in its own PID namespace)."""
        return None if self._info is None else self._info["pid"]

    # --- work ------------------------------------------------------------------------------
    def submit(
        self,
        image: Any,
        prompt: str = DEFAULT_PROMPT,
        sampling: SamplingParams | dict | None = None,
        request_id: str | None = None,
    ):
        """Send one request; returns an ObjectRef resolving to its Output. For bounded in-flight
        loops with ray.wait; resolve with `get()` so that actor death becomes ActorDied."""
        ref, rid = self._submit(image, prompt, sampling, request_id)
        self._outstanding[ref] = rid
        return ref

    def request_id(self, ref) -> str:
        """The request id of a ref returned by submit() and not yet resolved through get()."""
        return self._outstanding[ref]

    def get(self, refs, timeout: float | None = None) -> list[Output]:
        """ray.get over refs from submit(). Actor death raises ActorDied naming the request ids
        among `refs` that did not complete (the completed ones are in `.completed`)."""
        from .calls import get_outputs

        single = not isinstance(refs, (list, tuple))
        refs = [refs] if single else list(refs)
        ids = [self._outstanding.get(r, "?") for r in refs]
        try:
            outs = get_outputs(self.name, refs, ids, timeout)
        finally:
            for r in refs:
                self._outstanding.pop(r, None)
        return outs[0] if single else outs

    def caption(
        self,
        images: Iterable,
        prompt: str = DEFAULT_PROMPT,
        sampling: SamplingParams | dict | None = None,
        request_ids: list[str] | None = None,
    ) -> list[Output]:
        """One Output per image, in input order. Raises ActorDied if the actor dies."""
        images = list(images)
        outs: list[Output | None] = [None] * len(images)
        for i, out in self.caption_iter(images, prompt, sampling, request_ids):
            outs[i] = out
        return outs

    def caption_iter(
        self,
        images: Iterable,
        prompt: str = DEFAULT_PROMPT,
        sampling: SamplingParams | dict | None = None,
        request_ids: list[str] | None = None,
        max_in_flight: int | None = None,
    ) -> Iterator[tuple[int, Output]]:
        """Yield (index, Output) as requests finish, keeping at most `max_in_flight` (default:
        2 x max_concurrent_requests) requests outstanding."""
        from .calls import iter_outputs

        images = list(images)
        ids = self._ids_for(len(images), request_ids)
        submit = functools.partial(self._submit_ref, prompt=prompt, sampling=sampling)
        yield from iter_outputs(self.name, images, ids, submit, max_in_flight or 2 * self.max_concurrent_requests)

    async def caption_stream(
        self,
        images: Iterable,
        prompt: str = DEFAULT_PROMPT,
        sampling: SamplingParams | dict | None = None,
        request_ids: list[str] | None = None,
        max_in_flight: int | None = None,
    ) -> AsyncIterator[tuple[int, Output]]:
        """Async form of caption_iter()."""
        from .calls import aiter_outputs

        images = list(images)
        ids = self._ids_for(len(images), request_ids)
        submit = functools.partial(self._submit_ref, prompt=prompt, sampling=sampling)
        async for item in aiter_outputs(
            self.name, images, ids, submit, max_in_flight or 2 * self.max_concurrent_requests
        ):
            yield item

    def stats(self) -> dict:
        """The engine's stats plus the actor's: in_flight, max_in_flight_seen, queued,
        submitted, completed, errors, max_concurrent_requests, pid, uptime_s."""
        from .calls import get_outputs

        return get_outputs(self.name, [self._live_actor().stats.remote()], ["<stats>"], 30.0)[0]

    def __repr__(self) -> str:
        state = "loaded" if self._actor is not None else "not loaded"
        return f"ModelHandle({self.name!r}, {self.path!r}, {state})"

    # --- internals -------------------------------------------------------------------------
    def _submit(self, image, prompt, sampling, request_id):
        rid = request_id or f"{self._id_prefix}-{next(self._ids)}"
        if isinstance(sampling, SamplingParams):
            sampling = dataclasses.asdict(sampling)
        return self._live_actor().generate.remote(image, prompt, sampling, rid), rid

    def _submit_ref(self, image, rid, *, prompt, sampling):
        return self._submit(image, prompt, sampling, rid)[0]

    def _ids_for(self, n: int, request_ids) -> list[str]:
        if request_ids is None:
            return [f"{self._id_prefix}-{next(self._ids)}" for _ in range(n)]
        if len(request_ids) != n:
            raise ValueError(f"{len(request_ids)} request_ids for {n} images")
        return list(request_ids)

    def _live_actor(self):
        if self._actor is None:
            raise RuntimeError(f"model {self.name!r} is not loaded; call spawn() first")
        return self._actor

    def _resolve_num_gpus(self) -> float:
        if self.num_gpus is not None:
            return self.num_gpus
        import ray

        return 1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0

    def _check_budget(self, num_gpus) -> None:
        if num_gpus is not None and num_gpus != int(num_gpus) and self.engine_config.gpu_memory_budget_gib is None:
            raise ValueError(
                f"num_gpus={num_gpus} is fractional: Ray does not limit the memory of a GPU share, "
                "so pass gpu_memory_budget_gib (enforced by the engine)"
            )


__all__ = ["ModelHandle", "ActorDied", "UnloadError", "DEFAULT_PROMPT"]
