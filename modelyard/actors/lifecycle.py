"""Starting a model actor and stopping it with a verified reclaim: the bookkeeping behind
ModelHandle.spawn() and unload(), kept apart from the calls that use a running actor.
"""

from __future__ import annotations

import dataclasses
import time

from ..engine import EngineConfig
from .errors import LoadFailed, UnloadError, is_permanent
from .model_actor import remote_actor_class
from .reclaim import GpuFootprint, host_rss, run_on_node, snapshot_local_devices, wait_process_exit

# Ray (actor.py, `_remote`): an actor that names no resource needs one CPU to be placed and holds
# none afterwards; one that names any resource (num_gpus=0 included) holds `num_cpus`, default 1,
# for its whole life. A handle always names num_gpus, so it chooses num_cpus itself:
# - GPU actors hold no CPU: the GPU places them, and a CPU held per model would leave GPUs idle
#   on a node with fewer free CPUs than GPUs (the engine's host threads are not limited by it).
# - CPU actors hold a sliver: enough that Ray never places one on a node offering no CPUs (a head
#   node started with --num-cpus=0), small enough that a parallel job with more CPU models than
#   cores spawns them all (they then share the cores, like any processes).
# Either way Ray sets OMP_NUM_THREADS=1 in the actor (floor(num_cpus), at least 1), as it did with
# the former lifetime CPU; pass num_cpus=N for N intra-op threads (and N CPUs reserved).
GPU_ACTOR_NUM_CPUS = 0.0
CPU_ACTOR_NUM_CPUS = 0.01

_NO_GPU_MEMORY = {
    "process_vram_bytes": None,
    "baseline_used_bytes": None,
    "device_used_bytes": None,
    "device_total_bytes": None,
}


def default_num_cpus(num_gpus: float) -> float:
    return GPU_ACTOR_NUM_CPUS if num_gpus > 0 else CPU_ACTOR_NUM_CPUS


def start_actor(
    *,
    path: str,
    name: str,
    actor_name: str,
    config: EngineConfig,
    num_gpus: float,
    num_cpus: float,
    max_concurrent_requests: int,
    ray_options: dict,
    timeout: float | None,
) -> tuple[object, dict, GpuFootprint | None]:
    """Create the actor, wait for its engine, and measure it. Returns (actor, info, footprint):
    info is ModelHandle.spawn()'s dict; footprint is None when no GPU memory can be verified.
    Raises LoadFailed (chained to the actor's error) when loading fails; the actor is killed."""
    import ray

    pre_spawn, nvml = snapshot_local_devices() if num_gpus > 0 else ({}, "not used (num_gpus=0)")
    opts = {
        "max_concurrency": max(1000, 4 * max_concurrent_requests),
        **ray_options,
        "num_gpus": num_gpus,
        "num_cpus": num_cpus,
        "max_restarts": 0,
        "max_task_retries": 0,
        "name": actor_name,
    }
    t_wall, t0 = time.time(), time.perf_counter()
    actor = remote_actor_class().options(**opts).remote(path, dataclasses.asdict(config), max_concurrent_requests, name)
    try:
        load = ray.get(actor.load.remote(), timeout=timeout)
    except BaseException as e:
        ray.kill(actor, no_restart=True)
        # a RayTaskError's text opens with Ray's "ray::ModelActor.load() (pid=...)" header and a
        # traceback; its `cause` is the engine's own exception (CheckpointMismatch, ...), which
        # says what is wrong. A timeout or a dead actor has no cause: it is shown as itself.
        cause = getattr(e, "cause", None) or e
        raise LoadFailed(
            f"spawning model actor {name!r} from {path} failed: {type(cause).__name__}: {cause}",
            permanent=is_permanent(cause),
        ) from e
    spawn_s = time.perf_counter() - t0
    local = load["node_id"] == ray.get_runtime_context().get_node_id()
    gpu = GpuFootprint.from_spawn(load["device"], load["pid"], local, pre_spawn)
    info = {
        "name": name,
        "actor_name": actor_name,
        "pid": load["pid"],
        "node_id": load["node_id"],
        "local": local,
        "num_gpus": num_gpus,
        "num_cpus": num_cpus,
        "device": {"uuid": gpu.uuid, "index": gpu.index} if gpu else None,
        "timings": {
            "process_start_s": max(0.0, load["init_wall"] - t_wall),
            "load_s": load["load_s"],
            "kv_alloc_s": load["kv_alloc_s"],
            "engine_build_s": load["build_s"],
            "spawn_s": spawn_s,
        },
        "memory": {
            "weights_bytes": load["weights_bytes"],
            "kv_bytes": load["kv_bytes"],
            **(gpu.memory() if gpu else _NO_GPU_MEMORY),
        },
        "nvml": nvml if local else load["nvml"],
        "verified_by": gpu.method if gpu else "process-exit",
        "engine": _engine_info(load["engine_stats"], config),
    }
    return actor, info, gpu


def _engine_info(stats: dict, config: EngineConfig) -> dict:
    """What a driver needs to feed the engine: its backend (and why, where backend="auto" chose the
    fallback) and device, the most sequences it runs in one step, and the tokens its KV pool holds
    (None where the backend has no paged pool)."""
    blocks, block = stats.get("kv_blocks_total"), stats.get("block_size")
    return {
        "backend": stats.get("backend", config.backend),
        "backend_reason": stats.get("backend_reason"),
        "device": stats.get("device", config.device),
        "max_batch_size": int(stats.get("max_batch_size") or config.max_batch_size or 8),
        "kv_tokens": int(blocks * block) if blocks and block else None,
    }


def stop_actor(name: str, actor, info: dict, gpu: GpuFootprint | None, timeout: float, tolerance_bytes: int) -> dict:
    """ray.kill the actor and verify the reclaim (see ModelHandle.unload for the result).
    Raises UnloadError carrying the numbers when it is not verified within `timeout`."""
    import ray

    before = gpu.before_kill() if gpu else None
    rss = host_rss(info["pid"]) if info["local"] else None
    killed_at = time.monotonic()
    ray.kill(actor, no_restart=True)
    if gpu is not None:
        res = gpu.verify(info["node_id"], before, killed_at, timeout, tolerance_bytes)
    else:
        res = (
            wait_process_exit(info["pid"], timeout, killed_at)
            if info["local"]
            else run_on_node(info["node_id"], timeout, wait_process_exit, info["pid"], timeout)
        )
        res.update(
            reclaimed_bytes=None,
            residual_bytes=None,
            verified_by="process-exit",
            note="; ".join(
                filter(
                    None,
                    [
                        "no GPU memory to verify (CPU actor or NVML unavailable); waited for the process to exit",
                        res.get("note"),
                    ],
                )
            ),
        )
    res["host_rss_bytes"] = rss
    res["pid"] = info["pid"]
    if not res.pop("ok"):
        raise UnloadError(name, res)
    return res
