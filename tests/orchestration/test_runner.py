"""End-to-end jobs with real model actors on tiny checkpoints (CPU): sequential/parallel identity,
an actor SIGKILLed mid-job, a driver killed halfway and resumed, broken and awkward inputs."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pandas as pd
import pytest

from modelyard.actors import ModelHandle
from modelyard.engine.types import SamplingParams
from modelyard.orchestration import InputSpec, JobSpec, ModelSpec, PromptSpec, run_job
from modelyard.orchestration.running.job import default_handle_factory

SAMPLING = SamplingParams(max_new_tokens=6)
KEY = ["image_id", "model", "prompt_id"]


def _job(models, images, out, **kw):
    specs = tuple(ModelSpec(n, p) for n, p in models.items())
    return JobSpec(models=specs, inputs=InputSpec.from_any(images), output_dir=str(out), sampling=SAMPLING, **kw)


def _rows(out):
    return pd.read_parquet(os.path.join(out, "results.parquet"))


def _jsonl_keys(out):
    with open(os.path.join(out, "results.jsonl")) as f:
        return [tuple(json.loads(l)[k] for k in KEY) for l in f]


PROMPTS = (PromptSpec("default", "Describe the image."), PromptSpec("short", "Caption in a few words."))


@pytest.fixture(scope="module")
def sequential_run(ray_local, tiny_models, sample_images, tmp_path_factory):
    """Both models, two prompts, sequential: the reference the other tests compare captions with."""
    out = tmp_path_factory.mktemp("seq")
    return run_job(_job(tiny_models, sample_images, out, mode="sequential", prompts=PROMPTS), progress=False)


def test_sequential_and_parallel_give_identical_captions(sequential_run, tiny_models, sample_images, tmp_path):
    seq = sequential_run
    par = run_job(_job(tiny_models, sample_images, tmp_path / "par", mode="parallel", prompts=PROMPTS), progress=False)
    assert len(seq.plan.waves) == 2 and len(par.plan.waves) == 1
    a, b = _rows(seq.output_dir).set_index(KEY).sort_index(), _rows(par.output_dir).set_index(KEY).sort_index()
    assert len(a) == 8 * 2 * 2 and a.index.equals(b.index) and not a.index.duplicated().any()
    assert (a["finish_reason"] != "error").all()
    pd.testing.assert_series_equal(a["caption"], b["caption"])
    assert (a["num_generated_tokens"] > 0).all()
    for m in tiny_models:
        assert seq.summary[m]["rows"] == 16 and seq.summary[m]["load_s"] > 0
        # every unload is accounted for: a measured residual, or the handle's note on why there is none (CPU)
        s = seq.summary[m]
        assert s["reclaim_residual_bytes"] is not None or any(n.startswith("unload:") for n in s["notes"])
    assert os.path.exists(seq.report["report"]) and os.path.exists(seq.report["comparison"])


def _reference(run, model, prompt_id="default"):
    df = _rows(run.output_dir)
    return df[(df["model"] == model) & (df["prompt_id"] == prompt_id)].set_index("image_id")["caption"].sort_index()


class _KillOnce(ModelHandle):
    """Real handle whose actor process is SIGKILLed right after its `kill_at`-th submit (once)."""

    killed = 0

    def __init__(self, *a, kill_at, **kw):
        super().__init__(*a, **kw)
        self.kill_at, self.n = kill_at, 0

    def submit(self, *a, **kw):
        ref = super().submit(*a, **kw)
        self.n += 1
        if self.n == self.kill_at and _KillOnce.killed == 0:
            _KillOnce.killed += 1
            os.kill(self.pid, signal.SIGKILL)
        return ref


def test_actor_sigkill_mid_job_gives_exactly_one_row_per_key(sequential_run, tiny_models, sample_images, tmp_path):
    models = {"llava": tiny_models["llava"]}

    def factory(m, p):
        base = default_handle_factory(m, p)
        return _KillOnce(m.path, name=base.name, engine_config=base.engine_config, num_gpus=p.num_gpus, kill_at=5)

    job = _job(models, sample_images, tmp_path / "killed", max_in_flight=3)
    res = run_job(job, progress=False, handle_factory=factory)
    assert _KillOnce.killed == 1 and res.summary["llava"]["restarts"] == 1
    keys = _jsonl_keys(res.output_dir)
    assert len(keys) == len(set(keys)) == 8  # not even a superseded row
    got = _rows(res.output_dir).set_index("image_id").sort_index()
    assert (got["finish_reason"] != "error").all()
    # the retried items give the same greedy captions as the uninterrupted run
    pd.testing.assert_series_equal(got["caption"], _reference(sequential_run, "llava"))
    assert got["attempts"].max() == 2  # the units in flight at the kill ran twice


def test_ray_dataset_of_bytes(sequential_run, tiny_models, sample_images, tmp_path):
    """A Ray Dataset of encoded images as input: the actors decode the bytes; ids come from the rows."""
    import ray

    names = sorted(os.listdir(sample_images))
    ds = ray.data.from_items([{"id": n, "bytes": open(os.path.join(sample_images, n), "rb").read()} for n in names])
    res = run_job(_job({"qwen": tiny_models["qwen"]}, ds, tmp_path / "ds"), progress=False)
    got = _rows(res.output_dir).set_index("image_id").sort_index()
    assert list(got.index) == names and got["source"].isna().all()
    pd.testing.assert_series_equal(got["caption"], _reference(sequential_run, "qwen"))


_DRIVER = textwrap.dedent("""
    import sys, time
    from modelyard.orchestration import load_job, run_job
    from modelyard.orchestration.running.job import default_handle_factory

    class Slow:   # slows the driver's submissions so the parent can kill it halfway
        def __init__(self, h): self.h = h
        def __getattr__(self, k): return getattr(self.h, k)
        def submit(self, *a, **kw):
            time.sleep(0.15)
            return self.h.submit(*a, **kw)

    run_job(load_job(sys.argv[1]), progress=False,
            handle_factory=lambda m, p: Slow(default_handle_factory(m, p)))
""")


def test_driver_killed_halfway_then_rerun_resumes_without_recompute(ray_local, tiny_models, tmp_path):
    from modelyard.testing import make_images

    make_images(tmp_path / "imgs", 30, seed=3)
    out = tmp_path / "out"
    jobfile = tmp_path / "job.json"
    jobfile.write_text(
        json.dumps(
            {
                "output_dir": str(out),
                "inputs": {"directory": str(tmp_path / "imgs")},
                "max_in_flight": 2,
                "sampling": {"max_new_tokens": 6},
                "models": [{"name": "llava", "path": tiny_models["llava"]}],
            }
        )
    )
    (tmp_path / "driver.py").write_text(_DRIVER)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    # the driver starts its own local Ray (a loopback-bound cluster cannot be joined by address from
    # another process: Ray rewrites 127.0.0.1 to the host's IP), which dies with it
    proc = subprocess.Popen(
        [sys.executable, str(tmp_path / "driver.py"), str(jobfile)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    jsonl = out / "results.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if jsonl.exists() and jsonl.read_bytes().count(b"\n") >= 10:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the driver finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_before = set(_jsonl_keys(out))
    assert 10 <= len(done_before) < 30

    submitted = []

    class Recording:
        def __init__(self, h):
            self.h = h

        def __getattr__(self, k):
            return getattr(self.h, k)

        def submit(self, image, prompt, sampling, request_id=None):
            submitted.append(os.path.relpath(image, tmp_path / "imgs"))
            return self.h.submit(image, prompt, sampling, request_id=request_id)

    from modelyard.orchestration import load_job

    res = run_job(
        load_job(jobfile), progress=False, handle_factory=lambda m, p: Recording(default_handle_factory(m, p))
    )
    assert res.summary["llava"]["skipped_done"] == len(done_before)
    assert not {(i, "llava", "default") for i in submitted} & done_before  # done keys not recomputed
    assert len(submitted) == 30 - len(done_before)
    keys = _jsonl_keys(out)
    assert len(keys) == len(set(keys)) == 30
    df = _rows(out)
    assert len(df) == 30 and not df.duplicated(KEY).any() and (df["finish_reason"] != "error").all()


def test_broken_and_awkward_inputs_become_rows_and_the_rest_completes(ray_local, tiny_models, tmp_path):
    from modelyard.testing import awkward_images, broken_images, make_images

    d = tmp_path / "imgs"
    awkward = awkward_images(d / "awkward")
    broken = broken_images(d / "broken")
    make_images(d / "good", 3, seed=5)
    prompts = (PromptSpec("describe", "Describe the image."), PromptSpec("huge", "describe " * 6000))
    job = _job({"llava": tiny_models["llava"]}, str(d), tmp_path / "out", prompts=prompts)
    res = run_job(job, progress=False)
    df = _rows(res.output_dir).set_index(["image_id", "prompt_id"])
    n_files = len(awkward) + len(broken) + 3
    assert len(df) == n_files * 2 and not df.index.duplicated().any()
    assert res.summary["llava"]["restarts"] == 0
    err = df["finish_reason"] == "error"
    for p in broken.values():
        row = df.loc[(os.path.relpath(p, d), "describe")]
        assert row["finish_reason"] == "error" and row["error"], p
    ok = df.xs("describe", level="prompt_id")
    ok = ok[~ok.index.isin([os.path.relpath(p, d) for p in broken.values()])]
    assert (ok["finish_reason"] != "error").all(), ok[["finish_reason", "error"]]
    huge = df.xs("huge", level="prompt_id")
    assert (huge["finish_reason"] == "error").all() and huge["error"].str.len().min() > 0
    assert err.sum() == len(broken) + n_files
    print(df.loc[err, "error"].drop_duplicates().to_string())
