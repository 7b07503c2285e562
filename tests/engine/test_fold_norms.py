"""Folded decoder norms (models/decoder.py, EngineConfig.fold_norms): the folded engine computes what
the unfolded one does, up to the rounding points that move; it folds only where that is safe."""
from __future__ import annotations

import pytest
import torch

from modelyard import testing
from modelyard.engine import Engine, EngineConfig, Request, SamplingParams

NEW = 6


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("fold")
    return {"llava": testing.make_checkpoint("llava", root / "llava"),
            "images": testing.make_images(root / "imgs", 3, seed=5)}


def _run(path, images, cfg: EngineConfig):
    """Greedy tokens, every step's logits and the stats."""
    eng = Engine.from_pretrained(path, cfg)
    logits = []
    compute = eng.model.compute_logits
    eng.model.compute_logits = lambda h: logits.append(compute(h).float().clone()) or logits[-1]
    sp = SamplingParams(max_new_tokens=NEW, ignore_eos=True)
    outs = eng.generate([Request(image=im, prompt=f"Describe image {i}.", sampling=sp) for i, im in enumerate(images)])
    stats = eng.stats()
    eng.close()
    return [o.token_ids for o in outs], logits, stats


def _compare(env, device):
    base = dict(device=device, dtype="float32", num_kv_blocks=64)
    tokens, logits, stats = _run(env["llava"], env["images"], EngineConfig(**base))
    ref_tokens, ref_logits, ref_stats = _run(env["llava"], env["images"], EngineConfig(**base, fold_norms=False))
    assert stats["norms_folded"] and not ref_stats["norms_folded"]
    assert tokens == ref_tokens and len(logits) == len(ref_logits) == NEW
    for a, b in zip(logits, ref_logits):
        # float32: only the summation order and the rounding of s differ
        assert (a - b).abs().max() <= 1e-4 * b.abs().max()


def test_folded_float32_engine_matches_the_unfolded_one_on_cpu(env):
    _compare(env, "cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the csrc kernels' folded norm)")
def test_folded_float32_engine_matches_the_unfolded_one_on_cuda(env):
    _compare(env, "cuda")


def test_fold_moves_the_norm_weights_into_the_projections(env):
    from modelyard.engine.loader import load_model
    model = load_model(env["llava"], torch.float32, torch.device("cpu"))
    lm = model.language_model
    layer = lm.layers[0]
    g = torch.rand(layer.input_layernorm.weight.shape) + 0.5            # not all ones, so the fold shows
    layer.input_layernorm.weight.data.copy_(g)
    w = layer.self_attn.qkv_proj.weight.detach().clone()
    assert lm.fold_norms() and lm.norms_folded and lm.fold_norms()      # once; a second call is a no-op
    assert torch.allclose(layer.self_attn.qkv_proj.weight, w * g)
    assert torch.equal(layer.input_layernorm.weight, torch.ones_like(g))
    assert layer.self_attn.o_proj.accumulates and layer.mlp.down_proj.accumulates
    assert not layer.self_attn.qkv_proj.accumulates


def test_not_folded_where_unsafe(env, tmp_path):
    from modelyard.engine.loader import load_model
    # float16: the un-normalized projections could overflow its range
    assert not load_model(env["llava"], torch.float16, torch.device("cpu")).language_model.fold_norms()
    # Qwen2's q/k/v biases would have to be added after the norm's scaling
    qwen = testing.make_checkpoint("llava-qwen2", tmp_path / "qwen")
    eng = Engine.from_pretrained(qwen, EngineConfig(device="cpu", dtype="float32", num_kv_blocks=32))
    try:
        assert eng.stats()["norms_folded"] is False
    finally:
        eng.close()
    # fp8 projections (quantization="fp8") keep their norm kernels, which write the fp8 input
    from modelyard.engine.quant import quantize_model
    model = load_model(env["llava"], torch.bfloat16, torch.device("cpu"))
    quantize_model(model, "fp8")
    assert not model.language_model.fold_norms()
