"""Twisted AMP with our own box framing, hard limits, and a clean switch to raw bytes.

``FramedAMP`` is ``amp.AMP`` with its receiving side replaced: bytes go through
``framing.BoxDecoder`` (bounded box size and key count), and each box is checked before AMP's
dispatcher sees it.  Sending stays AMP's own (``sendBox``).  Whatever the peer does wrong — bytes
that are not a box, a box that is neither command nor answer nor error, an answer to nothing,
too many unanswered commands — is logged with the peer's address and a reason, and the
connection is closed; it never raises out of ``dataReceived``.  Unknown commands are answered by
AMP with an error box and the connection stays (sent without an answer tag, an unknown command
or one whose responder refuses has nobody to be answered: one line, and the connection closes).  A command the peer got wrong — a name that is
not printable ASCII, an argument missing or of the wrong type — is one logged line, an error
answer with the code ``BAD_REQUEST`` that says what was wrong, and a closed connection: one line
per connection, never a traceback, so a peer cannot fill the log.

``switch_to_raw`` turns the connection into a plain byte pipe after a box (how a connection
becomes a relay leg after ``OpenRelayLeg``).  What the commands mean is not this module's
business: responders live in the server and the modules.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from twisted.internet import defer
from twisted.logger import Logger
from twisted.protocols import amp
from twisted.python.failure import Failure

from .framing import DEFAULT_MAX_BOX_BYTES, DEFAULT_MAX_KEYS, Box, BoxDecoder, FramingError

log = Logger()

DEFAULT_MAX_PENDING_COMMANDS = 32

#: Error code of the answer to a command the peer got wrong (``protocol.control.BadRequest``).
BAD_REQUEST = b"BAD_REQUEST"
_COMMAND_NAME = re.compile(rb"[\x21-\x7e]{1,255}")  # printable ASCII, as AMP's locators need

#: ``_answers_due`` while nothing is due: an empty set costs 216 bytes, and an idle host's
#: connection has no command of its peer outstanding for almost all its life
_NONE_DUE: frozenset[bytes] = frozenset()

_PENDING = "pending"  # switch_to_raw was called; answers still due or a dispatch still running
_RAW = "raw"          # every further byte goes to the receiver


#: what ``amp._DescriptorExchanger.__init__`` sets per connection (see ``FramedAMP.__init__``)
_DESCRIPTOR_STATE = ("_descriptors", "_getDescriptor", "_sendingDescriptorCounter",
                     "_receivingDescriptorCounter")


class FramedAMP(amp.AMP):
    """``amp.AMP`` reading boxes with ``BoxDecoder``; see the module docstring.

    Keyword arguments: ``locator`` as for ``amp.AMP``; ``max_pending_commands`` bounds the
    commands from the peer that are being processed at once (asked ones until their answer is
    sent, one-way ones until their responder finishes); ``max_box_bytes`` and ``max_keys`` bound
    each incoming box.
    """

    def __init__(self, *, locator: amp.IResponderLocator | None = None,
                 max_pending_commands: int = DEFAULT_MAX_PENDING_COMMANDS,
                 max_box_bytes: int = DEFAULT_MAX_BOX_BYTES,
                 max_keys: int = DEFAULT_MAX_KEYS) -> None:
        # The box receiver is always this object: the checks below rely on its dispatcher state.
        super().__init__(locator=locator)
        # AMP's file-descriptor exchange (a dict, its bound pop and two counters: ~630 bytes
        # per connection) works over UNIX sockets only; these connections are TLS over TCP.
        for name in _DESCRIPTOR_STATE:
            delattr(self, name)
        self.max_pending_commands = max_pending_commands
        self._decoder = BoxDecoder(max_box_bytes=max_box_bytes, max_keys=max_keys)
        self._dispatching = False
        self._closing = False    # we found the peer at fault and are closing
        self._aborted = False
        self._answers_due: set[bytes] | frozenset[bytes] = _NONE_DUE  # _ask tags of peer
        # commands not answered yet
        self._one_way_running = 0
        self._raw_state: str | None = None
        self._raw_receiver: Callable[[bytes], None] | None = None
        self._raw_on_lost: Callable[[Failure], None] | None = None
        self._raw_backlog = bytearray()  # bytes that came while the switch was pending
        self._lost: Failure | None = None

    def fileDescriptorReceived(self, descriptor: int) -> None:
        raise amp.ProtocolSwitched("file descriptors are not passed over these connections")

    def _sendFileDescriptor(self, descriptor: int) -> int:
        raise amp.ProtocolSwitched("file descriptors are not passed over these connections")

    # --- the switch to raw bytes ------------------------------------------------------------

    def switch_to_raw(self, receiver: Callable[[bytes], None],
                      on_lost: Callable[[Failure], None]) -> None:
        """Parse no further box; from now on the connection is a byte pipe.

        Call it synchronously while handling the last box: on the server from the responder
        (or an ``ampBoxReceived`` override) that answers it, on the client from the callback of
        the ``callRemote`` whose answer is the last box.  Bytes the peer sent behind that box,
        even in the same read, go to ``receiver`` once the current box has been handled and
        every answer still due to the peer has been sent — so on the wire our raw bytes follow
        the answer, and ``receiver`` is never entered from inside the caller.  Outstanding
        ``callRemote``s fail with ``amp.ProtocolSwitched`` now (no answer can come any more);
        new ones fail the same way.  When the connection ends, ``on_lost(reason)`` is called
        (at once if it has ended already).
        """
        if self._raw_state is not None:
            raise amp.ProtocolSwitched("switch_to_raw was called already")
        self._decoder.pause()
        self._raw_receiver, self._raw_on_lost = receiver, on_lost
        self._raw_state = _PENDING
        if self._lost is not None:
            on_lost(self._lost)
            return
        self.failAllOutgoing(Failure(amp.ProtocolSwitched(
            "the connection switched to raw bytes before this command was answered")))
        self._finish_switch()

    def _finish_switch(self) -> None:
        if (self._raw_state != _PENDING or self._dispatching or self._answers_due
                or self._closing or self._lost is not None):
            return
        self._raw_state = _RAW
        early = self._decoder.take_unparsed() + bytes(self._raw_backlog)
        self._raw_backlog.clear()
        if early:
            self._raw_receiver(early)

    def _switchTo(self, newProto, clientFactory=None) -> None:
        """``amp.ProtocolSwitchCommand`` support on top of ``switch_to_raw``."""
        newProto.makeConnection(self.transport)

        def lost(reason: Failure) -> None:
            newProto.connectionLost(reason)
            if clientFactory is not None:
                clientFactory.clientConnectionLost(None, reason)

        self.switch_to_raw(newProto.dataReceived, lost)

    # --- receiving ----------------------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        self._justStartedTLS = False  # as BinaryBoxProtocol.dataReceived does
        if self._closing:
            # loseConnection may keep reading (TLS); a peer that goes on talking is cut off
            self._abort()
            return
        if self._raw_state == _RAW:
            self._raw_receiver(data)
            return
        if self._raw_state == _PENDING:
            # the peer cannot have seen our answer yet, so it has no business sending much
            self._raw_backlog += data
            if len(self._raw_backlog) > self._decoder.max_box_bytes:
                self._protocol_violation(
                    f"more than {self._decoder.max_box_bytes} bytes before the switch to raw "
                    "bytes was answered")
            return
        self._decoder.feed(data)
        nested = self._dispatching  # a responder fed us more bytes synchronously
        self._dispatching = True
        try:
            # one box at a time: a box may switch to raw bytes, and then what follows it
            # must stay unparsed
            while not self._closing:
                try:
                    box = self._decoder.next_box()
                except FramingError as exc:
                    self._protocol_violation(str(exc))
                    return
                if box is None:
                    break
                self._dispatch(box)
        finally:
            self._dispatching = nested
        self._finish_switch()

    def _dispatch(self, box: Box) -> None:
        reason = self._refusal(box)
        if reason is not None:
            self._protocol_violation(reason)
            return
        name = box.get(amp.COMMAND)
        if name is not None and amp.ANSWER not in box and amp.ERROR not in box \
                and not _COMMAND_NAME.fullmatch(name):
            self._bad_request(box, f"command name {name[:40]!r} is not printable ASCII")
            return
        try:
            self.ampBoxReceived(amp.AmpBox(box))
        except Exception:
            # the box passed the checks above, so this is our bug, not the peer's
            log.failure("handling a box from {peer} failed", peer=self._peer())
            self._close()

    def _refusal(self, box: Box) -> str | None:
        """Why this box must not reach AMP's dispatcher, or None.  Same precedence as
        ``BoxDispatcher.ampBoxReceived``: answer, then error, then command."""
        outstanding = self._outstandingRequests or {}
        if amp.ANSWER in box:
            if box[amp.ANSWER] not in outstanding:
                return f"answer to unknown request {box[amp.ANSWER][:20]!r}"
            return None
        if amp.ERROR in box:
            if box[amp.ERROR] not in outstanding:
                return f"error answer to unknown request {box[amp.ERROR][:20]!r}"
            if amp.ERROR_CODE not in box or amp.ERROR_DESCRIPTION not in box:
                return "error answer without _error_code or _error_description"
            return None
        if amp.COMMAND in box:
            tag = box.get(amp.ASK)
            if tag is not None and tag in self._answers_due:
                return f"request tag {tag[:20]!r} reused before it was answered"
            if len(self._answers_due) + self._one_way_running >= self.max_pending_commands:
                return f"more than {self.max_pending_commands} commands outstanding"
            return None
        return "box has none of _command, _answer, _error"

    def _wrapWithSerialization(self, aCallable, command):
        """AMP's responder wrapper, with arguments that do not parse answered as a bad request.

        AMP parses the arguments synchronously before it calls the responder (whose own
        exceptions become a failed Deferred), so an exception out of ``serialized`` is the
        peer's: a missing argument or a value of the wrong type.  AMP alone would log it as a
        critical traceback and answer "UNKNOWN / Unknown Error"."""
        serialized = super()._wrapWithSerialization(aCallable, command)

        def responder(box):
            try:
                return serialized(box)
            except Exception:
                return self._bad_request(box, _argument_problem(command, box, self))

        return responder

    def _bad_request(self, box, reason: str) -> defer.Deferred:
        """Log one line, answer ``BAD_REQUEST`` with the reason (if the peer asked) and close."""
        if not self._closing:
            log.warn("closing AMP connection from {peer}: {reason}", peer=self._peer(),
                     reason=reason)
        self._closing = True  # no further box from this peer is dispatched
        tag = box.get(amp.ASK)
        if tag is not None and tag not in self._answers_due and self.transport is not None:
            # not dispatched, so AMP will not answer it: answer here, then close
            self.sendBox(amp.AmpBox({
                amp.ERROR: tag, amp.ERROR_CODE: BAD_REQUEST,
                amp.ERROR_DESCRIPTION: reason.encode("utf-8", "replace")}))
            self.transport.loseConnection()
            return defer.succeed(None)
        if tag is not None:  # AMP answers it: a fatal error is sent, then the connection closes
            return defer.fail(amp.RemoteAmpError(BAD_REQUEST, reason, fatal=True))
        if self.transport is not None:
            self.transport.loseConnection()
        return defer.succeed(None)

    def dispatchCommand(self, box):
        tag = box.get(amp.ASK)
        if tag is not None:
            if not self._answers_due:
                self._answers_due = set()
            self._answers_due.add(tag)  # until sendBox sends the answer or error
            return super().dispatchCommand(box)
        self._one_way_running += 1

        def finished(result):
            self._one_way_running -= 1
            if isinstance(result, Failure) and result.check(amp.RemoteAmpError):
                # an unknown command or a declared error, and no tag to answer it with: AMP
                # would log a critical traceback and drop the connection; one line instead
                self._protocol_violation(f"one-way command {box[amp.COMMAND][:40]!r} "
                                         f"failed: {result.value.description}")
                return None
            return result

        return super().dispatchCommand(box).addBoth(finished)

    # --- sending ------------------------------------------------------------------------------

    def sendBox(self, box) -> None:
        tag = box.get(amp.ANSWER, box.get(amp.ERROR))
        if tag is None or tag not in self._answers_due:
            if self._raw_state is not None:
                raise amp.ProtocolSwitched("this connection carries raw bytes now")
            super().sendBox(box)
            return
        try:
            super().sendBox(box)
        finally:
            self._answers_due.discard(tag)
            if not self._answers_due:
                self._answers_due = _NONE_DUE
        self._finish_switch()

    # --- closing ------------------------------------------------------------------------------

    def failAllOutgoing(self, reason: Failure) -> None:
        if self._outstandingRequests is None:  # failed already, by switch_to_raw
            return
        super().failAllOutgoing(reason)

    def makeConnection(self, transport) -> None:
        # ``amp.AMP.makeConnection`` asks the transport for both addresses and logs "connection
        # established" at info for every connection, which ``protocol.runtime`` filters out
        # again (3 of them per ad-hoc set-up): the callers log who connected themselves.
        amp.BinaryBoxProtocol.makeConnection(self, transport)

    def connectionLost(self, reason: Failure) -> None:
        self._lost = reason
        on_lost = self._raw_on_lost
        try:
            # not ``amp.AMP.connectionLost``: its "connection lost" line, as above
            amp.BinaryBoxProtocol.connectionLost(self, reason)
            self.transport = None
        finally:
            if on_lost is not None:
                on_lost(reason)

    def _protocol_violation(self, reason: str) -> None:
        if self._closing:
            return
        log.warn("closing AMP connection from {peer}: {reason}", peer=self._peer(), reason=reason)
        self._close()

    def _close(self) -> None:
        self._closing = True
        if self.transport is not None:
            self.transport.loseConnection()

    def _abort(self) -> None:
        if self._aborted or self.transport is None:
            return
        self._aborted = True
        abort = getattr(self.transport, "abortConnection", None)
        (abort or self.transport.loseConnection)()

    def _peer(self) -> str:
        peer = self.transport.getPeer() if self.transport is not None else None
        host, port = getattr(peer, "host", None), getattr(peer, "port", None)
        if host is None:
            return str(peer)
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _argument_problem(command: type[amp.Command], box, proto) -> str:
    """Which argument of ``box`` does not parse for ``command``, in one line."""
    name = command.commandName.decode("ascii", "replace")
    for key, argument in command.arguments:
        label = key.decode("ascii", "replace")
        if key not in box:
            if getattr(argument, "optional", False):
                continue
            return f"{name} without argument {label}"
        try:
            argument.fromBox(key, dict(box), {}, proto)
        except Exception as exc:
            return (f"{name} argument {label} = {box[key][:40]!r} is not a valid "
                    f"{type(argument).__name__} ({type(exc).__name__}: {str(exc)[:80]!r})")
    return f"{name} arguments do not parse"
