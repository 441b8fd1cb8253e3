"""The apps' asyncio loop on Qt: qasync's ``QEventLoop`` with a shorter path from a readable
(or writable) socket to its callback, and ``call_soon`` without a Qt timer per call.

qasync runs every socket callback one Qt event later: the notifier's signal disables the
notifier, ``call_soon`` registers a Qt timer of 0 ms, the timer's event runs the callback and
the notifier is enabled again — per socket read two Qt events, a timer registration and two
notifier toggles, ~0.1 ms of the GUI thread's time (measured: bench/qt_loop_reads.py).  Every
app's networking runs on this loop (RFB viewer, relay legs, the session channel), so here:

* a notifier's signal calls the callback **directly** (as Twisted's own reactors do after
  ``select``).  What qasync's detour guarded stays guarded: a notifier that was removed or
  replaced (also inside its own callback) never calls or re-enables anything; a callback that
  runs a nested event loop (a modal dialog) is not entered again for the same notifier — the
  notifier is paused until the callback returns; a removed notifier is disabled at once and
  deleted later, when no socket callback is running (never inside its own signal; Qt's
  ``deleteLater`` raced with the loop's own end in tests); an exception goes to the loop's
  exception
  handler, as from any asyncio callback.
* ``call_soon`` (and a ``call_later`` under 1 ms, which qasync rounds to a 0 ms timer anyway)
  appends to a ready queue drained by one 0 ms single-shot timer, in FIFO order; a handle
  cancelled before its turn does not run.  Twisted's ``callFromThread`` and ``callLater(0)``
  take this path.

Everything else (timers, executors, ``call_soon_threadsafe``, running and stopping) is
qasync's."""

from __future__ import annotations

import asyncio
import collections
import heapq
import math

import qasync
from PySide6 import QtCore
from twisted.python import log as twisted_log
from twisted.python.log import callWithLogger

SOON = 0.001   # seconds: qasync gives a shorter delay a 0 ms Qt timer, we the ready queue


class _Watch:
    """One fd's reader or writer: its notifier and whether its callback is running."""

    __slots__ = ("notifier", "callback", "args", "running", "paused")

    def __init__(self, notifier, callback, args) -> None:
        self.notifier = notifier
        self.callback = callback
        self.args = args
        self.running = False    # inside the callback (a nested event loop may be spinning)
        self.paused = False     # disabled because it fired again while running


class QtEventLoop(qasync.QEventLoop):
    """qasync's loop with direct socket callbacks and a ready queue for ``call_soon``."""

    def __init__(self, app=None) -> None:
        # set before qasync's __init__: asyncio's adds its self-pipe reader in there
        self._watches: tuple[dict[int, _Watch], dict[int, _Watch]] = ({}, {})
        # removed notifiers, deleted (by dropping them) only when no socket callback runs:
        # one removed inside its own signal must not die under Qt's feet
        self._retired: list = []
        self._in_callbacks = 0
        self._ready: collections.deque[asyncio.Handle] = collections.deque()
        self._ready_timer = QtCore.QTimer()
        self._ready_timer.setSingleShot(True)
        self._ready_timer.setInterval(0)
        self._ready_timer.timeout.connect(self._run_ready)
        self._ready_armed = False      # the 0 ms timer is started and has not fired yet
        self._scheduled: list[asyncio.TimerHandle] = []      # a heap, by when
        self._cancelled_count = 0
        self._delay_timer = QtCore.QTimer()
        self._delay_timer.setSingleShot(True)
        self._delay_timer.setTimerType(QtCore.Qt.TimerType.PreciseTimer)
        self._delay_timer.timeout.connect(self._run_due)
        super().__init__(app)

    # --- sockets ----------------------------------------------------------------------------
    def _add_reader(self, fd, callback, *args):
        self._watch(0, fd, callback, args)

    def _add_writer(self, fd, callback, *args):
        self._watch(1, fd, callback, args)

    def _remove_reader(self, fd):
        return False if self.is_closed() else self._unwatch(0, fd)

    def _remove_writer(self, fd):
        return False if self.is_closed() else self._unwatch(1, fd)

    def _watch(self, kind: int, fd, callback, args) -> None:
        self._check_closed()
        fileno = qasync._fileno(fd)
        self._unwatch(kind, fd)
        self._delete_retired()
        notifier = QtCore.QSocketNotifier(
            fileno, QtCore.QSocketNotifier.Type.Write if kind else QtCore.QSocketNotifier.Type.Read)
        watch = _Watch(notifier, callback, args)
        watches = self._watches[kind]

        def ready(*_) -> None:
            if watches.get(fd) is not watch:        # removed or replaced: a late signal
                return
            if watch.running:                       # again, from a nested event loop
                watch.paused = True
                watch.notifier.setEnabled(False)
                return
            watch.running = True
            self._in_callbacks += 1
            try:
                if watch.callback is callWithLogger:
                    # Twisted's reactor: (selectable, _readOrWrite, selectable, read).  Its
                    # log context (the legacy "system" prefix, which protocol.runtime's
                    # logger drops) costs ~40 % of a read; _readOrWrite logs its failures
                    watch.args[1](*watch.args[2:])
                else:
                    watch.callback(*watch.args)
            except (SystemExit, KeyboardInterrupt):
                raise
            except BaseException as exc:
                if watch.callback is callWithLogger:     # into Twisted's log, as before
                    twisted_log.err(None, "Unhandled error in a socket callback")
                else:
                    self.call_exception_handler({
                        "message": f"Exception in callback {watch.callback!r}",
                        "exception": exc})
            finally:
                self._in_callbacks -= 1
                watch.running = False
                if watch.paused:
                    watch.paused = False
                    if watches.get(fd) is watch:
                        watch.notifier.setEnabled(True)

        notifier.activated.connect(ready)
        watches[fd] = watch

    def _unwatch(self, kind: int, fd) -> bool:
        watch = self._watches[kind].pop(fd, None)
        if watch is None:
            return False
        watch.notifier.setEnabled(False)
        # the callback's closure keeps the watch, not the notifier (no cycle through Qt)
        self._retired.append(watch.notifier)
        watch.notifier = None
        return True

    def _delete_retired(self) -> None:
        if self._retired and not self._in_callbacks:
            self._retired.clear()

    # --- call_soon and timers ---------------------------------------------------------------
    def call_later(self, delay, callback, *args, context=None):
        if self.get_debug() and (not callable(callback)
                                 or asyncio.iscoroutinefunction(callback)):
            return super().call_later(delay, callback, *args, context=context)  # its TypeError
        if delay < SOON:
            handle = asyncio.Handle(callback, args, self, context=context)
            self._ready.append(handle)
            if not self._ready_armed:
                self._ready_armed = True
                self._ready_timer.start()
            return handle
        handle = asyncio.TimerHandle(self.time() + delay, callback, args, self, context=context)
        handle._scheduled = True
        heapq.heappush(self._scheduled, handle)
        if self._scheduled[0] is handle:
            self._arm()
        return handle

    def call_soon(self, callback, *args, context=None):
        return self.call_later(0, callback, *args, context=context)

    def _timer_handle_cancelled(self, handle) -> None:
        """asyncio's TimerHandle.cancel: the heap keeps it until its turn or a clean-up."""
        if handle._scheduled:
            self._cancelled_count += 1
            if self._cancelled_count > 100 and 2 * self._cancelled_count > len(self._scheduled):
                self._scheduled = [h for h in self._scheduled if not h._cancelled]
                heapq.heapify(self._scheduled)
                self._cancelled_count = 0

    def _arm(self) -> None:
        """Start the one Qt timer for the earliest handle (after dropping cancelled ones)."""
        heap = self._scheduled
        while heap and heap[0]._cancelled:
            heapq.heappop(heap)._scheduled = False
            self._cancelled_count -= 1
        if heap:
            wait = math.ceil((heap[0].when() - self.time()) * 1000)
            self._delay_timer.start(max(0, wait))
        else:
            self._delay_timer.stop()

    def _run_due(self) -> None:
        self._delete_retired()
        heap, due = self._scheduled, self.time() + SOON
        while heap and (heap[0]._cancelled or heap[0].when() <= due):
            handle = heapq.heappop(heap)
            handle._scheduled = False
            if handle._cancelled:
                self._cancelled_count -= 1
            else:
                self._ready.append(handle)
        self._arm()              # first: a callback may spin a nested event loop
        self._run_ready()

    def _run_ready(self) -> None:
        """Run the handles that were ready when this turn began (later ones: the next turn,
        so a callback that keeps calling ``call_soon`` cannot starve Qt's events).  A callback
        that spins a nested event loop gets the rest run in there, in the same order: the
        timer is armed while handles wait behind the one running."""
        self._ready_armed = False
        self._delete_retired()
        ready = self._ready
        for _ in range(len(ready)):
            if not ready:                    # a nested event loop ran the rest
                break
            handle = ready.popleft()
            if ready and not self._ready_armed:
                self._ready_armed = True
                self._ready_timer.start()
            if not handle._cancelled:
                handle._run()
        if ready and not self._ready_armed:
            self._ready_armed = True
            self._ready_timer.start()

    def close(self) -> None:
        if self.is_running() or self.is_closed():
            return super().close()
        self._ready_timer.stop()
        self._ready_armed = False
        self._delay_timer.stop()
        self._ready.clear()
        self._scheduled.clear()
        for kind in (0, 1):
            for fd in list(self._watches[kind]):
                self._unwatch(kind, fd)
        super().close()
        self._retired.clear()
