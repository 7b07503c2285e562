"""Engine API behaviour: step loop, stats, seeded sampling, multi-image and text-only, host memory."""

import dataclasses
import gc

import psutil
import pytest
import torch
from hf_reference import hf_greedy
from PIL import Image

from modelyard import testing
from modelyard.engine import Engine, EngineConfig, Output, Request, SamplingParams

CPU = dict(device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("api")
    path = testing.make_checkpoint("llava", root / "llava")
    images = testing.make_images(root / "imgs", 6, seed=4)
    eng = Engine.from_pretrained(path, EngineConfig(**CPU, num_kv_blocks=256, block_size=8))
    yield {"path": path, "images": images, "eng": eng}
    eng.close()


def test_step_loop_outputs_and_stats(env):
    eng = env["eng"]
    sp = SamplingParams(max_new_tokens=5, ignore_eos=True)
    ids = [eng.add_request(Request(image=img, prompt="Describe.", sampling=sp)) for img in env["images"][:3]]
    st = eng.stats()
    assert st["waiting"] == 3 and st["running"] == 0
    outs: list[Output] = []
    while eng.has_unfinished():
        outs += eng.step()
        st = eng.stats()
        assert st["running"] + st["waiting"] + len(outs) == 3
    assert sorted(o.request_id for o in outs) == sorted(ids)
    for o in outs:
        assert o.ok and o.finish_reason == "length" and len(o.token_ids) == 5
        assert o.num_image_tokens == 16 and o.num_prompt_tokens > 16
        assert set(o.timings) >= {"queue", "prefill", "decode"} and all(v >= 0 for v in o.timings.values())
    st = eng.stats()
    for key in (
        "kv_blocks_total",
        "kv_blocks_used",
        "running",
        "waiting",
        "preemptions",
        "weights_bytes",
        "kv_bytes",
        "num_requests_finished",
    ):
        assert key in st
    assert st["kv_blocks_total"] == 256 and st["kv_blocks_used"] == 0
    assert st["kv_bytes"] == 256 * 8 * 2 * 2 * 4 * 16 * 4  # blocks*bs*(K,V)*layers*heads*dim*fp32
    assert st["weights_bytes"] > 0
    assert 0 < st["load_seconds"] < 60 and 0 <= st["kv_alloc_seconds"] < st["load_seconds"] + 60
    with pytest.raises(ValueError, match="in flight"):
        r = Request(image=env["images"][0], sampling=sp)
        eng.add_request(r)
        eng.add_request(r)
    eng.generate([])
    while eng.has_unfinished():
        eng.step()


def test_stop_on_eos_unless_ignored(env, monkeypatch):
    eng = env["eng"]
    req = dict(image=env["images"][1], prompt="Describe.")
    full = eng.generate([Request(**req, sampling=SamplingParams(max_new_tokens=12, ignore_eos=True))])[0]
    # Random weights rarely say eos on their own: declare the 5th greedy token an eos id instead.
    eos = full.token_ids[4]
    cut = full.token_ids.index(eos) + 1
    monkeypatch.setattr(
        eng.scheduler, "config", dataclasses.replace(eng.scheduler.config, eos_token_ids=frozenset({eos}))
    )
    stopped, ignored = eng.generate(
        [
            Request(**req, sampling=SamplingParams(max_new_tokens=12)),
            Request(**req, sampling=SamplingParams(max_new_tokens=12, ignore_eos=True)),
        ]
    )
    assert stopped.finish_reason == "stop" and stopped.token_ids == full.token_ids[:cut]
    assert ignored.finish_reason == "length" and ignored.token_ids == full.token_ids


def test_seeded_sampling_does_not_depend_on_the_batch(env):
    eng = env["eng"]
    sp = SamplingParams(max_new_tokens=16, temperature=0.9, top_p=0.9, top_k=50, seed=1234, ignore_eos=True)
    target = dict(image=env["images"][2], prompt="Write a short caption.", sampling=sp)
    alone = eng.generate([Request(**target)])[0].token_ids
    others = [
        Request(
            image=img,
            prompt=f"Describe {i}.",
            sampling=SamplingParams(max_new_tokens=10 + i, temperature=0.5 * i, seed=i, ignore_eos=True),
        )
        for i, img in enumerate(env["images"])
    ]
    batch = eng.generate(others[:3] + [Request(**target)] + others[3:])
    assert batch[3].token_ids == alone
    small = Engine.from_pretrained(
        env["path"],
        EngineConfig(**CPU, num_kv_blocks=24, block_size=4, max_prefill_tokens=32, reserve_decode_blocks=False),
    )
    outs = small.generate(others[:2] + [Request(**target)] + others[2:])
    assert small.stats()["preemptions"] > 0
    assert outs[2].token_ids == alone
    small.close()
    reseeded = eng.generate(
        [
            Request(
                **dict(
                    target,
                    sampling=SamplingParams(
                        max_new_tokens=16, temperature=0.9, top_p=0.9, top_k=50, seed=4321, ignore_eos=True
                    ),
                )
            )
        ]
    )[0]
    assert reseeded.token_ids != alone


def test_several_images_and_text_only_match_transformers(env):
    eng = env["eng"]
    sp = SamplingParams(max_new_tokens=12, ignore_eos=True)
    pair = [Image.open(env["images"][0]).convert("RGB"), Image.open(env["images"][1]).convert("RGB")]
    outs = eng.generate(
        [
            Request(image=[env["images"][0], env["images"][1]], prompt="Compare.", sampling=sp),
            Request(image=None, prompt="Tell me a story.", sampling=sp),
        ]
    )
    assert outs[0].num_image_tokens == 32 and outs[1].num_image_tokens == 0
    want = hf_greedy(env["path"], [(pair, "Compare."), (None, "Tell me a story.")], 12)
    assert outs[0].token_ids == want[0]
    assert outs[1].token_ids == want[1]


def test_config_checks_and_backend_dispatch(env):
    with pytest.raises(ValueError, match="max_position_embeddings"):
        Engine.from_pretrained(env["path"], EngineConfig(**CPU, max_model_len=10**6))
    from modelyard.engine.hf_engine import HFEngine

    hf = Engine.from_pretrained(env["path"], EngineConfig(**CPU, backend="transformers"))
    assert isinstance(hf, HFEngine)
    hf.close()
    eng = Engine.from_pretrained(env["path"], EngineConfig(**CPU, num_kv_blocks=8))
    eng.close()
    with pytest.raises(RuntimeError, match="closed"):
        eng.add_request(Request(image=env["images"][0]))


def test_unknown_options_are_type_errors_naming_them():
    """A dict with an option EngineConfig lacks (a typo, or one of a removed feature) fails as the
    constructor does, naming it."""
    with pytest.raises(TypeError, match="no_such_option"):
        EngineConfig(no_such_option=True)
    with pytest.raises(TypeError, match=r"unknown engine options: \['no_such_option'\]"):
        EngineConfig.from_dict({"no_such_option": True, "max_batch_size": 8})


def test_host_memory_stays_flat_over_300_requests(env):
    eng = env["eng"]
    sp = SamplingParams(max_new_tokens=2, ignore_eos=True)
    raw = [p.read_bytes() for p in env["images"]]
    proc = psutil.Process()

    def request(i):
        k = i % len(raw)
        src = [env["images"][k], raw[k], Image.open(env["images"][k])][i % 3]
        return Request(image=src, prompt="Describe the image." + " More." * (i % 5), sampling=sp)

    rss = []
    for wave in range(6):
        outs = eng.generate([request(wave * 50 + i) for i in range(50)])
        assert all(o.ok and len(o.token_ids) == 2 for o in outs)
        del outs
        gc.collect()
        rss.append(proc.memory_info().rss)
    assert rss[-1] <= rss[0] * 1.10, [r / 2**20 for r in rss]
    assert not eng._entries and eng.stats()["image_features_held"] == 0
    assert eng.stats()["kv_blocks_used"] == 0 and not eng.has_unfinished()


def test_unset_batch_and_prefill_budgets_follow_the_device():
    from modelyard.engine.kv_cache import GIB, estimate_activation_bytes, with_device_budgets

    llama7b = {
        "text_config": {
            "hidden_size": 4096,
            "intermediate_size": 11008,
            "vocab_size": 32064,
            "num_attention_heads": 32,
            "num_key_value_heads": 32,
            "num_hidden_layers": 32,
        }
    }
    weights = 14 * GIB
    cpu = with_device_budgets(EngineConfig(), llama7b, torch.device("cpu"), torch.float32, weights)
    assert (cpu.max_batch_size, cpu.max_prefill_tokens) == (64, 8192)
    # a GPU with room: the benchmarks' configuration
    big = with_device_budgets(
        EngineConfig(gpu_memory_budget_gib=70), llama7b, torch.device("cuda"), torch.bfloat16, weights
    )
    assert (big.max_batch_size, big.max_prefill_tokens) == (256, 16384)
    # 24 GB for a 7B model: the prefill budget shrinks until its activations take <= 1/4 of the 10 GiB left
    small = with_device_budgets(
        EngineConfig(gpu_memory_budget_gib=24), llama7b, torch.device("cuda"), torch.bfloat16, weights
    )
    assert small.max_batch_size == 256 and small.max_prefill_tokens < 16384
    assert estimate_activation_bytes(llama7b, small, torch.bfloat16) <= 0.25 * 10 * GIB
    assert (
        estimate_activation_bytes(
            llama7b, small.replace(max_prefill_tokens=2 * small.max_prefill_tokens), torch.bfloat16
        )
        > 0.25 * 10 * GIB
    )
    # what the user sets stays
    mine = with_device_budgets(
        EngineConfig(gpu_memory_budget_gib=24, max_batch_size=8, max_prefill_tokens=512),
        llama7b,
        torch.device("cuda"),
        torch.bfloat16,
        weights,
    )
    assert (mine.max_batch_size, mine.max_prefill_tokens) == (8, 512)
