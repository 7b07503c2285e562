"""The runner's driver-side behaviour with cheap fake model actors: driver memory against the data
set's size, replicas sharing one model's work, and an input that crashes the actor every time.

The fake actor is a Ray actor that answers each request at once with a fixed caption (or exits its
process on an image named "poison*", like a native crash would), behind the same
spawn/submit/get/unload/respawn surface as ModelHandle, with actor death reported through the
actors layer's own ActorDied. Real tiny models would only make these tests slower; the real-actor
behaviour (sequential/parallel identity, SIGKILL, driver kill and resume, broken images) is in
test_runner.py.

Ray's own task-event telemetry (a buffer in the driver's core worker that grows to a cap of a few
thousand task records, ~10 MiB, before it plateaus) is switched off for this module's cluster, so
that the memory test measures modelyard's driver and not Ray's observability buffer. The comparison
report is off in that test too: it is an explicit post-processing step over all rows (the HTML is
capped, the side-by-side table is not); results.parquet is still written, streamed in chunks.
"""

import os
import threading
import time

import pandas as pd
import psutil
import pytest

from modelyard.engine.types import Output, SamplingParams
from modelyard.orchestration import InputSpec, JobSpec, ModelSpec, PromptSpec, run_job


class _Echo:
    async def generate(self, image, prompt, sampling, request_id):
        if os.path.basename(image).startswith("poison"):
            os._exit(1)
        return Output(
            request_id,
            text=f"a caption of {os.path.basename(image)}",
            token_ids=[1, 2, 3],
            finish_reason="stop",
            num_prompt_tokens=12,
        )


class FakeHandle:
    def __init__(self, name):
        self.name, self._actor, self._ids = name, None, {}

    def spawn(self, timeout=None):
        import sys

        import ray

        # Ray workers cannot import this test module: ship the class by value
        ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
        self._actor = ray.remote(num_cpus=0)(_Echo).options(max_concurrency=256).remote()
        # what a real actor reports about its engine, from which the runner sizes what it keeps in flight
        return {"timings": {"spawn_s": 0.0}, "memory": {}, "engine": {"max_batch_size": 64, "kv_tokens": None}}

    def submit(self, image, prompt, sampling, request_id=None):
        ref = self._actor.generate.remote(image, prompt, sampling, request_id)
        self._ids[ref] = request_id
        return ref

    def get(self, refs):
        from modelyard.actors.calls import get_outputs

        refs = list(refs)
        try:
            return get_outputs(self.name, refs, [self._ids[r] for r in refs], None)
        finally:
            for r in refs:
                self._ids.pop(r, None)

    def stats(self):
        return {}

    def unload(self):
        import ray

        ray.kill(self._actor)
        self._ids.clear()
        return {"residual_bytes": 0, "reclaimed_bytes": 0, "seconds": 0.0}

    def respawn(self):
        self.unload()
        return self.spawn()


@pytest.fixture(scope="module")
def ray_local():
    import ray

    from modelyard.actors import ensure_ray

    old = os.environ.get("RAY_task_events_report_interval_ms")
    os.environ["RAY_task_events_report_interval_ms"] = "0"  # read by the core worker at ray.init
    try:
        ensure_ray(num_cpus=4)
        yield
    finally:
        ray.shutdown()
        if old is None:
            os.environ.pop("RAY_task_events_report_interval_ms", None)
        else:
            os.environ["RAY_task_events_report_interval_ms"] = old


def _fake_ckpt(d):
    """The fake actors load nothing, but the driver checks a model path is a checkpoint directory."""
    d.mkdir(exist_ok=True)
    (d / "config.json").write_text("{}")
    return str(d)


def _peak_rss_of_job(images_dir, out, models=("m1",)) -> int:
    proc = psutil.Process()
    peak = [proc.memory_info().rss]
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(0.01)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    try:
        ckpt = _fake_ckpt(images_dir.parent / "ckpt")
        job = JobSpec(
            models=tuple(ModelSpec(m, ckpt) for m in models),
            inputs=InputSpec(directory=str(images_dir)),
            output_dir=str(out),
            mode="parallel",
            sampling=SamplingParams(max_new_tokens=4),
            report=False,
        )
        res = run_job(job, progress=False, handle_factory=lambda m, p: FakeHandle(m.name), log=lambda s: None)
    finally:
        stop.set()
        t.join()
    assert all(s["rows"] > 0 and s["errors"] == 0 for s in res.summary.values()), res.summary
    return peak[0]


def _files(d, n):
    d.mkdir()
    for i in range(n):
        (d / f"{i:05d}.jpg").write_bytes(b"")
    return d


@pytest.mark.timeout(600)
def test_driver_rss_flat_from_1000_to_10000_images(ray_local, tmp_path):
    """With the default max_in_flight ("auto": 80 per actor for a 64-sequence engine)."""
    small, large = _files(tmp_path / "s", 1000), _files(tmp_path / "l", 10000)
    _peak_rss_of_job(small, tmp_path / "warmup")  # imports, Ray worker pools, pandas/pyarrow
    rss_small = _peak_rss_of_job(small, tmp_path / "o1000")
    rss_large = _peak_rss_of_job(large, tmp_path / "o10000")
    print(f"peak RSS: 1000 images {rss_small / 2**20:.1f} MiB, 10000 images {rss_large / 2**20:.1f} MiB")
    assert rss_large <= 1.10 * rss_small


def _job(images_dir, out, **kw):
    kw = {"sampling": SamplingParams(max_new_tokens=4), "report": False, **kw}
    models = kw.pop("models", (ModelSpec("m", _fake_ckpt(images_dir.parent / "ckpt")),))
    return JobSpec(models=models, inputs=InputSpec(directory=str(images_dir)), output_dir=str(out), **kw)


def _fakes(m, p):
    return FakeHandle(f"{m.name}#{p.replica}")


def test_replicas_share_one_models_work(ray_local, tmp_path):
    imgs = _files(tmp_path / "imgs", 60)
    res = run_job(
        _job(
            imgs, tmp_path / "out", models=(ModelSpec("m", _fake_ckpt(tmp_path / "ckpt"), replicas=2),), max_in_flight=2
        ),
        progress=False,
        handle_factory=_fakes,
        log=lambda s: None,
    )
    df = pd.read_parquet(res.results_path)
    assert len(df) == 60 and not df.duplicated(["image_id", "model", "prompt_id"]).any()
    per_worker = df["worker"].value_counts()
    assert set(per_worker.index) == {"m#0", "m#1"} and per_worker.min() > 0
    assert res.summary["m"]["replicas"] == 2


def test_an_input_that_kills_the_actor_is_isolated_and_the_rest_completes(ray_local, tmp_path):
    imgs = _files(tmp_path / "imgs", 30)
    (imgs / "poison.jpg").write_bytes(b"")
    res = run_job(
        _job(imgs, tmp_path / "out", max_in_flight=4, max_restarts=3, max_item_attempts=2),
        progress=False,
        handle_factory=_fakes,
        log=lambda s: None,
    )
    df = pd.read_parquet(res.results_path).set_index("image_id")
    assert len(df) == 31 and not df.index.duplicated().any()
    bad = df.loc["poison.jpg"]
    assert (
        bad["finish_reason"] == "error" and "died 2 times" in bad["error"] and "nothing else in flight" in bad["error"]
    )
    assert not bad["retryable"]
    assert (df.drop("poison.jpg")["finish_reason"] != "error").all()  # its batch-mates were retried, alone
    assert res.summary["m"]["restarts"] == 2
    with open(tmp_path / "out" / "results.jsonl") as f:
        assert sum(1 for _ in f) == 31


def test_restart_budget_exhausted_gives_retryable_error_rows(ray_local, tmp_path):
    imgs = _files(tmp_path / "imgs", 10)
    (imgs / "poison.jpg").write_bytes(b"")
    res = run_job(
        _job(imgs, tmp_path / "out", max_in_flight=20, max_restarts=0),
        progress=False,
        handle_factory=_fakes,
        log=lambda s: None,
    )
    df = pd.read_parquet(res.results_path).set_index("image_id")
    assert len(df) == 11 and not df.index.duplicated().any()
    err = df[df["finish_reason"] == "error"]
    # whatever had not finished when the only allowed life ended: an error row that a rerun retries
    assert len(err) >= 1 and err["retryable"].all() and err["error"].str.contains("max_restarts=0").all()
    assert "poison.jpg" in err.index


class _Unloadable(FakeHandle):
    def spawn(self, timeout=None):
        raise RuntimeError("spawning model actor 'broken' failed: no config.json in /x")


def test_a_model_that_fails_to_load_gets_error_rows_and_the_others_finish(ray_local, tmp_path):
    imgs = _files(tmp_path / "imgs", 5)
    ckpt = _fake_ckpt(tmp_path / "ckpt")
    models = (ModelSpec("good", ckpt), ModelSpec("broken", ckpt))
    res = run_job(
        _job(imgs, tmp_path / "out", models=models, mode="parallel"),
        progress=False,
        log=lambda s: None,
        handle_factory=lambda m, p: (_Unloadable if m.name == "broken" else FakeHandle)(m.name),
    )
    df = pd.read_parquet(res.results_path)
    good, broken = df[df["model"] == "good"], df[df["model"] == "broken"]
    assert len(good) == 5 and (good["finish_reason"] != "error").all()
    assert len(broken) == 5 and broken["retryable"].all()
    assert broken["error"].str.contains("failed to load: RuntimeError: spawning model actor 'broken' failed").all()


def test_rerun_with_changed_sampling_is_refused_and_keeps_the_rows(ray_local, tmp_path):
    """run_job itself (not only the CLI) refuses to resume into rows made with other sampling."""
    from modelyard.orchestration import SpecError

    imgs = _files(tmp_path / "imgs", 6)
    run_job(_job(imgs, tmp_path / "out"), progress=False, handle_factory=_fakes, log=lambda s: None)
    before = (tmp_path / "out" / "results.jsonl").read_bytes()
    with pytest.raises(SpecError, match="sampling changed: max_new_tokens 4 -> 9"):
        run_job(
            _job(imgs, tmp_path / "out", sampling=SamplingParams(max_new_tokens=9)),
            progress=False,
            handle_factory=_fakes,
            log=lambda s: None,
        )
    assert (tmp_path / "out" / "results.jsonl").read_bytes() == before


class _Counted(FakeHandle):
    """A fake whose factory calls, spawns and submissions go into a shared event list."""

    def __init__(self, name, events):
        super().__init__(name)
        self.events = events
        events.append(("made", name))

    def spawn(self, timeout=None):
        self.events.append(("spawn", self.name))
        return super().spawn(timeout)

    def submit(self, image, prompt, sampling, request_id=None):
        self.events.append(("submit", self.name, os.path.basename(image)))
        return super().submit(image, prompt, sampling, request_id)


def _run_counted(job):
    events, lines = [], []
    res = run_job(
        job, progress=False, handle_factory=lambda m, p: _Counted(f"{m.name}#{p.replica}", events), log=lines.append
    )
    return res, events, "\n".join(lines)


TWO_PROMPTS = (PromptSpec("default", "Describe the image."), PromptSpec("short", "Caption in a few words."))


def test_rerun_of_a_finished_job_spawns_nothing_and_keeps_the_output(ray_local, tmp_path):
    imgs = _files(tmp_path / "imgs", 6)
    ckpt = _fake_ckpt(tmp_path / "ckpt")
    job = _job(
        imgs,
        tmp_path / "out",
        mode="parallel",
        prompts=TWO_PROMPTS,
        models=(ModelSpec("m1", ckpt, replicas=2), ModelSpec("m2", ckpt)),
    )
    first, events, _ = _run_counted(job)
    assert sorted(n for kind, n, *_ in events if kind == "spawn") == ["m1#0", "m1#1", "m2#0"]
    jsonl = (tmp_path / "out" / "results.jsonl").read_bytes()
    before = pd.read_parquet(first.results_path)
    assert len(before) == 6 * 2 * 2

    again, events, log = _run_counted(job)
    assert events == []  # no handle made, no actor spawned, nothing submitted
    assert "m1: all 12 rows already done, not loaded" in log and "m2: all 12 rows already done, not loaded" in log
    assert (tmp_path / "out" / "results.jsonl").read_bytes() == jsonl
    pd.testing.assert_frame_equal(pd.read_parquet(again.results_path), before)
    for m in ("m1", "m2"):
        s = again.summary[m]
        assert s["not_loaded"] and s["rows"] == 0 and s["skipped_done"] == 12 and s["replicas"] == 0
        assert first.summary[m]["not_loaded"] is False


def test_sequential_job_whose_first_model_is_done_goes_straight_to_the_next(ray_local, tmp_path):
    imgs = _files(tmp_path / "imgs", 5)
    ckpt = _fake_ckpt(tmp_path / "ckpt")
    _run_counted(_job(imgs, tmp_path / "out", models=(ModelSpec("a", ckpt),)))
    a_rows = pd.read_parquet(tmp_path / "out" / "results.parquet")
    res, events, log = _run_counted(
        _job(imgs, tmp_path / "out", mode="sequential", models=(ModelSpec("a", ckpt), ModelSpec("b", ckpt)))
    )
    assert len(res.plan.waves) == 2
    assert [e[:2] for e in events if e[0] != "submit"] == [("made", "b#0"), ("spawn", "b#0")]
    assert {e[1] for e in events if e[0] == "submit"} == {"b#0"}
    assert "a: all 5 rows already done, not loaded" in log
    df = pd.read_parquet(res.results_path)
    assert len(df) == 10 and (df["finish_reason"] != "error").all()
    pd.testing.assert_frame_equal(df[df["model"] == "a"].reset_index(drop=True), a_rows)
    assert res.summary["a"]["not_loaded"] and not res.summary["b"]["not_loaded"]


def test_a_model_with_one_key_to_redo_is_loaded_for_that_key_only(ray_local, tmp_path):
    """The pending check reads up to the first pending key; that unit is the one submitted."""
    import json

    imgs = _files(tmp_path / "imgs", 6)
    ckpt = _fake_ckpt(tmp_path / "ckpt")
    job = _job(imgs, tmp_path / "out", mode="parallel", models=(ModelSpec("m1", ckpt), ModelSpec("m2", ckpt)))
    _run_counted(job)
    # a later retryable error row for one key of m2 (as a failed load would leave): the rerun redoes it
    from modelyard.orchestration.outputs.store import error_row

    row = error_row("00003.jpg", "m2", "default", "the model failed to load", retryable=True)
    with open(tmp_path / "out" / "results.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")
    res, events, log = _run_counted(job)
    assert [e for e in events if e[0] != "made"] == [("spawn", "m2#0"), ("submit", "m2#0", "00003.jpg")]
    assert "m1: all 6 rows already done, not loaded" in log and "m2: all" not in log
    df = pd.read_parquet(res.results_path).set_index(["image_id", "model"])
    assert len(df) == 12 and (df["finish_reason"] != "error").all()
    assert res.summary["m2"]["rows"] == 1 and not res.summary["m2"]["not_loaded"]
