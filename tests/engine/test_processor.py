import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
from PIL import Image

from modelyard import testing
from modelyard.engine.processor import Processor, ProcessorError, read_eos_token_ids


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("proc")
    return {a: testing.make_checkpoint(a, root / a) for a in ("llava", "llava-qwen2")}


@pytest.mark.parametrize("arch,per_image,eos", [("llava", 16, {2}), ("llava-qwen2", 9, {2, 0})])
def test_matches_upstream_processor(ckpts, arch, per_image, eos):
    from transformers import AutoProcessor

    path = ckpts[arch]
    proc = Processor.from_pretrained(path)
    hf = AutoProcessor.from_pretrained(path)
    img = Image.new("RGB", (70, 40), (1, 2, 3))
    conv = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}]
    ref = hf(text=hf.apply_chat_template(conv, add_generation_prompt=True), images=[img], return_tensors="pt")
    got = proc("What is it?", [img])
    assert got.input_ids == ref["input_ids"][0].tolist()
    assert got.pixel_values.shape == ref["pixel_values"].shape
    assert (got.pixel_values == ref["pixel_values"]).all()
    assert got.num_images == 1 and got.num_image_tokens == per_image
    assert proc.eos_token_ids == frozenset(eos)
    assert proc.decode(proc.tokenizer.encode("a cat", add_special_tokens=False)) == "a cat"


def test_several_images_and_text_only(ckpts):
    proc = Processor.from_pretrained(ckpts["llava"])
    imgs = [Image.new("RGB", (30, 30)), Image.new("RGB", (50, 20))]
    two = proc("Compare them.", imgs)
    assert two.num_images == 2 and two.num_image_tokens == 32 and two.pixel_values.shape[0] == 2
    none = proc("Just text.", [])
    assert none.num_images == 0 and none.num_image_tokens == 0 and none.pixel_values is None
    assert "Just text." in proc.tokenizer.decode(none.input_ids)
    with pytest.raises(ProcessorError, match="string"):
        proc(None, imgs)
    with pytest.raises(ValueError, match="no image"):  # transformers or ours, either is fine
        proc("<image> sneaky placeholder", [])


def test_missing_chat_template_is_an_error(ckpts):
    from transformers import AutoProcessor

    hf = AutoProcessor.from_pretrained(ckpts["llava"])
    hf.chat_template = None
    with pytest.raises(ProcessorError, match="chat template"):
        Processor(hf, image_token_id=1022, eos_token_ids=frozenset({2}))


def test_eos_falls_back_to_tokenizer(tmp_path):
    class Tok:
        eos_token_id = 7

    assert read_eos_token_ids(tmp_path, Tok()) == {7}
    (tmp_path / "generation_config.json").write_text('{"eos_token_id": [3, 4]}')
    assert read_eos_token_ids(tmp_path, Tok()) == {3, 4}
