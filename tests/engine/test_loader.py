"""loader.py: checkpoint formats and layouts, refusals, and what ends up on the device."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from modelyard.engine.loader import (  # noqa: E402
    CheckpointFormatError,
    CheckpointMismatch,
    UnsupportedArchitecture,
    load_model,
    read_config,
)
from modelyard.testing import make_checkpoint  # noqa: E402


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint("llava", tmp_path_factory.mktemp("llava"), seed=1)


def _copy_with_tensors(src, dst, tensors: dict, shards: int = 1):
    """A copy of checkpoint `src` whose weights are `tensors` (split over `shards` files + index)."""
    shutil.copytree(src, dst)
    for f in list(dst.glob("*.safetensors")) + list(dst.glob("*.index.json")):
        f.unlink()
    if shards == 1:
        save_file(tensors, str(dst / "model.safetensors"))
        return dst
    names = sorted(tensors)
    weight_map = {}
    for i in range(shards):
        fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = names[i::shards]
        save_file({n: tensors[n] for n in part}, str(dst / fname))
        weight_map.update({n: fname for n in part})
    (dst / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return dst


def _hub_name(name: str) -> str:
    """transformers-5 state-dict name -> the older Hub layout (llava-hf/llava-1.5-7b-hf)."""
    if name == "lm_head.weight":
        return "language_model.lm_head.weight"
    name = name.replace("model.language_model.", "language_model.model.", 1)
    name = name.replace("model.vision_tower.", "vision_tower.vision_model.", 1)
    return name.replace("model.multi_modal_projector.", "multi_modal_projector.", 1)


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_layouts_and_shards_load_identically(ckpt, tmp_path):
    tensors = load_file(str(ckpt / "model.safetensors"))
    assert any(n.startswith("model.language_model.") for n in tensors)  # the layout make_checkpoint writes
    base = _state(load_model(ckpt, torch.float32, "cpu"))
    hub = {_hub_name(n): t for n, t in tensors.items()}
    assert "vision_tower.vision_model.embeddings.class_embedding" in hub
    # buffers older exports carry; they are recognised and skipped
    hub["vision_tower.vision_model.embeddings.position_ids"] = torch.arange(17)[None]
    hub["language_model.model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)
    for layout, ts, shards in (("hub", hub, 1), ("hub-sharded", hub, 3), ("t5-sharded", tensors, 2)):
        path = _copy_with_tensors(ckpt, tmp_path / layout, ts, shards)
        state = _state(load_model(path, torch.float32, "cpu"))
        assert state.keys() == base.keys()
        for k in base:
            assert torch.equal(state[k], base[k]), (layout, k)


def test_fused_projections_hold_the_checkpoint_rows(ckpt):
    tensors = load_file(str(ckpt / "model.safetensors"))
    model = load_model(ckpt, torch.float32, "cpu")
    attn = model.language_model.layers[1].self_attn.qkv_proj.weight
    pre = "model.language_model.layers.1.self_attn."
    want = torch.cat([tensors[pre + p + ".weight"] for p in ("q_proj", "k_proj", "v_proj")])
    assert torch.equal(attn, want)
    mlp = model.language_model.layers[0].mlp.gate_up_proj.weight
    pre = "model.language_model.layers.0.mlp."
    assert torch.equal(mlp, torch.cat([tensors[pre + "gate_proj.weight"], tensors[pre + "up_proj.weight"]]))


def test_missing_unexpected_and_misshapen_tensors_are_named(ckpt, tmp_path):
    tensors = load_file(str(ckpt / "model.safetensors"))
    dropped = "model.language_model.layers.1.self_attn.k_proj.weight"
    bad = dict(tensors)
    del bad[dropped]
    bad["model.language_model.layers.0.self_attn.mystery.weight"] = torch.zeros(2)
    path = _copy_with_tensors(ckpt, tmp_path / "bad", bad)
    with pytest.raises(CheckpointMismatch) as e:
        load_model(path, torch.float32, "cpu")
    msg = str(e.value)
    assert "language_model.layers.1.self_attn.k_proj.weight" in msg and "missing" in msg
    assert "mystery.weight" in msg and "unexpected" in msg

    wrong = dict(tensors)
    wrong["model.multi_modal_projector.linear_1.weight"] = torch.zeros(3, 3)
    path = _copy_with_tensors(ckpt, tmp_path / "wrong", wrong)
    with pytest.raises(CheckpointMismatch, match="shape mismatch.*linear_1.weight"):
        load_model(path, torch.float32, "cpu")


def test_pickle_only_checkpoint_is_refused(ckpt, tmp_path):
    path = tmp_path / "pickled"
    path.mkdir()
    shutil.copy(ckpt / "config.json", path / "config.json")
    (path / "pytorch_model.bin").write_bytes(b"not unpickled, ever")
    with pytest.raises(CheckpointFormatError, match=r"pytorch_model\.bin.*Convert.*to safetensors"):
        load_model(path, torch.float32, "cpu")


def test_unsupported_architectures_are_refused_before_weights(ckpt, tmp_path):
    from transformers import LlamaConfig

    path = tmp_path / "llama"
    cfg = LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    cfg.architectures = ["LlamaForCausalLM"]
    cfg.save_pretrained(path)  # no weights at all: the config alone decides
    with pytest.raises(UnsupportedArchitecture, match=r"LlamaForCausalLM.*backend=\"transformers\""):
        load_model(path, torch.float32, "cpu")

    path = tmp_path / "llava-gemma"
    path.mkdir()
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["text_config"]["model_type"] = "gemma"
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedArchitecture, match="'gemma' language model"):
        load_model(path, torch.float32, "cpu")


def test_read_config_never_runs_checkpoint_code(tmp_path):
    marker = tmp_path / "ran"
    (tmp_path / "evil.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    (tmp_path / "config.json").write_text(
        json.dumps({"model_type": "evil-arch", "auto_map": {"AutoConfig": "evil.EvilConfig"}})
    )
    with pytest.raises(ValueError, match="trust_remote_code"):
        read_config(tmp_path)
    assert not marker.exists()


def test_bfloat16_load_keeps_rope_cache_float32(ckpt):
    model = load_model(ckpt, "bfloat16", "cpu")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert not any(p.requires_grad for p in model.parameters())
    cache = model.language_model.cos_sin_cache
    assert cache.dtype == torch.float32 and cache.shape == (2048, model.head_dim)
    ids = torch.tensor([1, 2, 3])
    assert model.compute_logits(model.embed_tokens(ids)).dtype == torch.float32


def test_sliding_window_beyond_max_model_len_is_refused(tmp_path):
    from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration, MistralConfig

    text = MistralConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        vocab_size=64,
        max_position_embeddings=256,
        sliding_window=32,
    )
    vision = CLIPVisionConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=16, patch_size=8
    )
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_id=63)
    LlavaForConditionalGeneration(cfg).save_pretrained(tmp_path)
    with pytest.raises(UnsupportedArchitecture, match=r"sliding-window.*max_model_len<=32"):
        load_model(tmp_path, torch.float32, "cpu")
    model = load_model(tmp_path, torch.float32, "cpu", max_model_len=32)
    assert model.sliding_window == 32
