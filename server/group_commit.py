"""Group commit: requests that arrive while a batch is being written go out together in the next.

Set-ups and session ends come in bursts.  Each used to cost its own thread-pool hand-off, its
own database transaction (an fsync of SQLite's WAL) and its own protocol fsyncs; together they
share one hand-off, one transaction and the fsyncs they can share (one directory fsync, one
fsync of the tenant's CSV).  A request alone is written at once (no waiting for company).

``work(batch)`` runs in the blocking pool and returns one outcome per request, in order: a value
(that request's Deferred fires with it) or an exception instance (its Deferred fails with it).
If ``work`` raises, the whole batch failed — e.g. its transaction did not commit, so nothing of
it was written — and every request of the batch fails with that error: nobody is answered as if
it had been written.  Nothing here knows about sessions; the callers' ``work`` does.
"""

from __future__ import annotations

from typing import Any, Callable, Generic, Sequence, TypeVar

from twisted.internet import defer
from twisted.python.failure import Failure

from protocol.runtime import run_blocking

Item = TypeVar("Item")


class GroupCommit(Generic[Item]):
    """One batch in the blocking pool at a time; what arrives meanwhile waits for the next."""

    def __init__(self, work: Callable[[list[Item]], Sequence[Any]], max_batch: int = 64,
                 blocking: Callable[..., defer.Deferred] = run_blocking) -> None:
        self.work = work
        self.max_batch = max_batch
        self.blocking = blocking
        self._waiting: list[tuple[Item, defer.Deferred]] = []
        self._running = False
        #: sizes of the batches written so far (for tests and benchmarks; bounded)
        self.batch_sizes: list[int] = []

    def submit(self, item: Item) -> defer.Deferred:
        """Queue ``item``; the Deferred fires with its outcome once its batch is written."""
        done: defer.Deferred = defer.Deferred()
        self._waiting.append((item, done))
        if not self._running:
            self._next()
        return done

    def _next(self) -> None:
        if not self._waiting:
            self._running = False
            return
        self._running = True
        batch = self._waiting[:self.max_batch]
        del self._waiting[:len(batch)]
        if len(self.batch_sizes) < 10_000:
            self.batch_sizes.append(len(batch))
        items = [item for item, _ in batch]
        d = self.blocking(self._checked, items)
        d.addBoth(self._answer, batch)

    def _checked(self, items: list[Item]) -> Sequence[Any]:
        outcomes = self.work(items)
        if len(outcomes) != len(items):  # a bug in work(): answer nobody as if written
            raise RuntimeError(f"group commit: {len(outcomes)} outcomes for {len(items)} requests")
        return outcomes

    def _answer(self, outcomes, batch: list[tuple[Item, defer.Deferred]]) -> None:
        try:
            if isinstance(outcomes, Failure):
                for _, done in batch:
                    done.errback(outcomes)
                return
            for (_, done), outcome in zip(batch, outcomes):
                if isinstance(outcome, BaseException):
                    done.errback(Failure(outcome))
                else:
                    done.callback(outcome)
        finally:
            self._next()


__all__ = ["GroupCommit"]
