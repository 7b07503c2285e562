"""Offline test fixtures: random-weight HF-format checkpoints of real VLM architectures, and images.

Nothing can be downloaded where modelyard is tested, so `make_checkpoint` writes everything a Hub
checkpoint has (config.json, generation_config.json, model.safetensors or shards + index, a byte-level
BPE tokenizer built with the `tokenizers` library, a chat template, special/image tokens,
preprocessor_config.json, processor_config.json). `AutoProcessor.from_pretrained(path)` and
`AutoModelForImageTextToText.from_pretrained(path)` load it offline; so does the native engine, through
the same loading code a real checkpoint takes.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass
from pathlib import Path

from .images import CAMERA_SIZES, awkward_images, broken_images, make_camera_jpegs, make_images  # noqa: F401 (re-exported)
from .weights import InitPlan, special_ids

SHARD_BYTES = 2 * 1024**3  # above this the weights are split into shards with an index, as the Hub does


@dataclass(frozen=True)
class _Shape:
    vision: dict
    text: dict
    extra: dict


_CLIP_L336 = dict(
    hidden_size=1024,
    intermediate_size=4096,
    num_hidden_layers=24,
    num_attention_heads=16,
    image_size=336,
    patch_size=14,
    projection_dim=768,
    hidden_act="quick_gelu",
)
_SIGLIP_SO400M = dict(
    hidden_size=1152,
    intermediate_size=4304,
    num_hidden_layers=27,
    num_attention_heads=16,
    image_size=384,
    patch_size=14,
    hidden_act="gelu_pytorch_tanh",
)
_LLAMA2_7B = dict(
    hidden_size=4096,
    intermediate_size=11008,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=32,
    max_position_embeddings=4096,
    rms_norm_eps=1e-5,
    vocab_size=32064,
)
_QWEN2_1_5B = dict(
    hidden_size=1536,
    intermediate_size=8960,
    num_hidden_layers=28,
    num_attention_heads=12,
    num_key_value_heads=2,
    max_position_embeddings=32768,
    rms_norm_eps=1e-6,
    vocab_size=151936,
    rope_theta=1000000.0,
    tie_word_embeddings=True,
)

ARCHITECTURES = {
    # arch: (vision model_type, text model_type, {size: _Shape})
    "llava": (
        "clip_vision_model",
        "llama",
        {
            "tiny": _Shape(
                dict(
                    hidden_size=32,
                    intermediate_size=64,
                    num_hidden_layers=2,
                    num_attention_heads=2,
                    image_size=32,
                    patch_size=8,
                    projection_dim=32,
                    hidden_act="quick_gelu",
                ),
                dict(
                    hidden_size=64,
                    intermediate_size=128,
                    num_hidden_layers=2,
                    num_attention_heads=4,
                    num_key_value_heads=4,
                    max_position_embeddings=2048,
                    rms_norm_eps=1e-5,
                    vocab_size=1024,
                ),
                dict(vision_feature_layer=-2, vision_feature_select_strategy="default"),
            ),
            "llava-1.5-7b": _Shape(
                _CLIP_L336, _LLAMA2_7B, dict(vision_feature_layer=-2, vision_feature_select_strategy="default")
            ),
        },
    ),
    "llava-qwen2": (
        "siglip_vision_model",
        "qwen2",
        {
            "tiny": _Shape(
                dict(
                    hidden_size=48,
                    intermediate_size=96,
                    num_hidden_layers=2,
                    num_attention_heads=2,
                    image_size=42,
                    patch_size=14,
                    hidden_act="gelu_pytorch_tanh",
                ),
                dict(
                    hidden_size=64,
                    intermediate_size=160,
                    num_hidden_layers=2,
                    num_attention_heads=4,
                    num_key_value_heads=2,
                    max_position_embeddings=4096,
                    rms_norm_eps=1e-6,
                    vocab_size=1280,
                    rope_theta=1000000.0,
                    tie_word_embeddings=True,
                ),
                dict(vision_feature_layer=-1, vision_feature_select_strategy="full"),
            ),
            "llava-qwen2-1.5b": _Shape(
                _SIGLIP_SO400M, _QWEN2_1_5B, dict(vision_feature_layer=-1, vision_feature_select_strategy="full")
            ),
        },
    ),
}
SIZES = sorted({s for _, _, shapes in ARCHITECTURES.values() for s in shapes})

_CLIP_MEAN, _CLIP_STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]

# Chat templates in the style of the upstream checkpoints (llava-1.5's USER/ASSISTANT; ChatML for Qwen2).
_LLAVA_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER: {% elif message['role'] == 'assistant' %}ASSISTANT: {% endif %}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}<image>\n"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}{% endif %}"
    "{% if message['role'] == 'assistant' %}</s>{% else %} {% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)
_CHATML_TEMPLATE = (
    "{% if messages[0]['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}<image>\n"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _configs(arch: str, size: str):
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; choose from {sorted(ARCHITECTURES)}")
    vision_type, text_type, shapes = ARCHITECTURES[arch]
    if size not in shapes:
        raise ValueError(f"size {size!r} is not defined for {arch!r}; choose from {sorted(shapes)}")
    return vision_type, text_type, shapes[size]


def make_checkpoint(
    arch: str, path, size: str = "tiny", seed: int = 0, dtype: str | None = None, device: str | None = None
) -> Path:
    """Write a complete random-weight HF checkpoint of `arch` at `size` into `path`; returns the path.

    dtype: "float32" | "bfloat16" | "float16" (default float32 for tiny, bfloat16 for real shapes).
    device: where random tensors are drawn (default: cuda if available for real shapes, else cpu).
    """
    from transformers import LlavaConfig

    vision_type, text_type, shape = _configs(arch, size)
    dtype = dtype or ("float32" if size == "tiny" else "bfloat16")
    if dtype not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"dtype must be float32, bfloat16 or float16, got {dtype!r}")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)

    from .tokenizer import build_tokenizer

    family = "llama" if text_type in ("llama", "mistral") else "qwen2"
    vocab_size = shape.text["vocab_size"]
    tok_info = build_tokenizer(
        path, family, vocab_size, seed=seed, chat_template=_LLAVA_TEMPLATE if family == "llama" else _CHATML_TEMPLATE
    )

    vision = dict(shape.vision, model_type=vision_type)
    if vision_type == "clip_vision_model":
        vision.setdefault("layer_norm_eps", 1e-5)
    else:
        vision.setdefault("layer_norm_eps", 1e-6)
    text = dict(
        shape.text,
        model_type=text_type,
        bos_token_id=tok_info["bos_token_id"],
        eos_token_id=_first(tok_info["eos_token_id"]),
        pad_token_id=tok_info["pad_token_id"],
    )
    text.setdefault("rope_theta", 10000.0)
    cfg = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tok_info["image_token_id"],
        projector_hidden_act="gelu",
        image_seq_length=_num_image_tokens(shape),
        pad_token_id=tok_info["pad_token_id"],
        tie_word_embeddings=bool(shape.text.get("tie_word_embeddings", False)),
        **shape.extra,
    )
    cfg.architectures = ["LlavaForConditionalGeneration"]
    cfg.dtype = dtype
    cfg.save_pretrained(path)
    _write_generation_config(path, tok_info)
    _write_processor_files(path, vision_type, shape)
    plan = _write_weights(path, cfg, dtype, seed, device)
    (path / "README.md").write_text(
        f"# Random-weight {arch} checkpoint ({size})\n\nWritten by `modelyard.testing.make_checkpoint`. "
        f"The weights are random: captions are meaningless. For tests and benchmarks only.\n\n{plan.describe()}\n"
    )
    return path


def _first(x):
    return x[0] if isinstance(x, list) else x


def _num_image_tokens(shape: _Shape) -> int:
    n = (shape.vision["image_size"] // shape.vision["patch_size"]) ** 2
    return n + (
        1 if shape.extra["vision_feature_select_strategy"] == "full" and "projection_dim" in shape.vision else 0
    )


def _write_generation_config(path: Path, tok: dict) -> None:
    (path / "generation_config.json").write_text(
        json.dumps(
            {
                "bos_token_id": tok["bos_token_id"],
                "eos_token_id": tok["eos_token_id"],
                "pad_token_id": tok["pad_token_id"],
                "do_sample": False,
            },
            indent=2,
        )
    )


def _write_processor_files(path: Path, vision_type: str, shape: _Shape) -> None:
    side = shape.vision["image_size"]
    if vision_type == "clip_vision_model":
        pre = {
            "image_processor_type": "CLIPImageProcessor",
            "do_resize": True,
            "size": {"shortest_edge": side},
            "do_center_crop": True,
            "crop_size": {"height": side, "width": side},
            "do_rescale": True,
            "rescale_factor": 1 / 255,
            "do_normalize": True,
            "image_mean": _CLIP_MEAN,
            "image_std": _CLIP_STD,
            "do_convert_rgb": True,
            "resample": 3,
        }
        extra_tokens = 1  # CLIP's class token, which the "default" strategy drops again
    else:
        pre = {
            "image_processor_type": "SiglipImageProcessor",
            "do_resize": True,
            "size": {"height": side, "width": side},
            "do_rescale": True,
            "rescale_factor": 1 / 255,
            "do_normalize": True,
            "image_mean": [0.5, 0.5, 0.5],
            "image_std": [0.5, 0.5, 0.5],
            "do_convert_rgb": True,
            "resample": 3,
        }
        extra_tokens = 0
    pre["processor_class"] = "LlavaProcessor"
    (path / "preprocessor_config.json").write_text(json.dumps(pre, indent=2))
    (path / "processor_config.json").write_text(
        json.dumps(
            {
                "processor_class": "LlavaProcessor",
                "patch_size": shape.vision["patch_size"],
                "vision_feature_select_strategy": shape.extra["vision_feature_select_strategy"],
                "num_additional_image_tokens": extra_tokens,
                "image_token": "<image>",
            },
            indent=2,
        )
    )


def _param_shapes(cfg):
    """(name, shape) of every tensor the HF model holds, read off a meta-device instance."""
    import torch
    from transformers import LlavaForConditionalGeneration

    with torch.device("meta"):
        model = LlavaForConditionalGeneration(cfg)
    sd = model.state_dict()
    tied = set()
    if cfg.tie_word_embeddings:
        tied = {n for n in sd if n.endswith("lm_head.weight")}
    return [(n, tuple(t.shape)) for n, t in sd.items() if n not in tied]


def _write_weights(path: Path, cfg, dtype: str, seed: int, device: str | None) -> InitPlan:
    import torch
    from safetensors.torch import save_file

    if device is None:
        device = "cuda" if torch.cuda.is_available() and cfg.text_config.hidden_size >= 1024 else "cpu"
    plan = InitPlan.for_config(cfg, seed, special_ids(path))
    itemsize = torch.tensor([], dtype=getattr(torch, dtype)).element_size()
    shapes = _param_shapes(cfg)
    total = sum(math.prod(s) for _, s in shapes) * itemsize
    groups, cur, cur_bytes = [], [], 0
    for name, shape in shapes:
        nbytes = math.prod(shape) * itemsize
        if cur and cur_bytes + nbytes > SHARD_BYTES:
            groups.append(cur)
            cur, cur_bytes = [], 0
        cur.append((name, shape))
        cur_bytes += nbytes
    groups.append(cur)
    meta = {"format": "pt"}
    if len(groups) == 1:
        save_file(
            {n: plan.tensor(n, s, dtype, device) for n, s in groups[0]}, str(path / "model.safetensors"), metadata=meta
        )
        return plan
    weight_map = {}
    for i, group in enumerate(groups):
        fname = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        save_file({n: plan.tensor(n, s, dtype, device) for n, s in group}, str(path / fname), metadata=meta)
        weight_map.update({n: fname for n, _ in group})
    (path / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
    )
    return plan


def checkpoint_summary(path) -> dict:
    """Small, cheap facts about a checkpoint dir (for logs and reports)."""
    path = Path(path)
    cfg = json.loads((path / "config.json").read_text())
    files = sorted(p.name for p in path.glob("*.safetensors"))
    return {
        "architectures": cfg.get("architectures"),
        "text": cfg["text_config"].get("model_type"),
        "vision": cfg["vision_config"].get("model_type"),
        "files": files,
        "bytes": sum((path / f).stat().st_size for f in files),
    }


def random_prompts(n: int, seed: int = 0) -> list[str]:
    """Varied user prompts of different lengths (for batch tests)."""
    rng = random.Random(seed)
    base = [
        "Describe the image.",
        "What is in this picture?",
        "Write a short caption.",
        "List the main objects and their colors.",
        "Describe the scene in one detailed paragraph.",
        "Is there any text in the image? Answer briefly.",
        "What shapes do you see?",
        "Give a title for this image and explain why in two sentences.",
    ]
    return [base[i % len(base)] + ("" if rng.random() < 0.5 else " Be concise.") for i in range(n)]
