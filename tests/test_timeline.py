"""benchmarks/timeline.py: GPU idle gaps of a Chrome trace and their host attribution (synthetic
traces with known answers), and the profiler / annotation plumbing on a tiny CPU engine."""
import gzip
import importlib.util
import json
import random
from pathlib import Path

import pytest

from modelyard import testing
from modelyard.engine import Engine, EngineConfig, Request, SamplingParams

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "timeline.py"
_spec = importlib.util.spec_from_file_location("timeline", _PATH)
timeline = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(timeline)

T0 = 1_000_000.0      # an absolute clock, as in real traces: offsets must be taken from the window


def X(cat, name, start, end, tid=1):
    return {"ph": "X", "cat": cat, "name": name, "ts": T0 + start, "dur": end - start, "pid": 0, "tid": tid}


def synthetic_trace() -> dict:
    """Times in us from T0. GPU busy spans (streams 7 and 8 overlap in the first):
        [1000, 4000] k1 (s7, 1000-3000) + k2 (s8, 2500-4000)   | 0.2 ms gap
        [4200, 4300] memcpy                                     | 2.0 ms gap
        [6300, 8000] k3 (s7, 6300-7000) + k4 (s8, 7000-8000)    | 1.0 ms gap
        [9000, 9500] k5                                         | 2.5 ms gap
        [12000, 12500] k6
    window 11.5 ms, busy 5.8 ms, idle 5.7 ms."""
    ev = [
        X("kernel", "k1", 1000, 3000, tid=7), X("kernel", "k2", 2500, 4000, tid=8),
        X("gpu_memcpy", "Memcpy HtoD", 4200, 4300, tid=7),
        X("kernel", "k3", 6300, 7000, tid=7), X("kernel", "k4", 7000, 8000, tid=8),
        X("gpu_memset", "k5", 9000, 9500, tid=7), X("kernel", "k6", 12000, 12500, tid=7),
        # a GPU-side label spanning everything: not work, must not fill the gaps
        X("gpu_user_annotation", "my.engine.step", 0, 20000, tid=7),
        # host: nested my.* ranges on one thread, and a non-my range that must be ignored
        X("user_annotation", "my.engine.step", 3500, 9200),
        X("user_annotation", "my.runner.execute", 4000, 6200),
        X("user_annotation", "my.runner._pack", 4100, 5000),
        X("user_annotation", "my.runner._sample", 7500, 8600),
        X("user_annotation", "my.engine._finish", 11000, 11500),
        X("user_annotation", "other.range", 4000, 12000),
        X("cuda_runtime", "cudaMemcpyAsync", 4250, 4400),           # 0.1 ms inside gap [4300, 6300]
        X("cuda_runtime", "cudaStreamSynchronize", 5200, 6300),     # 1.1 ms inside gap [4300, 6300]
        X("cuda_runtime", "cudaStreamSynchronize", 7900, 8300),     # 0.3 ms inside gap [8000, 9000]
        X("cuda_driver", "cuLaunchKernel", 8900, 9050),             # 0.1 ms inside gap [8000, 9000]
        X("cpu_op", "aten::to", 5000, 6350),                        # 1.3 ms
        X("cpu_op", "aten::copy_", 5100, 6300),                     # 1.2 ms, nested in aten::to
        {"ph": "M", "name": "process_name", "pid": 0, "tid": 0, "args": {"name": "python"}},
        {"ph": "s", "cat": "ac2g", "name": "ac2g", "id": 1, "pid": 0, "tid": 1, "ts": T0 + 4250},
        {"ph": "i", "cat": "cpu_instant_event", "name": "x", "pid": 0, "tid": 1, "ts": T0 + 5000},
    ]
    random.Random(0).shuffle(ev)        # the export's event order is not to be relied on
    return {"traceEvents": ev}


def _ms(pairs):
    return {k: pytest.approx(v) for k, v in pairs}


def test_busy_idle_and_gaps():
    a = timeline.analyze_trace(synthetic_trace(), min_gap_ms=0.5)
    assert a["gpu_events"] == 7
    assert a["window_ms"] == pytest.approx(11.5)
    assert a["busy_ms"] == pytest.approx(5.8)
    assert a["idle_ms"] == pytest.approx(5.7)
    assert a["busy_fraction"] == pytest.approx(5.8 / 11.5)
    assert a["num_gaps"] == 3 and a["gap_ms"] == pytest.approx(5.5)
    assert a["small_gap_idle_ms"] == pytest.approx(0.2)
    starts = [g["start_ms"] for g in a["gaps"]]
    lengths = [g["length_ms"] for g in a["gaps"]]
    assert starts == pytest.approx([8.5, 3.3, 7.0]) and lengths == pytest.approx([2.5, 2.0, 1.0])
    assert [(g["before"], g["after"]) for g in a["gaps"]] == [("k5", "k6"), ("Memcpy HtoD", "k3"), ("k4", "k5")]
    # the kernel table sums each name's own GPU time (overlaps included), largest first
    assert a["by_kernel"][:2] == [("k1", pytest.approx(2.0)), ("k2", pytest.approx(1.5))]
    assert dict(a["by_kernel"])["k4"] == pytest.approx(1.0) and len(a["by_kernel"]) == 7


def test_gap_attribution():
    a = timeline.analyze_trace(synthetic_trace(), min_gap_ms=0.5)
    late, mid, short = a["gaps"]
    # [9500, 12000]: outside every my.* range except _finish (11000-11500)
    assert dict(late["host"]) == _ms([("(no my.* range)", 2.0), ("my.engine._finish", 0.5)])
    assert late["runtime"] == [] and late["cpu_ops"] == []
    # [4300, 6300]: _pack innermost to 5000, then execute to 6200, then only step
    assert mid["host"] == [("my.runner.execute", pytest.approx(1.2)), ("my.runner._pack", pytest.approx(0.7)),
                           ("my.engine.step", pytest.approx(0.1))]
    assert dict(mid["runtime"]) == _ms([("cudaStreamSynchronize", 1.1), ("cudaMemcpyAsync", 0.1)])
    assert [k for k, _ in mid["runtime"]] == ["cudaStreamSynchronize", "cudaMemcpyAsync"]
    assert dict(mid["cpu_ops"]) == _ms([("aten::to", 1.3), ("aten::copy_", 1.2)])
    # [8000, 9000]: _sample to 8600, step after
    assert dict(short["host"]) == _ms([("my.runner._sample", 0.6), ("my.engine.step", 0.4)])
    assert dict(short["runtime"]) == _ms([("cudaStreamSynchronize", 0.3), ("cuLaunchKernel", 0.1)])
    # totals over all gaps add up to the gap time
    assert dict(a["by_annotation"]) == _ms([
        ("(no my.* range)", 2.0), ("my.runner.execute", 1.2), ("my.runner._pack", 0.7),
        ("my.runner._sample", 0.6), ("my.engine._finish", 0.5), ("my.engine.step", 0.5)])
    assert sum(v for _, v in a["by_annotation"]) == pytest.approx(a["gap_ms"])
    assert dict(a["by_runtime"]) == _ms([("cudaStreamSynchronize", 1.4), ("cudaMemcpyAsync", 0.1),
                                         ("cuLaunchKernel", 0.1)])


def test_threshold_and_top():
    a = timeline.analyze_trace(synthetic_trace(), min_gap_ms=0.1, top=2)
    assert a["num_gaps"] == 4 and a["small_gap_idle_ms"] == pytest.approx(0.0)
    assert [g["length_ms"] for g in a["gaps"]] == pytest.approx([2.5, 2.0])      # only the top 2 listed
    assert dict(a["by_runtime"])["cudaStreamSynchronize"] == pytest.approx(1.4)   # totals cover all 4
    # the 0.2 ms gap [4000, 4200] follows k2, which ends after the overlapping k1
    small = timeline.analyze_trace(synthetic_trace(), min_gap_ms=0.1, top=4)["gaps"][-1]
    assert (small["before"], small["after"], small["length_ms"]) == ("k2", "Memcpy HtoD", pytest.approx(0.2))
    assert dict(small["host"]) == _ms([("my.runner.execute", 0.1), ("my.runner._pack", 0.1)])
    assert timeline.analyze_trace(synthetic_trace(), min_gap_ms=3.0)["gaps"] == []


def test_report_and_cli(tmp_path, capsys):
    path = tmp_path / "t.json.gz"
    with gzip.open(path, "wt") as f:
        json.dump(synthetic_trace(), f)
    timeline.main([str(path), "--min-gap-ms", "0.5"])
    text = capsys.readouterr().out
    assert "busy 5.80 ms (50.4%)" in text and "3 gaps >= 0.5 ms" in text
    assert "my.runner.execute 1.20" in text and "cudaStreamSynchronize" in text


def test_no_gpu_activity():
    cpu_only = {"traceEvents": [X("cpu_op", "aten::mm", 0, 100), X("user_annotation", "my.engine.step", 0, 200)]}
    a = timeline.analyze_trace(cpu_only)
    assert a["gpu_events"] == 0 and a["window_ms"] == 0.0 and a["gaps"] == []
    assert "no GPU activity" in timeline.format_report(a)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("timeline")
    ckpt = testing.make_checkpoint("llava", root / "ckpt", size="tiny", seed=0)
    return ckpt, testing.make_images(root / "imgs", 1, seed=0)


def _own_attrs(eng):
    """Names of the instance attributes (their values change as the engine runs)."""
    return {k: set(vars(o)) for k, o in {"engine": eng, "scheduler": eng.scheduler, "runner": eng.runner}.items()}


def test_profile_timeline_on_cpu_marks_and_restores(tiny, tmp_path):
    ckpt, images = tiny
    eng = Engine.from_pretrained(ckpt, EngineConfig(device="cpu", dtype="float32"))
    before = _own_attrs(eng)
    sampler = eng.runner.sampler
    req = Request(image=images[0], prompt="Describe.", sampling=SamplingParams(max_new_tokens=2, ignore_eos=True))
    outs = []
    res = timeline.profile_timeline(lambda: outs.extend(eng.generate([req])), tmp_path / "t.json.gz", engine=eng)
    assert len(outs[0].token_ids) == 2 and outs[0].error is None
    assert res["gpu_events"] == 0 and res["gaps"] == [] and res["wall_ms"] > 0
    assert "no GPU activity" in timeline.format_report(res)
    names = {e.get("name") for e in timeline.load_trace(tmp_path / "t.json.gz")["traceEvents"]
             if e.get("cat") == "user_annotation"}
    expected = {"my.engine.step", "my.scheduler.schedule", "my.engine._encode_new_images", "my.runner.execute",
                "my.runner._pack", "my.runner._metadata", "my.runner._sample", "my.runner.sampler",
                "my.scheduler.update", "my.engine._finish"}
    assert expected <= names
    # the instances are as they were: no leftover attributes, the same Sampler object
    assert _own_attrs(eng) == before and eng.runner.sampler is sampler
    assert "schedule" not in vars(eng.scheduler) and "step" not in vars(eng)
    # and restored after an exception inside the block, too
    with pytest.raises(RuntimeError, match="boom"), timeline.annotate(eng):
        assert "step" in vars(eng) and eng.runner.sampler is not sampler
        raise RuntimeError("boom")
    assert _own_attrs(eng) == before and eng.runner.sampler is sampler
    eng.close()
