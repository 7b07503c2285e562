"""The oracle the engine tests compare against: greedy tokens from transformers `generate`."""

import copy

import torch

from modelyard.engine.images import load_images


def hf_greedy(path, items, n: int) -> list[list[int]]:
    """items: (image source(s) or None, prompt) pairs -> exactly n greedy tokens for each, from
    transformers generate in float32, one request at a time (no padding effects). Images are decoded
    as the engine decodes them (JPEGs at the reduced scale that covers the processor's input size),
    so both models see the same pixels and the comparison is of the models alone."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from modelyard.engine.processor import Processor

    proc = AutoProcessor.from_pretrained(path)
    min_size = Processor(proc, image_token_id=0, eos_token_ids=frozenset()).min_image_size
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval()
    # exactly n tokens with EOS an ordinary token (the engines' ignore_eos), not suppressed
    gen = copy.deepcopy(model.generation_config)
    gen.update(do_sample=False, max_new_tokens=n, pad_token_id=proc.tokenizer.pad_token_id, eos_token_id=[])
    out = []
    for image, prompt in items:
        imgs = load_images(image, min_size)
        content = [{"type": "image"} for _ in imgs] + [{"type": "text", "text": prompt}]
        text = proc.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
        inputs = proc(text=text, images=imgs or None, return_tensors="pt")
        with torch.inference_mode():
            seq = model.generate(**inputs, generation_config=gen)
        out.append(seq[0, inputs["input_ids"].shape[1] :].tolist())
    return out
