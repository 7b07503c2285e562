"""backend="auto": the native engine where it implements the checkpoint, else the transformers fallback;
one-line permanent errors for what neither can run (unknown architecture, remote code, a missing package);
the fallback's per-request isolation of bad inputs and its context limit."""

import importlib.util
import json
import logging

import pytest

from modelyard import testing
from modelyard.actors.errors import is_permanent
from modelyard.engine import Engine, EngineConfig, Request, SamplingParams
from modelyard.engine.backends import MissingPackage, missing_processor_packages
from modelyard.engine.hf_engine import HFEngine
from modelyard.engine.loader import RemoteCodeRequired
from modelyard.engine.models.registry import UnsupportedArchitecture
from modelyard.testing.fallback import make_fallback_checkpoint

CPU = dict(device="cpu")
SP = SamplingParams(max_new_tokens=4, ignore_eos=True)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("auto")
    return {
        "next": make_fallback_checkpoint("llava-next", root / "next"),
        "llava": testing.make_checkpoint("llava", root / "llava"),
        "images": testing.make_images(root / "imgs", 3, seed=2),
        "root": root,
    }


@pytest.fixture(scope="module")
def fallback(env):
    eng = Engine.from_pretrained(env["next"], EngineConfig(**CPU))
    yield eng
    eng.close()


def _one_line_permanent(exc_info, *needles):
    msg = str(exc_info.value)
    assert "\n" not in msg.strip() and is_permanent(exc_info.value), msg
    for n in needles:
        assert n in msg, msg


def test_auto_runs_an_architecture_without_native_code_through_transformers(env, caplog):
    with caplog.at_level(logging.WARNING, logger="modelyard.engine"):
        eng = Engine.from_pretrained(env["next"], EngineConfig(**CPU))
    try:
        assert isinstance(eng, HFEngine) and eng.config.backend == "transformers"
        st = eng.stats()
        assert st["backend"] == "transformers" and "not implemented by the native engine" in st["backend_reason"]
        (line,) = [r.getMessage() for r in caplog.records if "transformers backend" in r.getMessage()]
        assert "LlavaNextForConditionalGeneration" in line
        outs = eng.generate([Request(image=str(i), sampling=SP) for i in env["images"][:2]])
        assert all(o.ok and len(o.token_ids) == 4 and o.num_image_tokens > 0 for o in outs)
    finally:
        eng.close()


def test_auto_keeps_the_native_engine_where_it_implements_the_checkpoint(env):
    eng = Engine.from_pretrained(env["llava"], EngineConfig(**CPU, num_kv_blocks=16))
    try:
        assert eng.stats()["backend"] == "native" and eng.config.backend == "native"
    finally:
        eng.close()


def test_explicit_backends_are_kept(env):
    with pytest.raises(UnsupportedArchitecture) as e:
        Engine.from_pretrained(env["next"], EngineConfig(**CPU, backend="native"))
    _one_line_permanent(e, "LlavaNextForConditionalGeneration", 'backend="transformers"')
    eng = Engine.from_pretrained(env["llava"], EngineConfig(**CPU, backend="transformers"))
    try:
        assert eng.stats()["backend"] == "transformers" and eng.stats()["backend_reason"] is None
    finally:
        eng.close()


@pytest.mark.parametrize("backend", ["auto", "transformers"])
def test_an_architecture_neither_backend_loads_is_a_permanent_error_naming_it(tmp_path, backend):
    cfg = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 64}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedArchitecture) as e:
        Engine.from_pretrained(tmp_path, EngineConfig(**CPU, backend=backend))
    _one_line_permanent(e, "'LlamaForCausalLM'", "neither backend", "image-text-to-text")


@pytest.mark.parametrize("backend", ["auto", "native", "transformers"])
@pytest.mark.parametrize(
    "cfg",
    [
        {"model_type": "llava", "architectures": ["LlavaForConditionalGeneration"], "auto_map": {"AutoConfig": "x.C"}},
        {"model_type": "phi3_v", "architectures": ["Phi3VForCausalLM"]},
    ],
)
def test_remote_code_is_refused_in_one_line(tmp_path, cfg, backend):
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(RemoteCodeRequired) as e:
        Engine.from_pretrained(tmp_path, EngineConfig(**CPU, backend=backend))
    _one_line_permanent(e, "trust_remote_code", "never")


@pytest.mark.skipif(importlib.util.find_spec("torchvision") is not None, reason="torchvision is installed")
def test_a_missing_processor_package_names_it_and_the_pip_command(env, monkeypatch):
    import transformers

    def needs_torchvision(*a, **k):
        return transformers.Qwen2VLVideoProcessor()  # transformers' own ImportError, without torchvision

    monkeypatch.setattr(transformers.AutoProcessor, "from_pretrained", needs_torchvision)
    with pytest.raises(MissingPackage) as e:
        Engine.from_pretrained(env["next"], EngineConfig(**CPU))
    _one_line_permanent(e, "'torchvision'", "pip install torchvision", "LlavaNextForConditionalGeneration")
    assert "torchvision" in missing_processor_packages()

    def needs_num2words(*a, **k):  # the text SmolVLMProcessor raises
        raise ImportError("Package `num2words` is required to run SmolVLM processor. Install it with `pip install`.")

    monkeypatch.setattr(transformers.AutoProcessor, "from_pretrained", needs_num2words)
    with pytest.raises(MissingPackage) as e:
        Engine.from_pretrained(env["next"], EngineConfig(**CPU))
    _one_line_permanent(e, "pip install num2words")


class _Rejecting:
    """The checkpoint's processor, except that it rejects any batch holding an image of `bad_size`."""

    def __init__(self, inner, bad_size):
        self.inner, self.bad_size, self.calls = inner, bad_size, 0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def __call__(self, images=None, **kw):
        self.calls += 1
        if any(im.size == self.bad_size for group in images for im in group):
            raise ValueError(f"image of size {self.bad_size} rejected")
        return self.inner(images=images, **kw)


def test_an_image_the_processor_rejects_fails_only_its_request(env, fallback, monkeypatch):
    from PIL import Image

    odd = env["root"] / "odd.png"
    Image.new("RGB", (37, 23), "red").save(odd)
    good = [str(i) for i in env["images"]]
    alone = fallback.generate([Request(image=g, sampling=SP) for g in good])
    monkeypatch.setattr(fallback, "processor", _Rejecting(fallback.processor, (37, 23)))
    reqs = [Request(image=good[0], sampling=SP), Request(image=str(odd), sampling=SP)]
    reqs += [Request(image=g, sampling=SP) for g in good[1:]]
    outs = fallback.generate(reqs)
    assert [o.request_id for o in outs] == [r.request_id for r in reqs]
    assert outs[1].finish_reason == "error" and "rejected" in outs[1].error
    assert [o.token_ids for o in outs[:1] + outs[2:]] == [o.token_ids for o in alone]
    assert all(o.ok for o in outs[:1] + outs[2:])


class _NoBatching(_Rejecting):
    """Rejects any batch of more than one request (as for inputs that only fail together)."""

    def __call__(self, images=None, **kw):
        self.calls += 1
        if len(images) > 1:
            raise ValueError("these images cannot share a batch")
        return self.inner(images=images, **kw)


def test_requests_that_only_fail_together_run_one_at_a_time(env, fallback, monkeypatch):
    monkeypatch.setattr(fallback, "processor", _NoBatching(fallback.processor, None))
    reqs = [Request(image=str(i), sampling=SP) for i in env["images"]]
    outs = fallback.generate(reqs)
    assert [o.request_id for o in outs] == [r.request_id for r in reqs]
    assert all(o.ok and len(o.token_ids) == 4 for o in outs) and not fallback._solo


def test_the_fallback_enforces_the_checkpoints_context_without_max_model_len(env, fallback):
    assert fallback.max_model_len == 2048 and fallback.stats()["max_model_len"] == 2048
    long = Request(image=str(env["images"][0]), prompt="describe " * 2100, sampling=SP)
    short = Request(image=str(env["images"][1]), sampling=SP)
    outs = fallback.generate([long, short])
    assert outs[0].finish_reason == "error" and "exceeds max_model_len (2048)" in outs[0].error
    assert outs[0].num_prompt_tokens > 2048 and outs[1].ok
    with pytest.raises(ValueError, match="exceeds the checkpoint's max_position_embeddings 2048"):
        Engine.from_pretrained(env["next"], EngineConfig(**CPU, max_model_len=4096))
