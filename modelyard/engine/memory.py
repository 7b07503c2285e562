"""Device-memory arithmetic of one engine, shared by the engine (sizing its KV pool at start-up) and
the planner (placing actors before anything loads), so the two cannot drift apart.

Plain Python over config values: it takes an HF config object or the dicts of a config.json, and
imports neither torch nor transformers (the driver plans without them).
"""

from __future__ import annotations

from typing import Any

ACTIVATION_SAFETY = 2.0  # the estimate counts the big tensors only; allocator slack on top


def get(cfg: Any, key: str, default: Any = None) -> Any:
    """A config value from an HF config object or a config.json dict."""
    if cfg is None:
        return default
    value = cfg.get(key) if isinstance(cfg, dict) else getattr(cfg, key, None)
    return default if value is None else value


def text_and_vision(config: Any) -> tuple[Any, Any]:
    """The decoder's and the vision tower's sub-configs (a text-only config is its own text config)."""
    return get(config, "text_config", config), get(config, "vision_config")


def kv_bytes_per_token(text_cfg: Any, itemsize: int) -> int:
    """K and V of one token over every decoder layer."""
    heads = get(text_cfg, "num_attention_heads")
    kv_heads = get(text_cfg, "num_key_value_heads", heads)
    head_dim = get(text_cfg, "head_dim") or get(text_cfg, "hidden_size") // heads
    return 2 * get(text_cfg, "num_hidden_layers") * kv_heads * head_dim * itemsize


def activation_bytes(
    text_cfg: Any, vision_cfg: Any, *, max_prefill_tokens: int, max_batch_size: int, max_image_batch: int, itemsize: int
) -> int:
    """Peak transient memory of the largest step: a full prefill chunk, its logits, an image batch.

    An upper-bound style estimate (no profiling run): per token of a max_prefill_tokens chunk, one
    layer's live tensors (residual, normed input, q/k/v, attention output, gate/up and their
    product); float32 logits for every row that may sample; the vision tower over max_image_batch
    images including its attention scores. A vision config without its sizes adds nothing.
    """
    hidden, inter, vocab = (get(text_cfg, k) for k in ("hidden_size", "intermediate_size", "vocab_size"))
    heads = get(text_cfg, "num_attention_heads")
    kv_heads = get(text_cfg, "num_key_value_heads", heads)
    head_dim = get(text_cfg, "head_dim") or hidden // heads
    tokens = max_prefill_tokens
    per_token = 4 * hidden + (heads + 2 * kv_heads) * head_dim + heads * head_dim + 3 * inter
    decoder = tokens * per_token * itemsize
    logits = max(max_batch_size, 1) * vocab * 4 + tokens * 8 * 3  # + ids, positions, slots
    vision = 0
    sizes = [
        get(vision_cfg, k)
        for k in ("image_size", "patch_size", "hidden_size", "intermediate_size", "num_attention_heads")
    ]
    if all(sizes):
        image, patch, embed, v_inter, v_heads = sizes
        positions = (image // patch) ** 2 + 1
        vision = max_image_batch * positions * (4 * embed + 2 * v_inter) * itemsize
        vision += max_image_batch * v_heads * positions * positions * 4
    return int(ACTIVATION_SAFETY * (decoder + logits + vision))
