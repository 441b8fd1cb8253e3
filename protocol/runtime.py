"""What server and modules share at run time: the one structured logger and the one way to run
blocking work off the reactor thread.

Logging is ``twisted.logger`` everywhere; ``start_logging`` installs a single observer that writes
JSON lines (or short text lines for a terminal) to stderr, filtered by ``--log-level``.
Blocking work (database, disk, boto3) goes through ``run_blocking``, which uses one bounded
thread pool owned by the reactor.  ``tune_gc`` sets up the garbage collector of a long-running
process (server, relay) once it has started.
"""

from __future__ import annotations

import datetime
import gc
import json
import os
import sys
from typing import Any, Callable, TextIO, TypeVar

from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThreadPool
from twisted.logger import (
    FileLogObserver, FilteringLogObserver, LogLevel, LogLevelFilterPredicate,
    Logger as TwistedLogger, PredicateResult, formatEvent, globalLogBeginner, textFileLogObserver,
)
from twisted.python.threadpool import ThreadPool

T = TypeVar("T")

LEVELS = {"debug": LogLevel.debug, "info": LogLevel.info, "warn": LogLevel.warn,
          "error": LogLevel.error, "critical": LogLevel.critical}

_started = False
#: whether debug events can reach the sink (``start_logging`` decides; until then they can)
_debug_logged = True


class Logger(TwistedLogger):
    """``twisted.logger.Logger`` whose ``debug`` costs next to nothing when the process logs
    above debug.  A debug event the sink's filter drops has still been built and passed through
    the publisher and the filter (~20 µs; 8 per ad-hoc set-up on the server: 3 % of its
    samples, bench/README.md); here it is not made at all.  Everything else is Twisted's."""

    def debug(self, format: str | None = None, **kwargs: object) -> None:
        if _debug_logged:
            self.emit(LogLevel.debug, format, **kwargs)


def _plain(value: Any) -> Any:
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def json_line(event: dict) -> str:
    """One compact JSON object per event: time, level, namespace, message, structured fields."""
    fields = {k: _plain(v) for k, v in event.items()
              if not k.startswith("log_") and k not in ("format", "message", "system", "time",
                                                         "isError", "failure", "why")}
    record = {
        "time": datetime.datetime.fromtimestamp(event.get("log_time", 0), datetime.timezone.utc)
        .isoformat(timespec="milliseconds"),
        "level": event.get("log_level", LogLevel.info).name,
        "ns": event.get("log_namespace", "-"),
        "msg": formatEvent(event),
        **fields,
    }
    failure = event.get("log_failure")
    if failure is not None:
        record["error"] = failure.getErrorMessage()
        record["traceback"] = failure.getTraceback()
    return json.dumps(record, ensure_ascii=False) + "\n"


def start_logging(level: str = "info", fmt: str = "json", stream: TextIO | None = None,
                  quiet_twisted: bool = False) -> None:
    """Route every ``twisted.logger`` event (and stdlib ``logging``, via Twisted) to one sink.
    ``quiet_twisted``: Twisted's own chatter ("Starting factory", "connection established")
    only at level debug (a module's terminal is for people, not for reactor internals)."""
    global _started, _debug_logged
    stream = stream or sys.stderr
    observer = (FileLogObserver(stream, json_line) if fmt == "json"
                else textFileLogObserver(stream))
    predicates = [LogLevelFilterPredicate(defaultLogLevel=LEVELS[level])]
    if quiet_twisted and level != "debug":
        predicates.append(_no_twisted_chatter)
    elif level != "debug":
        predicates.append(_no_amp_connection_lines)
    filtered = FilteringLogObserver(observer, predicates)
    _debug_logged = level == "debug"
    if not _started:
        globalLogBeginner.beginLoggingTo([filtered], redirectStandardIO=False,
                                         discardBuffer=True)
        _started = True


def _no_twisted_chatter(event: dict) -> PredicateResult:
    namespace = event.get("log_namespace", "")
    level = event.get("log_level")
    if (namespace.startswith("twisted.") or namespace == "log_legacy") and \
            level in (LogLevel.debug, LogLevel.info):
        return PredicateResult.no
    return PredicateResult.maybe


def _no_amp_connection_lines(event: dict) -> PredicateResult:
    """Twisted's AMP logs "connection established" and "connection lost" at info for every
    connection: 6 of the 13 lines of an ad-hoc set-up and 2 of a host's 4 at registration, each
    formatted and written (bench/README.md).  Our own lines say who connected; debug keeps them."""
    if event.get("log_namespace") == "twisted.protocols.amp" and \
            event.get("log_level") == LogLevel.info:
        return PredicateResult.no
    return PredicateResult.maybe


# Generation-0 threshold for long-running processes (CPython's default is 700); see tune_gc.
GC_THRESHOLDS = (50_000, 50, 100)
GC_ENV = "HAUSMEISTER_GC"


def tune_gc(thresholds: tuple[int, int, int] = GC_THRESHOLDS) -> str:
    """Keep the garbage collector's pauses short in a server or relay process; call it once,
    after start-up, before the reactor runs.  Returns what it did (for the start-up log).

    Why: a full collection walks every tracked object; a relay with 750 sessions holds ~130,000
    of them and one pass took 79 ms, which set its p99 latency (24-68 ms with the collector,
    4.6-10 ms without it; bench/README.md).  ``gc.freeze()`` moves everything start-up created
    (modules, classes, configuration: never garbage) out of the collector's view, and a
    generation-0 threshold of 50,000 instead of 700 makes collections rare while still freeing
    reference cycles of closed connections; the relay's chunks are bytes, which are not tracked.
    Measured: no collection at all while a relay served 500-1,000 sessions; the cost is that
    thousands of connections closing at once are freed in one pause (up to ~120 ms at shutdown).

    ``HAUSMEISTER_GC=default`` in the environment leaves CPython's settings alone and
    ``HAUSMEISTER_GC=<n>`` sets the generation-0 threshold to n (benchmarks compare them).
    """
    wanted = os.environ.get(GC_ENV, "").strip()
    if wanted == "default":
        return f"default (thresholds {gc.get_threshold()})"
    ignored = ""
    if wanted and wanted.isascii() and wanted.isdigit() and int(wanted) > 0:
        thresholds = (int(wanted), *thresholds[1:])
    elif wanted:
        ignored = (f"; {GC_ENV}={wanted!r} ignored: use 'default' or a whole number above 0 "
                   "(the generation-0 threshold)")
    gc.collect()  # so start-up garbage is freed, not frozen for the life of the process
    gc.freeze()
    gc.set_threshold(*thresholds)
    return f"{gc.get_freeze_count()} start-up objects frozen, thresholds {thresholds}{ignored}"


_pool: ThreadPool | None = None


def blocking_pool(reactor: Any = None) -> ThreadPool:
    """The process-wide pool for blocking work, started on first use, stopped with the reactor."""
    global _pool
    if _pool is None:
        if reactor is None:
            from twisted.internet import reactor  # noqa: F811 - the installed reactor
        _pool = ThreadPool(minthreads=1, maxthreads=8, name="hausmeister-blocking")
        _pool.start()
        reactor.addSystemEventTrigger("during", "shutdown", _stop_pool)
    return _pool


def _stop_pool() -> None:
    global _pool
    if _pool is not None:
        _pool.stop()
        _pool = None


def run_blocking(fn: Callable[..., T], *args: Any, **kwargs: Any) -> "Deferred[T]":
    """Run ``fn`` in the blocking pool; the Deferred fires on the reactor thread."""
    from twisted.internet import reactor
    return deferToThreadPool(reactor, blocking_pool(reactor), fn, *args, **kwargs)


__all__ = ["Logger", "start_logging", "run_blocking", "blocking_pool", "json_line", "tune_gc"]
