"""The supporter's list of reachable hosts, kept current for as long as a front-end shows it.

Listed once per control connection, then changed only by what the server pushes
(``HostPresenceChanged``, no polling).  A lost connection is not the end of the list: the
directory says so, waits by the modules' ``ReconnectSchedule`` (a clean shutdown's notice
honoured, capped for a person who is waiting: ``MAX_WAIT`` seconds at most between attempts),
connects again, lists again and reports the hosts whose presence changed meanwhile.  Before,
``hosts --watch`` ended with "run it again" and the app's list silently froze after a server
restart.  The connection is a ``KeptConnection``: an attempt the server never answers is
given up after 30 s, and a heartbeat every few seconds finds a connection that went silent
without a reset (before, the list froze on it without a word).

One core for both front-ends (STYLE.md §6): ``hosts --watch`` prints the delegate's events, the
app's host table shows them.  The delegate has ``hosts_listed(hosts, changed)``,
``host_changed(host)`` and ``connection_changed(state, why, retry_in)``: ``"reconnecting"`` with
why the connection was lost (a sentence) or why an attempt failed (the exception), or
``"online"`` when a listing succeeded again.
"""

from __future__ import annotations

from typing import Any, Awaitable, Callable

from twisted.logger import Logger

from ..common.link.kept_connection import KeptConnection
from ..common.link.reconnect import ReconnectSchedule
from .sessions import list_hosts

log = Logger()

#: the longest a supporter's list waits between two attempts (a person is looking at it)
MAX_WAIT = 5.0

#: what a pushed change may set on a listed host
PRESENCE_FIELDS = ("online", "last_seen", "address")


class HostDirectory(KeptConnection):
    """``start()`` connects and lists (its errors are the caller's: a wrong address is said at
    once); from then on the directory keeps itself connected until ``stop()``.  ``conn`` is the
    current control connection (None while reconnecting), for the sessions a front-end opens."""

    def __init__(self, reactor, connect: Callable[[], Awaitable[Any]], delegate: Any,
                 schedule: ReconnectSchedule | None = None) -> None:
        super().__init__(reactor, connect, MAX_WAIT, schedule)
        self.delegate = delegate
        self.hosts: list[dict] = []

    async def start(self) -> list[dict]:
        await self._first_attempt()
        return self.hosts

    async def refresh(self) -> None:
        """List again now (the app's Refresh); while reconnecting: try at once."""
        if self.conn is None:
            if self._retry is not None and self._retry.active():
                self._retry.reset(0)
            return
        self._listed(await list_hosts(self.conn))

    # --- the connection ---------------------------------------------------------------------
    async def _set_up(self, conn) -> list[dict]:
        conn.on_host_presence = self._pushed
        return await list_hosts(conn)

    def _attached(self, conn, hosts: list[dict], again: bool) -> None:
        self._listed(hosts)
        if again:
            self.delegate.connection_changed("online", "", 0.0)

    def _offline(self, why: "str | BaseException", retry_in: float) -> None:
        self.delegate.connection_changed("reconnecting", why, retry_in)

    # --- the list ---------------------------------------------------------------------------
    def _listed(self, hosts: list[dict]) -> None:
        """A fresh listing: the hosts whose presence differs from what was shown are reported
        as changed (what happened while the connection was away)."""
        before = {h["host_id"]: h for h in self.hosts}
        changed = [h for h in hosts if h["host_id"] in before
                   and any(h[f] != before[h["host_id"]][f] for f in PRESENCE_FIELDS)]
        changed += [h for h in hosts if h["host_id"] not in before and before]
        self.hosts = hosts
        self.delegate.hosts_listed(hosts, changed)

    def _pushed(self, fields: dict) -> None:
        for host in self.hosts:
            if host["host_id"] == fields["host_id"]:
                host["online"] = fields["online"]
                host["last_seen"] = fields["last_seen"]
                host["address"] = fields["address"] or host["address"]
                self.delegate.host_changed(host)
                return
