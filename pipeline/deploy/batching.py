"""Server-side batching: requests' images join one queue, and one worker runs them through the network in
batches, so that concurrent requests share forward passes.

The worker takes the first queued image and every image queued behind it, waits `max_wait` seconds and
takes what arrived meanwhile, up to `max_batch` in all; then it runs the batch in its own thread (the
network uses every core by itself) while the next requests queue. An idle server runs a lone request after
`max_wait`; a busy one batches whatever arrived during the previous pass.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Generic, TypeVar

In = TypeVar("In")
Out = TypeVar("Out")


class Batcher(Generic[In, Out]):
    """`run` maps a list of items to a list of results, one each; `submit` queues a request's items and
    returns their results. Start it (`start`) inside the event loop that will submit to it."""

    def __init__(self, run: Callable[[list[In]], Sequence[Out]], max_batch: int, max_wait: float) -> None:
        self.run, self.max_batch, self.max_wait = run, max_batch, max_wait
        self.batches = 0  # batches run so far
        self.images = 0  # items run so far
        self._queue: asyncio.Queue[tuple[In, asyncio.Future]] | None = None
        self._worker: asyncio.Task | None = None
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="batcher")

    def start(self) -> None:
        self._queue = asyncio.Queue()
        self._worker = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            await asyncio.gather(self._worker, return_exceptions=True)
        self._executor.shutdown(wait=True)

    @property
    def queued(self) -> int:
        return self._queue.qsize() if self._queue is not None else 0

    async def submit(self, items: list[In]) -> list[Out]:
        if self._queue is None:
            raise RuntimeError("the batcher was not started")
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in items]
        for item, future in zip(items, futures, strict=True):
            self._queue.put_nowait((item, future))
        return list(await asyncio.gather(*futures))

    async def _collect(self) -> list[tuple[In, asyncio.Future]]:
        """The first queued image, what is queued behind it, and what arrives within `max_wait`. (A sleep, then
        taking what is there: `wait_for` on `Queue.get` can lose an item when its timeout and the item meet.)"""
        assert self._queue is not None
        batch = [await self._queue.get()]
        self._take_queued(batch)
        if len(batch) < self.max_batch and self.max_wait > 0:
            await asyncio.sleep(self.max_wait)
            self._take_queued(batch)
        return batch

    def _take_queued(self, batch: list) -> None:
        assert self._queue is not None
        while len(batch) < self.max_batch and not self._queue.empty():
            batch.append(self._queue.get_nowait())

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._collect()
            live = [(item, future) for item, future in batch if not future.done()]  # a cancelled request's are dropped
            if not live:
                continue
            try:
                results = await loop.run_in_executor(self._executor, self.run, [item for item, _ in live])
            except Exception as exc:  # noqa: BLE001 - the requests of this batch fail with it; the server goes on
                for _, future in live:
                    if not future.done():
                        future.set_exception(exc)
                continue
            self.batches += 1
            self.images += len(live)
            for (_, future), result in zip(live, results, strict=True):
                if not future.done():
                    future.set_result(result)
