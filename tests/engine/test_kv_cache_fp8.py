"""The opt-in fp8 (e4m3) KV cache end to end on the CPU: config checks, pool size, and the engine's
logits against an oracle engine whose float32 cache holds K/V rounded through fp8 by hand."""

from __future__ import annotations

import math

import pytest
import torch

from modelyard import testing
from modelyard.engine import Engine, EngineConfig, Request, SamplingParams, ops
from modelyard.engine.attention.sdpa import SdpaBackend
from modelyard.engine.images import load_images
from modelyard.engine.processor import Processor

CPU = dict(device="cpu", dtype="float32")
NEW = 6


def hand_round(x: torch.Tensor, scale: float) -> torch.Tensor:
    """What an fp8 cache entry reads back as: x / scale saturated to +-448, rounded to e4m3, times scale."""
    return (x.float() / scale).clamp(-448.0, 448.0).to(torch.float8_e4m3fn).float().mul(scale).to(x.dtype)


class HandRoundedSdpa(SdpaBackend):
    """The oracle: a plain float32 cache that receives K/V already rounded through fp8, so it never
    exercises the fp8 storage, quantize_kv or any dequantize path of the engine under test."""

    def __init__(self, k_scale: float, v_scale: float):
        super().__init__()
        self.round_k, self.round_v = k_scale, v_scale

    def write_kv(self, k, v, k_cache, v_cache, meta, q=None, rotary=None):
        if rotary is not None:  # q and k are rotated in place before the write, as the engine's is
            ops.rotary_embedding_ref(rotary.positions, q, k, k.shape[-1], rotary.cos_sin_cache, rotary.is_neox)
        super().write_kv(hand_round(k, self.round_k), hand_round(v, self.round_v), k_cache, v_cache, meta)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("fp8")
    prompts = [p + " Please answer carefully." * (i % 3) for i, p in enumerate(testing.random_prompts(4, seed=1))]
    return {
        "path": testing.make_checkpoint("llava", root / "llava"),
        "images": testing.make_images(root / "imgs", 4, seed=3),
        "prompts": prompts,
    }


def _requests(env, n=3, new=NEW):
    sp = SamplingParams(max_new_tokens=new, ignore_eos=True)
    return [Request(image=env["images"][i], prompt=env["prompts"][i], sampling=sp) for i in range(n)]


def _run(env, cfg: EngineConfig, monkeypatch, attn=None, chunks=None, **requests):
    """Greedy tokens, every step's logits [S, vocab] and the stats; `attn` replaces the engine's
    backend; `chunks` (a list) collects the prefill spans that continue a cached prefix."""
    eng = Engine.from_pretrained(env["path"], cfg)
    if attn is not None:
        eng.runner.attn = attn
    if chunks is not None:
        schedule = eng.scheduler.schedule

        def record():
            out = schedule()
            chunks.extend(s for s in out.seqs if 0 < s.start_pos < s.num_prompt_tokens)
            return out

        monkeypatch.setattr(eng.scheduler, "schedule", record)
    logits = []
    compute = eng.model.compute_logits
    monkeypatch.setattr(eng.model, "compute_logits", lambda h: logits.append(compute(h).clone()) or logits[-1])
    outs = eng.generate(_requests(env, **requests))
    stats = eng.stats()
    eng.close()
    return [o.token_ids for o in outs], logits, stats


# ---- config ------------------------------------------------------------------------------------


def test_config_accepts_fp8_names_and_rejects_bad_values():
    assert EngineConfig(**CPU).resolved_kv_cache_dtype() == torch.float32  # auto: the model dtype
    assert EngineConfig(device="cpu", dtype="bfloat16").resolved_kv_cache_dtype() == torch.bfloat16
    for name in ("fp8", "fp8_e4m3"):
        cfg = EngineConfig(**CPU, kv_cache_dtype=name, kv_cache_k_scale=0.5, kv_cache_v_scale=2)
        assert cfg.kv_cache_is_fp8 and cfg.resolved_kv_cache_dtype() == torch.float8_e4m3fn
    assert EngineConfig.from_dict({"kv_cache_dtype": "fp8"}).kv_cache_is_fp8
    with pytest.raises(ValueError, match="kv_cache_dtype must be one of"):
        EngineConfig(kv_cache_dtype="fp16")
    with pytest.raises(ValueError, match="kv_cache_dtype"):
        EngineConfig(kv_cache_dtype="fp8_e5m2")  # e5m2 is not what the kernels store
    for bad in (0.0, -1.0, math.inf, math.nan, True, "1.0"):
        for name in ("kv_cache_k_scale", "kv_cache_v_scale"):
            with pytest.raises(ValueError, match=name):
                EngineConfig(kv_cache_dtype="fp8", **{name: bad})
    with pytest.raises(ValueError, match="kv_cache_v_scale=0.5 only applies to an fp8 KV cache"):
        EngineConfig(kv_cache_v_scale=0.5)  # silently ignoring it would hide a typo
    # the CUDA kernels quantize 16-bit K/V only: a float32 model is refused there (no GPU needed to ask)
    on_gpu = EngineConfig(device="cuda", dtype="bfloat16", kv_cache_dtype="fp8")
    assert on_gpu.resolved_kv_cache_dtype() == torch.float8_e4m3fn
    with pytest.raises(ValueError, match="kv_cache_dtype='fp8' on CUDA needs a float16 or bfloat16 model"):
        EngineConfig(device="cuda", dtype="float32", kv_cache_dtype="fp8").resolved_kv_cache_dtype()


def test_job_spec_names_a_bad_kv_cache_option():
    from modelyard.orchestration.spec.job import ModelSpec
    from modelyard.orchestration.spec.validation import SpecError

    with pytest.raises(SpecError, match="kv_cache_dtype"):
        ModelSpec("m", "/models/m", engine={"kv_cache_dtype": "int8"})
    with pytest.raises(SpecError, match="kv_cache_k_scale"):
        ModelSpec("m", "/models/m", engine={"kv_cache_dtype": "fp8", "kv_cache_k_scale": "big"})
    ModelSpec("m", "/models/m", engine={"kv_cache_dtype": "fp8", "kv_cache_k_scale": 2})


def test_transformers_backend_refuses_an_fp8_cache_before_loading(env, monkeypatch):
    import transformers

    monkeypatch.setattr(
        transformers.AutoModelForImageTextToText,
        "from_pretrained",
        lambda *a, **k: pytest.fail("weights loaded before the config was checked"),
    )
    with pytest.raises(ValueError, match="kv_cache_dtype='fp8'.*native engine"):
        Engine.from_pretrained(env["path"], EngineConfig(**CPU, backend="transformers", kv_cache_dtype="fp8"))


# ---- the pool ----------------------------------------------------------------------------------


def test_fp8_pool_takes_a_quarter_of_float32_and_stats_say_so(env):
    sizes = {}
    for kv in ("auto", "fp8"):
        eng = Engine.from_pretrained(
            env["path"], EngineConfig(**CPU, num_kv_blocks=32, block_size=8, kv_cache_dtype=kv)
        )
        st = eng.stats()
        sizes[kv] = (st["kv_bytes"], eng.kv_cache.spec.bytes_per_block)
        assert st["dtype"] == "torch.float32"  # the model's dtype is unchanged
        assert st["kv_cache_dtype"] == {"auto": "float32", "fp8": "float8_e4m3fn"}[kv]
        assert eng.kv_cache.storage.dtype == eng.kv_cache.layers[0][0].dtype == eng.config.resolved_kv_cache_dtype()
        assert not eng.kv_cache.storage.view(torch.uint8).any()  # zeroed: every byte 0 (+0.0)
        eng.close()
    assert sizes["fp8"][0] * 4 == sizes["auto"][0] and sizes["fp8"][1] * 4 == sizes["auto"][1]


def test_a_byte_budget_holds_four_times_the_fp8_blocks():
    from modelyard.engine.kv_cache import GIB, KVCacheSpec, plan_num_blocks

    cfg = EngineConfig(**CPU, gpu_memory_budget_gib=1.0)
    blocks = {
        dtype: plan_num_blocks(
            cfg,
            KVCacheSpec(4, 8, 128, 16, dtype),
            torch.device("cpu"),
            weights_bytes=GIB // 4,
            activation_bytes=GIB // 4,
            max_model_len=4096,
        )[0]
        for dtype in (torch.float32, torch.float8_e4m3fn)
    }
    per_fp8_block = 2 * 4 * 16 * 8 * 128  # K and V, layers, block, heads, head_dim: 1 byte
    assert blocks[torch.float8_e4m3fn] == (GIB // 2) // per_fp8_block == 4 * blocks[torch.float32]


# ---- correctness -------------------------------------------------------------------------------


@pytest.mark.parametrize("k_scale,v_scale", [(1.0, 1.0), (0.37, 1.9)])
def test_fp8_engine_equals_hand_rounded_oracle(env, monkeypatch, k_scale, v_scale):
    """Every step's logits (prefill over the rounded cache, then decode steps) equal those of an
    engine whose float32 cache holds the same values rounded by hand. Distinct, non-power-of-two
    k/v scales make a scale that is missing, applied twice or swapped between K and V show up."""
    fp8 = EngineConfig(
        **CPU, num_kv_blocks=64, block_size=8, kv_cache_dtype="fp8", kv_cache_k_scale=k_scale, kv_cache_v_scale=v_scale
    )
    tokens, logits, stats = _run(env, fp8, monkeypatch)
    assert stats["decode_steps"] == NEW - 1 and stats["kv_cache_dtype"] == "float8_e4m3fn"
    oracle_cfg = EngineConfig(**CPU, num_kv_blocks=64, block_size=8)
    ref_tokens, ref_logits, _ = _run(env, oracle_cfg, monkeypatch, attn=HandRoundedSdpa(k_scale, v_scale))
    assert tokens == ref_tokens and len(logits) == len(ref_logits) == NEW
    for step, (got, want) in enumerate(zip(logits, ref_logits)):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5, msg=f"step {step}")
    if (k_scale, v_scale) != (1.0, 1.0):  # and the scales matter: swapping them is another result
        _, swapped, _ = _run(env, oracle_cfg, monkeypatch, attn=HandRoundedSdpa(v_scale, k_scale))
        assert (swapped[0] - logits[0]).abs().max() > 1e-3
    # the fp8 rounding really happened: the first step differs from the float32 cache's ...
    _, exact, _ = _run(env, oracle_cfg, monkeypatch)
    rounding = float((exact[0] - logits[0]).abs().max())
    assert 1e-4 < rounding < 1.0
    # ... and a scale far too small saturates K and V at +-448 * scale: a much larger change,
    # still exactly what the hand-rounded oracle computes.
    tiny = fp8.replace(kv_cache_k_scale=1e-3, kv_cache_v_scale=1e-3)
    _, saturated, _ = _run(env, tiny, monkeypatch)
    _, saturated_ref, _ = _run(env, oracle_cfg, monkeypatch, attn=HandRoundedSdpa(1e-3, 1e-3))
    torch.testing.assert_close(saturated[0], saturated_ref[0], rtol=0, atol=1e-5)
    assert float((exact[0] - saturated[0]).abs().max()) > 5 * rounding


def _preempting_pool(env, n, new, block_size) -> int:
    """Blocks for two of the n requests at once: running ones outgrow it and get preempted."""
    proc = Processor.from_pretrained(env["path"])
    longest = max(len(proc(env["prompts"][i], load_images(env["images"][i])).input_ids) for i in range(n))
    return math.ceil((longest + new) / block_size) * 2


def test_chunked_prefill_and_preemption_read_the_fp8_cache_back(env, monkeypatch):
    """Chunked prefill and recompute after preemption attend over prefixes gathered from the fp8
    cache; they must give the tokens of the same fp8 engine that prefills each prompt in one go."""
    base = dict(**CPU, block_size=4, kv_cache_dtype="fp8", kv_cache_k_scale=0.37, kv_cache_v_scale=1.9)
    n, new = 4, 16
    want, _, _ = _run(env, EngineConfig(**base, num_kv_blocks=256), monkeypatch, n=n, new=new)
    small = EngineConfig(
        **base, num_kv_blocks=_preempting_pool(env, n, new, 4), max_prefill_tokens=16, reserve_decode_blocks=False
    )  # admit on current length, so that it preempts
    chunks = []
    tokens, logits, stats = _run(env, small, monkeypatch, chunks=chunks, n=n, new=new)
    assert chunks, "no prefill chunk continued a cached prefix"
    assert stats["preemptions"] > 0
    assert tokens == want
    # and step for step what the same schedule computes over a hand-rounded float32 cache
    oracle = small.replace(kv_cache_dtype="auto", kv_cache_k_scale=1.0, kv_cache_v_scale=1.0)
    ref_tokens, ref_logits, _ = _run(env, oracle, monkeypatch, attn=HandRoundedSdpa(0.37, 1.9), n=n, new=new)
    assert ref_tokens == tokens and len(ref_logits) == len(logits)
    for step, (got, ref) in enumerate(zip(logits, ref_logits)):
        torch.testing.assert_close(got, ref, rtol=0, atol=1e-5, msg=f"step {step}")
