"""The weights `modelyard.testing.make_checkpoint` writes: plain random weights, or, where the shape allows,
random weights whose greedy decoding is well-conditioned in bf16, so that two correct implementations
agree on their captions and a comparison of captions measures correctness rather than rounding."""

from __future__ import annotations

import json
import math
import zlib
from dataclasses import dataclass
from pathlib import Path

# Why the weights look the way they do (docs/design.md, random-weight checkpoints, has the measurements).
# Plain random weights make greedy decoding ill-conditioned: the logits are ~iid Gaussian over the
# vocabulary, so the top two of 32k lie ~0.2 sigma apart, while bf16 perturbs the final hidden state by
# ~1% (every residual add and matmul output is rounded, and any difference between two implementations
# grows to that level within a few layers): ~0.02 sigma on a logit difference. Tokens flip at ~2% of
# steps and two correct bf16 runs agree on only ~0.7 of a 32-token caption. Scaling lm_head, the final
# norm or the residual branches cannot help (argmax is scale-invariant and the 1% is relative). What
# helps is what trained models have: a final hidden state aligned with few unembedding rows. So:
#   - every ordinary token t has a successor succ1(t) (one random cycle; special tokens cycle among
#     themselves, so eos/pad/<image> are never proposed); a random _BRANCH_FRACTION of tokens also has a
#     second one. lm_head row j = unit(E[pred1(j)] + E[pred2(j)]) (E: input embeddings), so the current
#     token's embedding, carried in the residual stream, lifts its successor(s) above the bulk;
#   - the embedding std makes cos(final residual, E[current]) = sqrt(2 / hidden) * (E[max of V normals] +
#     _BIGRAM_MARGIN): the successors' logits sit _BIGRAM_MARGIN sigma above the best of the rest.
# Attention and MLPs still add a context-dependent ~N(0, 1) to each logit, which decides between the two
# successors of a branch token: captions depend on the image and the KV cache there, and nowhere else
# bf16 noise has a near-tie to flip. Each such input-dependent decision still flips with probability
# ~1% (a continuous input has a decision boundary), so the fraction trades diversity for agreement.
# Not applied (plain weights, std 0.02 embeddings) where it cannot work: tied checkpoints (lm_head ==
# embed_tokens can only align with the current token, which would repeat it), and hidden sizes so small
# that the alignment needs cos > _MAX_BIGRAM_COS (tiny: 0.93), leaving the image almost no say; there,
# the plain weights' sensitivity to every input is what exact float32 comparisons want anyway.
_BIGRAM_MARGIN = 2.0
_BRANCH_FRACTION = 0.2
_MAX_BIGRAM_COS = 0.6
_BRANCH_RMS_PER_SQRT_LAYER = 0.92  # measured: rms of (final residual - input embedding) / sqrt(layers)
_SMALL_STD = 0.02


def _expected_max_normal(n: int) -> float:
    """E[max of n iid N(0, 1)] (Gumbel asymptotics; within ~0.05 for n >= 1000)."""
    a = math.sqrt(2 * math.log(n))
    return a - (math.log(math.log(n)) + math.log(4 * math.pi)) / (2 * a) + 0.5772 / a


def _bigram_cos(text_cfg) -> float:
    """cos(final hidden, current embedding) that puts a successor's logit _BIGRAM_MARGIN sigma above the
    bulk: a successor row has half its norm along E[current], so its logit is sqrt(hidden / 2) * cos."""
    return (_expected_max_normal(text_cfg.vocab_size) + _BIGRAM_MARGIN) * math.sqrt(2 / text_cfg.hidden_size)


def _conditioned(cfg) -> bool:
    return not cfg.tie_word_embeddings and _bigram_cos(cfg.text_config) <= _MAX_BIGRAM_COS


def _embedding_std(cfg) -> float:
    if not _conditioned(cfg):
        return _SMALL_STD
    cos = _bigram_cos(cfg.text_config)
    branch_rms = _BRANCH_RMS_PER_SQRT_LAYER * math.sqrt(cfg.text_config.num_hidden_layers)
    return branch_rms * cos / math.sqrt(1 - cos * cos)


def _bigram_predecessors(vocab_size: int, specials, seed: int):
    """[2, V] long: column j holds the two tokens whose successor is j (equal where j's predecessor is
    not a branch token). succ1 is one random cycle over the ordinary tokens (the special tokens cycle
    among themselves); a branch token b also leads to succ1(sigma(b)), sigma a random cycle over the
    branch tokens, so succ2 = succ1 off the branch set and a bijection onto succ1(branch set) on it."""
    import torch

    gen = torch.Generator().manual_seed(seed * 1_000_003 + 77)
    special = sorted({i for i in specials if 0 <= i < vocab_size})
    is_special = torch.zeros(vocab_size, dtype=torch.bool)
    is_special[special] = True
    succ1 = torch.empty(vocab_size, dtype=torch.long)
    for group in (torch.nonzero(~is_special).flatten(), torch.tensor(special, dtype=torch.long)):
        if len(group):
            order = group[torch.randperm(len(group), generator=gen)]
            succ1[order] = order.roll(-1)
    ordinary = torch.nonzero(~is_special).flatten()
    branch = ordinary[torch.randperm(len(ordinary), generator=gen)[: round(_BRANCH_FRACTION * len(ordinary))]]
    succ2 = succ1.clone()
    if len(branch) > 1:
        succ2[branch] = succ1[branch.roll(-1)]
    pred = torch.empty(2, vocab_size, dtype=torch.long)
    pred[0, succ1] = torch.arange(vocab_size)
    pred[1, succ2] = torch.arange(vocab_size)
    return pred


@dataclass(frozen=True)
class InitPlan:
    seed: int
    emb_std: float
    lm_from_embedding: bool  # lm_head rows are normalized sums of predecessor embeddings
    embed_name: str
    special_ids: tuple

    @classmethod
    def for_config(cls, cfg, seed: int, specials) -> InitPlan:
        return cls(
            seed, _embedding_std(cfg), _conditioned(cfg), "model.language_model.embed_tokens.weight", tuple(specials)
        )

    def describe(self) -> str:
        if not self.lm_from_embedding:
            return "Weights: plain random (embeddings std 0.02, linear layers 1/sqrt(fan_in))."
        return (
            f"Weights: conditioned for greedy decoding (embeddings std {self.emb_std:.3f}, lm_head rows from "
            f"successor embeddings; bigram margin {_BIGRAM_MARGIN} sigma, branch fraction {_BRANCH_FRACTION}; "
            "see modelyard/testing/weights.py)."
        )

    def tensor(self, name: str, shape, dtype, device):
        import torch

        if name == "lm_head.weight" and self.lm_from_embedding:
            emb = self._draw(self.embed_name, shape, device)  # [V, H]
            pred = _bigram_predecessors(shape[0], self.special_ids, self.seed).to(emb.device)  # [2, V]
            t = emb[pred[0]] + emb[pred[1]]  # [V, H]
            t = t / t.norm(dim=1, keepdim=True)  # unit rows: logits of a unit-rms hidden spread ~N(0, 1)
        else:
            t = self._draw(name, shape, device)
        return t.to(getattr(torch, dtype)).cpu().contiguous()

    def _draw(self, name: str, shape, device):
        import torch

        seed = (self.seed * 1_000_003 + zlib.crc32(name.encode())) % 2**63
        gen = torch.Generator(device=device).manual_seed(seed)
        leaf = name.rsplit(".", 1)[-1]
        is_norm = any(k in name for k in ("norm", "layrnorm", "layernorm", "ln_"))
        if is_norm:
            return (torch.zeros if leaf == "bias" else torch.ones)(shape, device=device)
        if leaf == "bias":
            scale = _SMALL_STD
        elif name == self.embed_name:
            scale = self.emb_std
        elif "embed" in name or len(shape) != 2:
            scale = _SMALL_STD
        else:
            # Linear weights at 1/sqrt(fan_in) so every layer moves the residual stream (at 0.02 a tiny
            # model with tied embeddings just repeats its input token).
            scale = shape[1] ** -0.5
        return torch.randn(shape, generator=gen, device=device, dtype=torch.float32) * scale


def special_ids(path: Path) -> list[int]:
    """Ids of the special tokens of the tokenizer written into `path`."""
    tok = json.loads((path / "tokenizer.json").read_text())
    return [t["id"] for t in tok.get("added_tokens", []) if t.get("special")]
