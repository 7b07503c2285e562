"""`modelyard.pipeline(path)`: one actor-backed model behind a call, LMDeploy-style.

    with modelyard.pipeline("ckpt/llava", max_batch_size=32) as pipe:
        outs = pipe(["a.jpg", "b.jpg"], prompt="Describe the image.")
    # the actor is dead here and the GPU memory verified back to its baseline

Closing (leaving the block, or close()) kills the actor and verifies the reclaim through NVML,
so opening pipelines for model after model in a loop accumulates nothing: each model's memory
lives and dies with its own process. A pipeline dropped without close() still kills its actor
(a weakref finalizer; no verification there, as it may run at interpreter exit).
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from .actors.handle import DEFAULT_PROMPT, ModelHandle
from .engine import EngineConfig, Output, SamplingParams

_HANDLE_OPTIONS = (
    "name",
    "num_gpus",
    "num_cpus",
    "gpu_memory_budget_gib",
    "max_concurrent_requests",
    "ray_options",
    "unload_timeout_s",
    "reclaim_tolerance_bytes",
)
_ENGINE_FIELDS = tuple(EngineConfig.__dataclass_fields__)


class Pipeline:
    """A spawned model. Use `pipeline(path, **options)` to make one."""

    def __init__(
        self,
        path,
        *,
        engine_config: EngineConfig | dict | None = None,
        ray_address: str | None = None,
        spawn_timeout: float | None = None,
        **options,
    ):
        unknown = set(options) - set(_HANDLE_OPTIONS) - set(_ENGINE_FIELDS)
        if unknown:
            raise TypeError(
                f"unknown pipeline options {sorted(unknown)}; handle options: {list(_HANDLE_OPTIONS)}, "
                f"engine options: {list(_ENGINE_FIELDS)}"
            )
        engine_kw = {k: options.pop(k) for k in list(options) if k in _ENGINE_FIELDS}
        if engine_kw:
            if isinstance(engine_config, EngineConfig):
                engine_config = engine_config.replace(**engine_kw)
            else:
                engine_config = {**(engine_config or {}), **engine_kw}
        from .actors.ray_init import ensure_ray

        ensure_ray(ray_address)
        self._handle = ModelHandle(path, engine_config=engine_config, **options)
        self.spawn_info = self._handle.spawn(timeout=spawn_timeout)
        self.reclaim: dict | None = None  # unload's result once closed
        # Holds the actor handle, not self: kills the actor if this object is dropped unclosed.
        self._finalizer = weakref.finalize(self, _kill_actor, self._handle.actor)

    @property
    def name(self) -> str:
        return self._handle.name

    @property
    def closed(self) -> bool:
        return self.reclaim is not None

    def __call__(
        self, images, prompt: str = DEFAULT_PROMPT, sampling: SamplingParams | dict | None = None, **sampling_kw
    ) -> Output | list[Output]:
        """Caption one image (returns an Output) or a list of images (returns a list, in order).

        Sampling options may be given as keywords: `pipe(imgs, max_new_tokens=32, temperature=0.7)`.
        """
        single, items = _as_items(images)
        outs = self._live().caption(items, prompt=prompt, sampling=_sampling(sampling, sampling_kw))
        return outs[0] if single else outs

    def stream(
        self,
        images: Iterable,
        prompt: str = DEFAULT_PROMPT,
        sampling: SamplingParams | dict | None = None,
        **sampling_kw,
    ) -> Iterator[tuple[int, Output]]:
        """Yield (index, Output) as each image finishes."""
        return self._live().caption_iter(list(images), prompt=prompt, sampling=_sampling(sampling, sampling_kw))

    def stats(self) -> dict:
        return self._live().stats()

    def close(self) -> dict:
        """Kill the actor and verify the GPU memory came back; returns unload()'s dict. Idempotent."""
        if self.reclaim is None:
            from .actors.errors import UnloadError

            self._finalizer.detach()
            try:
                self.reclaim = self._handle.unload()
            except UnloadError as e:  # the actor is dead either way; keep the numbers, then raise
                self.reclaim = e.result
                raise
        return self.reclaim

    def __enter__(self) -> Pipeline:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Pipeline({self.name!r}, {'closed' if self.closed else 'open'})"

    def _live(self) -> ModelHandle:
        if self.closed:
            raise RuntimeError(f"pipeline {self.name!r} is closed; open a new one with modelyard.pipeline(path)")
        return self._handle


def pipeline(path, **options) -> Pipeline:
    """Spawn `path` in its own actor and return a Pipeline (use it in a `with` block).

    Options: EngineConfig fields (backend, max_batch_size, cache_max_entry_count, ...) or
    engine_config=...; ModelHandle options (num_gpus, num_cpus, gpu_memory_budget_gib,
    max_concurrent_requests, ray_options, name, unload_timeout_s); ray_address; spawn_timeout.
    """
    return Pipeline(path, **options)


def _as_items(images) -> tuple[bool, list]:
    if isinstance(images, (str, Path, bytes)) or not isinstance(images, Iterable):
        return True, [images]
    return False, list(images)


def _sampling(sampling, kw: dict) -> Any:
    if not kw:
        return sampling
    if isinstance(sampling, SamplingParams):
        import dataclasses

        return {**dataclasses.asdict(sampling), **kw}
    return {**(sampling or {}), **kw}


def _kill_actor(actor) -> None:
    try:
        import ray

        if ray.is_initialized():
            ray.kill(actor, no_restart=True)
    except Exception:  # interpreter shutdown: the actor dies with the driver anyway
        pass
