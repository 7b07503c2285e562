"""The transformers fallback backend: same API and Output fields, same tokens as transformers generate."""

import pytest
import torch

from modelyard import testing
from modelyard.engine import Engine, EngineConfig, Request, SamplingParams


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    path = testing.make_checkpoint("llava", root / "llava")
    images = testing.make_images(root / "imgs", 4, seed=5)
    return path, images, root


def _reference(path, image, prompt, n):
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    proc = AutoProcessor.from_pretrained(path)
    model = AutoModelForImageTextToText.from_pretrained(path).eval()
    conv = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
    inputs = proc(
        images=Image.open(image).convert("RGB"),
        text=proc.apply_chat_template(conv, add_generation_prompt=True),
        return_tensors="pt",
    )
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False)
    return out[0, inputs["input_ids"].shape[1] :].tolist()


def test_fallback_matches_transformers_and_isolates_bad_images(setup):
    path, images, root = setup
    eng = Engine.from_pretrained(path, EngineConfig(backend="transformers", device="cpu"))
    prompts = ["Describe the image.", "What is in this picture? Answer in detail please."]
    sp = SamplingParams(max_new_tokens=12, ignore_eos=True)
    bad = root / "bad.jpg"
    bad.write_bytes(b"not an image")
    reqs = [Request(image=str(images[i]), prompt=prompts[i % 2], sampling=sp) for i in range(3)]
    reqs.insert(1, Request(image=str(bad), sampling=sp))
    outs = eng.generate(reqs)
    assert [o.request_id for o in outs] == [r.request_id for r in reqs]
    assert outs[1].finish_reason == "error" and outs[1].error
    for i, o in zip([0, 1, 2], [outs[0], outs[2], outs[3]]):
        assert o.finish_reason == "length" and len(o.token_ids) == 12
        assert o.token_ids == _reference(path, images[i], prompts[i % 2], 12)
        assert o.num_image_tokens == 16 and o.num_prompt_tokens > 16
    assert eng.stats()["num_requests_finished"] == 4
    eng.close()


def test_ignore_eos_means_eos_is_an_ordinary_token_in_both_backends(tmp_path):
    """ignore_eos: exactly max_new_tokens, EOS allowed and not a stop (not suppressed, as transformers'
    min_new_tokens would), the same in the native engine, the fallback and the transformers oracle."""
    import json

    from hf_reference import hf_greedy
    from safetensors.torch import load_file, save_file

    path = testing.make_checkpoint("llava", tmp_path / "ckpt")
    image = testing.make_images(tmp_path / "imgs", 1, seed=4)[0]
    eos = json.loads((path / "generation_config.json").read_text())["eos_token_id"]
    eos = eos[0] if isinstance(eos, list) else eos
    first = hf_greedy(path, [(image, "Describe it.")], 1)[0][0]
    (weights,) = list(path.glob("*.safetensors"))
    tensors = load_file(weights)
    head = next(k for k in tensors if k.endswith("lm_head.weight"))
    tensors[head][eos] = 2 * tensors[head][first]  # EOS now wins wherever that token would
    save_file(tensors, weights, metadata={"format": "pt"})
    ref = hf_greedy(path, [(image, "Describe it.")], 8)[0]
    assert eos in ref and len(ref) == 8
    sp = SamplingParams(max_new_tokens=8, ignore_eos=True)
    for backend in ("native", "transformers"):
        eng = Engine.from_pretrained(path, EngineConfig(device="cpu", dtype="float32", backend=backend))
        (out,) = eng.generate([Request(image=str(image), prompt="Describe it.", sampling=sp)])
        eng.close()
        assert out.token_ids == ref and out.finish_reason == "length", backend
