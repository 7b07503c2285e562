"""ModelActor's machinery in-process (no Ray): a fake engine stands in for the model, so these
check the stepping thread, the admission limit and failure handling quickly and exactly."""

import asyncio
import threading
import time

import pytest

from modelyard.actors import EngineFailed, model_actor
from modelyard.actors.model_actor import ModelActor
from modelyard.engine import Output


class FakeEngine:
    """Finishes every running request after `steps` steps; records the most it ever held."""

    def __init__(self, steps=3, fail_on_step=None):
        self.steps, self.fail_on_step = steps, fail_on_step
        self.running: dict[str, int] = {}
        self.max_running = 0
        self.step_count = 0
        self.thread_ids = set()
        self.closed = False

    def add_request(self, req):
        self.thread_ids.add(threading.get_ident())
        if req.prompt == "reject":
            raise ValueError("prompt rejected at admission")
        self.running[req.request_id] = 0
        self.max_running = max(self.max_running, len(self.running))
        return req.request_id

    def has_unfinished(self):
        return bool(self.running)

    def step(self):
        self.thread_ids.add(threading.get_ident())
        self.step_count += 1
        if self.step_count == self.fail_on_step:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        time.sleep(0.002)
        done = []
        for rid in list(self.running):
            self.running[rid] += 1
            if self.running[rid] >= self.steps:
                del self.running[rid]
                done.append(Output(rid, text=f"caption of {rid}", token_ids=[1, 2]))
        return done

    def stats(self):
        return {
            "running": len(self.running),
            "waiting": 0,
            "weights_bytes": 123,
            "kv_bytes": 456,
            "load_seconds": 1.5,
            "kv_alloc_seconds": 0.25,
        }

    def close(self):
        self.closed = True


def make_actor(monkeypatch, engine, limit):
    monkeypatch.setattr(model_actor, "_build_engine", lambda path, cfg: engine)
    return ModelActor("/nonexistent/fake-model", {"device": "cpu"}, max_concurrent_requests=limit)


def test_many_callers_share_the_batch_within_the_limit(monkeypatch):
    eng = FakeEngine(steps=3)
    actor = make_actor(monkeypatch, eng, limit=4)

    async def main():
        info = await actor.load()
        assert info["weights_bytes"] == 123 and info["kv_bytes"] == 456 and info["device"] is None
        assert (info["load_s"], info["kv_alloc_s"]) == (1.5, 0.25) and info["build_s"] >= 0
        outs = await asyncio.gather(*(actor.generate(f"img{i}.png", request_id=f"r{i}") for i in range(16)))
        return outs, await actor.stats()

    outs, stats = asyncio.run(main())
    import ray

    assert not ray.is_initialized()  # in-process use must not start a Ray cluster on the side
    assert [o.request_id for o in outs] == [f"r{i}" for i in range(16)]
    assert all(o.ok and o.text == f"caption of r{i}" for i, o in enumerate(outs))
    assert eng.max_running == 4 and stats["max_in_flight_seen"] == 4  # the limit was reached, never passed
    assert stats["in_flight"] == 0 and stats["queued"] == 0 and stats["completed"] == 16
    assert len(eng.thread_ids) == 1 and threading.get_ident() not in eng.thread_ids  # one stepping thread
    assert all("actor_queue" in o.timings for o in outs)


def test_admission_error_is_that_requests_output(monkeypatch):
    actor = make_actor(monkeypatch, FakeEngine(steps=1), limit=2)

    async def main():
        await actor.load()
        return await asyncio.gather(
            actor.generate("a.png", request_id="good"), actor.generate("b.png", prompt="reject", request_id="bad")
        )

    good, bad = asyncio.run(main())
    assert good.ok and not bad.ok and "rejected at admission" in bad.error
    assert actor._limiter.in_flight == 0


def test_duplicate_in_flight_request_id_is_refused(monkeypatch):
    actor = make_actor(monkeypatch, FakeEngine(steps=5), limit=2)

    async def main():
        await actor.load()
        first = asyncio.ensure_future(actor.generate("a.png", request_id="same"))
        await asyncio.sleep(0)
        with pytest.raises(ValueError, match="already in flight"):
            await actor.generate("b.png", request_id="same")
        return await first

    assert asyncio.run(main()).ok


def test_engine_step_failure_fails_in_flight_and_refuses_more(monkeypatch):
    eng = FakeEngine(steps=10, fail_on_step=3)
    actor = make_actor(monkeypatch, eng, limit=2)

    async def main():
        await actor.load()
        res = await asyncio.gather(*(actor.generate(f"{i}.png") for i in range(5)), return_exceptions=True)
        with pytest.raises(EngineFailed):
            await actor.generate("later.png")
        return res, await actor.stats()

    res, stats = asyncio.run(main())
    assert all(isinstance(r, EngineFailed) for r in res), res
    assert "illegal memory access" in str(res[0]) and stats["failed"] and stats["in_flight"] == 0


def test_shutdown_closes_the_engine(monkeypatch):
    eng = FakeEngine(steps=1)
    actor = make_actor(monkeypatch, eng, limit=2)

    async def main():
        await actor.load()
        assert (await actor.generate("a.png")).ok
        await actor.shutdown()
        for _ in range(200):
            if eng.closed:
                break
            await asyncio.sleep(0.005)

    asyncio.run(main())
    assert eng.closed
