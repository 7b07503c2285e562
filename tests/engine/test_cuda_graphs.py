"""Decode CUDA graphs (bucketing, padded static inputs, capture/replay), the automatic attention
choice, and the engine's GPU-path features that run on the CPU (stats, overlapped preprocessing).

CPU: bucket selection, the host staging of a padded decode step, padding rows never reaching the
KV pool, the `auto` rules, and generate() with preprocessing threads against serial adds.
CUDA (skipped without a GPU): graph decode token-exact against eager decode in float32, padding
rows leave the KV pool untouched on replay, and `auto` picks the kernels and captures graphs.
"""

from __future__ import annotations

import json

import pytest
import torch

from modelyard.engine import Engine, EngineConfig, Request, SamplingParams, attention, ops
from modelyard.engine.cuda_graphs import PAD_SLOT, DecodeGraphs, DecodeStaging, graph_batch_sizes, pick_bucket
from modelyard.engine.images import load_images
from modelyard.engine.scheduler import ScheduledSeq
from modelyard.testing import make_checkpoint, make_images

requires_cuda = pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="needs a CUDA GPU: graphs capture CUDA kernels (the CPU tests above cover the host-side logic)",
)


def _span(seq_id, token, pos, table):
    return ScheduledSeq(
        seq_id=seq_id, token_ids=(token,), start_pos=pos, num_prompt_tokens=1, block_table=tuple(table), sample=True
    )


@pytest.fixture(scope="module")
def ckpt64(tmp_path_factory):
    """The tiny llava checkpoint with one 64-wide attention head: same weight shapes, but a head
    size the csrc decode kernel is built for (the stock tiny model's 16 is not)."""
    path = make_checkpoint("llava", tmp_path_factory.mktemp("ckpt64") / "llava", size="tiny", seed=3)
    cfg_path = path / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["text_config"].update(num_attention_heads=1, num_key_value_heads=1, head_dim=64)
    cfg_path.write_text(json.dumps(cfg))
    return path


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return make_images(tmp_path_factory.mktemp("imgs"), 6, seed=5)


def _requests(images, n, max_new=12, bad=None):
    prompts = [
        "Describe the image.",
        "What is here?",
        "List colors, shapes and anything else in view.",
        "One word.",
        "Caption it.",
        "Count the objects.",
    ]
    reqs = [
        Request(
            image=str(images[i % len(images)]),
            prompt=prompts[i % len(prompts)],
            sampling=SamplingParams(max_new_tokens=max_new + i, ignore_eos=True),
        )
        for i in range(n)
    ]
    if bad is not None:
        reqs[bad] = Request(image=b"not an image", prompt="x", sampling=SamplingParams(max_new_tokens=4))
    return reqs


# ---- buckets and staging (CPU) ---------------------------------------------------------------------


def test_batch_sizes_and_bucket_choice():
    assert graph_batch_sizes(1) == (1,)
    assert graph_batch_sizes(5) == (1, 2, 4, 5)
    assert graph_batch_sizes(64) == (1, 2, 4, 8, 16, 32, 48, 64)
    assert graph_batch_sizes(100)[-3:] == (80, 96, 100)
    sizes = graph_batch_sizes(64)
    assert [pick_bucket(n, sizes) for n in (1, 3, 8, 9, 17, 63, 64)] == [1, 4, 8, 16, 32, 64, 64]
    assert pick_bucket(65, sizes) is None
    with pytest.raises(ValueError):
        pick_bucket(0, sizes)
    with pytest.raises(ValueError):
        graph_batch_sizes(0)


def test_staging_fills_rows_and_pads_the_rest():
    st = DecodeStaging(max_batch=8, max_blocks=4, block_size=4, pin=False)
    st.fill([_span(0, 11, 5, [7, 2]), _span(1, 12, 0, [3]), _span(2, 13, 12, [1, 4, 6, 9])], bucket=4)
    assert st.input_ids[:4].tolist() == [11, 12, 13, 0]
    assert st.positions[:4].tolist() == [5, 0, 12, 0]
    assert st.slot_mapping[:4].tolist() == [2 * 4 + 1, 3 * 4, 9 * 4, PAD_SLOT]
    assert st.seq_lens[:4].tolist() == [6, 1, 13, 0]
    assert st.block_tables[:4].tolist() == [[7, 2, 0, 0], [3, 0, 0, 0], [1, 4, 6, 9], [0, 0, 0, 0]]
    # A later, smaller step reuses the rows: nothing of the earlier occupants survives.
    st.fill([_span(5, 21, 1, [8])], bucket=2)
    assert st.block_tables[:2].tolist() == [[8, 0, 0, 0], [0, 0, 0, 0]]
    assert st.slot_mapping[:2].tolist() == [8 * 4 + 1, PAD_SLOT] and st.seq_lens[:2].tolist() == [2, 0]


def test_staging_refuses_what_a_graph_cannot_run():
    st = DecodeStaging(max_batch=4, max_blocks=2, block_size=4, pin=False)
    with pytest.raises(ValueError, match="exceed"):
        st.fill([_span(0, 1, 8, [1, 2, 3])], bucket=1)  # 9 tokens > 2 blocks of 4
    with pytest.raises(ValueError, match="one token"):
        st.fill([ScheduledSeq(0, (1, 2), 0, 2, (1,), True)], bucket=1)
    with pytest.raises(ValueError, match="do not fit"):
        st.fill([_span(i, 1, 0, [i]) for i in range(3)], bucket=2)


def test_padding_rows_write_nothing_into_the_pool():
    st = DecodeStaging(max_batch=4, max_blocks=2, block_size=2, pin=False)
    st.fill([_span(0, 1, 2, [3, 1])], bucket=4)
    k_cache, v_cache = torch.zeros(4, 2, 1, 8), torch.zeros(4, 2, 1, 8)
    k = torch.ones(4, 1, 8)
    ops.reshape_and_cache_ref(k, k, k_cache, v_cache, st.slot_mapping[:4])
    written = (k_cache != 0).any(-1).any(-1).flatten().nonzero().flatten().tolist()
    assert written == [1 * 2 + 0]  # position 2 lives in block 1, offset 0; padding nowhere


def test_graphs_refuse_cpu_and_unsafe_backends():
    from modelyard.engine.attention.sdpa import SdpaBackend

    with pytest.raises(ValueError, match="CUDA"):
        DecodeGraphs(None, None, SdpaBackend(), torch.device("cpu"), 4, 64)


# ---- the automatic attention choice ----------------------------------------------------------------


def test_auto_rules(monkeypatch):
    from modelyard.engine import kernels
    from modelyard.engine.attention import flash

    cuda, bf16 = torch.device("cuda"), torch.bfloat16
    assert attention.resolve_backend_name("auto", "cpu", head_dim=128, dtype=bf16) == "sdpa"
    monkeypatch.setattr(kernels, "enabled", lambda: True)
    monkeypatch.setattr(flash, "probe_varlen", lambda: ((object(),), ()))
    assert attention._auto(cuda, 128, bf16) == "flash"
    assert attention._auto(cuda, 128, torch.float32) == "csrc"  # FlashAttention is 16-bit only
    assert attention._auto(cuda, 16, bf16) == "sdpa"  # no csrc decode instance for 16
    assert attention._auto(cuda, 256, bf16) == "flash" and attention._auto(cuda, 256, torch.float32) == "sdpa"
    monkeypatch.setattr(flash, "probe_varlen", lambda: ((), ()))
    assert attention._auto(cuda, 128, bf16) == "csrc"
    monkeypatch.setattr(kernels, "enabled", lambda: False)
    assert attention._auto(cuda, 128, bf16) == "sdpa"


def test_cpu_engine_reports_its_paths(ckpt64, images):
    eng = Engine.from_pretrained(ckpt64, EngineConfig(device="cpu", dtype="float32", num_kv_blocks=64))
    try:
        outs = eng.generate(_requests(images, 2, max_new=3))  # 3 and 4 new tokens
        st = eng.stats()
        assert st["attention_backend"] == "sdpa" and st["cuda_graphs"] == "off: not a CUDA device"
        # One prefill samples each first token; decode then runs 2 + 2 + 1 tokens in 3 steps.
        assert (st["prefill_steps"], st["decode_steps"], st["decode_tokens"]) == (1, 3, 5)
        assert st["prefill_tokens"] == sum(o.num_prompt_tokens for o in outs)
        assert st["prefill_seconds"] > 0 and st["decode_seconds"] > 0
    finally:
        eng.close()


# ---- generate() with preprocessing threads (CPU) ---------------------------------------------------


def test_overlapped_generate_matches_serial(ckpt64, images, monkeypatch):
    import time

    from modelyard.engine import engine as engine_mod

    cfg = EngineConfig(device="cpu", dtype="float32", num_kv_blocks=128, max_batch_size=3, block_size=4)
    serial = Engine.from_pretrained(ckpt64, cfg)
    threaded = Engine.from_pretrained(ckpt64, cfg)
    threaded._prep_workers = 2
    # Slow preprocessing after the first two requests, so the engine must step while it runs.
    monkeypatch.setattr(engine_mod, "_PREP_FIRST_BATCH", 2)
    process, admit, steps_at_admit = threaded._process, threaded._admit, []

    def slow_process(req):
        if req.prompt != "Describe the image.":
            time.sleep(0.2)
        return process(req)

    def recording_admit(*args):
        steps_at_admit.append(threaded.stats()["prefill_steps"] + threaded.stats()["decode_steps"])
        return admit(*args)

    threaded._process, threaded._admit = slow_process, recording_admit
    try:
        want = serial.generate(_requests(images, 6, max_new=4, bad=2))
        got = threaded.generate(_requests(images, 6, max_new=4, bad=2))
        assert [o.token_ids for o in got] == [o.token_ids for o in want]
        assert [o.finish_reason for o in got] == [o.finish_reason for o in want]
        assert got[2].finish_reason == "error" and "image" in got[2].error
        assert steps_at_admit[0] == 0 and steps_at_admit[-1] > 0  # later requests joined a running batch
        dup = _requests(images, 2)
        dup[1].request_id = dup[0].request_id
        with pytest.raises(ValueError, match="duplicate"):
            threaded.generate(dup)
        assert not threaded.has_unfinished() and threaded.stats()["kv_blocks_used"] == 0
    finally:
        serial.close()
        threaded.close()


# ---- CUDA ------------------------------------------------------------------------------------------


def _eager_then_graphs(ckpt, images, max_new, check=None, **config):
    """The same 5 requests through an eager engine and a CUDA-graph one: ([outputs], [stats]).
    check(engine), if given, runs on each engine before it closes."""
    outs, stats = [], []
    for eager in (True, False):
        eng = Engine.from_pretrained(ckpt, EngineConfig(**config, enforce_eager=eager))
        try:
            outs.append(eng.generate(_requests(images, 5, max_new=max_new)))
            stats.append(eng.stats())
            if check is not None:
                check(eng)
        finally:
            eng.close()
    return outs, stats


@requires_cuda
def test_graph_decode_matches_eager_float32(ckpt64, images):
    """Same tokens with and without graphs; 5 sequences run in the 8-row graph (3 padding rows)."""
    outs, stats = _eager_then_graphs(
        ckpt64, images, 16, dtype="float32", attention_backend="csrc", num_kv_blocks=256, max_batch_size=8
    )
    assert stats[0]["cuda_graphs"] == "off: enforce_eager=True"
    assert stats[1]["cuda_graphs"].startswith("on") and stats[1]["decode_steps"] > 0
    assert [o.token_ids for o in outs[1]] == [o.token_ids for o in outs[0]]


@requires_cuda
@torch.inference_mode()
def test_graph_replay_touches_only_real_slots(ckpt64):
    eng = Engine.from_pretrained(ckpt64, EngineConfig(dtype="bfloat16", num_kv_blocks=64, max_batch_size=16))
    try:
        graphs = eng.runner.graphs
        assert graphs is not None, eng.stats()["cuda_graphs"]
        bs = eng.kv_cache.spec.block_size
        spans = [_span(0, 5, 3, [10]), _span(1, 6, bs + 1, [20, 21]), _span(2, 7, 0, [30])]
        before = eng.kv_cache.storage.clone()
        logits = graphs.run(spans)  # bucket 4: one padding row
        torch.cuda.synchronize()
        assert logits.shape == (3, eng.model.vocab_size) and torch.isfinite(logits).all()
        changed = (eng.kv_cache.storage != before).flatten(4).any(-1)  # [L, 2, NB, BS]
        touched = {(b, o) for b, o in changed.any(0).any(0).nonzero().tolist()}
        assert touched <= {(10, 3), (21, 1), (30, 0)} and (10, 3) in touched
    finally:
        eng.close()


@requires_cuda
def test_auto_uses_kernels_and_graphs_in_bf16(ckpt64, images):
    eng = Engine.from_pretrained(ckpt64, EngineConfig(dtype="bfloat16", num_kv_blocks=256, max_batch_size=4))
    try:
        outs = eng.generate(_requests(images, 6, max_new=8))
        st = eng.stats()
        assert st["attention_backend"] in ("flash", "csrc") and st["decode_attention"] == "csrc paged split-KV"
        assert st["cuda_graphs"].startswith("on") and st["attention_graph_safe"]
        assert all(o.ok and len(o.token_ids) == 8 + i for i, o in enumerate(outs))
    finally:
        eng.close()


@requires_cuda
def test_fp8_cache_engine_with_graphs(ckpt64, images):
    """bf16 model, e4m3 pool: the kernels write and read fp8 inside the captured graphs."""

    def pool_is_fp8_and_written(eng):
        assert eng.kv_cache.storage.dtype == ops.FP8_KV_DTYPE
        assert eng.kv_cache.storage.view(torch.uint8).any()

    outs, stats = _eager_then_graphs(
        ckpt64,
        images,
        10,
        check=pool_is_fp8_and_written,
        dtype="bfloat16",
        num_kv_blocks=256,
        max_batch_size=8,
        kv_cache_dtype="fp8",
        kv_cache_k_scale=0.5,
        kv_cache_v_scale=2.0,
    )
    assert all(s["kv_cache_dtype"] == "float8_e4m3fn" for s in stats)
    assert stats[1]["cuda_graphs"].startswith("on") and stats[1]["decode_steps"] > 0
    for eager_outs, graph_outs in zip(*outs):
        assert eager_outs.ok and graph_outs.ok and len(graph_outs.token_ids) == len(eager_outs.token_ids)
        assert graph_outs.token_ids[0] == eager_outs.token_ids[0]  # from the same prefill


@requires_cuda
def test_fp8_quantized_engine_with_graphs(ckpt64, images):
    """quantization="fp8": e4m3 GEMMs (torch._scaled_mm) and the csrc activation quantizer inside the
    captured decode graphs run, and agree with eager decode on the prefill's token (later tokens may
    differ: the GEMM's kernel choice depends on the padded batch size, and bf16 sums in another order)."""
    outs, stats = _eager_then_graphs(
        ckpt64, images, 10, dtype="bfloat16", num_kv_blocks=256, max_batch_size=8, quantization="fp8"
    )
    assert all(s["quantization"] == "fp8" for s in stats)
    assert stats[1]["cuda_graphs"].startswith("on") and stats[1]["decode_steps"] > 0
    for eager_outs, graph_outs in zip(*outs):
        assert eager_outs.ok and graph_outs.ok and len(graph_outs.token_ids) == len(eager_outs.token_ids)
        assert graph_outs.token_ids[0] == eager_outs.token_ids[0]


@requires_cuda
def test_fp8_quantization_refuses_float16(ckpt64):
    with pytest.raises(ValueError, match="bfloat16"):
        Engine.from_pretrained(ckpt64, EngineConfig(dtype="float16", quantization="fp8", num_kv_blocks=64))


def test_prefetch_bounds_requests_prepared_ahead():
    """admit_overlapped never holds more than `lookahead` prepared-but-unadmitted requests, and
    admits every request in order."""
    import threading

    from modelyard.engine.prefetch import admit_overlapped

    lock = threading.Lock()
    started, admitted, worst = [0], [], [0]

    def prepare(req):
        with lock:
            started[0] += 1
            worst[0] = max(worst[0], started[0] - len(admitted))
        return req * 10, None

    admit_overlapped(
        list(range(40)),
        prepare=prepare,
        admit=lambda req, value, err: admitted.append(value),
        step=lambda: [],
        has_unfinished=lambda: False,
        collect=lambda outs: None,
        workers=3,
        first_batch=2,
        lookahead=5,
    )
    assert admitted == [i * 10 for i in range(40)]
    assert 1 <= worst[0] <= 5
    with pytest.raises(ValueError, match="lookahead"):
        admit_overlapped(
            [1],
            prepare=prepare,
            admit=lambda *a: None,
            step=lambda: [],
            has_unfinished=lambda: False,
            collect=lambda outs: None,
            workers=1,
            first_batch=4,
            lookahead=2,
        )


def test_pixels_held_in_the_model_dtype(ckpt64, images):
    """The processor's float32 pixels are cast once, on admission, to what the vision tower runs in."""
    eng = Engine.from_pretrained(ckpt64, EngineConfig(device="cpu", dtype="bfloat16", num_kv_blocks=64))
    try:
        processed = eng._process(_requests(images, 1)[0])
        assert processed.pixel_values.dtype == torch.bfloat16 and not processed.pixel_values.is_pinned()
        raw = eng.processor("Describe the image.", load_images(str(images[0])))
        assert torch.equal(processed.pixel_values, raw.pixel_values.to(torch.bfloat16))
    finally:
        eng.close()


@requires_cuda
def test_pixels_pinned_on_cuda(ckpt64, images):
    eng = Engine.from_pretrained(ckpt64, EngineConfig(dtype="bfloat16", num_kv_blocks=64))
    try:
        processed = eng._process(_requests(images, 1)[0])
        assert processed.pixel_values.dtype == torch.bfloat16 and processed.pixel_values.is_pinned()
    finally:
        eng.close()
