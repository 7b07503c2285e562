"""Collecting actor call results on the driver: bounded in-flight windows over ray.wait (never a
ray.get per ref in a loop), and actor death turned into ActorDied naming what did not complete."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator

from .errors import ActorDied


def _death_types():
    from ray.exceptions import RayActorError  # ActorDiedError, ActorUnavailableError, ...

    return RayActorError


def _salvage(refs: list, ids: list[str]) -> tuple[dict, list[str]]:
    """After a death: outputs of refs that had finished anyway, and the ids of those that had not."""
    import ray

    death = _death_types()
    ready = set(ray.wait(refs, num_returns=len(refs), timeout=0)[0]) if refs else set()
    completed, unfinished = {}, []
    for ref, rid in zip(refs, ids):
        if ref in ready:
            try:
                completed[rid] = ray.get(ref)
                continue
            except death:
                pass
        unfinished.append(rid)
    return completed, unfinished


def get_outputs(name: str, refs: list, ids: list[str], timeout: float | None) -> list:
    import ray

    try:
        return ray.get(refs, timeout=timeout)
    except _death_types() as e:
        completed, unfinished = _salvage(refs, ids)
        raise ActorDied(name, unfinished, completed, e) from e


def iter_outputs(name: str, items: list, ids: list[str], submit: Callable, window: int) -> Iterator[tuple[int, object]]:
    """Yield (index, output) as calls finish; at most `window` calls outstanding."""
    import ray

    pending: dict = {}  # ObjectRef -> index
    completed: dict = {}  # request id -> output
    nxt = 0
    try:
        while nxt < len(items) or pending:
            while nxt < len(items) and len(pending) < window:
                pending[submit(items[nxt], ids[nxt])] = nxt
                nxt += 1
            refs = list(pending)
            ready, rest = ray.wait(refs, num_returns=1)
            if rest:  # take everything else that is already done in the same pass
                ready += ray.wait(rest, num_returns=len(rest), timeout=0)[0]
            for ref in ready:
                out = ray.get(ref)
                i = pending.pop(ref)
                completed[ids[i]] = out
                yield i, out
    except _death_types() as e:
        refs = list(pending)
        late, _ = _salvage(refs, [ids[pending[r]] for r in refs])
        completed.update(late)
        raise ActorDied(name, [rid for rid in ids if rid not in completed], completed, e) from e


async def aiter_outputs(name: str, items: list, ids: list[str], submit: Callable, window: int):
    """Async form of iter_outputs: awaits object refs on the running event loop."""
    pending: dict = {}  # asyncio future -> index
    completed: dict = {}
    nxt = 0
    try:
        while nxt < len(items) or pending:
            while nxt < len(items) and len(pending) < window:
                pending[asyncio.wrap_future(submit(items[nxt], ids[nxt]).future())] = nxt
                nxt += 1
            done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for fut in done:
                out = fut.result()
                i = pending.pop(fut)
                completed[ids[i]] = out
                yield i, out
    except _death_types() as e:
        for fut, i in pending.items():
            if fut.done() and fut.exception() is None:
                completed[ids[i]] = fut.result()
            elif not fut.done():
                fut.cancel()
        raise ActorDied(name, [rid for rid in ids if rid not in completed], completed, e) from e
