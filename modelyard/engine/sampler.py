"""Sampler: greedy, temperature, top-k, top-p over float32 logits.

Randomness is per request and per output position: the draw for a request's i-th new token comes
from a generator seeded with mix(seed, i). So a request's tokens depend only on its own seed and
logits, never on which other requests share the batch, and a sequence that was preempted and
recomputed draws exactly what it would have drawn. No generator state outlives a step.
"""

from __future__ import annotations

import torch

from .types import SamplingParams

_MASK64 = (1 << 64) - 1


def mix_seed(seed: int, index: int) -> int:
    """splitmix64 of (seed, index): nearby seeds and positions give unrelated streams."""
    z = (seed * 0x9E3779B97F4A7C15 + (index + 1) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) & ((1 << 63) - 1)


def apply_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Mask logits outside each row's top-k and top-p nucleus with -inf.

    logits [R, V] float32; top_k [R] int64 (0 = off); top_p [R] float32 (1.0 = off).
    The most likely token always survives.
    """
    R, V = logits.shape
    sorted_logits, order = logits.sort(dim=-1, descending=True)  # [R, V]
    ranks = torch.arange(V, device=logits.device).expand(R, V)
    k = torch.where(top_k > 0, top_k, torch.full_like(top_k, V))
    sorted_logits = sorted_logits.masked_fill(ranks >= k[:, None], float("-inf"))
    probs = sorted_logits.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs  # [R, V]
    outside = (mass_before >= top_p[:, None]) & (top_p[:, None] < 1.0)  # 1.0 is off, despite rounding
    sorted_logits = sorted_logits.masked_fill(outside, float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter(1, order, sorted_logits)


class Sampler:
    def __call__(
        self,
        logits: torch.Tensor,  # [S, V] float32
        params: list[SamplingParams],
        seeds: list[int],
        output_index: list[int],  # which new token of its request each row samples (0-based)
    ) -> list[int]:
        S = logits.shape[0]
        if not (len(params) == len(seeds) == len(output_index) == S):
            raise ValueError("one SamplingParams, seed and output index per logits row")
        tokens = logits.argmax(dim=-1)  # [S]
        rows = [i for i, p in enumerate(params) if p.temperature > 0]
        if rows:
            dev = logits.device
            idx = torch.tensor(rows, device=dev)
            temps = torch.tensor([params[i].temperature for i in rows], dtype=torch.float32, device=dev)
            x = logits.index_select(0, idx).float() / temps[:, None]  # [R, V]
            if any(params[i].top_k > 0 or params[i].top_p < 1.0 for i in rows):
                top_k = torch.tensor([params[i].top_k for i in rows], dtype=torch.int64, device=dev)
                top_p = torch.tensor([params[i].top_p for i in rows], dtype=torch.float32, device=dev)
                x = apply_top_k_top_p(x, top_k, top_p)
            probs = x.softmax(dim=-1)  # [R, V]
            # Exponential race: argmax(p / E), E ~ Exp(1), picks token i with probability p_i,
            # and lets each row draw from its own generator.
            noise = torch.empty_like(probs)
            for r, i in enumerate(rows):
                gen = torch.Generator(device=dev)
                gen.manual_seed(mix_seed(seeds[i], output_index[i]))
                noise[r].exponential_(generator=gen)
            tokens = tokens.index_copy(0, idx, (probs / noise).argmax(dim=-1))
        return tokens.tolist()
