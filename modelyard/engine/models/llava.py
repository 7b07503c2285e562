"""LLaVA (HF `LlavaForConditionalGeneration`): CLIP/SigLIP tower -> MLP projector -> Llama-family decoder.

The runner drives it in three steps per prefill: `embed_tokens(ids)`, `encode_images(pixels)`, then
`merge_image_features(embeds, ids, rows)` writes the image rows into the placeholder positions
before `forward` runs the decoder over the paged cache.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from ..attention.base import AttentionBackend, AttentionMetadata
from .base import NativeVLM
from .decoder import DecoderModel, DecoderSpec
from .layers import activation
from .registry import UnsupportedArchitecture
from .vision import VisionSpec, VisionTower
from .weights import load_named_weights

# Checkpoint tensors no LLaVA feature reads: the tower's pooled-output norm and SigLIP's pooling head,
# plus buffers some older exports saved.
_ALWAYS_IGNORED = re.compile(r"^vision_tower\.(post_layernorm|head)\.|\.rotary_emb\.inv_freq$|\.position_ids$")
_VISION_LAYER = re.compile(r"^vision_tower\.encoder\.layers\.(\d+)\.")


def merge_image_features(
    inputs_embeds: torch.Tensor, input_ids: torch.Tensor, features: torch.Tensor, image_token_id: int
) -> torch.Tensor:
    """Write image feature rows into the placeholder positions of `inputs_embeds`, in order; in place.

    inputs_embeds [T, H]; input_ids [T]; features [n, H] (or [N, tokens, H]) where n is exactly the
    number of `image_token_id` placeholders in input_ids. For a prefill chunk, pass only the rows
    of the placeholders that fall inside the chunk.
    """
    mask = input_ids == image_token_id  # [T]
    rows = features.reshape(-1, features.shape[-1])  # [n, H]
    n = int(mask.sum())
    if n != rows.shape[0]:
        raise ValueError(f"{n} image placeholder tokens in input_ids but {rows.shape[0]} feature rows")
    if rows.shape[-1] != inputs_embeds.shape[-1]:
        raise ValueError(f"feature width {rows.shape[-1]} != embedding width {inputs_embeds.shape[-1]}")
    inputs_embeds[mask] = rows.to(inputs_embeds.dtype)
    return inputs_embeds


class LlavaProjector(nn.Module):
    def __init__(self, in_features: int, hidden_size: int, act: str, bias: bool):
        super().__init__()
        self.linear_1 = nn.Linear(in_features, hidden_size, bias=bias)
        self.act = activation(act)
        self.linear_2 = nn.Linear(hidden_size, hidden_size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(x)))


def _feature_indices(layers, num_layers: int) -> tuple[int, ...]:
    """HF hidden_states indices (negative from the end of num_layers + 1 states) -> 0..num_layers."""
    layers = (layers,) if isinstance(layers, int) else tuple(layers)
    if not layers:
        raise ValueError("vision_feature_layer is an empty list")
    out = []
    for i in layers:
        if not -(num_layers + 1) <= i <= num_layers:
            raise ValueError(f"vision_feature_layer {i} is out of range for a {num_layers}-layer tower")
        out.append(i % (num_layers + 1))
    return tuple(out)


class LlavaForConditionalGeneration(NativeVLM):
    def __init__(self, hf_config):
        super().__init__()
        text_cfg, vision_cfg = hf_config.text_config, hf_config.vision_config
        self.text_spec = DecoderSpec.from_hf(text_cfg)
        self.vision_spec = VisionSpec.from_hf(vision_cfg)
        self.select_strategy = getattr(hf_config, "vision_feature_select_strategy", "default")
        if self.select_strategy not in ("default", "full"):
            raise UnsupportedArchitecture(
                f"vision_feature_select_strategy {self.select_strategy!r} is not supported natively"
            )
        indices = _feature_indices(getattr(hf_config, "vision_feature_layer", -2), self.vision_spec.num_layers)
        token_id = getattr(hf_config, "image_token_id", None)
        self.image_token_id = int(token_id if token_id is not None else hf_config.image_token_index)

        spec = self.text_spec
        self.num_layers, self.num_kv_heads, self.head_dim = spec.num_layers, spec.num_kv_heads, spec.head_dim
        self.vocab_size = spec.vocab_size
        self.hidden_size = spec.hidden_size
        self.max_position_embeddings = spec.max_position_embeddings
        self.sliding_window = spec.sliding_window
        self.tie_word_embeddings = bool(
            getattr(hf_config, "tie_word_embeddings", False) or getattr(text_cfg, "tie_word_embeddings", False)
        )

        self.vision_tower = VisionTower(self.vision_spec, indices)
        self.multi_modal_projector = LlavaProjector(
            self.vision_spec.hidden_size * len(indices),
            spec.hidden_size,
            getattr(hf_config, "projector_hidden_act", "gelu"),
            bool(getattr(hf_config, "multimodal_projector_bias", True)),
        )
        self.language_model = DecoderModel(spec)
        self.lm_head = None if self.tie_word_embeddings else nn.Linear(spec.hidden_size, spec.vocab_size, bias=False)

    # ---- setup -------------------------------------------------------------------------------
    def init_buffers(self, max_model_len: int | None = None) -> None:
        """Non-persistent buffers (the rope cache), computed on the parameters' device."""
        self.language_model.init_buffers(max_model_len)

    def check_max_model_len(self, max_model_len: int) -> None:
        """Sliding-window attention is not implemented: refuse contexts where it would matter."""
        if self.sliding_window is not None and max_model_len > self.sliding_window:
            raise UnsupportedArchitecture(
                f"this {self.text_spec.model_type} decoder uses sliding-window attention (window "
                f"{self.sliding_window}) which the native engine does not implement; it is exact only for "
                f"contexts up to the window, but max_model_len is {max_model_len}. Set "
                f'EngineConfig(max_model_len<={self.sliding_window}) or use EngineConfig(backend="transformers")'
            )

    def _ignored_weight(self, name: str) -> bool:
        if _ALWAYS_IGNORED.search(name):
            return True
        m = _VISION_LAYER.match(name)
        if m and int(m.group(1)) >= len(self.vision_tower.encoder.layers):
            return True  # encoder layers after the last selected feature layer
        return self.tie_word_embeddings and name == "lm_head.weight"

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        return load_named_weights(self, weights, self._ignored_weight)

    # ---- NativeVLM ----------------------------------------------------------------------------
    def num_image_tokens(self, image_size: tuple[int, int] | None = None) -> int:
        """Rows per image: every tower token, minus CLIP's class token under the "default" strategy.
        Independent of the source image size (the processor resizes to the tower's input)."""
        return self.vision_spec.num_positions - (1 if self.select_strategy == "default" else 0)

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        dtype = self.language_model.embed_tokens.weight.dtype
        states = self.vision_tower(pixel_values.to(dtype))  # each [N, L, E]
        if self.select_strategy == "default":
            states = [s[:, 1:] for s in states]
        features = states[0] if len(states) == 1 else torch.cat(states, dim=-1)
        return self.multi_modal_projector(features)  # [N, tokens, hidden]

    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.language_model.embed_tokens(input_ids)  # [T, hidden]

    def merge_image_features(self, inputs_embeds, input_ids, features) -> torch.Tensor:
        return merge_image_features(inputs_embeds, input_ids, features, self.image_token_id)

    def forward(
        self,
        inputs_embeds: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        meta: AttentionMetadata,
        attn: AttentionBackend,
    ) -> torch.Tensor:
        return self.language_model(inputs_embeds, positions, kv_caches, meta, attn)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        weight = self.language_model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        return F.linear(hidden, weight).float()  # [S, vocab]
