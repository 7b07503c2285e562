"""A user's mistakes end in one clear SpecError naming the field, before Ray or a model starts:
job-file typos and wrong types, bad engine options, model paths that are not checkpoints, inputs
with no images, unreachable cluster addresses, and a rerun into an output directory whose rows
came from a different job."""

import json
import socket

import pytest

from modelyard.engine.types import SamplingParams
from modelyard.orchestration.checks.preflight import check_address, check_job
from modelyard.orchestration.checks.resume import check_resume
from modelyard.orchestration.outputs.progress import describe_outcome, format_summary
from modelyard.orchestration.outputs.store import ResultStore, error_row
from modelyard.orchestration.planning.memory import estimate_memory
from modelyard.orchestration.spec.job import InputSpec, JobSpec, ModelSpec, PromptSpec, SpecError
from modelyard.orchestration.spec.jobfile import job_from_dict, load_job


def _data(**change):
    d = {"output_dir": "out", "inputs": {"directory": "imgs"}, "models": [{"path": "org/model"}]}
    return d | change


@pytest.mark.parametrize(
    "change, match",
    [
        ({"max_in_flght": 4}, r"unknown key 'max_in_flght' \(did you mean 'max_in_flight'\?\)"),
        (
            {"models": [{"path": "org/model", "engnie": {}}]},
            r"models\[0\]: unknown key 'engnie' \(did you mean 'engine'",
        ),
        ({"sampling": {"max_tokens": 4}}, r"sampling: unknown key 'max_tokens' \(did you mean 'max_new_tokens'"),
        ({"prompts": [{"id": "a", "txt": "x"}]}, r"prompts\[0\]: unknown key 'txt' \(did you mean 'text'"),
        ({"max_in_flight": "4"}, r"max_in_flight must be \"auto\" or an integer >= 1, got '4'"),
        ({"report": "no"}, r"report must be true/false, got 'no'"),
        ({"sampling": {"max_new_tokens": "4"}}, r"sampling: max_new_tokens must be an integer, got '4'"),
        ({"sampling": {"temperature": "hot"}}, r"sampling: temperature must be a number"),
        ({"sampling": 4}, r"`sampling` must be a table"),
        ({"models": [{"path": 3}]}, r"models\[0\]: path must be a string, got 3"),
        ({"models": [{"path": "org/model", "replicas": "2"}]}, r"replicas must be an integer, got '2'"),
        ({"models": [{"path": "org/model", "gpus": "half"}]}, r"gpus must be a number or null, got 'half'"),
        ({"models": [{"path": "org/model", "prompt": 3}]}, r"prompt must be a string or a table or null"),
        (
            {"models": [{"path": "org/model", "engine": {"max_batch_size": "2"}}]},
            r"engine options: max_batch_size must be an integer or null, got '2'",
        ),
        ({"models": [{"path": "org/model", "engine": {"max_batch": 2}}]}, r"did you mean 'max_batch_size'"),
        ({"models": [{"path": "org/model", "engine": {"backend": "vllm"}}]}, r"backend must be one of"),
        ({"output_dir": 5}, r"output_dir must be a non-empty path string, got 5"),
        ({"inputs": {"directory": "imgs", "extensions": "jpg"}}, r"extensions must be a list, got 'jpg'"),
        ({"inputs": {"directory": "imgs", "recursive": "no"}}, r"recursive must be true/false, got 'no'"),
    ],
)
def test_job_file_mistakes_are_named(change, match):
    with pytest.raises(SpecError, match=match):
        job_from_dict(_data(**change))


def test_python_specs_check_engine_options_and_inputs():
    with pytest.raises(SpecError, match="engine options: unknown key 'bogus'"):
        ModelSpec("m", "x", engine={"bogus": 1})
    with pytest.raises(SpecError, match="cache_max_entry_count must be in"):
        ModelSpec("m", "x", engine={"cache_max_entry_count": 2.0})
    assert (
        ModelSpec("m", "x", engine={"gpu_memory_budget_gib": 10, "enforce_eager": True}).engine["gpu_memory_budget_gib"]
        == 10
    )
    with pytest.raises(SpecError, match="extensions must be a list"):
        InputSpec(directory="d", extensions=".jpg")
    with pytest.raises(SpecError, match="recursive must be true or false"):
        InputSpec(directory="d", recursive="yes")


def test_job_file_path_errors(tmp_path):
    with pytest.raises(SpecError, match="job file not found"):
        load_job(tmp_path / "missing.toml")
    bad = tmp_path / "job.toml"
    bad.write_text('output_dir = "o"\n[[models]\npath = "x"\n')
    with pytest.raises(SpecError, match=r"cannot parse: .*line 2"):
        load_job(bad)


def _job(tmp_path, model_path, inputs, **kw):
    return JobSpec(models=(ModelSpec("m", str(model_path)),), inputs=inputs, output_dir=str(tmp_path / "out"), **kw)


def test_preflight_model_paths(tmp_path):
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    (imgs / "a.jpg").write_bytes(b"x")
    inputs = InputSpec(directory=str(imgs))
    with pytest.raises(SpecError, match="does not exist, and it is not a Hub id"):
        check_job(_job(tmp_path, tmp_path / "nope", inputs))
    with pytest.raises(SpecError, match=r"not a Hugging Face checkpoint \(no config.json"):
        check_job(_job(tmp_path, imgs, inputs))
    with pytest.raises(SpecError, match="is a file; give the checkpoint's directory"):
        check_job(_job(tmp_path, imgs / "a.jpg", inputs))
    check_job(_job(tmp_path, "org/some-model", inputs))  # a Hub id is fetched later, by the runner


def test_preflight_inputs_without_images(tmp_path):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text("{}")
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    (empty / "sub" / "notes.txt").write_text("not an image")
    with pytest.raises(SpecError, match=r"no images in .*empty.*\.jpg.*subdirectories included"):
        check_job(_job(tmp_path, ckpt, InputSpec(directory=str(empty))))
    with pytest.raises(SpecError, match="no files match"):
        check_job(_job(tmp_path, ckpt, InputSpec(glob=str(empty / "*.png"))))
    lst = tmp_path / "list.txt"
    lst.write_text("# nothing yet\n\n")
    with pytest.raises(SpecError, match="lists no paths"):
        check_job(_job(tmp_path, ckpt, InputSpec(file_list=str(lst))))
    with pytest.raises(SpecError, match="is not a directory"):
        check_job(_job(tmp_path, ckpt, InputSpec(directory=str(tmp_path / "missing"))))


def test_preflight_address():
    with socket.socket() as s:  # a port nobody listens on: bind, then close
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(SpecError, match=f"no Ray cluster answers at 127.0.0.1:{port}"):
        check_address(f"127.0.0.1:{port}", timeout_s=2)
    with pytest.raises(SpecError, match="dashboard URL"):
        check_address("http://127.0.0.1:8265")
    with pytest.raises(SpecError, match="host:port"):
        check_address("headnode")
    for ok in (None, "auto", "ray://head:10001"):
        check_address(ok)


def test_corrupt_safetensors_is_named(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors").write_bytes(b'\x40\x00\x00\x00\x00\x00\x00\x00{"w": {"dtype"')
    with pytest.raises(SpecError, match="model.safetensors is not a readable safetensors file"):
        estimate_memory(tmp_path, {}, on_gpu=False)


def _done_run(tmp_path, job):
    """An output directory as a finished run of `job` leaves it: job.json and one row."""
    out = tmp_path / "out"
    with ResultStore(out) as st:
        st.add({"image_id": "a.jpg", "model": "m", "prompt_id": "default", "caption": "c", "finish_reason": "stop"})
    (out / "job.json").write_text(json.dumps(job.to_dict(), default=str))
    return out


def test_rerun_with_a_changed_job_is_refused(tmp_path):
    ckpt, other = tmp_path / "ckpt", tmp_path / "other"
    ckpt.mkdir(), other.mkdir()
    base = _job(tmp_path, ckpt, InputSpec(items=["a.jpg"]), sampling=SamplingParams(max_new_tokens=8))
    assert check_resume(base) == []  # nothing there yet
    _done_run(tmp_path, base)
    assert check_resume(base) == []  # the same job resumes
    more = JobSpec(
        models=base.models,
        inputs=InputSpec(items=["a.jpg", "b.jpg"]),
        output_dir=base.output_dir,
        sampling=base.sampling,
        mode="parallel",
        max_in_flight=3,
    )
    assert check_resume(more) == []  # new images, mode: new keys only
    added = JobSpec(
        models=base.models + (ModelSpec("m2", str(other)),),
        inputs=base.inputs,
        output_dir=base.output_dir,
        sampling=base.sampling,
    )
    assert check_resume(added) == []  # a model added: one consistent, larger job
    swapped = JobSpec(
        models=(ModelSpec("m2", str(other)),), inputs=base.inputs, output_dir=base.output_dir, sampling=base.sampling
    )
    with pytest.raises(SpecError, match=r"its models are m; this run's are m2 \(a rerun keeps every model"):
        check_resume(swapped)  # m's rows would stay, undescribed
    with pytest.raises(SpecError, match=r"its prompts are default; this run's are short"):
        check_resume(_job(tmp_path, ckpt, base.inputs, sampling=base.sampling, prompts=(PromptSpec("short", "Hi."),)))
    with pytest.raises(SpecError, match=r"sampling changed: max_new_tokens 8 -> 16.*new output directory"):
        check_resume(_job(tmp_path, ckpt, InputSpec(items=["a.jpg"]), sampling=SamplingParams(max_new_tokens=16)))
    with pytest.raises(SpecError, match=r"prompt 'default' of model 'm' was 'Describe the image.', now 'Say hi.'"):
        check_resume(
            _job(
                tmp_path,
                ckpt,
                InputSpec(items=["a.jpg"]),
                sampling=base.sampling,
                prompts=(PromptSpec("default", "Say hi."),),
            )
        )
    with pytest.raises(SpecError, match=r"model 'm' was .*ckpt', now .*other'"):
        check_resume(_job(tmp_path, other, InputSpec(items=["a.jpg"]), sampling=base.sampling))
    bf16 = JobSpec(
        models=(ModelSpec("m", str(ckpt), engine={"dtype": "bfloat16"}),),
        inputs=base.inputs,
        output_dir=base.output_dir,
        sampling=base.sampling,
    )
    (warning,) = check_resume(bf16)
    assert "engine dtype was None, now 'bfloat16'" in warning


def test_outcome_counts_unfinished_rows_and_summary_shows_notes(tmp_path):
    with ResultStore(tmp_path) as st:
        st.add({"image_id": "a", "model": "m", "prompt_id": "p", "caption": "c", "finish_reason": "stop"})
        st.add(error_row("b", "m", "p", "ImageError: cannot decode", retryable=False))
        st.add(error_row("c", "m", "p", "the model failed to load: boom", retryable=True))
        st.add(error_row("d", "m", "p", "the model failed to load: boom", retryable=True))
        st.add(error_row("e", "old", "p", "from another job", retryable=True))
        path = st.finalize()
    lines, unfinished = describe_outcome(path, ["m"])
    assert unfinished == 2 and lines[0].startswith("3 of 4 rows are errors")
    assert "2 x the model failed to load: boom" in lines[1] and "1 x ImageError" in lines[2]
    text = format_summary(
        {
            "m": {
                "rows": 4,
                "errors": 3,
                "images_per_s": 1.0,
                "load_s": 0.0,
                "peak_vram_bytes": 0,
                "reclaim_residual_bytes": None,
                "restarts": 0,
                "notes": ["m#0 failed to load: RuntimeError: boom"],
            }
        }
    )
    assert "m#0 failed to load: RuntimeError: boom" in text
