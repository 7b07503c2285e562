"""Memory estimates from checkpoint headers, and placement for sequential / parallel / auto."""

import json

import pytest
import torch
from safetensors.torch import save_file

from modelyard.engine.memory import activation_bytes, kv_bytes_per_token
from modelyard.orchestration.planning.memory import GIB, MemoryEstimate, PlannerConfig, estimate_memory, weights_bytes
from modelyard.orchestration.planning.planner import ModelDemand, PlanError, plan


@pytest.fixture
def ckpt(tmp_path):
    cfg = {
        "text_config": {
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "hidden_size": 64,
            "intermediate_size": 128,
            "vocab_size": 1000,
        }
    }
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    save_file(
        {"w": torch.zeros(100, 10, dtype=torch.float32), "ids": torch.zeros(7, dtype=torch.int64)},
        str(tmp_path / "model-00001-of-00002.safetensors"),
    )
    save_file({"v": torch.zeros(50, dtype=torch.bfloat16)}, str(tmp_path / "model-00002-of-00002.safetensors"))
    return tmp_path


def test_weights_bytes_reads_headers_and_converts_floats(ckpt):
    assert weights_bytes(ckpt, None) == 1000 * 4 + 7 * 8 + 50 * 2
    assert weights_bytes(ckpt, "bfloat16") == 1000 * 2 + 7 * 8 + 50 * 2  # ints keep their width


def test_kv_per_token_uses_gqa_heads():
    cfg = {
        "text_config": {
            "num_hidden_layers": 32,
            "num_attention_heads": 32,
            "num_key_value_heads": 8,
            "hidden_size": 4096,
        }
    }
    assert kv_bytes_per_token(cfg["text_config"], 2) == 2 * 32 * 8 * 128 * 2


def test_estimate_components(ckpt):
    c = PlannerConfig(kv_tokens_per_seq=100, max_kv_seqs=4, context_bytes=5)
    e = estimate_memory(ckpt, {"max_batch_size": 2, "max_prefill_tokens": 512}, on_gpu=True, cfg=c)
    text = json.loads((ckpt / "config.json").read_text())["text_config"]
    assert e.weights_bytes == 2156
    assert e.kv_bytes == 2 * 100 * kv_bytes_per_token(text, 2)
    # the engine's own activation estimate for these options: 512 tokens of one layer's tensors + logits
    act = activation_bytes(text, None, max_prefill_tokens=512, max_batch_size=2, max_image_batch=8, itemsize=2)
    assert act == 2 * (512 * (4 * 64 + (4 + 4) * 16 + 4 * 16 + 3 * 128) * 2 + 2 * 1000 * 4 + 512 * 24)
    assert e.activation_bytes == act and e.context_bytes == 5
    assert e.total_bytes == e.weights_bytes + e.kv_bytes + act + 5
    assert estimate_memory(ckpt, {"gpu_memory_budget_gib": 3}).total_bytes == 3 * GIB
    assert estimate_memory(ckpt / "nope").source == "unknown"


def test_fp8_kv_cache_estimate_takes_one_byte_per_element(ckpt):
    c = PlannerConfig(kv_tokens_per_seq=100, max_kv_seqs=4, context_bytes=5)
    per_token_fp8 = kv_bytes_per_token(json.loads((ckpt / "config.json").read_text())["text_config"], 1)
    for dtype, width in (("bfloat16", 2), ("float32", 4)):
        base = estimate_memory(ckpt, {"max_batch_size": 2, "dtype": dtype}, cfg=c)
        for name in ("fp8", "fp8_e4m3"):
            fp8 = estimate_memory(ckpt, {"max_batch_size": 2, "dtype": dtype, "kv_cache_dtype": name}, cfg=c)
            assert fp8.kv_bytes == 2 * 100 * per_token_fp8 == base.kv_bytes // width
            assert fp8.weights_bytes == base.weights_bytes  # the weights keep the model dtype
    auto = estimate_memory(ckpt, {"max_batch_size": 2, "kv_cache_dtype": "auto"}, cfg=c)
    assert auto.kv_bytes == estimate_memory(ckpt, {"max_batch_size": 2}, cfg=c).kv_bytes


def _d(name, gib, replicas=1, gpus=None):
    return ModelDemand(name, replicas, gpus, MemoryEstimate(int(gib * GIB), 0, 0, 0))


def test_sequential_one_model_per_wave():
    p = plan([_d("a", 30), _d("b", 60, replicas=2)], "sequential", num_gpus=2, gpu_memory_bytes=80 * GIB)
    assert [[(x.model, x.replica) for x in w] for w in p.waves] == [[("a", 0)], [("b", 0), ("b", 1)]]
    a = p.waves[0][0]
    assert a.num_gpus == 1.0 and a.gpu_memory_budget_gib is None  # alone: the whole GPU, engine-sized KV
    assert [x.num_gpus for x in p.waves[1]] == [1.0, 1.0]  # > half a GPU: the whole GPU
    assert {x.gpu_slot for x in p.waves[1]} == {0, 1}


def test_parallel_packs_fractions_and_fails_clearly():
    p = plan([_d("a", 30), _d("b", 30), _d("c", 70)], "parallel", num_gpus=2, gpu_memory_bytes=80 * GIB)
    (wave,) = p.waves
    slots = {x.model: x.gpu_slot for x in wave}
    assert slots["a"] == slots["b"] != slots["c"]
    assert [x.model for x in wave] == ["a", "b", "c"]
    with pytest.raises(PlanError, match="mode='auto'"):
        plan([_d("a", 50), _d("b", 50), _d("c", 50)], "parallel", num_gpus=2, gpu_memory_bytes=80 * GIB)
    with pytest.raises(PlanError, match="more than one GPU"):
        plan([_d("a", 90)], "parallel", num_gpus=4, gpu_memory_bytes=80 * GIB)


def test_auto_waves_of_what_fits():
    ds = [_d("a", 50), _d("b", 50), _d("c", 50), _d("d", 20)]
    p = plan(ds, "auto", num_gpus=2, gpu_memory_bytes=80 * GIB)
    assert len(p.waves) == 2
    placed = sorted(x.model for w in p.waves for x in w)
    assert placed == ["a", "b", "c", "d"]
    for w in p.waves:
        per_slot = {}
        for x in w:
            per_slot[x.gpu_slot] = per_slot.get(x.gpu_slot, 0) + x.num_gpus
        assert all(v <= 1.0 + 1e-9 for v in per_slot.values())


def test_explicit_gpus_unknown_size_and_cpu():
    p = plan(
        [_d("a", 1, gpus=0.25), ModelDemand("hub", 1, None, MemoryEstimate(0, 0, 0, 0, "unknown"))],
        "parallel",
        num_gpus=2,
        gpu_memory_bytes=80 * GIB,
    )
    assert [x.num_gpus for x in p.waves[0]] == [0.25, 1.0]
    assert p.waves[0][0].gpu_memory_budget_gib == 20.0  # a shared GPU always comes with a budget
    p = plan(
        [_d("a", 1, gpus=0.25), ModelDemand("hub", 1, None, MemoryEstimate(0, 0, 0, 0, "unknown"))],
        "auto",
        num_gpus=1,
        gpu_memory_bytes=80 * GIB,
    )
    assert len(p.waves) == 2 and any("size unknown" in n for n in p.notes)
    cpu = plan([_d("a", 1), _d("b", 1, replicas=2)], "parallel", num_gpus=0, gpu_memory_bytes=None)
    assert len(cpu.waves) == 1 and all(x.num_gpus == 0 for x in cpu.waves[0]) and len(cpu.waves[0]) == 3
    assert len(plan([_d("a", 1), _d("b", 1)], "sequential", 0, None).waves) == 2
    assert "wave 1" in cpu.describe()


def test_shared_gpu_memory_is_handed_out_in_proportion():
    p = plan([_d("a", 10), _d("b", 30)], "parallel", num_gpus=1, gpu_memory_bytes=80 * GIB)
    a, b = p.waves[0]
    assert (a.num_gpus, b.num_gpus) == (pytest.approx(0.25), pytest.approx(0.74))
    assert a.gpu_memory_budget_gib == pytest.approx(20.0) and b.gpu_memory_budget_gib == pytest.approx(59.2)
    # parallel spreads models over the GPUs before sharing one
    p = plan([_d("a", 10), _d("b", 10), _d("c", 10)], "parallel", num_gpus=2, gpu_memory_bytes=80 * GIB)
    assert sorted(x.gpu_slot for x in p.waves[0]) == [0, 0, 1]
    # explicit shares are kept as given; the others fill what is left
    p = plan([_d("a", 10, gpus=0.5), _d("b", 10), _d("c", 10)], "parallel", num_gpus=1, gpu_memory_bytes=80 * GIB)
    fr = {x.model: x.num_gpus for x in p.waves[0]}
    assert fr["a"] == 0.5 and fr["b"] == fr["c"] == pytest.approx(0.25) and sum(fr.values()) <= 1.0


def test_gpu_actors_reserve_cpus_for_decoding_without_starving_gpus():
    from modelyard.orchestration.running.job import PREP_CPUS, gpu_actor_cpus

    assert gpu_actor_cpus({"CPU": 16, "GPU": 1}) == PREP_CPUS == 4
    assert gpu_actor_cpus({"CPU": 128, "GPU": 8}) == 4
    assert gpu_actor_cpus({"CPU": 12, "GPU": 8}) == 1  # one CPU per GPU is all there is
    assert gpu_actor_cpus({"CPU": 4, "GPU": 8}) is None  # fewer CPUs than GPUs: reserve none
    assert gpu_actor_cpus({"CPU": 4}) is None
