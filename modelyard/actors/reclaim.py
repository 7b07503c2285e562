"""What the driver remembers about an actor's GPU footprint at spawn, and the verified unload.

The baseline is the device before the model arrived: read by the driver just before creating the
actor when the actor lands on the driver's node, else by the actor itself before it touched CUDA.
After ray.kill the reclaim is watched where the GPU is: in the driver on its own node, in a
zero-CPU task pinned to the actor's node otherwise.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from .gpu import DeviceSnapshot, NvmlSession, identify_process, reclaim_state, wait_for_reclaim


@dataclass(frozen=True)
class GpuFootprint:
    uuid: str
    index: int
    local: bool  # the actor's GPU is on the driver's node
    baseline: DeviceSnapshot
    loaded: DeviceSnapshot
    actor_pids: frozenset  # NVML pids that belong to the actor
    method: str  # see gpu.identify_process

    @classmethod
    def from_spawn(cls, device: dict, pid: int, local: bool, pre_spawn: dict) -> GpuFootprint | None:
        """`device`: the actor's report (uuid, baseline, loaded); `pre_spawn`: the driver's
        {uuid: snapshot} taken before the actor was created (empty when NVML is unusable here)."""
        if not device or not device.get("uuid"):
            return None
        uuid = device["uuid"]
        baseline = pre_spawn.get(uuid) if local else None
        baseline = baseline or device.get("baseline")
        loaded = device.get("loaded")
        if local:
            with NvmlSession.open() as nv:
                loaded = nv.snapshot(uuid) if nv.ok else loaded
        if baseline is None or loaded is None:
            return None
        pids, method = identify_process(baseline, loaded, pid)
        return cls(uuid, loaded.index, local, baseline, loaded, frozenset(pids), method)

    def memory(self) -> dict:
        per_proc = [self.loaded.processes.get(p) for p in self.actor_pids]
        known = self.method != "nvml-used-memory" and per_proc and None not in per_proc
        return {
            "process_vram_bytes": sum(per_proc) if known else None,
            "baseline_used_bytes": self.baseline.used_bytes,
            "device_used_bytes": self.loaded.used_bytes,
            "device_total_bytes": self.loaded.total_bytes,
        }

    def before_kill(self) -> DeviceSnapshot:
        if not self.local:
            return self.loaded
        with NvmlSession.open() as nv:
            return nv.snapshot(self.uuid) if nv.ok else self.loaded

    def verify(
        self, node_id: str, before: DeviceSnapshot, killed_at: float, timeout_s: float, tolerance_bytes: int
    ) -> dict:
        args = (self.uuid, self.baseline, before, set(self.actor_pids), self.method, timeout_s, tolerance_bytes)
        if self.local:
            res = wait_for_reclaim(*args, started=killed_at)
        else:
            res = run_on_node(node_id, timeout_s, wait_for_reclaim, *args)
        res["device"] = {"uuid": self.uuid, "index": self.index}
        return res


def run_on_node(node_id: str, timeout_s: float, fn, *args) -> dict:
    """Run a watcher where the actor was (a zero-CPU task pinned to its node): NVML and process
    tables are per machine. Its "seconds" count from the task's start, not from the kill."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    task = ray.remote(num_cpus=0, max_retries=0)(fn).options(
        scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False)
    )
    res = ray.get(task.remote(*args), timeout=timeout_s + 60)
    res["note"] = "; ".join(filter(None, [res.get("note"), "watched from a task on the actor's node"]))
    return res


def wait_process_exit(pid: int, timeout_s: float, started: float | None = None) -> dict:
    """For actors without a GPU (or without NVML): wait until the process is gone or a zombie."""
    import psutil

    started = time.monotonic() if started is None else started
    while True:
        try:
            gone = psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            gone = True
        seconds = time.monotonic() - started
        if gone or seconds >= timeout_s:
            return {"ok": gone, "seconds": seconds, "process_still_listed": not gone}
        time.sleep(0.005)


def host_rss(pid: int) -> int | None:
    import psutil

    try:
        return psutil.Process(pid).memory_info().rss
    except psutil.Error:  # already gone
        return None


def snapshot_local_devices() -> tuple[dict, str]:
    """{uuid: snapshot} of this machine's GPUs, and NVML's status ("ok" or why not)."""
    with NvmlSession.open() as nv:
        return (nv.snapshot_all() if nv.ok else {}), nv.reason


__all__ = ["GpuFootprint", "host_rss", "run_on_node", "wait_process_exit", "snapshot_local_devices", "reclaim_state"]
