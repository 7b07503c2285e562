"""JobSpec validation and loading from TOML / YAML / JSON."""

import json

import pytest

from modelyard.engine.types import SamplingParams
from modelyard.orchestration.spec.job import InputSpec, JobSpec, ModelSpec, PromptSpec, SpecError
from modelyard.orchestration.spec.jobfile import job_from_dict, load_job

TOML = """
mode = "parallel"
output_dir = "out"
max_in_flight = 4
[inputs]
directory = "imgs"
recursive = false
[[prompts]]
id = "short"
text = "One sentence."
[[prompts]]
id = "long"
text = "A paragraph."
[sampling]
max_new_tokens = 12
[[models]]
name = "a"
path = "ckpt_a"
engine = { max_batch_size = 8 }
replicas = 2
[[models]]
path = "org/hub-model"
prompt = { short = "Caption briefly." }
gpus = 0.5
"""


def _data():
    return {
        "mode": "parallel",
        "output_dir": "out",
        "max_in_flight": 4,
        "inputs": {"directory": "imgs", "recursive": False},
        "prompts": [{"id": "short", "text": "One sentence."}, {"id": "long", "text": "A paragraph."}],
        "sampling": {"max_new_tokens": 12},
        "models": [
            {"name": "a", "path": "ckpt_a", "engine": {"max_batch_size": 8}, "replicas": 2},
            {"path": "org/hub-model", "prompt": {"short": "Caption briefly."}, "gpus": 0.5},
        ],
    }


@pytest.mark.parametrize("fmt", ["toml", "yaml", "json"])
def test_load_formats_agree(tmp_path, fmt):
    (tmp_path / "ckpt_a").mkdir()
    f = tmp_path / f"job.{fmt}"
    if fmt == "toml":
        f.write_text(TOML)
    elif fmt == "yaml":
        import yaml

        f.write_text(yaml.safe_dump(_data()))
    else:
        f.write_text(json.dumps(_data()))
    job = load_job(f)
    assert job.mode == "parallel" and job.max_in_flight == 4
    assert job.output_dir == str(tmp_path / "out")
    assert job.inputs.directory == str(tmp_path / "imgs") and job.inputs.recursive is False
    assert [p.id for p in job.prompts] == ["short", "long"]
    assert job.sampling == SamplingParams(max_new_tokens=12)
    a, b = job.models
    assert a.path == str(tmp_path / "ckpt_a") and a.replicas == 2 and a.engine == {"max_batch_size": 8}
    assert b.name == "hub-model" and b.path == "org/hub-model" and b.gpus == 0.5  # hub id kept as is
    assert b.prompt_text(job.prompts[0]) == "Caption briefly."
    assert b.prompt_text(job.prompts[1]) == "A paragraph."
    assert load_job(f, mode="auto").mode == "auto"
    json.dumps(job.to_dict())


@pytest.mark.parametrize(
    "change, match",
    [
        ({"mode": "fast"}, "mode must be one of"),
        ({"models": []}, "non-empty list"),
        ({"inputs": {"directory": "x", "glob": "*.jpg"}}, "exactly one of"),
        ({"inputs": {"folder": "x"}}, "unknown key .*folder"),
        ({"sampling": {"max_new_tokens": 0}}, "max_new_tokens"),
        ({"sampling": {"beams": 2}}, "sampling: unknown key .*beams"),
        ({"max_in_flight": 0}, "max_in_flight"),
        ({"colour": 1}, "unknown key .*colour"),
        ({"prompts": [{"id": "a", "text": "x"}, {"id": "a", "text": "y"}]}, "unique"),
    ],
)
def test_invalid_specs_name_the_problem(change, match):
    d = _data() | change
    with pytest.raises(SpecError, match=match):
        job_from_dict(d)


def test_model_validation():
    with pytest.raises(SpecError, match="model name"):
        ModelSpec(name="bad name!", path="x")
    with pytest.raises(SpecError, match="replicas"):
        ModelSpec(name="m", path="x", replicas=0)
    with pytest.raises(SpecError, match="unique"):
        JobSpec(models=(ModelSpec("m", "x"), ModelSpec("m", "y")), inputs=InputSpec(items=["a"]), output_dir="o")
    with pytest.raises(SpecError, match="unknown prompt ids"):
        JobSpec(
            models=(ModelSpec("m", "x", prompt={"nope": "t"}),),
            inputs=InputSpec(items=["a"]),
            output_dir="o",
            prompts=(PromptSpec("p", "t"),),
        )
    with pytest.raises(SpecError, match="unknown job file type"):
        load_job(__file__)


def test_input_from_any(tmp_path):
    assert InputSpec.from_any(str(tmp_path)).directory == str(tmp_path)
    assert InputSpec.from_any(str(tmp_path / "*.png")).glob
    assert InputSpec.from_any(str(tmp_path / "list.txt")).file_list
    assert InputSpec.from_any(["a.jpg", "b.jpg"]).items == ("a.jpg", "b.jpg")
    with pytest.raises(SpecError):
        InputSpec.from_any(42)


def test_example_job_file_loads():
    """examples/job.toml is a valid job (its Hub ids are kept as ids, its paths resolved)."""
    from pathlib import Path

    ex = Path(__file__).resolve().parents[2] / "examples"
    job = load_job(ex / "job.toml")
    assert job.mode == "auto" and [m.name for m in job.models] == ["llava-1.5-7b", "bakllava", "interleave-qwen-0.5b"]
    assert job.models[0].path == "llava-hf/llava-1.5-7b-hf" and job.models[2].replicas == 2
    assert job.inputs.directory == str(ex.parent / "photos")
    for script in ex.glob("*.py"):
        compile(script.read_text(), str(script), "exec")
