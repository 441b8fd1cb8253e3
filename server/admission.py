"""Who may wait for a handshake, and for how long: the bookkeeping behind ``connection_guard``.

A connection is *pending* from the moment it is accepted until it has proved it speaks our
protocol (TLS done and the first control command, or complete request headers on HTTPS).
``PendingConnections`` counts pending connections per source address and in total, knows each
one's deadline, and decides what a new arrival costs: refused (its address has too many
pending), admitted, or admitted in place of the oldest pending connection (the total is full).
``RefusalLog`` decides which refusals get a log line of their own and which are only counted,
so a flood cannot fill the log.

Both are plain objects fed the current time; no sockets, no reactor (see
``connection_guard`` for the Twisted side).
"""

from __future__ import annotations

import ipaddress
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from typing import Hashable

#: Stage of a pending connection before its TLS handshake has completed.
HANDSHAKE = "handshake"


def address_key(host: str) -> str:
    """The unit the per-address cap counts: an IPv4 address, or the /64 an IPv6 address is in
    (one IPv6 machine usually holds a whole /64, so counting single addresses would not cap it)."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return host
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return host


@dataclass(frozen=True)
class Admission:
    """What ``PendingConnections.admit`` decided: admitted or not, and whom it displaced."""

    admitted: bool
    reason: str = ""
    evicted: Hashable | None = None
    evicted_address: str = ""


@dataclass
class _Entry:
    address: str
    queue: tuple[str, float]
    deadline: float


class PendingConnections:
    """Pending connections per address and in total, each in a queue per (stage, timeout).

    Every queue holds connections in the order of their deadlines (same timeout, admitted in
    time order), so finding the expired ones and the oldest one is a look at the queue heads.
    """

    def __init__(self, per_address: int, total: int) -> None:
        if per_address < 1 or total < 1:
            raise ValueError("caps must be at least 1")
        self.per_address = per_address
        self.total = total
        self._entries: dict[Hashable, _Entry] = {}
        self._queues: dict[tuple[str, float], OrderedDict[Hashable, None]] = {}
        self._per_address: Counter[str] = Counter()

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, conn: object) -> bool:
        return conn in self._entries

    def count_of(self, address: str) -> int:
        return self._per_address[address_key(address)]

    def stage_of(self, conn: Hashable) -> str | None:
        entry = self._entries.get(conn)
        return entry.queue[0] if entry else None

    def admit(self, conn: Hashable, address: str, timeout: float, now: float) -> Admission:
        """A newly accepted connection, in the handshake stage with ``timeout`` seconds."""
        key = address_key(address)
        if self._per_address[key] >= self.per_address:
            return Admission(False, f"{self._per_address[key]} connections from {key} are "
                                    "already waiting for their handshake")
        evicted, evicted_address = None, ""
        if len(self._entries) >= self.total:
            evicted = self._oldest()
            evicted_address = self._entries[evicted].address
            self.settle(evicted)
        self._put(conn, key, (HANDSHAKE, timeout), now + timeout)
        return Admission(True, evicted=evicted, evicted_address=evicted_address)

    def advance(self, conn: Hashable, stage: str, timeout: float, now: float) -> None:
        """The connection reached ``stage`` (e.g. TLS done): a new deadline, ``timeout`` from now."""
        entry = self._entries.get(conn)
        if entry is None:
            return
        self._queues[entry.queue].pop(conn, None)
        self._put(conn, entry.address, (stage, timeout), now + timeout)

    def settle(self, conn: Hashable) -> bool:
        """No longer pending (authenticated, or gone); False if it was not pending."""
        entry = self._entries.pop(conn, None)
        if entry is None:
            return False
        queue = self._queues[entry.queue]
        queue.pop(conn, None)
        if not queue:
            del self._queues[entry.queue]
        self._per_address[entry.address] -= 1
        if self._per_address[entry.address] <= 0:
            del self._per_address[entry.address]
        return True

    def expired(self, now: float) -> list[tuple[Hashable, str, float, str]]:
        """Remove and return ``(conn, stage, timeout, address)`` of every connection past its
        deadline."""
        out = []
        for queue_key in list(self._queues):
            queue = self._queues.get(queue_key)
            while queue:
                conn = next(iter(queue))
                entry = self._entries[conn]
                if entry.deadline > now:
                    break
                out.append((conn, queue_key[0], queue_key[1], entry.address))
                self.settle(conn)
                queue = self._queues.get(queue_key)
        return out

    def _put(self, conn: Hashable, address: str, queue_key: tuple[str, float],
             deadline: float) -> None:
        if conn not in self._entries:
            self._per_address[address] += 1
        self._entries[conn] = _Entry(address, queue_key, deadline)
        self._queues.setdefault(queue_key, OrderedDict())[conn] = None

    def _oldest(self) -> Hashable:
        """The connection to give up for a newcomer: the one nearest its deadline among those
        still in the TLS handshake (the cheapest kind for an attacker), else among all."""
        heads = [(self._entries[next(iter(q))].deadline, k[0] != HANDSHAKE, next(iter(q)))
                 for k, q in self._queues.items() if q]
        handshaking = [h for h in heads if not h[1]]
        return min(handshaking or heads, key=lambda h: h[0])[2]


MAX_ADDRESSES_PER_TALLY = 1024


@dataclass
class _Tally:
    opened: float
    suppressed: int = 0
    by_address: Counter = field(default_factory=Counter)


@dataclass(frozen=True)
class Summary:
    kind: str
    suppressed: int
    seconds: float
    top_address: str
    top_count: int


class RefusalLog:
    """At most one line per kind of refusal per ``interval`` seconds; the others are counted
    and come out as one summary line when the interval is over."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self._tallies: dict[str, _Tally] = {}

    def note(self, kind: str, address: str, now: float) -> bool:
        """Record one refusal; True if it should be logged on its own line now."""
        tally = self._tallies.get(kind)
        if tally is None:
            self._tallies[kind] = _Tally(opened=now)
            return True
        tally.suppressed += 1
        if address in tally.by_address or len(tally.by_address) < MAX_ADDRESSES_PER_TALLY:
            tally.by_address[address] += 1
        return False

    def due(self, now: float) -> list[Summary]:
        """Summaries of the intervals that are over and had refusals not logged on their own."""
        out = []
        for kind, tally in list(self._tallies.items()):
            if now - tally.opened < self.interval:
                continue
            if tally.suppressed == 0:
                del self._tallies[kind]  # quiet again: the next refusal gets its own line
                continue
            top, top_count = (tally.by_address.most_common(1) or [("?", 0)])[0]
            out.append(Summary(kind, tally.suppressed, now - tally.opened, top, top_count))
            self._tallies[kind] = _Tally(opened=now)
        return out
