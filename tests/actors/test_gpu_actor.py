"""On a GPU through Ray: a model actor's unload is verified back to the pre-spawn baseline, also
while another actor shares the GPU (its memory is told apart by NVML's per-process numbers)."""

import pytest

from modelyard.actors import ModelHandle

pytestmark = pytest.mark.gpu
GPU_ENGINE = {"backend": "native", "num_kv_blocks": 256, "enforce_eager": True}


@pytest.fixture
def gpu_ray(request):
    from modelyard.actors.gpu import NvmlSession

    with NvmlSession.open() as nv:
        if not nv.ok:
            pytest.skip(f"no GPU here: {nv.reason}")
    import ray

    info = request.getfixturevalue("ray_session")
    if ray.cluster_resources().get("GPU", 0) < 1:
        pytest.skip("Ray sees no GPU on this machine")
    return info


def test_gpu_actor_unload_is_verified_to_baseline(gpu_ray, tiny_ckpt, images):
    h = ModelHandle(tiny_ckpt, name="gpu", engine_config=GPU_ENGINE, num_gpus=1)
    info = h.spawn()
    print(f"\nspawn: {info}")
    assert info["device"]["uuid"] and info["nvml"] == "ok"
    assert info["verified_by"] in ("nvml-pid", "nvml-new-process"), info
    assert info["memory"]["process_vram_bytes"] > 0
    assert all(o.ok for o in h.caption(images, sampling={"max_new_tokens": 8}))
    res = h.unload(timeout=60)
    print(f"unload: {res}")
    assert res["residual_bytes"] == 0 and not res["process_still_listed"]
    assert res["reclaimed_bytes"] >= info["memory"]["process_vram_bytes"]


def test_two_actors_sharing_a_gpu_unload_one_at_a_time(gpu_ray, tiny_ckpt, images):
    a = ModelHandle(tiny_ckpt, name="half-a", engine_config=GPU_ENGINE, num_gpus=0.5, gpu_memory_budget_gib=4)
    b = ModelHandle(tiny_ckpt, name="half-b", engine_config=GPU_ENGINE, num_gpus=0.5, gpu_memory_budget_gib=4)
    ia, ib = a.spawn(), b.spawn()
    try:
        assert ia["device"]["uuid"] == ib["device"]["uuid"]
        assert a.caption(images[:2])[0].ok and b.caption(images[:2])[0].ok
        ra = a.unload(timeout=60)  # b's memory arrived after a's baseline: drift, not residual
        print(f"\nunload a: {ra}")
        assert ra["residual_bytes"] == 0 and ra["others_corrected"] and ra["others_drift_bytes"] > 0
        assert ra["others_changed"] == 1
        assert b.caption(images[:1])[0].ok
        rb = b.unload(timeout=60)  # a was in b's baseline and is gone: negative drift
        print(f"unload b: {rb}")
        assert rb["residual_bytes"] == 0 and rb["others_drift_bytes"] < 0
    finally:
        a.unload()
        b.unload()
