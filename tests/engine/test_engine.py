"""The native engine against transformers generate: greedy tokens must be identical (float32, CPU)."""

import math

import pytest
from hf_reference import hf_greedy

from modelyard import testing
from modelyard.engine import Engine, EngineConfig, Request, SamplingParams
from modelyard.engine.images import load_images
from modelyard.engine.processor import Processor

ARCHS = ("llava", "llava-qwen2")
NEW = 32


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("engine")
    images = testing.make_images(root / "imgs", 8, seed=11)  # varied sizes and aspect ratios
    prompts = [p + " Please answer carefully." * (i % 4) for i, p in enumerate(testing.random_prompts(8, seed=2))]
    data = {"root": root, "images": images, "prompts": prompts}
    for arch in ARCHS:
        path = testing.make_checkpoint(arch, root / arch)
        data[arch] = {"path": path, "ref": hf_greedy(path, list(zip(images, prompts)), NEW)}
    return data


def _requests(env, idx=range(8), **sp):
    sampling = SamplingParams(**{"max_new_tokens": NEW, "ignore_eos": True, **sp})
    return [Request(image=env["images"][i], prompt=env["prompts"][i], sampling=sampling) for i in idx]


def _small_pool_config(**kw):
    return EngineConfig(
        device="cpu", dtype="float32", block_size=4, max_prefill_tokens=64, max_batch_size=6, max_image_batch=3, **kw
    )


def _preempting_pool(env, arch) -> int:
    """KV blocks (of 4) for two or three of the requests at once, not eight: running ones outgrow it
    when admission does not reserve their growth (reserve_decode_blocks=False)."""
    proc = Processor.from_pretrained(env[arch]["path"])
    longest = max(len(proc(p, load_images(i)).input_ids) for i, p in zip(env["images"], env["prompts"]))
    return math.ceil((longest + NEW) / 4) * 2


def _instrument(eng, monkeypatch):
    log = {"steps": [], "image_batches": []}
    schedule, encode = eng.scheduler.schedule, eng.model.encode_images

    def schedule_and_record():
        out = schedule()
        log["steps"].append((out.is_prefill, out.num_tokens, len(eng.scheduler.running), out))
        return out

    def encode_and_record(pixels):
        log["image_batches"].append(pixels.shape[0])
        return encode(pixels)

    monkeypatch.setattr(eng.scheduler, "schedule", schedule_and_record)
    monkeypatch.setattr(eng.model, "encode_images", encode_and_record)
    return log


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_tokens_match_transformers(env, arch, monkeypatch):
    cfg = EngineConfig(device="cpu", dtype="float32", max_image_batch=3)
    eng = Engine.from_pretrained(env[arch]["path"], cfg)
    log = _instrument(eng, monkeypatch)
    outs = eng.generate(_requests(env))
    assert [o.token_ids for o in outs] == env[arch]["ref"]
    # All eight admitted in one prefill step; their images went through the tower together.
    assert log["steps"][0][0] and len(log["steps"][0][3].seqs) == 8
    assert log["image_batches"] == [3, 3, 2]
    assert all(o.finish_reason == "length" and o.error is None for o in outs)
    assert all(o.num_image_tokens == eng.model.num_image_tokens() for o in outs)
    assert len({o.num_prompt_tokens for o in outs}) > 3
    assert outs[0].text == eng.processor.decode(outs[0].token_ids)
    st = eng.stats()
    assert st["kv_blocks_used"] == 0 and st["preemptions"] == 0 and st["num_requests_finished"] == 8
    eng.close()


@pytest.mark.parametrize("arch", ARCHS)
def test_preemption_chunking_and_budgets_keep_tokens_exact(env, arch, monkeypatch):
    ref = env[arch]["ref"]
    num_blocks = _preempting_pool(env, arch)
    cfg = _small_pool_config(num_kv_blocks=num_blocks, reserve_decode_blocks=False)  # so that it preempts
    eng = Engine.from_pretrained(env[arch]["path"], cfg)
    log = _instrument(eng, monkeypatch)
    outs = eng.generate(_requests(env))
    assert [o.token_ids for o in outs] == ref
    st = eng.stats()
    assert st["preemptions"] > 0
    assert st["kv_blocks_used"] == 0 and st["kv_blocks_total"] == num_blocks
    assert st["running"] == st["waiting"] == 0 and st["image_features_held"] == 0
    eng.scheduler.block_manager.check_invariants()
    prefill = [out for is_prefill, _, _, out in log["steps"] if is_prefill]
    assert max(out.num_tokens for out in prefill) <= cfg.max_prefill_tokens
    assert any(s.start_pos > 0 for out in prefill for s in out.seqs if s.start_pos < s.num_prompt_tokens)
    assert max(running for _, _, running, _ in log["steps"]) <= cfg.max_batch_size
    assert max(log["image_batches"]) <= cfg.max_image_batch
    assert sum(log["image_batches"]) > 8  # recomputed sequences re-encoded theirs
    eng.close()


def test_reserved_growth_runs_a_small_pool_without_preemption(env, monkeypatch):
    """The pool of the test above, admitting with the decode growth reserved (the default): fewer
    sequences at once, nothing recomputed, the same tokens."""
    arch = "llava"
    cfg = _small_pool_config(num_kv_blocks=_preempting_pool(env, arch))
    assert cfg.reserve_decode_blocks
    eng = Engine.from_pretrained(env[arch]["path"], cfg)
    log = _instrument(eng, monkeypatch)
    reqs = _requests(env)
    outs = eng.generate(reqs)
    assert [o.token_ids for o in outs] == env[arch]["ref"]
    assert eng.stats()["preemptions"] == 0 and eng.stats()["kv_blocks_used"] == 0
    prompt_tokens = sum(o.num_prompt_tokens for o in outs)
    assert sum(n for is_prefill, n, _, _ in log["steps"] if is_prefill) == prompt_tokens  # none recomputed
    assert log["image_batches"] and sum(log["image_batches"]) == 8  # each image encoded once
    assert max(running for _, _, running, _ in log["steps"]) >= 2
    eng.close()


def test_errors_fail_only_their_request(env, tmp_path):
    broken = {"zero": b"", "text": tmp_path / "notes.jpg", "missing": tmp_path / "missing.png"}
    broken["text"].write_text("not an image at all")
    truncated = open(env["images"][1], "rb").read()
    cfg = _small_pool_config(num_kv_blocks=48, max_model_len=512)
    eng = Engine.from_pretrained(env["llava"]["path"], cfg)
    good = _requests(env, idx=[0, 3, 5])
    sp = SamplingParams(max_new_tokens=NEW, ignore_eos=True)
    bad = [
        Request(image=broken["zero"], sampling=sp),
        Request(image=truncated[: len(truncated) // 2], sampling=sp),
        Request(image=broken["text"], sampling=sp),
        Request(image=broken["missing"], sampling=sp),
        Request(image=env["images"][0], sampling=SamplingParams(max_new_tokens=500)),  # > max_model_len
        Request(image=env["images"][0], sampling=SamplingParams(max_new_tokens=300)),
    ]  # > whole pool
    reqs = [bad[0], good[0], bad[1], bad[2], good[1], bad[3], bad[4], good[2], bad[5]]
    outs = eng.generate(reqs)
    assert [o.request_id for o in outs] == [r.request_id for r in reqs]
    by_id = {o.request_id: o for o in outs}
    for r in bad:
        o = by_id[r.request_id]
        assert o.finish_reason == "error" and o.error and o.token_ids == []
    assert "empty" in by_id[bad[0].request_id].error and "decode" in by_id[bad[1].request_id].error
    assert "not a readable image" in by_id[bad[2].request_id].error
    assert "no such file" in by_id[bad[3].request_id].error
    assert "max_model_len" in by_id[bad[4].request_id].error
    assert "whole pool" in by_id[bad[5].request_id].error
    assert [by_id[r.request_id].token_ids for r in good] == [env["llava"]["ref"][i] for i in (0, 3, 5)]
    assert eng.stats()["kv_blocks_used"] == 0 and eng.stats()["num_requests_finished"] == len(reqs)
    eng.close()


def test_image_gone_before_recompute_fails_that_request_only(env, monkeypatch):
    path = env["llava-qwen2"]["path"]
    eng = Engine.from_pretrained(
        path, _small_pool_config(num_kv_blocks=_preempting_pool(env, "llava-qwen2"), reserve_decode_blocks=False)
    )
    reqs = _requests(env, idx=range(6))
    calls = {}
    process = eng._process

    def flaky(req):
        calls[req.request_id] = calls.get(req.request_id, 0) + 1
        if calls[req.request_id] > 1:
            raise FileNotFoundError("the file was deleted")
        return process(req)

    monkeypatch.setattr(eng, "_process", flaky)
    outs = eng.generate(reqs)
    failed = [i for i, o in enumerate(outs) if o.finish_reason == "error"]
    assert eng.stats()["preemptions"] > 0 and failed
    for i, o in enumerate(outs):
        if i in failed:
            assert "recompute" in o.error and "deleted" in o.error
        else:
            assert o.token_ids == env["llava-qwen2"]["ref"][i]
    assert eng.stats()["kv_blocks_used"] == 0 and eng.stats()["image_features_held"] == 0
    eng.close()
