"""Prompt formatting and image preprocessing through the checkpoint's own AutoProcessor.

The user's text and images become a one-turn conversation formatted by the checkpoint's chat
template, then the processor expands each image placeholder into its feature tokens. So the
token ids are exactly those upstream transformers would build for the same checkpoint.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image


@dataclass
class ProcessedInputs:
    input_ids: list[int]
    pixel_values: torch.Tensor | None  # [num_images, 3, H, W] host memory: float32 from the
    # processor; Engine._process casts to the model dtype (pinned on CUDA)
    num_images: int
    num_image_tokens: int  # placeholder positions in input_ids


class ProcessorError(ValueError):
    pass


def read_eos_token_ids(path, tokenizer) -> frozenset[int]:
    """generation_config.json's eos_token_id (an int or a list), else the tokenizer's eos."""
    gen_path = Path(path) / "generation_config.json"
    eos = None
    if gen_path.is_file():
        eos = json.loads(gen_path.read_text()).get("eos_token_id")
    if eos is None:
        eos = tokenizer.eos_token_id
    if eos is None:
        return frozenset()
    return frozenset(int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos]))


class Processor:
    def __init__(self, hf_processor, image_token_id: int, eos_token_ids: frozenset[int]):
        if getattr(hf_processor, "chat_template", None) is None:
            raise ProcessorError(
                "the checkpoint's processor has no chat template; cannot format prompts "
                "the way upstream does (add chat_template.jinja to the checkpoint)"
            )
        self.hf_processor = hf_processor
        self.tokenizer = hf_processor.tokenizer
        self.image_token_id = image_token_id
        self.eos_token_ids = eos_token_ids

    @classmethod
    def from_pretrained(cls, path, image_token_id: int | None = None) -> Processor:
        from transformers import AutoProcessor

        hf = AutoProcessor.from_pretrained(str(path))
        if image_token_id is None:
            image_token_id = getattr(hf, "image_token_id", None)
            if image_token_id is None:
                raise ProcessorError(f"cannot tell the image token id of {path}; pass image_token_id")
        return cls(hf, int(image_token_id), read_eos_token_ids(path, hf.tokenizer))

    @property
    def min_image_size(self) -> tuple[int, int] | None:
        """The fewest pixels (width, height) the image processor's resize needs in each direction,
        so images can be decoded at a reduced scale that still covers them; None when unknown."""
        ip = getattr(self.hf_processor, "image_processor", None)
        size = dict(getattr(ip, "size", None) or {})
        crop = dict(getattr(ip, "crop_size", None) or {})
        if "shortest_edge" in size:
            edge = int(size["shortest_edge"])
            return max(edge, int(crop.get("width", 0))), max(edge, int(crop.get("height", 0)))
        if "height" in size and "width" in size:
            return int(size["width"]), int(size["height"])
        return None

    def format_prompt(self, prompt: str, num_images: int) -> str:
        content = [{"type": "image"} for _ in range(num_images)] + [{"type": "text", "text": prompt}]
        return self.hf_processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)

    def __call__(self, prompt: str, images: list[Image.Image]) -> ProcessedInputs:
        if not isinstance(prompt, str):
            raise ProcessorError(f"prompt must be a string, got {type(prompt).__name__}")
        text = self.format_prompt(prompt, len(images))
        batch = self.hf_processor(text=text, images=images or None, return_tensors="pt")
        input_ids = batch["input_ids"][0].tolist()
        # Only pixel_values feeds NativeVLM.encode_images (LLaVA-1.5 style: fixed-size images).
        pixel_values = batch.get("pixel_values") if images else None
        num_image_tokens = sum(1 for t in input_ids if t == self.image_token_id)
        if images and num_image_tokens == 0:
            raise ProcessorError(
                f"the formatted prompt has no image placeholder tokens (image_token_id {self.image_token_id})"
            )
        if not images and num_image_tokens:
            raise ProcessorError(
                f"the prompt contains {num_image_tokens} image placeholder tokens but the request has no image"
            )
        return ProcessedInputs(
            input_ids=input_ids, pixel_values=pixel_values, num_images=len(images), num_image_tokens=num_image_tokens
        )

    def decode(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=True)
