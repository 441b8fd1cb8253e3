"""Runs a ``SessionChannel`` over a relayed byte pipe on the reactor.

The pipe is a ``RelayLeg`` or anything shaped like it: ``send(bytes)``, ``attach(sink)``, an
``ended`` Deferred and ``close()``.  This adapter only moves bytes and events; everything the
channel decides stays in ``channel.py``.  The host-flow argon2id derivation runs in the blocking
pool, never on the reactor thread.
"""

from __future__ import annotations

from typing import Any, Callable

from twisted.internet.defer import Deferred

from protocol.runtime import run_blocking

from modules.common.session.channel import HOST_KDF, HostKdf, Mode, Role, SessionChannel, derive_host_secret
from modules.common.session.channel_events import (Closed, Event, Failed, FailureKind, HostSaltReceived, KeyConfirmed,
                             Record)


class ChannelFailure(Exception):
    """``confirmed`` fails with this when the channel fails before key confirmation."""

    def __init__(self, failed: Failed) -> None:
        super().__init__(failed.reason)
        self.failed = failed


class ChannelOverPipe:
    """``confirmed`` fires with ``KeyConfirmed`` (or fails with ``ChannelFailure``); ``ended``
    fires with ``Closed`` or ``Failed``.  ``host_password`` is the typed password of a supporter
    in the host flow."""

    def __init__(self, pipe: Any, channel: SessionChannel, on_record: Callable[[bytes], None],
                 host_password: str | None = None, kdf: HostKdf = HOST_KDF) -> None:
        if channel.mode is Mode.HOST and channel.role is Role.SUPPORTER and not host_password:
            raise ValueError("a supporter in the host flow needs the typed host password")
        self.pipe, self.channel, self.on_record = pipe, channel, on_record
        self._host_password, self._kdf = host_password, kdf
        self.confirmed: Deferred = Deferred()
        self.ended: Deferred = Deferred()
        self._send(channel.start())  # our hello goes out before anything we answer with
        pipe.attach(lambda data: self._handle(channel.receive(data)))
        pipe.ended.addBoth(lambda _reason: self._handle(channel.eof()))

    def send_record(self, payload: bytes) -> None:
        self._send(self.channel.seal(payload))

    def close(self) -> None:
        """Send the close record; the pipe closes once the peer's close record arrives.
        Before key confirmation (or after a failure) the pipe is simply closed."""
        if self.channel.confirmed and self.channel.failure is None:
            self._send(self.channel.close())
        else:
            self.pipe.close()

    def _send(self, data: bytes) -> None:
        if data:
            self.pipe.send(data)

    def _handle(self, events: list[Event]) -> None:
        self._send(self.channel.data_to_send())
        for event in events:
            if isinstance(event, Record):
                self.on_record(event.payload)
            elif isinstance(event, KeyConfirmed):
                self.confirmed.callback(event)
            elif isinstance(event, HostSaltReceived):
                d = run_blocking(derive_host_secret, self._host_password, event.salt, self._kdf)
                d.addCallback(lambda secret: self._handle(self.channel.provide_password(secret)))
                d.addErrback(lambda f: self._end(Failed(f"cannot derive the host password: "
                                                        f"{f.getErrorMessage()}",
                                                        FailureKind.PROTOCOL)))
            elif isinstance(event, (Closed, Failed)):
                if isinstance(event, Closed):
                    self._send(self.channel.close())   # answer the peer's close with ours
                self._end(event)

    def _end(self, event: Closed | Failed) -> None:
        self.pipe.close()
        if not self.confirmed.called:
            self.confirmed.errback(ChannelFailure(event))
        if not self.ended.called:
            self.ended.callback(event)
