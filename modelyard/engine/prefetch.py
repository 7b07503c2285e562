"""Host preprocessing overlapped with engine steps, for Engine.generate() on CUDA.

Decoding, resizing and normalizing an image costs a few ms of host time; done serially for a
512-image call that is seconds during which the GPU idles. Here a small thread pool prepares the
requests (PIL and torch release the GIL) while the engine steps, and they are admitted strictly
in request order, so sequence ids and derived seeds are the same as with serial add_request().
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

_DONE = object()


def admit_overlapped(
    requests: list,
    *,
    prepare: Callable,
    admit: Callable,
    step: Callable,
    has_unfinished: Callable[[], bool],
    collect: Callable,
    workers: int,
    first_batch: int,
    lookahead: int,
) -> None:
    """Run `prepare(req)` for every request on `workers` threads and `admit(req, *prepared)` them
    in order. While the next one is not ready the engine steps (`collect(step())`), unless it is
    idle: then it waits for the first `first_batch` requests, so its first prefill is not one image.
    At most `lookahead` requests are prepared but not yet admitted at any time: preprocessing is far
    faster than the GPU, and unbounded it would hold every request's pixels (pinned) at once.

    `prepare` must be thread-safe; `admit`, `step` and `has_unfinished` run on the calling thread
    only (the engine is not thread-safe)."""
    if lookahead < first_batch:
        raise ValueError(f"lookahead {lookahead} must cover first_batch {first_batch}")
    with ThreadPoolExecutor(workers, thread_name_prefix="modelyard-prep") as pool:
        todo = iter(requests)
        pending: deque[tuple[object, Future]] = deque()

        def refill() -> None:
            while len(pending) < lookahead:
                req = next(todo, _DONE)
                if req is _DONE:
                    return
                pending.append((req, pool.submit(prepare, req)))

        try:
            refill()
            while pending:
                if not pending[0][1].done() and has_unfinished():
                    collect(step())
                    continue
                if not has_unfinished():
                    pending[min(len(pending), first_batch) - 1][1].result()
                while pending and pending[0][1].done():
                    req, fut = pending.popleft()
                    admit(req, *fut.result())
                refill()
        except BaseException:
            for _, fut in pending:  # don't preprocess the rest before the error surfaces
                fut.cancel()
            raise
