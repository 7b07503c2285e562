"""On a GPU: NVML sees a CUDA process's memory, identifies the process, and after SIGKILL
wait_for_reclaim confirms the device is back to its baseline (the unload path without Ray).
For contrast, an in-process release (del + gc + empty_cache) leaves memory held by the process.

The test process itself never creates a CUDA context: children do the CUDA work."""

import subprocess
import sys
import time

import pytest

from modelyard.actors.gpu import MIB, NvmlSession, identify_process, wait_for_reclaim

pytestmark = pytest.mark.gpu

_CHILD = r"""
import gc, sys, torch
x = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")        # 1 GiB
y = torch.randn(2048, 2048, device="cuda") @ torch.randn(2048, 2048, device="cuda")  # cuBLAS workspace
torch.cuda.synchronize()
props = torch.cuda.get_device_properties(torch.cuda.current_device())
print(str(props.uuid), flush=True)
sys.stdin.readline()
if "release" in sys.argv:
    del x, y
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.synchronize()
    print("released", flush=True)
    sys.stdin.readline()
"""


@pytest.fixture
def nvml():
    nv = NvmlSession.open()
    if not nv.ok:
        pytest.skip(f"no NVML here: {nv.reason}")
    yield nv
    nv.close()


def _start_child(*argv):
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD, *argv], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    raw = child.stdout.readline().strip()
    if not raw:
        child.kill()
        pytest.skip("the child could not use CUDA")
    return child, raw if raw.startswith(("GPU-", "MIG-")) else f"GPU-{raw}"


def test_sigkill_reclaim_is_verified_to_baseline(nvml):
    base_all = nvml.snapshot_all()
    child, uuid = _start_child()
    try:
        base = base_all[uuid]
        loaded = nvml.snapshot(uuid)
        pids, method = identify_process(base, loaded, child.pid)
        print(
            f"\nmethod={method} our pid={child.pid} nvml pids={sorted(loaded.processes)} "
            f"device +{(loaded.used_bytes - base.used_bytes) / MIB:.0f} MiB"
        )
        assert loaded.used_bytes - base.used_bytes >= 1024 * MIB
        assert method in ("nvml-pid", "nvml-new-process"), (method, loaded.processes)
        t0 = time.monotonic()
        child.kill()
        res = wait_for_reclaim(uuid, base, loaded, pids, method, timeout_s=30.0, started=t0)
        print(f"reclaim: {res}")
        assert res["ok"] and res["residual_bytes"] == 0 and not res["process_still_listed"]
        assert res["reclaimed_bytes"] >= 1024 * MIB and res["seconds"] < 30.0
    finally:
        child.kill()
        child.wait()


def test_in_process_release_leaves_memory_held(nvml):
    base_all = nvml.snapshot_all()
    child, uuid = _start_child("release")
    try:
        child.stdin.write("\n")
        child.stdin.flush()
        assert child.stdout.readline().strip() == "released"
        time.sleep(0.5)
        held = nvml.snapshot(uuid).used_bytes - base_all[uuid].used_bytes
        print(f"\nin-process release still holds {held / MIB:.0f} MiB")
        assert held > 0  # the CUDA context, cuBLAS workspace and allocator state stay with the process
    finally:
        child.kill()
        child.wait()
