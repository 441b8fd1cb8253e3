"""An ad-hoc ID kept on offer until a customer joins, for the CLI and the app alike.

The ID a supporter reads out is only good while its control connection lives and its nameplate
has not expired (the server drops an unused nameplate after ``[adhoc] nameplate_ttl`` without a
word to the supporter, and releases every nameplate of a connection that goes).  Before, a lost
connection left the app's tab with an error and ``adhoc`` with an exit, and an expired ID was
still shown as if it worked.  The offer keeps one ID valid instead: when the connection is lost
it says so, waits by the modules' ``ReconnectSchedule`` (a clean shutdown's notice honoured, at
most ``MAX_WAIT`` seconds between attempts: a person is waiting), connects again and draws a new
nameplate with a new secret; shortly before the nameplate expires (``RENEW_AHEAD``) it draws
the next one on the same connection, while the old one stays valid on the server until its
expiry: a customer who is typing the old ID in its last minute still gets in, and from then on
the supporter reads out the new one.  The first customer to join with either takes the offer:
the server withdraws the other nameplate at that join (one offer, one customer).  A connection that goes silent (a pulled cable, a wedged server: no reset arrives,
and the server drops the ID after its TCP keep-alive) is found by a heartbeat while waiting,
and an attempt the server never answers is given up: both from ``KeptConnection``, which the
host list stands on too.  Every change is a typed event to the delegate
(``adhoc_event(event)``), so the front-ends only say it.

Once the customer joined, the connection is the session's (``joined`` fires with the
invitation and the server's ticket): a cut from then on ends the session as before, the offer
does nothing more.  ``stop()`` (a closed tab, Ctrl+C) ends the offer and its connection.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

from twisted.internet import defer, error as net_error
from twisted.logger import Logger

from protocol import control

from ..common.link.kept_connection import ATTEMPT_SECONDS, MAX_HEARTBEAT, KeptConnection
from ..common.link.reconnect import ReconnectSchedule
from .sessions import AdhocInvitation

log = Logger()

#: the longest the offer waits between two connection attempts (a person is waiting)
MAX_WAIT = 5.0

#: the next ID is drawn this long before the one on offer expires (at most a tenth of its
#: lifetime); the old one keeps working until then for a customer who already has it
RENEW_AHEAD = 60.0

#: an old ID with less left than this is said to have expired (not "still usable for 0 s")
MIN_LEFT = 1.0

__all__ = ["ATTEMPT_SECONDS", "MAX_HEARTBEAT", "MAX_WAIT", "RENEW_AHEAD", "AdhocOffer",
           "CustomerJoined", "IdOffered", "IdReplaced", "Offline", "ReplaceReason"]


class ReplaceReason(enum.Enum):
    CONNECTION_LOST = "connection lost"
    EXPIRED = "expired"


@dataclass(frozen=True)
class IdOffered:
    """The first ID is on offer (valid for ``expires_in`` seconds)."""
    adhoc_id: str
    expires_in: float


@dataclass(frozen=True)
class Offline:
    """The connection is gone and with it ``old_id``; the next attempt in ``retry_in`` seconds.
    ``why``: the sentence the connection ended with, or the exception an attempt failed with."""
    old_id: str
    why: "str | BaseException"
    retry_in: float


@dataclass(frozen=True)
class IdReplaced:
    """``adhoc_id`` is on offer instead of ``old_id`` (``reason``).  ``old_valid_for``: the
    seconds ``old_id`` still works for a customer who already has it (drawn ahead of its
    expiry); 0: it works no more."""
    old_id: str
    adhoc_id: str
    reason: ReplaceReason
    expires_in: float
    old_valid_for: float = 0.0


@dataclass(frozen=True)
class CustomerJoined:
    adhoc_id: str
    peer_address: str


class AdhocOffer(KeptConnection):
    """``start()`` connects and draws the first ID (its errors are the caller's: a server that
    refuses ad-hoc sessions is said at once); then the offer keeps an ID valid until a customer
    joins (``joined`` fires with ``(invitation, ticket)``) or ``stop()``."""

    def __init__(self, reactor, connect: Callable[[], Awaitable[Any]], delegate: Any,
                 schedule: ReconnectSchedule | None = None) -> None:
        super().__init__(reactor, connect, MAX_WAIT, schedule)
        self.delegate = delegate
        self.invitation: AdhocInvitation | None = None   # the ID on offer (or the one that went)
        self.joined: defer.Deferred = defer.Deferred(canceller=lambda _d: self.stop())
        #: the ID on offer and the one before it on the same connection, by nameplate (a
        #: customer who typed the previous one just before it expired gets its own secret)
        self._drawn: dict[str, AdhocInvitation] = {}
        #: why the ID on offer went, until a new one replaces it
        self._gone: ReplaceReason | None = None
        self._expiry = None              # the pending draw ahead of the expiry (IDelayedCall)
        self._expires_at = 0.0           # when the ID on offer expires (reactor seconds)

    @property
    def adhoc_id(self) -> str:
        return self.invitation.adhoc_id if self.invitation is not None else ""

    async def start(self) -> AdhocInvitation:
        return await self._first_attempt()

    def stop(self) -> None:
        """No more IDs: the pending attempt and expiry are cancelled, the connection closed
        (the server releases its nameplate).  After the customer joined: nothing (the
        connection is the session's)."""
        if self._done:
            return
        super().stop()
        if self._expiry is not None and self._expiry.active():
            self._expiry.cancel()
        if not self.joined.called:
            self.joined.errback(defer.CancelledError("the ad-hoc ID was withdrawn"))

    @property
    def _done(self) -> bool:
        return self.stopped or self.joined.called

    # --- drawing IDs ------------------------------------------------------------------------
    async def _set_up(self, conn) -> AdhocInvitation:
        return await self._draw(conn)

    async def _draw(self, conn) -> AdhocInvitation:
        """A new nameplate on ``conn`` and a new secret (never the one just shown)."""
        conn.on_session_ready = lambda ticket: self._customer_joined(conn, ticket)
        before = self.invitation.secret if self.invitation is not None else None
        invitation = await AdhocInvitation(conn, avoid_secret=before).allocate()
        return invitation

    def _attached(self, conn, invitation: AdhocInvitation, again: bool) -> None:
        """``invitation`` on offer on a new connection (the first, or after one was lost)."""
        self._drawn = {}
        if self.invitation is None:
            self._on_offer(invitation)
            self.delegate.adhoc_event(IdOffered(invitation.adhoc_id, invitation.expires_in))
        else:
            self._replaced(invitation)

    def _on_offer(self, invitation: AdhocInvitation) -> None:
        previous = self._drawn.get(self.invitation.nameplate) if self.invitation else None
        self.invitation = invitation
        self._drawn = {invitation.nameplate: invitation}
        if previous is not None and previous.nameplate != invitation.nameplate:
            self._drawn[previous.nameplate] = previous
        self._gone = None
        # the server counted from before its answer was sent: it refuses the nameplate a
        # round trip before ``_expires_at``
        self._expires_at = self.reactor.seconds() + invitation.expires_in
        ahead = min(RENEW_AHEAD, invitation.expires_in / 10)
        self._expiry = self.reactor.callLater(invitation.expires_in - ahead, self._expired)

    def _replaced(self, invitation: AdhocInvitation, same_connection: bool = False) -> None:
        old, reason = self.adhoc_id, self._gone
        # on the same connection the old nameplate lives on until its expiry (a new connection
        # means the server released it with the old one)
        left = self._expires_at - self.reactor.seconds() if same_connection else 0.0
        self._on_offer(invitation)
        self.delegate.adhoc_event(IdReplaced(old, invitation.adhoc_id, reason,
                                             invitation.expires_in,
                                             left if left >= MIN_LEFT else 0.0))

    def _expired(self) -> None:
        """Shortly before the ID on offer expires: draw the next one on the same connection."""
        conn = self.conn
        if self._done or conn is None:
            return
        self._gone = ReplaceReason.EXPIRED
        log.info("ad-hoc nameplate {nameplate} expires in {left:.0f} s unused: drawing the next "
                 "one", nameplate=self.invitation.nameplate,
                 left=max(0.0, self._expires_at - self.reactor.seconds()))

        async def again():
            try:
                invitation = await self._draw(conn)
            except net_error.ConnectionClosed:
                return      # the connection ended under it: ``_lost`` says why
            except Exception as exc:
                self._drop(conn, exc)   # the server refused: start afresh
                return
            if conn is self.conn and not self._done:
                self._replaced(invitation, same_connection=True)
        defer.ensureDeferred(again())

    # --- the customer -----------------------------------------------------------------------
    def _customer_joined(self, conn, ticket: dict) -> None:
        invitation = self._drawn.get(ticket.get("nameplate", ""))
        if self._done or conn is not self.conn or invitation is None:
            raise control.WrongState("this ad-hoc ID is no longer on offer")
        if self._expiry is not None and self._expiry.active():
            self._expiry.cancel()
        self._stop_heartbeat()       # the session keeps its own connection alive
        self.invitation = invitation
        self.delegate.adhoc_event(CustomerJoined(invitation.adhoc_id, ticket["peer_address"]))
        self.joined.callback((invitation, ticket))

    # --- the connection ---------------------------------------------------------------------
    def _connection_gone(self) -> None:
        if self._expiry is not None and self._expiry.active():
            self._expiry.cancel()
        self._gone = self._gone or ReplaceReason.CONNECTION_LOST

    def _offline(self, why: "str | BaseException", retry_in: float) -> None:
        self._gone = self._gone or ReplaceReason.CONNECTION_LOST
        self.delegate.adhoc_event(Offline(self.adhoc_id, why, retry_in))
