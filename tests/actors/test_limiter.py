"""FifoLimiter: the actor's admission limit (no Ray, no engine)."""

import asyncio

import pytest

from modelyard.actors.limiter import FifoLimiter


def test_limit_fifo_order_and_high_water_mark():
    async def main():
        lim = FifoLimiter(2)
        order, live = [], [0]

        async def worker(i):
            await lim.acquire()
            live[0] += 1
            assert live[0] <= 2
            order.append(i)
            await asyncio.sleep(0.001 * (5 - i % 5))
            live[0] -= 1
            lim.release()

        await asyncio.gather(*(worker(i) for i in range(10)))
        return lim, order

    lim, order = asyncio.run(main())
    assert order == list(range(10))  # admitted in arrival order
    assert lim.max_in_flight_seen == 2 and lim.in_flight == 0 and lim.queued == 0


def test_cancelled_waiter_leaves_the_queue_and_keeps_counts():
    async def main():
        lim = FifoLimiter(1)
        await lim.acquire()
        waiter = asyncio.ensure_future(lim.acquire())
        await asyncio.sleep(0)
        assert lim.queued == 1
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        assert lim.queued == 0
        lim.release()
        assert lim.in_flight == 0
        await lim.acquire()  # the slot is usable again
        assert lim.in_flight == 1

    asyncio.run(main())


def test_rejects_bad_limit():
    with pytest.raises(ValueError, match="max_concurrent_requests"):
        FifoLimiter(0)
