"""The server's reactor: Twisted's epoll reactor without a log context per ready socket.

Twisted's ``EPollReactor.doPoll`` hands every ready socket to ``log.callWithLogger``: it asks
the connection for its log prefix (``"GuardedTLSFactory,1234,127.0.0.1"``, formatted on every
call), copies the legacy log context and runs the read or write inside a new one, so that a
line of Twisted's legacy log (``twisted.python.log``) written meanwhile is tagged with that
prefix as its ``system``.  That is ~21,000 of the ~178,000 instructions the server spends on
an idle host's heartbeat (12 %, ``bench/heartbeat_instructions.py``; bench/README.md issue 14)
and the same again for every relay chunk and every other socket event.

The JSON log, the server's default, never writes ``system`` (``protocol.runtime.json_line``),
and our own lines name the peer in their fields.  So with the JSON log the server and relay
processes run ``ServerEPollReactor``, which calls the reactor's read/write handler directly;
with the text log (which prints ``[system]``) they keep Twisted's reactor as it is.
Everything else — epoll, timers, threads, shutdown, error handling in ``_doReadOrWrite`` — is
Twisted's own: only the wrapper around that one call is left out.
"""

from __future__ import annotations

import errno

from twisted.internet.epollreactor import EPollReactor


class ServerEPollReactor(EPollReactor):
    """``EPollReactor`` whose ``doPoll`` calls ``_doReadOrWrite`` without
    ``log.callWithLogger`` around it (see the module's docstring)."""

    def doPoll(self, timeout):
        # Twisted's EPollReactor.doPoll (26.x) but for the last line of the loop
        if timeout is None:
            timeout = -1  # wait indefinitely
        try:
            events = self._poller.poll(timeout, len(self._selectables))
        except OSError as err:
            if err.errno == errno.EINTR:
                return
            raise
        handle = self._doReadOrWrite
        selectables = self._selectables
        for fd, event in events:
            selectable = selectables.get(fd)
            if selectable is not None:
                handle(selectable, fd, event)

    doIteration = doPoll


def install(log_format: str) -> None:
    """Install the reactor for a server or relay process whose log has ``log_format``:
    ``ServerEPollReactor`` for ``json``, Twisted's default (epoll) for ``text``."""
    if log_format == "json":
        from twisted.internet.main import installReactor
        installReactor(ServerEPollReactor())
    else:
        from twisted.internet import default
        default.install()
