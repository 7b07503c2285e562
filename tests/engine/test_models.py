"""Native LLaVA models against transformers on tiny random checkpoints (CPU, float32).

Covers both test architectures (CLIP + Llama; SigLIP + Qwen2 with GQA, q/k/v biases and tied
embeddings) plus in-memory variants (several feature layers, Llama attention bias + llama3 rope,
Mistral). The decoder runs over a small paged pool with shuffled, non-contiguous block ids through
SdpaBackend, the way the runner drives it: embed, encode, merge, forward, logits.
"""

from __future__ import annotations

import itertools
import os
import random

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from transformers import LlavaForConditionalGeneration  # noqa: E402

from modelyard.engine.attention.base import AttentionMetadata  # noqa: E402
from modelyard.engine.attention.sdpa import SdpaBackend  # noqa: E402
from modelyard.engine.loader import load_model  # noqa: E402
from modelyard.testing import make_checkpoint  # noqa: E402

BLOCK = 4


class PagedDriver:
    """A minimal stand-in for the runner: per-sequence block tables over one shuffled pool."""

    def __init__(self, model, num_blocks=96, seed=0):
        self.model = model
        self.free = list(range(1, num_blocks))
        random.Random(seed).shuffle(self.free)
        shape = (num_blocks, BLOCK, model.num_kv_heads, model.head_dim)
        weight = model.language_model.embed_tokens.weight
        self.device = weight.device
        self.caches = [
            (
                torch.zeros(shape, dtype=weight.dtype, device=self.device),
                torch.zeros(shape, dtype=weight.dtype, device=self.device),
            )
            for _ in range(model.num_layers)
        ]
        self.tables: dict[int, list[int]] = {}
        self.lens: dict[int, int] = {}

    def step(self, chunks):
        """chunks: [(seq_id, token ids [q], feature rows for the image placeholders among them or None)]."""
        slots, positions, q_lens, s_lens, tables = [], [], [], [], []
        for sid, ids, _ in chunks:
            table = self.tables.setdefault(sid, [])
            start = self.lens.get(sid, 0)
            end = start + len(ids)
            while len(table) * BLOCK < end:
                table.append(self.free.pop())
            slots += [table[p // BLOCK] * BLOCK + p % BLOCK for p in range(start, end)]
            positions += list(range(start, end))
            self.lens[sid] = end
            q_lens.append(len(ids))
            s_lens.append(end)
            tables.append(list(table))
        width = max(len(t) for t in tables)
        dev = self.device
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slots, device=dev),
            block_tables=torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32, device=dev),
            seq_lens=torch.tensor(s_lens, dtype=torch.int32, device=dev),
            query_start_loc=torch.tensor([0, *itertools.accumulate(q_lens)], dtype=torch.int32, device=dev),
            max_query_len=max(q_lens),
            max_seq_len=max(s_lens),
            seq_lens_cpu=s_lens,
            query_lens_cpu=q_lens,
            is_decode=all(q == 1 for q in q_lens),
        )
        ids = torch.cat([c[1] for c in chunks])
        embeds = self.model.embed_tokens(ids)
        rows = [c[2] for c in chunks if c[2] is not None]
        if rows:
            self.model.merge_image_features(embeds, ids, torch.cat(rows))
        hidden = self.model(embeds, torch.tensor(positions, device=dev), self.caches, meta, SdpaBackend())
        return self.model.compute_logits(hidden)  # [T, V] float32


def make_prompt(model, n_before: int, n_after: int, seed: int) -> torch.Tensor:
    """Random text ids around one image's placeholder run (ids avoid the image token)."""
    g = torch.Generator().manual_seed(seed)
    n_img = model.num_image_tokens()
    text = torch.randint(0, model.image_token_id, (n_before + n_after,), generator=g)
    img = torch.full((n_img,), model.image_token_id)
    return torch.cat([text[:n_before], img, text[n_before:]])


def rows_in(ids: torch.Tensor, image_token_id: int, consumed: int, feats: torch.Tensor):
    """The feature rows for the placeholders in `ids`, given `consumed` rows used by earlier chunks."""
    n = int((ids == image_token_id).sum())
    return feats[consumed : consumed + n], consumed + n


@pytest.fixture(scope="module", params=["llava", "llava-qwen2"])
def pair(request, tmp_path_factory):
    """(native model, HF model) on the same tiny checkpoint."""
    path = make_checkpoint(request.param, tmp_path_factory.mktemp(request.param), seed=3)
    ours = load_model(path, torch.float32, "cpu")
    ref = LlavaForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
    return ours, ref


def hf_image_features(ref, pixels):
    with torch.no_grad():
        return torch.stack(list(ref.model.get_image_features(pixel_values=pixels).pooler_output))


def pixels_for(model, n, seed=0):
    s = model.vision_spec.image_size
    return torch.randn(n, 3, s, s, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def test_encode_images_matches_hf(pair):
    ours, ref = pair
    pixels = pixels_for(ours, 3)
    got = ours.encode_images(pixels)
    assert got.shape == (3, ours.num_image_tokens(), ours.hidden_size)
    torch.testing.assert_close(got, hf_image_features(ref, pixels), atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_packed_prefill_logits_match_hf(pair):
    """Two prompts of different lengths and images in one packed prefill step."""
    ours, ref = pair
    prompts = [make_prompt(ours, 3, 5, seed=0), make_prompt(ours, 1, 11, seed=1)]
    pixels = pixels_for(ours, 2, seed=1)
    feats = ours.encode_images(pixels)
    logits = PagedDriver(ours).step([(i, p, feats[i]) for i, p in enumerate(prompts)])
    start = 0
    for i, p in enumerate(prompts):
        want = ref(input_ids=p[None], pixel_values=pixels[i : i + 1]).logits[0]
        torch.testing.assert_close(logits[start : start + len(p)], want, atol=1e-4, rtol=1e-4)
        start += len(p)


@torch.no_grad()
def test_chunked_prefill_then_decode_match_full_forward(pair):
    """Chunk boundaries split the image run; the tail is decoded token by token, interleaved with
    a second sequence so decode steps are batched."""
    ours, ref = pair
    seqs = [make_prompt(ours, 4, 9, seed=5), make_prompt(ours, 2, 6, seed=6)]
    pixels = pixels_for(ours, 2, seed=2)
    feats = ours.encode_images(pixels)
    want = [ref(input_ids=s[None], pixel_values=pixels[i : i + 1]).logits[0] for i, s in enumerate(seqs)]
    n_img = ours.num_image_tokens()
    cut1 = 4 + n_img // 2  # mid-image
    drv = PagedDriver(ours, seed=7)
    consumed = [0, 0]
    got = [[], []]

    def chunk(i, a, b):
        ids = seqs[i][a:b]
        rows, consumed[i] = rows_in(ids, ours.image_token_id, consumed[i], feats[i])
        return i, ids, rows

    got[0].append(drv.step([chunk(0, 0, cut1)]))
    out = drv.step([chunk(0, cut1, len(seqs[0]) - 3), chunk(1, 0, len(seqs[1]) - 3)])  # mixed lengths
    got[0].append(out[: len(seqs[0]) - 3 - cut1])
    got[1].append(out[len(seqs[0]) - 3 - cut1 :])
    for t in range(3, 0, -1):  # batched decode of the last three tokens of both
        out = drv.step(
            [chunk(0, len(seqs[0]) - t, len(seqs[0]) - t + 1), chunk(1, len(seqs[1]) - t, len(seqs[1]) - t + 1)]
        )
        got[0].append(out[:1])
        got[1].append(out[1:])
    for i in range(2):
        torch.testing.assert_close(torch.cat(got[i]), want[i], atol=1e-4, rtol=1e-4)


def test_merge_image_features_checks_counts(pair):
    ours, _ = pair
    ids = torch.tensor([1, ours.image_token_id, ours.image_token_id, 2])
    embeds = torch.zeros(4, ours.hidden_size)
    with pytest.raises(ValueError, match="2 image placeholder tokens"):
        ours.merge_image_features(embeds, ids, torch.ones(3, ours.hidden_size))
    ours.merge_image_features(embeds, ids, torch.ones(2, ours.hidden_size))
    assert embeds[[1, 2]].eq(1).all() and embeds[[0, 3]].eq(0).all()


# ---- in-memory variants: configs the two test checkpoints do not exercise ---------------------------


def _variant_config(kind: str):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, MistralConfig, SiglipVisionConfig

    if kind == "clip-llama3-layers":
        # several feature layers incl. the embeddings (index 0); the last tower layer is never run;
        # Llama with every bias and llama3 rope whose three frequency bands all occur at head_dim 16
        vision = CLIPVisionConfig(
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=3,
            num_attention_heads=4,
            image_size=24,
            patch_size=8,
            projection_dim=16,
        )
        text = LlamaConfig(
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            vocab_size=300,
            max_position_embeddings=512,
            attention_bias=True,
            mlp_bias=True,
            rms_norm_eps=1e-5,
            rope_parameters={
                "rope_type": "llama3",
                "rope_theta": 10000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            },
        )
        extra = dict(vision_feature_layer=[0, -2], vision_feature_select_strategy="default")
    else:  # "siglip-mistral-linear": SigLIP under the "default" strategy (drops the first patch), tied head
        vision = SiglipVisionConfig(
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=28,
            patch_size=7,
        )
        text = MistralConfig(
            hidden_size=48,
            intermediate_size=80,
            num_hidden_layers=2,
            num_attention_heads=6,
            num_key_value_heads=2,
            vocab_size=256,
            max_position_embeddings=256,
            sliding_window=None,
            tie_word_embeddings=True,
            rope_parameters={"rope_type": "linear", "rope_theta": 5000.0, "factor": 2.0},
        )
        extra = dict(
            vision_feature_layer=-1,
            vision_feature_select_strategy="default",
            projector_hidden_act="gelu",
            multimodal_projector_bias=False,
            tie_word_embeddings=True,
        )
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_id=text.vocab_size - 1, **extra)
    cfg.architectures = ["LlavaForConditionalGeneration"]
    return cfg


@pytest.fixture(scope="module", params=["clip-llama3-layers", "siglip-mistral-linear"])
def variant(request, tmp_path_factory):
    torch.manual_seed(0)
    ref = LlavaForConditionalGeneration(_variant_config(request.param)).eval()
    with torch.no_grad():  # HF zero-inits biases; randomise them so a dropped bias would show
        for name, p in ref.named_parameters():
            if name.endswith("bias"):
                p.normal_(std=0.05)
    path = tmp_path_factory.mktemp(request.param)
    ref.save_pretrained(path)  # transformers' own save layout (language_model.model....)
    return load_model(path, torch.float32, "cpu"), ref


@torch.no_grad()
def test_variant_matches_hf(variant):
    ours, ref = variant
    pixels = pixels_for(ours, 2, seed=4)
    feats = ours.encode_images(pixels)
    torch.testing.assert_close(feats, hf_image_features(ref, pixels), atol=1e-5, rtol=1e-5)
    prompt = make_prompt(ours, 70, 30, seed=9)  # long enough to reach rotated-away llama3 bands
    drv = PagedDriver(ours)
    got = torch.cat(
        [
            drv.step([(0, prompt[:-2], feats[0])]),
            drv.step([(0, prompt[-2:-1], None)]),
            drv.step([(0, prompt[-1:], None)]),
        ]
    )
    want = ref(input_ids=prompt[None], pixel_values=pixels[:1]).logits[0]
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_unused_tower_layer_not_built(variant):
    ours, _ = variant
    if ours.vision_spec.kind == "clip":
        assert len(ours.vision_tower.encoder.layers) == 2  # features [0, -2] of 3 layers
        assert ours.vision_tower.feature_indices == (0, 2)


# ---- rope --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "params",
    [
        {"rope_type": "default", "rope_theta": 500000.0},
        {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0},
        {
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 128,
        },
    ],
)
def test_rope_cache_matches_hf_rotary(params):
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    from modelyard.engine.models.rope import RopeSpec, cos_sin_cache

    cfg = LlamaConfig(
        hidden_size=256, num_attention_heads=2, head_dim=128, max_position_embeddings=2048, rope_parameters=dict(params)
    )
    positions = torch.arange(0, 2048, 7)
    cos, sin = LlamaRotaryEmbedding(cfg)(torch.zeros(1, dtype=torch.float32), positions[None])
    cache = cos_sin_cache(RopeSpec.from_hf(cfg), 128, 2048)[positions]
    assert torch.equal(cache[:, :64], cos[0, :, :64]) and torch.equal(cache[:, 64:], sin[0, :, :64])


def test_rope_reads_transformers4_style_config():
    from types import SimpleNamespace

    from modelyard.engine.models.rope import RopeSpec

    old = SimpleNamespace(
        rope_theta=1e6,
        max_position_embeddings=4096,
        rope_scaling={
            "type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 1024,
        },
    )
    new = SimpleNamespace(
        max_position_embeddings=4096,
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 1e6,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 1024,
        },
    )
    assert RopeSpec.from_hf(old) == RopeSpec.from_hf(new)
    plain = RopeSpec.from_hf(SimpleNamespace(rope_theta=5.0, max_position_embeddings=8))
    assert (plain.rope_type, plain.theta, plain.factor) == ("default", 5.0, 1.0)


def test_unsupported_rope_type_is_refused():
    from types import SimpleNamespace

    from modelyard.engine.models import UnsupportedArchitecture
    from modelyard.engine.models.rope import RopeSpec

    cfg = SimpleNamespace(
        max_position_embeddings=8, rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0}
    )
    with pytest.raises(UnsupportedArchitecture, match='backend="transformers"'):
        RopeSpec.from_hf(cfg)


# ---- CUDA --------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("arch", ["llava", "llava-qwen2"])
@torch.no_grad()
def test_cuda_logits_match_hf(arch, tmp_path):
    """float32 on CUDA matches tightly; in bfloat16 our error against the float32 reference is no
    worse than transformers' own bfloat16 error (twice it, plus rounding slack)."""
    path = make_checkpoint(arch, tmp_path / arch, seed=4)
    cuda = torch.device("cuda")
    ref32 = LlavaForConditionalGeneration.from_pretrained(path, dtype=torch.float32).to(cuda).eval()
    ref16 = LlavaForConditionalGeneration.from_pretrained(path, dtype=torch.bfloat16).to(cuda).eval()
    for dtype in (torch.float32, torch.bfloat16):
        ours = load_model(path, dtype, cuda)
        assert all(p.device.type == "cuda" for p in ours.parameters())
        prompt = make_prompt(ours, 5, 40, seed=2).to(cuda)
        pixels = pixels_for(ours, 1, seed=3).to(cuda)
        drv = PagedDriver(ours)
        feats = ours.encode_images(pixels)
        got = torch.cat([drv.step([(0, prompt[:-1], feats[0])]), drv.step([(0, prompt[-1:], None)])])
        want = ref32(input_ids=prompt[None], pixel_values=pixels).logits[0]
        if dtype == torch.float32:
            torch.testing.assert_close(got, want, atol=2e-4, rtol=2e-4)
        else:
            hf16 = ref16(input_ids=prompt[None], pixel_values=pixels.bfloat16()).logits[0].float()
            assert (got - want).abs().max() <= 2 * (hf16 - want).abs().max() + 1e-2
