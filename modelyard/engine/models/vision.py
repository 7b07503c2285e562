"""CLIP and SigLIP vision towers (the ViT encoders LLaVA-family checkpoints use).

Only the encoder layers that the selected features need are built: LLaVA-1.5 reads the
penultimate layer, so its last CLIP layer is never allocated (its weights are skipped at load).
Module names mirror the HF checkpoints' (`embeddings`, `pre_layrnorm`, `encoder.layers.N`) except for
the merged `qkv_proj`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from .layers import MergedLinear, activation

_KINDS = {"clip_vision_model": "clip", "siglip_vision_model": "siglip"}

# SDPA backends for the tower: cuDNN left out (it exists on CUDA only, so on the CPU nothing changes).
# torch picks it first on Hopper, and it builds an execution plan for every new image-batch size
# (~30 ms each, the batch size changes with every prefill step); FlashAttention needs no plan and was
# within 6% of cuDNN's steady speed for CLIP-L/336 on an H200.
_TOWER_SDPA = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


@dataclass(frozen=True)
class VisionSpec:
    kind: str  # "clip" (class token, pre-layernorm, bias-free patch conv) or "siglip"
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_layers: int  # layers in the checkpoint
    image_size: int
    patch_size: int
    num_channels: int
    layer_norm_eps: float
    hidden_act: str

    def __post_init__(self):
        if self.kind not in _KINDS.values():
            raise ValueError(f"unknown vision tower kind {self.kind!r}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"vision hidden_size {self.hidden_size} not divisible by {self.num_heads} heads")
        activation(self.hidden_act)  # fail at build time, not at the first image

    @classmethod
    def from_hf(cls, cfg) -> VisionSpec:
        return cls(
            kind=_KINDS[cfg.model_type],
            hidden_size=cfg.hidden_size,
            intermediate_size=cfg.intermediate_size,
            num_heads=cfg.num_attention_heads,
            num_layers=cfg.num_hidden_layers,
            image_size=cfg.image_size,
            patch_size=cfg.patch_size,
            num_channels=getattr(cfg, "num_channels", 3),
            layer_norm_eps=float(cfg.layer_norm_eps),
            hidden_act=cfg.hidden_act,
        )

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def num_positions(self) -> int:
        """Tokens per image inside the tower (patches, plus CLIP's class token)."""
        return self.num_patches + (1 if self.kind == "clip" else 0)


class VisionEmbeddings(nn.Module):
    def __init__(self, spec: VisionSpec):
        super().__init__()
        self.spec = spec
        if spec.kind == "clip":
            self.class_embedding = nn.Parameter(torch.empty(spec.hidden_size))
        self.patch_embedding = nn.Conv2d(
            spec.num_channels,
            spec.hidden_size,
            kernel_size=spec.patch_size,
            stride=spec.patch_size,
            bias=spec.kind == "siglip",
        )
        self.position_embedding = nn.Embedding(spec.num_positions, spec.hidden_size)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        N, _, H, W = pixel_values.shape
        if H != self.spec.image_size or W != self.spec.image_size:
            raise ValueError(
                f"pixel_values are {H}x{W}; this vision tower takes "
                f"{self.spec.image_size}x{self.spec.image_size} (the checkpoint's processor size)"
            )
        weight = self.patch_embedding.weight
        patches = self.patch_embedding(pixel_values.to(weight.dtype))  # [N, E, h, w]
        x = patches.flatten(2).transpose(1, 2)  # [N, h*w, E]
        if self.spec.kind == "clip":
            cls = self.class_embedding.expand(N, 1, -1)
            x = torch.cat([cls, x], dim=1)  # [N, 1 + h*w, E]
        return x + self.position_embedding.weight  # positions are 0..L-1 in order


class VisionAttention(nn.Module):
    def __init__(self, spec: VisionSpec):
        super().__init__()
        E = spec.hidden_size
        self.num_heads, self.head_dim = spec.num_heads, E // spec.num_heads
        self.qkv_proj = MergedLinear(E, {"q_proj": E, "k_proj": E, "v_proj": E}, bias=True)
        self.out_proj = nn.Linear(E, E)
        self.scale = self.head_dim**-0.5

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        N, L, E = x.shape
        qkv = self.qkv_proj(x).view(N, L, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # [N, heads, L, d] each
        out = F.scaled_dot_product_attention(q, k, v, scale=self.scale)  # bidirectional over the image
        return self.out_proj(out.transpose(1, 2).reshape(N, L, E))


class VisionMLP(nn.Module):
    def __init__(self, spec: VisionSpec):
        super().__init__()
        self.fc1 = nn.Linear(spec.hidden_size, spec.intermediate_size)
        self.fc2 = nn.Linear(spec.intermediate_size, spec.hidden_size)
        self.act = activation(spec.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class VisionEncoderLayer(nn.Module):
    def __init__(self, spec: VisionSpec):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(spec.hidden_size, eps=spec.layer_norm_eps)
        self.self_attn = VisionAttention(spec)
        self.layer_norm2 = nn.LayerNorm(spec.hidden_size, eps=spec.layer_norm_eps)
        self.mlp = VisionMLP(spec)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class VisionEncoder(nn.Module):
    def __init__(self, spec: VisionSpec, num_layers: int):
        super().__init__()
        self.layers = nn.ModuleList(VisionEncoderLayer(spec) for _ in range(num_layers))


class VisionTower(nn.Module):
    """Returns the hidden states HF's `hidden_states[i]` would hold for each requested index
    (0 = the embeddings after CLIP's pre-layernorm, i = the output of encoder layer i).
    The post-layernorm and SigLIP's pooling head feed no LLaVA feature, so they are not built."""

    def __init__(self, spec: VisionSpec, feature_indices: tuple[int, ...]):
        super().__init__()
        for i in feature_indices:
            if not 0 <= i <= spec.num_layers:
                raise ValueError(f"vision feature index {i} outside 0..{spec.num_layers}")
        self.spec = spec
        self.feature_indices = tuple(feature_indices)
        self.embeddings = VisionEmbeddings(spec)
        if spec.kind == "clip":
            self.pre_layrnorm = nn.LayerNorm(spec.hidden_size, eps=spec.layer_norm_eps)
        self.encoder = VisionEncoder(spec, max(self.feature_indices))

    def forward(self, pixel_values: torch.Tensor) -> list[torch.Tensor]:
        x = self.embeddings(pixel_values)  # [N, L, E]
        if self.spec.kind == "clip":
            x = self.pre_layrnorm(x)
        wanted = set(self.feature_indices)
        kept = {0: x} if 0 in wanted else {}
        with sdpa_kernel(_TOWER_SDPA):
            for i, layer in enumerate(self.encoder.layers, start=1):
                x = layer(x)
                if i in wanted:
                    kept[i] = x
        return [kept[i] for i in self.feature_indices]
