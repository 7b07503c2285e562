"""ModelHandle against a real local Ray (CPU actors, num_gpus=0) and the transformers backend on
a tiny random checkpoint: results equal the in-process engine's, the admission limit holds under
4x as many callers, and the actor's death names the requests that did not finish."""

import asyncio
import os
import signal
import threading
import time

import pytest
from actor_testlib import ENGINE, modelyard_actor_names, process_gone

from modelyard.actors import ActorDied, ModelHandle
from modelyard.engine import EngineConfig, Request, SamplingParams

LIMIT = 2
GREEDY = {"max_new_tokens": 6}


@pytest.fixture(scope="module")
def handle(ray_session, tiny_ckpt):
    h = ModelHandle(tiny_ckpt, name="shared", engine_config=ENGINE, num_gpus=0, max_concurrent_requests=LIMIT)
    h.spawn()
    yield h
    h.unload()


def test_spawn_reports_process_timings_and_memory(handle):
    info = handle.info
    assert info["pid"] != os.getpid() and info["local"] and info["num_gpus"] == 0 and info["device"] is None
    tim = info["timings"]
    assert set(tim) == {"process_start_s", "load_s", "kv_alloc_s", "engine_build_s", "spawn_s"}
    assert tim["spawn_s"] >= tim["engine_build_s"] >= tim["load_s"] + tim["kv_alloc_s"]
    assert tim["load_s"] > 0 and tim["kv_alloc_s"] > 0 and info["num_cpus"] == 0.01
    assert info["memory"]["weights_bytes"] > 0 and info["verified_by"] == "process-exit"
    assert info["actor_name"] in modelyard_actor_names() and handle.alive


def test_captions_equal_the_in_process_engine(handle, tiny_ckpt, images):
    from modelyard.engine import Engine

    eng = Engine.from_pretrained(tiny_ckpt, EngineConfig(**ENGINE))
    try:
        ref = eng.generate([Request(image=p, sampling=SamplingParams(**GREEDY)) for p in images])
    finally:
        eng.close()
    got = handle.caption(images, sampling=GREEDY)
    assert [o.token_ids for o in got] == [o.token_ids for o in ref]
    assert [o.text for o in got] == [o.text for o in ref] and all(o.ok for o in got)


def test_four_times_the_limit_of_concurrent_callers(handle, images):
    n_callers = 4 * LIMIT
    results, errors = {}, []

    def caller(k):
        try:
            results[k] = handle.caption([images[k % len(images)], images[(k + 1) % len(images)]], sampling=GREEDY)
        except Exception as e:  # surfaced below
            errors.append(e)

    before = handle.stats()
    threads = [threading.Thread(target=caller, args=(k,)) for k in range(n_callers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    st = handle.stats()
    assert not errors and len(results) == n_callers and all(o.ok for r in results.values() for o in r)
    assert st["completed"] - before["completed"] == 2 * n_callers
    assert st["max_in_flight_seen"] == LIMIT  # reached, never exceeded
    assert st["max_queued_seen"] > 0  # the excess really waited in the FIFO
    assert st["in_flight"] == 0 and st["queued"] == 0


def test_streaming_forms_and_submit(handle, images):
    import ray

    seen = sorted(i for i, o in handle.caption_iter(images, sampling=GREEDY, max_in_flight=3) if o.ok)
    assert seen == list(range(len(images)))

    async def collect():
        return [i async for i, o in handle.caption_stream(images[:4], sampling=GREEDY)]

    assert sorted(asyncio.run(collect())) == [0, 1, 2, 3]

    img_bytes = open(images[0], "rb").read()
    refs = [
        handle.submit(images[0], sampling=GREEDY, request_id="by-path"),
        handle.submit(img_bytes, sampling=GREEDY, request_id="by-bytes"),
        handle.submit(ray.put(img_bytes), sampling=SamplingParams(**GREEDY), request_id="by-ref"),
    ]
    assert [handle.request_id(r) for r in refs] == ["by-path", "by-bytes", "by-ref"]
    outs = handle.get(refs)
    assert [o.request_id for o in outs] == ["by-path", "by-bytes", "by-ref"]
    assert outs[0].token_ids == outs[1].token_ids == outs[2].token_ids


def test_sigkill_mid_batch_raises_actor_died_naming_unfinished(ray_session, tiny_ckpt, images):
    h = ModelHandle(tiny_ckpt, name="victim", engine_config=ENGINE, num_gpus=0, max_concurrent_requests=LIMIT)
    h.spawn()
    pid = h.pid
    ids = [f"victim-{i}" for i in range(len(images))]
    sampling = {"max_new_tokens": 48, "ignore_eos": True}

    # Killed once LIMIT results reached the driver (not merely finished in the actor: a reply in
    # flight at the kill is lost, which would make "completed" racy); the rest are mid-batch.
    received = []
    with pytest.raises(ActorDied) as ei:
        for _, out in h.caption_iter(images, sampling=sampling, request_ids=ids, max_in_flight=len(images)):
            received.append(out.request_id)
            if len(received) == LIMIT:
                os.kill(pid, signal.SIGKILL)
    died = ei.value
    assert len(received) >= LIMIT and set(received) <= set(died.completed)
    assert died.request_ids and set(died.request_ids) | set(died.completed) == set(ids)
    assert not set(died.request_ids) & set(died.completed)
    assert died.request_ids == [i for i in ids if i in died.request_ids]  # in submission order
    assert len(died.completed) >= LIMIT and all(o.ok for o in died.completed.values())
    assert not h.alive and process_gone(pid)

    info = h.respawn()  # verified unload of the dead actor, then a new one
    assert info["pid"] != pid and h.caption(images[:1], sampling=GREEDY)[0].ok
    new_pid = h.pid
    h._info["local"] = False  # take the path used for actors on other nodes: a pinned watcher task
    res = h.unload()
    assert res["verified_by"] == "process-exit" and res["seconds"] < 30 and res["residual_bytes"] is None
    assert "task on the actor's node" in res["note"] and process_gone(new_pid)
    assert info["actor_name"] not in modelyard_actor_names() and not h.alive


def test_more_cpu_actors_than_ray_cpus_all_spawn(ray_session, tiny_ckpt):
    """Ray here has 2 CPUs. An actor naming num_gpus would hold a whole CPU for its lifetime by
    default, so the third spawn used to wait forever; now CPU actors hold 0.01 CPU, and an
    explicit num_cpus is held as asked."""
    import ray

    def free_cpus():
        return ray.available_resources().get("CPU", 0.0)

    before = free_cpus()
    handles = [
        ModelHandle(tiny_ckpt, name=f"cpu-{i}", engine_config=ENGINE, num_gpus=0, num_cpus=1 if i == 2 else None)
        for i in range(3)
    ]
    try:
        infos = [h.spawn(timeout=120) for h in handles]
        assert [i["num_cpus"] for i in infos] == [0.01, 0.01, 1] and all(h.alive for h in handles)
        deadline = time.monotonic() + 15  # the resource view lags the spawns a little
        while abs(before - free_cpus() - 1.02) > 1e-6 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert before - free_cpus() == pytest.approx(1.02), (before, free_cpus())
    finally:
        for h in handles:
            h.unload()


def test_failed_load_is_a_clear_error_and_leaves_no_actor(ray_session, tmp_path):
    h = ModelHandle(tmp_path / "no-such-model", name="broken", engine_config=ENGINE, num_gpus=0)
    with pytest.raises(RuntimeError, match="spawning model actor 'broken'") as err:
        h.spawn()
    assert "ray::" not in str(err.value)
    assert not h.alive and not [n for n in modelyard_actor_names() if ":broken-" in n]


def test_failed_load_names_the_engines_exception_not_rays_header(ray_session, tiny_ckpt, tmp_path):
    """A checkpoint whose lm_head disagrees with its config: the error says CheckpointMismatch and
    which tensor, not Ray's "ray::ModelActor.load() (pid=...)" header of the remote traceback."""
    import shutil

    from safetensors.torch import load_file, save_file

    bad = shutil.copytree(tiny_ckpt, tmp_path / "bad-lm-head")
    tensors = load_file(bad / "model.safetensors")
    tensors["lm_head.weight"] = tensors["lm_head.weight"][:-24].clone()  # [vocab - 24, hidden]
    save_file(tensors, bad / "model.safetensors", metadata={"format": "pt"})
    h = ModelHandle(bad, name="mismatch", engine_config=ENGINE, num_gpus=0)
    with pytest.raises(RuntimeError) as err:
        h.spawn()
    msg = str(err.value)
    assert msg.startswith("spawning model actor 'mismatch' from ") and "ray::" not in msg, msg
    assert "failed: CheckpointMismatch: shape mismatch for 'lm_head.weight'" in msg, msg
    assert not h.alive and not [n for n in modelyard_actor_names() if ":mismatch-" in n]


def test_resource_arguments_are_validated(tiny_ckpt):
    with pytest.raises(ValueError, match="num_cpus must be >= 0"):
        ModelHandle(tiny_ckpt, num_cpus=-1)
    for key in ("num_cpus", "num_gpus"):
        with pytest.raises(ValueError, match=f"pass {key} as ModelHandle"):
            ModelHandle(tiny_ckpt, ray_options={key: 1})


def test_fractional_gpu_requires_a_budget(tiny_ckpt):
    with pytest.raises(ValueError, match="gpu_memory_budget_gib"):
        ModelHandle(tiny_ckpt, num_gpus=0.5)
    h = ModelHandle(tiny_ckpt, num_gpus=0.5, gpu_memory_budget_gib=10)
    assert h.engine_config.gpu_memory_budget_gib == 10
    with pytest.raises(RuntimeError, match="not loaded"):
        h.caption(["x.png"])
    assert h.unload()["note"] == "not loaded"
