"""A job with no tuning flags keeps its engine fed: the driver holds as many requests in an actor as
its engine batches (max_in_flight "auto"), and the summary says how full the batches were."""

import json

import pandas as pd

from modelyard.engine.types import SamplingParams
from modelyard.orchestration import InputSpec, JobSpec, ModelSpec, run_job


def test_a_job_with_no_flags_gives_the_engine_a_full_batch(ray_local, tiny_models, tmp_path):
    from modelyard.testing import make_images

    make_images(tmp_path / "imgs", 64, seed=5, size=(48, 40))
    out = tmp_path / "out"
    job = JobSpec(
        models=(ModelSpec("tiny", tiny_models["llava"]),),
        inputs=InputSpec(directory=str(tmp_path / "imgs")),
        output_dir=str(out),
        sampling=SamplingParams(max_new_tokens=4, ignore_eos=True),
        report=False,
    )
    assert job.max_in_flight == "auto"
    res = run_job(job, progress=False)
    s = res.summary["tiny"]
    assert s["max_running_seen"] >= 32, s  # the engine ran at least half its batch at once
    assert s["mean_batch"] and s["mean_batch"] > 8 and s["output_tokens_per_s"] > 0 and s["mean_new_tokens"] == 4
    assert 0 < s["busy_fraction"] <= 1.5
    keys = [(r["image_id"], r["model"], r["prompt_id"]) for r in map(json.loads, open(out / "results.jsonl"))]
    assert len(keys) == 64 and len(set(keys)) == 64  # each key written exactly once
    df = pd.read_parquet(res.results_path)
    assert (df["finish_reason"] != "error").all()
    summary = json.loads((out / "summary.json").read_text())["models"]["tiny"]
    assert {"output_tokens_per_s", "max_running_seen", "mean_batch", "busy_fraction", "load_s"} <= set(summary)
