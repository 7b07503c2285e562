"""Tiny random-weight checkpoints of architectures the native engine does not implement, for the
transformers fallback: written through transformers' own config and model classes (random init,
save_pretrained), with the same offline byte-level tokenizer as make_checkpoint and the image
processor files each processor class reads. They load offline with the installed transformers and
need no torchvision.
"""

from __future__ import annotations

import json
from pathlib import Path

from . import _LLAVA_TEMPLATE, _first
from .tokenizer import build_tokenizer

_VISION = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=2,
    image_size=32,
    patch_size=8,
)
_TEXT = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=4,
    max_position_embeddings=2048,
    vocab_size=1024,
)
_CLIP_MEAN, _CLIP_STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]

_BOI = "<start_of_image>"
_GEMMA3_TOKENS = {"boi_token": _BOI, "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"}

FALLBACK_ARCHITECTURES = ("llava-next", "paligemma", "gemma3")


def make_fallback_checkpoint(arch: str, path, seed: int = 0) -> Path:
    """Write a tiny random-weight checkpoint of `arch` (one of FALLBACK_ARCHITECTURES) into `path`."""
    import torch

    if arch not in FALLBACK_ARCHITECTURES:
        raise ValueError(f"unknown fallback architecture {arch!r}; choose from {FALLBACK_ARCHITECTURES}")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    # Gemma 3's template marks an image with its begin-of-image token, which its processor expands.
    template = _LLAVA_TEMPLATE.replace("<image>", _BOI) if arch == "gemma3" else _LLAVA_TEMPLATE
    tok = build_tokenizer(
        path, "llama", _TEXT["vocab_size"] - len(_GEMMA3_TOKENS) * (arch == "gemma3"), seed=seed, chat_template=template
    )
    if arch == "gemma3":
        tok = _add_gemma3_image_tokens(path, tok)
    cfg, model_cls = {"llava-next": _llava_next, "paligemma": _paligemma, "gemma3": _gemma3}[arch](path, tok)
    cfg.architectures = [model_cls.__name__]
    torch.manual_seed(seed)
    model = model_cls(cfg).eval()
    model.save_pretrained(str(path))
    (path / "generation_config.json").write_text(
        json.dumps({"bos_token_id": tok["bos_token_id"], "eos_token_id": tok["eos_token_id"], "do_sample": False})
    )
    return path


def _text(tok: dict, **extra) -> dict:
    return dict(
        _TEXT,
        bos_token_id=tok["bos_token_id"],
        eos_token_id=_first(tok["eos_token_id"]),
        pad_token_id=tok["pad_token_id"],
        **extra,
    )


def _write_json(path: Path, name: str, data: dict) -> None:
    (path / name).write_text(json.dumps(data, indent=2))


def _llava_next(path: Path, tok: dict):
    from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration

    side = _VISION["image_size"]
    pinpoints = [[side, 2 * side], [2 * side, side], [2 * side, 2 * side]]
    cfg = LlavaNextConfig(
        vision_config=dict(_VISION, model_type="clip_vision_model", projection_dim=32),
        text_config=_text(tok, model_type="llama"),
        image_token_index=tok["image_token_id"],
        image_grid_pinpoints=pinpoints,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        tie_word_embeddings=False,
    )
    _write_json(
        path,
        "preprocessor_config.json",
        {
            "image_processor_type": "LlavaNextImageProcessor",
            "processor_class": "LlavaNextProcessor",
            "size": {"shortest_edge": side},
            "crop_size": {"height": side, "width": side},
            "image_grid_pinpoints": pinpoints,
            "image_mean": _CLIP_MEAN,
            "image_std": _CLIP_STD,
            "do_convert_rgb": True,
        },
    )
    _write_json(
        path,
        "processor_config.json",
        {
            "processor_class": "LlavaNextProcessor",
            "patch_size": _VISION["patch_size"],
            "vision_feature_select_strategy": "default",
            "num_additional_image_tokens": 1,
            "image_token": "<image>",
        },
    )
    return cfg, LlavaNextForConditionalGeneration


def _paligemma(path: Path, tok: dict):
    from transformers import PaliGemmaConfig, PaliGemmaForConditionalGeneration

    side = _VISION["image_size"]
    num_image_tokens = (side // _VISION["patch_size"]) ** 2
    text = _text(tok, model_type="gemma", head_dim=16, hidden_activation="gelu_pytorch_tanh")
    cfg = PaliGemmaConfig(
        vision_config=dict(_VISION, model_type="siglip_vision_model", projection_dim=_TEXT["hidden_size"]),
        text_config=dict(text, num_image_tokens=num_image_tokens),
        image_token_index=tok["image_token_id"],
        projection_dim=_TEXT["hidden_size"],
        hidden_size=_TEXT["hidden_size"],
        vocab_size=_TEXT["vocab_size"],
        pad_token_id=tok["pad_token_id"],
    )
    _write_json(
        path,
        "preprocessor_config.json",
        {
            "image_processor_type": "SiglipImageProcessor",
            "processor_class": "PaliGemmaProcessor",
            "size": {"height": side, "width": side},
            "image_mean": [0.5, 0.5, 0.5],
            "image_std": [0.5, 0.5, 0.5],
            "image_seq_length": num_image_tokens,
        },
    )
    _write_json(path, "processor_config.json", {"processor_class": "PaliGemmaProcessor"})
    return cfg, PaliGemmaForConditionalGeneration


def _add_gemma3_image_tokens(path: Path, tok: dict) -> dict:
    """The tokenizer with Gemma 3's image tokens appended, which its processor reads by name."""
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(path), extra_special_tokens={"image_token": "<image>", **_GEMMA3_TOKENS})
    hf.save_pretrained(str(path))
    ids = {name: hf.convert_tokens_to_ids(t) for name, t in _GEMMA3_TOKENS.items()}
    return dict(tok, image_token_id=ids["image_token"], boi_token_id=ids["boi_token"], eoi_token_id=ids["eoi_token"])


def _gemma3(path: Path, tok: dict):
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    side = _VISION["image_size"]
    mm_tokens = 4  # the pooled tokens per image: a square number dividing the patch grid
    text = _text(tok, model_type="gemma3_text", head_dim=16, sliding_window=512)
    cfg = Gemma3Config(
        vision_config=dict(_VISION, model_type="siglip_vision_model"),
        text_config=text,
        mm_tokens_per_image=mm_tokens,
        boi_token_index=tok["boi_token_id"],
        eoi_token_index=tok["eoi_token_id"],
        image_token_index=tok["image_token_id"],
    )
    _write_json(
        path,
        "preprocessor_config.json",
        {
            "image_processor_type": "Gemma3ImageProcessor",
            "processor_class": "Gemma3Processor",
            "size": {"height": side, "width": side},
            "image_mean": [0.5, 0.5, 0.5],
            "image_std": [0.5, 0.5, 0.5],
            "do_pan_and_scan": False,
        },
    )
    _write_json(path, "processor_config.json", {"processor_class": "Gemma3Processor", "image_seq_length": mm_tokens})
    return cfg, Gemma3ForConditionalGeneration
