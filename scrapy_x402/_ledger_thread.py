"""The ledger's own thread: every store call of a crawl runs there, never on the reactor.

Calls that arrive while it commits wait and are then committed together: one fsync for all the
payments of a busy moment. Each PaymentBook call is a transaction of its own (a savepoint of
the group's), so one that fails leaves the others intact. A call's result is delivered once its
group is durable.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from scrapy.utils.defer import maybe_deferred_to_future
from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThread
from twisted.python.failure import Failure

from scrapy_x402.ledger import Ledger

logger = logging.getLogger(__name__)

T = TypeVar("T")
MAX_GROUP = 512  # calls per commit, so one group never holds the write lock for long

_Call = tuple[Callable[[], Any], Deferred]


class LedgerThread:
    def __init__(self, store: Ledger):
        from twisted.internet import reactor  # noqa: PLC0415 (importing it installs one)

        self.store = store
        self._reactor: Any = reactor
        self._queue: queue.SimpleQueue[_Call | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._work, name="x402-ledger", daemon=True)
        self._thread.start()
        self._closed = False

    async def run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run ``fn(*args, **kwargs)`` in the ledger's thread, in a transaction; its result
        once that transaction is committed."""
        if self._closed:
            raise RuntimeError("the ledger is closed")
        done: Deferred[T] = Deferred()
        self._queue.put((lambda: fn(*args, **kwargs), done))
        return await maybe_deferred_to_future(done)

    async def close(self) -> None:
        """Finish what was queued, then close the store."""
        if self._closed:
            return
        await self.run(lambda: None)
        self._closed = True
        self._queue.put(None)
        # Joined off the reactor: the thread closes the store, which may wait for a lock.
        await maybe_deferred_to_future(deferToThread(self._thread.join))

    def _work(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                self.store.close()
                return
            group = [first]
            while len(group) < MAX_GROUP:
                try:
                    call = self._queue.get_nowait()
                except queue.Empty:
                    break
                if call is None:
                    self._queue.put(None)  # after this group
                    break
                group.append(call)
            self._commit(group)

    def _commit(self, group: list[_Call]) -> None:
        results: list[tuple[Deferred, bool, Any]] = []
        try:
            with self.store.transaction():
                for fn, done in group:
                    # A book call is a transaction of its own (a savepoint here): one that
                    # fails has rolled itself back, and leaves the others of its group intact.
                    try:
                        results.append((done, True, fn()))
                    except Exception:
                        results.append((done, False, Failure()))
        except Exception:
            # The commit failed: nothing of this group is durable, every call fails.
            failure = Failure()
            logger.error("x402: the ledger could not commit: %s", failure.getErrorMessage())
            results = [(done, False, failure) for _, done in group]
        self._reactor.callFromThread(_deliver, results)


def _deliver(results: list[tuple[Deferred, bool, Any]]) -> None:
    """On the reactor: one wake-up for a whole group."""
    for done, ok, result in results:
        if ok:
            done.callback(result)
        else:
            done.errback(result)
