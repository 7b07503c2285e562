"""modelyard.pipeline(): a context manager over one actor; leaving it unloads with verification."""

import gc

import pytest
from actor_testlib import ENGINE, HF_ENGINE, modelyard_actor_names, process_gone

import modelyard


def test_with_block_captions_then_nothing_is_left(ray_session, tiny_ckpt, images):
    from modelyard.engine import Engine, EngineConfig, Request, SamplingParams

    eng = Engine.from_pretrained(tiny_ckpt, EngineConfig(**HF_ENGINE))
    try:
        ref = eng.generate([Request(image=p, sampling=SamplingParams(max_new_tokens=4)) for p in images[:3]])
    finally:
        eng.close()
    with modelyard.pipeline(tiny_ckpt, num_gpus=0, max_concurrent_requests=4, **HF_ENGINE) as pipe:
        outs = pipe(images[:3], max_new_tokens=4)
        one = pipe(images[0], max_new_tokens=4)
        streamed = sorted(i for i, _ in pipe.stream(images[:3], max_new_tokens=4))
        pid, name = pipe.spawn_info["pid"], pipe.spawn_info["actor_name"]
        assert name in modelyard_actor_names()
    assert [o.token_ids for o in outs] == [o.token_ids for o in ref] and all(o.ok for o in outs)
    assert one.token_ids == outs[0].token_ids and streamed == [0, 1, 2]
    assert pipe.closed and pipe.reclaim["verified_by"] == "process-exit"
    assert modelyard_actor_names() == [] and process_gone(pid)
    assert pipe.close() is pipe.reclaim  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        pipe(images[:1])


def test_dropped_pipeline_still_kills_its_actor(ray_session, tiny_ckpt):
    pipe = modelyard.pipeline(tiny_ckpt, num_gpus=0, **ENGINE)
    pid, name = pipe.spawn_info["pid"], pipe.spawn_info["actor_name"]
    del pipe
    gc.collect()
    assert process_gone(pid, wait_s=30) and name not in modelyard_actor_names()


def test_unknown_option_is_a_clear_error(ray_session, tiny_ckpt):
    with pytest.raises(TypeError, match="unknown pipeline options"):
        modelyard.pipeline(tiny_ckpt, max_batch=3)
