"""NVML accounting logic on synthetic snapshots, and plain reporting where there is no NVML."""

from modelyard.actors.gpu import (
    CONTEXT_UNATTRIBUTED_MAX,
    MIB,
    DeviceSnapshot,
    NvmlSession,
    identify_process,
    reclaim_state,
)


def snap(used_mib, procs):
    return DeviceSnapshot(
        "GPU-x",
        0,
        80_000 * MIB,
        used_mib * MIB,
        (80_000 - used_mib) * MIB,
        {p: (None if b is None else b * MIB) for p, b in procs.items()},
    )


def test_identify_process_by_pid_new_process_or_memory_only():
    base = snap(1000, {7: 500})
    assert identify_process(base, snap(9000, {7: 500, 42: 8000}), 42) == ({42}, "nvml-pid")
    # container: NVML reports host pid 90042 for our pid 42
    assert identify_process(base, snap(9000, {7: 500, 90042: 8000}), 42) == ({90042}, "nvml-new-process")
    pids, method = identify_process(base, snap(9000, {7: 500, 1: 4000, 2: 4000}), 42)
    assert pids == {1, 2} and method == "nvml-used-memory"


def test_reclaim_state_back_to_baseline():
    base, before = snap(1000, {7: 500}), snap(9000, {7: 500, 42: 8000})
    st = reclaim_state(base, before, snap(1000, {7: 500}), {42})
    assert st["residual_bytes"] == 0 and st["reclaimed_bytes"] == 8000 * MIB and not st["process_still_listed"]
    st = reclaim_state(base, before, snap(1300, {7: 500}), {42})
    assert st["residual_bytes"] == 300 * MIB


def test_reclaim_state_subtracts_other_processes_changes():
    base, before = snap(1000, {7: 500}), snap(9000, {7: 500, 42: 8000})
    # meanwhile pid 7 grew by 2000 MiB and pid 8 arrived with 1000 MiB: not ours to reclaim
    st = reclaim_state(base, before, snap(4000, {7: 2500, 8: 1000}), {42})
    assert st["residual_bytes"] == 0 and st["others_drift_bytes"] == 3000 * MIB and st["others_corrected"]
    assert st["reclaimed_bytes"] == 8000 * MIB
    # the same device numbers with the actor still listed: not done
    st = reclaim_state(base, before, snap(12000, {7: 2500, 8: 1000, 42: 8000}), {42})
    assert st["process_still_listed"] and st["residual_bytes"] == 8000 * MIB - CONTEXT_UNATTRIBUTED_MAX


def test_other_processes_unattributed_context_memory_is_bounded():
    base, before = snap(1000, {}), snap(9000, {42: 8000})
    # pid 8 started meanwhile: 1000 MiB in its NVML number plus ~6 MiB its context costs the device
    st = reclaim_state(base, before, snap(2006, {8: 1000}), {42})
    assert st["residual_bytes"] == 0 and st["others_context_bytes"] == 6 * MIB and st["others_changed"] == 1
    # more than one context's worth unexplained is residual
    st = reclaim_state(base, before, snap(2040, {8: 1000}), {42})
    assert st["residual_bytes"] == 24 * MIB
    # nobody else changed: byte for byte
    st = reclaim_state(snap(1000, {7: 500}), snap(9000, {7: 500, 42: 8000}), snap(1006, {7: 500}), {42})
    assert st["residual_bytes"] == 6 * MIB and st["others_context_bytes"] == 0


def test_reclaim_state_without_per_process_numbers_uses_device_memory_only():
    base, before = snap(1000, {7: None}), snap(9000, {7: None, 42: None})
    st = reclaim_state(base, before, snap(1500, {7: None}), {42})
    assert not st["others_corrected"] and st["residual_bytes"] == 500 * MIB


def test_nvml_session_reports_plainly():
    with NvmlSession.open() as nv:
        if nv.ok:
            snaps = nv.snapshot_all()
            assert snaps and all(s.total_bytes >= s.used_bytes for s in snaps.values())
        else:
            assert nv.reason and nv.device_count() == 0
            assert nv.device_for_visible("0") is None
