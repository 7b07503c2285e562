"""NVML accounting: device used/free memory, per-process usage, and waiting for a killed actor's
memory to come back. No CUDA context is ever created here (NVML only), so the driver can watch
GPUs without holding any memory on them.

Where there is no GPU or no NVML, `NvmlSession.open()` says so in `.reason` and callers fall back
to waiting for the process to exit.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

MIB = 1 << 20
# Upper bound of the device memory a CUDA context costs beyond its process's NVML number
# (5.5-8.8 MiB measured on an H200); see reclaim_state.
CONTEXT_UNATTRIBUTED_MAX = 16 * MIB


@dataclass(frozen=True)
class DeviceSnapshot:
    uuid: str
    index: int
    total_bytes: int
    used_bytes: int
    free_bytes: int
    # pid -> bytes used by that process; None where NVML cannot tell (some containers, MIG).
    # The pids are in the NVML host's PID namespace, which may differ from the caller's.
    processes: dict = field(default_factory=dict)
    taken_at: float = 0.0  # time.monotonic()

    def others_bytes(self, exclude: set) -> int | None:
        """Memory of the listed processes not in `exclude`, or None if any of them is unknown."""
        used = [b for p, b in self.processes.items() if p not in exclude]
        return None if any(b is None for b in used) else sum(used)


class NvmlSession:
    """NVML initialized for the lifetime of the object (`with NvmlSession.open() as nv:`).

    `ok` is False when NVML cannot be used; `reason` then says why in plain words.
    """

    def __init__(self, nvml, reason: str):
        self._nvml = nvml
        self.reason = reason

    @classmethod
    def open(cls) -> NvmlSession:
        try:
            import pynvml
        except ImportError:
            return cls(None, "pynvml (nvidia-ml-py) is not installed")
        try:
            pynvml.nvmlInit()
        except Exception as e:  # NVMLError_LibraryNotFound, _DriverNotLoaded, ...
            return cls(None, f"NVML unavailable ({type(e).__name__}: {e}); no NVIDIA driver on this machine?")
        try:
            if pynvml.nvmlDeviceGetCount() == 0:
                pynvml.nvmlShutdown()
                return cls(None, "NVML reports no GPU on this machine")
        except Exception as e:
            pynvml.nvmlShutdown()
            return cls(None, f"NVML device query failed ({type(e).__name__}: {e})")
        return cls(pynvml, "ok")

    @property
    def ok(self) -> bool:
        return self._nvml is not None

    def close(self) -> None:
        if self._nvml is not None:
            self._nvml.nvmlShutdown()
            self._nvml = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # --- queries ---------------------------------------------------------------------------
    def device_count(self) -> int:
        return self._nvml.nvmlDeviceGetCount() if self.ok else 0

    def uuid_of_index(self, index: int) -> str:
        return _s(self._nvml.nvmlDeviceGetUUID(self._nvml.nvmlDeviceGetHandleByIndex(index)))

    def snapshot(self, device: str | int) -> DeviceSnapshot:
        """One device by NVML index or UUID ("GPU-..." or "MIG-...")."""
        nv = self._nvml
        h = nv.nvmlDeviceGetHandleByUUID(device) if isinstance(device, str) else nv.nvmlDeviceGetHandleByIndex(device)
        mem = nv.nvmlDeviceGetMemoryInfo(h)
        procs: dict[int, int | None] = {}
        for getter in ("nvmlDeviceGetComputeRunningProcesses", "nvmlDeviceGetGraphicsRunningProcesses"):
            try:
                for p in getattr(nv, getter)(h):
                    b = p.usedGpuMemory
                    procs[int(p.pid)] = None if b is None else int(b)
            except Exception:  # not supported on this device/driver: per-process data stays partial
                pass
        try:
            index = int(nv.nvmlDeviceGetIndex(h))
        except Exception:  # MIG handles have no index
            index = -1
        return DeviceSnapshot(
            uuid=_s(nv.nvmlDeviceGetUUID(h)),
            index=index,
            total_bytes=int(mem.total),
            used_bytes=int(mem.used),
            free_bytes=int(mem.free),
            processes=procs,
            taken_at=time.monotonic(),
        )

    def snapshot_all(self) -> dict[str, DeviceSnapshot]:
        snaps = (self.snapshot(i) for i in range(self.device_count()))
        return {s.uuid: s for s in snaps}

    def device_for_visible(self, cuda_visible_devices: str | None) -> str | None:
        """UUID of the first device in a CUDA_VISIBLE_DEVICES string (indices or UUIDs).

        Indices are read in NVML (PCI bus) order, which is what Ray assigns; a process that can
        ask CUDA for its device UUID should prefer that.
        """
        if not self.ok or not cuda_visible_devices:
            return None
        first = cuda_visible_devices.split(",")[0].strip()
        if first.startswith(("GPU-", "MIG-")):
            return first
        try:
            return self.uuid_of_index(int(first))
        except (ValueError, Exception):
            return None


def _s(x) -> str:
    return x.decode() if isinstance(x, bytes) else str(x)


def identify_process(baseline: DeviceSnapshot, loaded: DeviceSnapshot, pid: int) -> tuple[set, str]:
    """Which NVML pids belong to the actor: (pids, method).

    "nvml-pid": the actor's own pid is listed (same PID namespace).
    "nvml-new-process": exactly one process appeared since the baseline (containers where NVML
    reports host pids).
    "nvml-used-memory": neither; every process that appeared since the baseline is counted as
    the actor's and only the device's used memory can confirm the reclaim.
    """
    if pid in loaded.processes:
        return {pid}, "nvml-pid"
    new = set(loaded.processes) - set(baseline.processes)
    if len(new) == 1:
        return new, "nvml-new-process"
    return new, "nvml-used-memory"


def reclaim_state(baseline: DeviceSnapshot, before: DeviceSnapshot, now: DeviceSnapshot, actor_pids: set) -> dict:
    """Residual and reclaimed bytes of `now`, corrected for memory other processes gained or
    released since `baseline` (when NVML gives per-process numbers).

    Each CUDA context also costs the device a few MiB that NVML does not attribute to its
    process (measured on an H200: 8.8 MiB for the first context, 5.5-5.7 MiB for each further
    one). So when other processes started or stopped meanwhile, up to CONTEXT_UNATTRIBUTED_MAX
    per such process is put down to them (reported as others_context_bytes); when none did,
    the device must be back to the baseline byte for byte.
    """
    others_base = baseline.others_bytes(actor_pids)
    others_now = now.others_bytes(actor_pids)
    others_before = before.others_bytes(actor_pids)
    corrected = None not in (others_base, others_now, others_before)
    drift = (others_now - others_base) if corrected else 0
    changed = len((set(baseline.processes) ^ set(now.processes)) - actor_pids)
    raw = max(0, now.used_bytes - (baseline.used_bytes + drift))
    context = min(raw, changed * CONTEXT_UNATTRIBUTED_MAX) if corrected else 0
    reclaimed = before.used_bytes - now.used_bytes + ((others_now - others_before) if corrected else 0)
    return {
        "residual_bytes": int(raw - context),
        "reclaimed_bytes": int(max(0, reclaimed)),
        "others_drift_bytes": int(drift),
        "others_corrected": corrected,
        "others_changed": changed,
        "others_context_bytes": int(context),
        "process_still_listed": bool(actor_pids & set(now.processes)),
        "baseline_used_bytes": baseline.used_bytes,
        "device_used_bytes": now.used_bytes,
    }


def wait_for_reclaim(
    uuid: str,
    baseline: DeviceSnapshot,
    before: DeviceSnapshot,
    actor_pids: set,
    method: str,
    timeout_s: float,
    tolerance_bytes: int = 0,
    poll_s: float = 0.005,
    started: float | None = None,
) -> dict:
    """Poll NVML until the actor's processes are gone from `uuid` and the used memory is back
    to the (drift-corrected) baseline. Returns the state plus "seconds", "ok", "verified_by".

    `started`: time.monotonic() of the kill, so that "seconds" measures kill -> reclaimed.
    """
    t0 = time.monotonic() if started is None else started
    with NvmlSession.open() as nv:
        if not nv.ok:
            return {
                "ok": False,
                "seconds": time.monotonic() - t0,
                "verified_by": "none",
                "note": nv.reason,
                "residual_bytes": None,
                "reclaimed_bytes": None,
            }
        while True:
            now = nv.snapshot(uuid)
            st = reclaim_state(baseline, before, now, actor_pids)
            gone = not st["process_still_listed"] or method == "nvml-used-memory"
            st["ok"] = gone and st["residual_bytes"] <= tolerance_bytes
            st["seconds"] = time.monotonic() - t0
            if st["ok"] or st["seconds"] >= timeout_s:
                break
            time.sleep(poll_s)
    st["verified_by"] = method
    notes = []
    if method == "nvml-used-memory":
        notes.append(
            "the actor's pid is not among NVML's processes (another PID namespace?) and no single "
            "new process could be matched to it; verified by the device's used memory only"
        )
    if not st["others_corrected"]:
        notes.append("NVML gives no per-process usage here; other processes' changes are not subtracted")
    st["note"] = "; ".join(notes)
    return st
