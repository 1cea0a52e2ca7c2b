"""Dynamic batching: requests that arrive together are answered by one `search_many`.

One worker thread answers the searches, a batch at a time. Request threads `submit` their
prepared request and wait on its future. The worker takes every request queued, and while
other requests are still on their way in (their body being read, their image decoded:
`arriving`), it waits for them, at most ``wait_ms`` after taking the first, up to
``max_batch``. A request that finds nothing else in flight is answered at once, so a lone
client pays no waiting; under load the next batch gathers while one is answered. With
``max_batch`` 1 requests are answered one at a time, in order of arrival.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass

from ..query.search import Request, Searcher

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BatchStats:
    max_batch: int
    wait_ms: float
    batches: int
    requests: int
    sizes: dict[int, int]  # batch size -> how many batches had it


class Batcher:
    """Answers submitted requests in batches on its own thread, with the searcher that
    ``searchers()`` gives at the start of each batch (the index's latest version)."""

    def __init__(self, searchers: Callable[[], Searcher], max_batch: int, wait_ms: float) -> None:
        if max_batch < 1 or wait_ms < 0:
            raise ValueError(f"max_batch must be >= 1 and wait_ms >= 0: {max_batch}, {wait_ms}")
        self.searchers, self.max_batch, self.wait_ms = searchers, max_batch, wait_ms
        self._queue: deque[tuple[Request, Future]] = deque()
        self._ready = threading.Condition()
        self._arriving = 0
        self._closed = False
        self._sizes: Counter[int] = Counter()
        self._thread = threading.Thread(target=self._loop, name="search-batches", daemon=True)
        self._thread.start()

    @contextlib.contextmanager
    def arriving(self) -> Iterator[Callable[[Request], Future]]:
        """Around a request's reading and preparing, while the worker may wait for it to join;
        gives the ``submit`` that queues it and ends its arrival at once (a worker that took
        it must not wait for it)."""
        with self._ready:
            self._arriving += 1
        queued = False

        def submit(request: Request) -> Future:
            nonlocal queued
            arrived, queued = not queued, True  # its arrival ends in the queue's own step
            return self._queue_locked(request, arrived)

        try:
            yield submit
        finally:
            if not queued:
                with self._ready:
                    self._arriving -= 1
                    self._ready.notify()

    def submit(self, request: Request) -> Future:
        """A future of ``(searcher, answer)``; its exception is the request's one-line error."""
        return self._queue_locked(request, False)

    def _queue_locked(self, request: Request, arrived: bool) -> Future:
        future: Future = Future()
        with self._ready:
            if arrived:  # one step: never seen both queued and still arriving
                self._arriving -= 1
            if self._closed:
                raise RuntimeError("the server is shutting down")
            self._queue.append((request, future))
            self._ready.notify()
        return future

    def close(self) -> None:
        """Answer what is queued, then stop the worker."""
        with self._ready:
            self._closed = True
            self._ready.notify()
        self._thread.join(timeout=60)

    def stats(self) -> BatchStats:
        with self._ready:
            sizes = dict(sorted(self._sizes.items()))
        total = sum(n * count for n, count in sizes.items())
        return BatchStats(self.max_batch, self.wait_ms, sum(sizes.values()), total, sizes)

    def _loop(self) -> None:
        while (batch := self._take()) is not None:
            try:
                self._answer(batch)
            except Exception as e:  # the worker must outlive any batch: its requests get 500s
                log.exception("a batch of %d searches failed", len(batch))
                for _, future in batch:
                    if not future.done():
                        future.set_exception(e)

    def _take(self) -> list[tuple[Request, Future]] | None:
        """The next batch (None once closed and drained; empty when every request taken had
        been cancelled)."""
        with self._ready:
            while not self._queue and not self._closed:
                self._ready.wait()
            if not self._queue:
                return None
            batch: list[tuple[Request, Future]] = []
            deadline = time.monotonic() + self.wait_ms / 1000
            while len(batch) < self.max_batch:
                if self._queue:
                    request, future = self._queue.popleft()
                    # A client that went away cancelled its future: drop it; from here on a
                    # future cannot be cancelled.
                    if future.set_running_or_notify_cancel():
                        batch.append((request, future))
                    continue
                left = deadline - time.monotonic()
                if not self._arriving or left <= 0 or self._closed:
                    break
                self._ready.wait(left)
            if batch:
                self._sizes[len(batch)] += 1
            return batch

    def _answer(self, batch: list[tuple[Request, Future]]) -> None:
        if not batch:
            return
        searcher = self.searchers()
        requests = [r for r, _ in batch]
        try:
            answers = searcher.search_many(requests, return_exceptions=True)
        except Exception:  # a fault of the engine, not of a request: find whose, one by one
            log.exception("a batch of %d searches failed; answering them one by one", len(batch))
            answers = [self._alone(searcher, r) for r in requests]
        for (_, future), answer in zip(batch, answers, strict=True):
            if isinstance(answer, BaseException):
                future.set_exception(answer)
            else:
                future.set_result((searcher, answer))

    @staticmethod
    def _alone(searcher: Searcher, request: Request):
        try:
            return searcher.search_many([request], return_exceptions=True)[0]
        except Exception as e:
            return e
