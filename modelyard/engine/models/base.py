"""The contract every native model implements (runner and loader rely on exactly this).

Models are built from the checkpoint's HF config on the target device/dtype, then
`load_weights` consumes (hf_name, tensor) pairs streamed one at a time by the loader.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from ..attention.base import AttentionBackend, AttentionMetadata


class NativeVLM(nn.Module):
    image_token_id: int  # the placeholder id in input_ids, one per image feature row
    num_layers: int  # decoder layers (one KV pair each)
    num_kv_heads: int
    head_dim: int
    vocab_size: int

    def num_image_tokens(self, image_size: tuple[int, int] | None = None) -> int:
        """Feature rows one image contributes (fixed for LLaVA-1.5-style models)."""
        raise NotImplementedError

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[N, 3, H, W] -> [N, num_image_tokens, hidden] in the decoder's dtype (tower + projector)."""
        raise NotImplementedError

    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        """[T] -> [T, hidden]."""
        raise NotImplementedError

    def forward(
        self,
        inputs_embeds: torch.Tensor,  # [T, hidden]
        positions: torch.Tensor,  # [T] int64
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],  # per layer (k_cache, v_cache)
        meta: AttentionMetadata,
        attn: AttentionBackend,
    ) -> torch.Tensor:  # [T, hidden] after the final norm
        raise NotImplementedError

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[S, hidden] -> [S, vocab] float32."""
        raise NotImplementedError

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        raise NotImplementedError
