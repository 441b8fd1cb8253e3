"""FramedAMP against stock Twisted AMP peers and itself, over in-memory transports: calls both
ways, refusals that close only the guilty connection, the switch to raw bytes on either side,
and the bound on unanswered commands."""

from __future__ import annotations

import pytest
from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.protocol import Protocol
from twisted.internet.testing import StringTransport
from twisted.logger import LogLevel, capturedLogs
from twisted.protocols import amp
from twisted.python.failure import Failure
from twisted.test import iosim

from protocol.amp_adapter import DEFAULT_MAX_PENDING_COMMANDS, FramedAMP
from protocol.control import (
    ERRORS,
    BadRequest,
    Heartbeat,
    Hello,
    ListHosts,
    OfferSession,
    OpenRelayLeg,
    RelayRefused,
    SessionReady,
)
from protocol.framing import BoxDecoder, encode_box

PEER = IPv4Address("TCP", "192.0.2.7", 50123)

HELLO_ANSWER = {"server_version": "0.1", "identity": "module:abc", "role": "supporter",
                "tenant": "praxis", "certificate_not_after": "2030-01-01",
                "heartbeat_seconds": 30.0}


class Server(FramedAMP):
    """The responders a test needs; OpenRelayLeg switches to raw bytes."""

    def __init__(self, **kw) -> None:
        super().__init__(**kw)
        self.raw: list[bytes] = []
        self.lost: list[Failure] = []
        self.wire_at_first_raw: bytes | None = None
        self.heartbeats: list[defer.Deferred] | None = None  # set: answer heartbeats later

    @Hello.responder
    def hello(self, protocol_version, module_version, module_kind):
        return HELLO_ANSWER

    @Heartbeat.responder
    def heartbeat(self):
        if self.heartbeats is None:
            return {"server_time": 1.5}
        d = defer.Deferred()
        self.heartbeats.append(d)
        return d

    @OpenRelayLeg.responder
    def open_relay_leg(self, relay_token):
        if relay_token != "good":
            raise RelayRefused("unknown relay token")
        self.switch_to_raw(self.received, self.lost.append)
        return {"session_id": "s1"}

    def received(self, data: bytes) -> None:
        if self.wire_at_first_raw is None and isinstance(self.transport, StringTransport):
            self.wire_at_first_raw = self.transport.value()
        self.raw.append(data)


class StockClient(amp.AMP):
    """Plain Twisted AMP: answers the server's calls to a module."""

    @SessionReady.responder
    def session_ready(self, **fields):
        self.ready = fields
        return {}

    @OfferSession.responder
    def offer_session(self, **fields):
        return {"accepted": fields["supporter"] == "alice"}


class StockServer(amp.AMP):
    @Hello.responder
    def hello(self, protocol_version, module_version, module_kind):
        return HELLO_ANSWER

    @ListHosts.responder
    def list_hosts(self):
        return {"hosts": [{"host_id": f"h{i}", "name": f"Host {i}", "group": "Praxis",
                           "online": i % 2 == 0, "last_seen": "", "address": "192.0.2.9",
                           "module_version": "0.1"} for i in range(40)]}


class NoSuchCommand(amp.Command):
    arguments: list = []
    response: list = []


class NoAnswer(amp.Command):
    arguments: list = []
    requiresAnswer = False


RELAY = {"session_id": "s1", "relay_host": "relay.example", "relay_port": 4443,
         "relay_token": "t"}


def server_transport(proto):
    return iosim.FakeTransport(proto, isServer=True, peerAddress=PEER)


def connect(server_class=Server, client_class=StockClient):
    client, server, pump = iosim.connectedServerAndClient(
        server_class, client_class, serverTransportFactory=server_transport)
    return client, server, pump


class Outcome:
    """Watches a Deferred from the moment it is made.  AMP drops the connection when an error
    answer finds no errback, so the watcher must be attached before the answer comes."""

    def __init__(self, d: defer.Deferred) -> None:
        self._results: list = []
        d.addBoth(self._results.append)

    @property
    def value(self):
        assert self._results, "the Deferred has not fired"
        if isinstance(self._results[0], Failure):
            self._results[0].raiseException()
        return self._results[0]

    def failure(self, *types) -> Failure:
        assert self._results and isinstance(self._results[0], Failure), self._results
        assert self._results[0].check(*types), self._results[0]
        return self._results[0]

    @property
    def fired(self) -> bool:
        return bool(self._results)


def on_string_transport(proto) -> StringTransport:
    transport = StringTransport(peerAddress=PEER)
    proto.makeConnection(transport)
    return transport


def warnings_in(events) -> list[dict]:
    return [e for e in events if e.get("log_level") == LogLevel.warn and "reason" in e]


# --- calls both ways ----------------------------------------------------------------------------

def test_stock_client_calls_framed_server():
    client, server, pump = connect()
    hello = Outcome(client.callRemote(Hello, protocol_version=1, module_version="0.1",
                                      module_kind="host"))
    heartbeat = Outcome(client.callRemote(Heartbeat))
    pump.flush()
    assert hello.value == HELLO_ANSWER
    assert heartbeat.value == {"server_time": 1.5}


def test_framed_server_calls_stock_client():
    client, server, pump = connect()
    ready = Outcome(server.callRemote(SessionReady, nameplate="1234",
                                      peer_address="198.51.100.1", **RELAY))
    offer = Outcome(server.callRemote(OfferSession, supporter="alice", supporter_fingerprint="",
                                      **RELAY))
    pump.flush()
    assert ready.value == {}
    assert client.ready["relay_port"] == 4443
    assert offer.value == {"accepted": True}


def test_framed_client_calls_stock_server_with_nested_lists():
    client, server, pump = connect(StockServer, FramedAMP)
    listing = Outcome(client.callRemote(ListHosts))
    pump.flush()
    hosts = listing.value["hosts"]
    assert [h["host_id"] for h in hosts] == [f"h{i}" for i in range(40)]
    assert hosts[1]["online"] is False


def test_declared_error_reaches_the_caller_and_the_connection_stays():
    client, server, pump = connect()
    refused = Outcome(client.callRemote(OpenRelayLeg, relay_token="bad"))
    pump.flush()
    assert str(refused.failure(RelayRefused).value) == "unknown relay token"
    heartbeat = Outcome(client.callRemote(Heartbeat))
    pump.flush()
    assert heartbeat.value == {"server_time": 1.5}


def test_unknown_command_gets_an_error_answer_and_the_connection_stays():
    client, server, pump = connect()
    with capturedLogs() as events:
        unknown = Outcome(client.callRemote(NoSuchCommand))
        pump.flush()
    unknown.failure(amp.UnhandledCommand)
    assert not warnings_in(events)
    heartbeat = Outcome(client.callRemote(Heartbeat))
    pump.flush()
    assert heartbeat.value == {"server_time": 1.5}


# --- refusals -----------------------------------------------------------------------------------

def test_malformed_bytes_close_only_that_connection_with_a_logged_reason():
    bad_client, bad_server, bad_pump = connect()
    good_client, good_server, good_pump = connect()
    bad_transport = bad_server.transport
    pending = Outcome(bad_client.callRemote(Heartbeat))
    with capturedLogs() as events:
        bad_client.transport.write(b"\x01\x00" + b"k" * 256)  # key length 256
        bad_pump.flush()
    [event] = warnings_in(events)
    assert event["peer"] == "192.0.2.7:50123"
    assert event["reason"] == "key length 256 exceeds 255"
    assert bad_transport.disconnected and bad_server.transport is None
    assert pending.value == {"server_time": 1.5}  # it came in the same read, before the junk
    late = Outcome(bad_client.callRemote(Heartbeat))
    bad_pump.flush()
    late.failure(ConnectionDone, ConnectionLost)
    heartbeat = Outcome(good_client.callRemote(Heartbeat))
    good_pump.flush()
    assert heartbeat.value == {"server_time": 1.5}
    assert not good_server.transport.disconnecting


@pytest.mark.parametrize("box, reason", [
    ({b"hello": b"x"}, "box has none of _command, _answer, _error"),
    ({b"_ask": b"1"}, "box has none of _command, _answer, _error"),
    ({b"_answer": b"99"}, "answer to unknown request b'99'"),
    ({b"_error": b"99", b"_error_code": b"X", b"_error_description": b""},
     "error answer to unknown request b'99'"),
])
def test_boxes_outside_the_protocol_close_the_connection(box, reason):
    server = Server()
    transport = on_string_transport(server)
    with capturedLogs() as events:
        server.dataReceived(encode_box(box))
    assert [e["reason"] for e in warnings_in(events)] == [reason]
    assert transport.disconnecting
    assert transport.value() == b""


def test_error_answer_without_code_closes_and_the_call_fails_on_loss():
    server = Server()
    transport = on_string_transport(server)
    call = Outcome(server.callRemote(SessionReady, nameplate="1", peer_address="x", **RELAY))
    with capturedLogs() as events:
        server.dataReceived(encode_box({b"_error": b"1"}))
    assert [e["reason"] for e in warnings_in(events)] == [
        "error answer without _error_code or _error_description"]
    assert transport.disconnecting and not call.fired
    server.connectionLost(Failure(ConnectionDone()))
    call.failure(ConnectionDone)


def test_peer_that_keeps_sending_after_a_refusal_is_aborted():
    server = Server()
    transport = on_string_transport(server)
    with capturedLogs():
        server.dataReceived(b"\xff\xff")
    assert transport.disconnecting and not transport.disconnected
    server.dataReceived(encode_box({b"_command": b"Heartbeat", b"_ask": b"1"}))
    assert transport.disconnected  # StringTransport.abortConnection
    assert transport.value() == b""  # and nothing was dispatched


class HelloWithout(amp.Command):
    """A Hello from a module that forgot ``protocol_version``, typed on the caller's side."""

    commandName = b"Hello"
    arguments = [(b"module_version", amp.Unicode()), (b"module_kind", amp.Unicode())]
    response: list = []
    errors = ERRORS


def no_tracebacks(events) -> None:
    assert not [e for e in events if "log_failure" in e or e.get("log_level") in
                (LogLevel.error, LogLevel.critical)], events


def test_missing_argument_is_answered_bad_request_and_closes_with_one_line():
    client, server, pump = connect()
    transport = server.transport
    with capturedLogs() as events:
        hello = Outcome(client.callRemote(HelloWithout, module_version="0.1", module_kind="host"))
        pump.flush()
    refusal = hello.failure(BadRequest).value
    assert str(refusal) == "Hello without argument protocol_version"
    assert [e["reason"] for e in warnings_in(events)] == [
        "Hello without argument protocol_version"]
    no_tracebacks(events)
    assert transport.disconnected


@pytest.mark.parametrize("arguments, reason", [
    ({"protocol_version": b"one", "module_version": b"0.1", "module_kind": b"host"},
     "Hello argument protocol_version = b'one' is not a valid Integer"),
    ({"protocol_version": b"1", "module_version": b"\xff\xfe", "module_kind": b"host"},
     "Hello argument module_version = b'\\xff\\xfe' is not a valid Unicode"),
])
def test_ill_typed_argument_is_answered_bad_request_and_closes(arguments, reason):
    client, server, pump = connect()
    transport = server.transport
    with capturedLogs() as events:
        hello = Outcome(client.callRemoteString(b"Hello", **arguments))
        pump.flush()
    error = hello.failure(amp.RemoteAmpError).value
    assert error.errorCode == b"BAD_REQUEST"
    assert error.description.startswith(reason), error.description
    assert [e["reason"] for e in warnings_in(events)] == [error.description]
    no_tracebacks(events)
    assert transport.disconnected


def test_one_way_command_with_missing_arguments_closes_with_one_line():
    server = Server()
    transport = on_string_transport(server)
    with capturedLogs() as events:
        server.dataReceived(encode_box({b"_command": b"Hello", b"module_kind": b"host"}))
    assert [e["reason"] for e in warnings_in(events)] == ["Hello without argument protocol_version"]
    no_tracebacks(events)
    assert transport.disconnecting and transport.value() == b""  # nothing asked, nothing answered


def test_unknown_one_way_command_is_one_line_and_closes():
    """Without an answer tag there is nobody to tell "unhandled": AMP logged a critical
    traceback for each such box; one line and a closed connection instead."""
    server = Server()
    transport = on_string_transport(server)
    with capturedLogs() as events:
        server.dataReceived(encode_box({b"_command": b"NoSuchCommand"}) * 3)
    assert [e["reason"] for e in warnings_in(events)] == [
        "one-way command b'NoSuchCommand' failed: Unhandled Command: b'NoSuchCommand'"]
    no_tracebacks(events)
    assert transport.disconnecting and transport.value() == b""


def test_non_ascii_command_names_are_one_line_per_connection_and_an_answer():
    server = Server()
    transport = on_string_transport(server)
    with capturedLogs() as events:
        # many in one read, and more after: the log gets one line, the peer one answer
        server.dataReceived(b"".join(encode_box({b"_command": "Hällo".encode(), b"_ask": b"%d" % i})
                                     for i in range(50)))
        server.dataReceived(encode_box({b"_command": b"\xff", b"_ask": b"99"}))
    assert [e["reason"] for e in warnings_in(events)] == [
        "command name b'H\\xc3\\xa4llo' is not printable ASCII"]
    no_tracebacks(events)
    [answer] = BoxDecoder().receive(transport.value())
    assert answer == {b"_error": b"0", b"_error_code": b"BAD_REQUEST",
                      b"_error_description": b"command name b'H\\xc3\\xa4llo' is not printable ASCII"}
    assert transport.disconnected  # aborted: it went on sending after the refusal


def test_framed_client_refuses_a_malformed_command_from_the_server_the_same_way():
    """The modules' side (``ControlClient`` is a FramedAMP too): a server's SessionReady without
    its relay fields is one line and a BAD_REQUEST answer, not a traceback."""
    class FramedClient(FramedAMP):
        @SessionReady.responder
        def session_ready(self, **fields):
            raise AssertionError("must not be called without its arguments")

    client, server, pump = connect(server_class=StockServer, client_class=FramedClient)
    with capturedLogs() as events:
        ready = Outcome(server.callRemoteString(b"SessionReady", session_id=b"s1"))
        pump.flush()
    assert ready.failure(amp.RemoteAmpError).value.errorCode == b"BAD_REQUEST"
    no_tracebacks(events)
    assert len(warnings_in(events)) == 1


# --- raw bytes after a box ----------------------------------------------------------------------

def test_server_switches_after_answering_and_keeps_bytes_of_the_same_read():
    server = Server()
    transport = on_string_transport(server)
    # a pipelining client: the command and raw bytes in one read; the raw bytes look like a
    # box and then like garbage, and must be neither dispatched nor refused
    raw = encode_box({b"_command": b"Heartbeat", b"_ask": b"2"}) + b"\xff\xff\x00"
    with capturedLogs() as events:
        server.dataReceived(encode_box({b"_command": b"OpenRelayLeg", b"_ask": b"1",
                                        b"relay_token": b"good"}) + raw)
    assert not warnings_in(events)
    answer = encode_box({b"_answer": b"1", b"session_id": b"s1"})
    assert server.wire_at_first_raw == answer  # the answer was on the wire first
    assert server.raw == [raw]
    server.dataReceived(b"more")
    assert server.raw == [raw, b"more"]
    assert transport.value() == answer
    assert not transport.disconnecting
    with pytest.raises(amp.ProtocolSwitched):
        server.sendBox(amp.AmpBox(_command=b"Heartbeat"))
    Outcome(server.callRemote(Heartbeat)).failure(amp.ProtocolSwitched)
    assert transport.value() == answer


def test_server_switch_waits_for_an_answer_given_later():
    class SlowServer(Server):
        @OpenRelayLeg.responder
        def open_relay_leg(self, relay_token):
            self.switch_to_raw(self.received, self.lost.append)
            self.answer = defer.Deferred()
            return self.answer

    server = SlowServer()
    transport = on_string_transport(server)
    server.dataReceived(encode_box({b"_command": b"OpenRelayLeg", b"_ask": b"1",
                                    b"relay_token": b"good"}) + b"early")
    server.dataReceived(b"+later")
    assert server.raw == [] and transport.value() == b""
    server.answer.callback({"session_id": "s9"})
    assert server.wire_at_first_raw == encode_box({b"_answer": b"1", b"session_id": b"s9"})
    assert server.raw == [b"early+later"]


def test_switch_while_another_answer_is_due_waits_for_that_answer():
    server = Server()
    server.heartbeats = []
    transport = on_string_transport(server)
    server.dataReceived(
        encode_box({b"_command": b"Heartbeat", b"_ask": b"1"})
        + encode_box({b"_command": b"OpenRelayLeg", b"_ask": b"2", b"relay_token": b"good"})
        + b"raw")
    assert transport.value() == encode_box({b"_answer": b"2", b"session_id": b"s1"})
    assert server.raw == []  # the heartbeat's answer must go out before any raw byte
    server.heartbeats[0].callback({"server_time": 2.0})
    assert amp.parseString(transport.value())[1] == {b"_answer": b"1", b"server_time": b"2.0"}
    assert server.raw == [b"raw"]


def test_client_switches_after_the_answer_and_keeps_bytes_of_the_same_read():
    client = FramedAMP()
    transport = on_string_transport(client)
    raw: list[bytes] = []
    lost: list[Failure] = []
    d = client.callRemote(OpenRelayLeg, relay_token="good")
    d.addCallback(lambda answer: client.switch_to_raw(raw.append, lost.append) or answer)
    opened = Outcome(d)
    assert amp.parseString(transport.value())[0][b"_command"] == b"OpenRelayLeg"
    first = b"\x00\x03RFB 003.008\n\xff\xff"  # would be a framing error if parsed
    with capturedLogs() as events:
        client.dataReceived(encode_box({b"_answer": b"1", b"session_id": b"s1"}) + first)
    assert opened.value == {"session_id": "s1"}
    assert raw == [first]
    client.dataReceived(b"second")
    assert raw == [first, b"second"]
    assert not warnings_in(events) and not transport.disconnecting
    client.connectionLost(Failure(ConnectionDone()))
    assert [f.type for f in lost] == [ConnectionDone]


def test_relay_leg_end_to_end_between_two_framed_peers():
    client, server, pump = connect(Server, FramedAMP)
    client_raw: list[bytes] = []
    client_lost: list[Failure] = []
    d = client.callRemote(OpenRelayLeg, relay_token="good")
    d.addCallback(lambda answer: client.switch_to_raw(client_raw.append, client_lost.append))
    opened = Outcome(d)
    pump.flush()
    opened.value
    client.transport.write(b"from client")
    server.transport.write(b"from server")
    pump.flush()
    assert server.raw == [b"from client"]
    assert client_raw == [b"from server"]
    client.transport.loseConnection()
    pump.flush()
    assert [f.type for f in client_lost] == [ConnectionDone]
    assert [f.type for f in server.lost] == [ConnectionDone]


def test_switch_fails_outstanding_calls_and_later_ones():
    client = FramedAMP()
    transport = on_string_transport(client)
    raw: list[bytes] = []
    lost: list[Failure] = []
    unanswered = Outcome(client.callRemote(Heartbeat))
    d = client.callRemote(OpenRelayLeg, relay_token="good")
    d.addCallback(lambda answer: client.switch_to_raw(raw.append, lost.append))
    opened = Outcome(d)
    client.dataReceived(encode_box({b"_answer": b"2", b"session_id": b"s1"}))
    opened.value
    unanswered.failure(amp.ProtocolSwitched)  # its answer can never be told from raw bytes
    Outcome(client.callRemote(Heartbeat)).failure(amp.ProtocolSwitched)
    assert client.callRemote(NoAnswer) is None
    assert len(amp.parseString(transport.value())) == 2  # nothing sent after the switch
    client.connectionLost(Failure(ConnectionDone()))  # nothing left to fail twice
    assert [f.type for f in lost] == [ConnectionDone]


def test_connection_lost_before_the_switch_completes_calls_on_lost():
    server = Server()
    server.heartbeats = []
    on_string_transport(server)
    server.dataReceived(encode_box({b"_command": b"Heartbeat", b"_ask": b"1"}))
    server.switch_to_raw(server.received, server.lost.append)
    server.connectionLost(Failure(ConnectionLost()))
    assert [f.type for f in server.lost] == [ConnectionLost]
    server.heartbeats[0].callback({"server_time": 2.0})  # too late: no error, no delivery
    assert server.raw == []
    with pytest.raises(amp.ProtocolSwitched):
        server.switch_to_raw(server.received, server.lost.append)


def test_switch_after_the_connection_is_gone_calls_on_lost_at_once():
    client = FramedAMP()
    on_string_transport(client)
    client.connectionLost(Failure(ConnectionDone()))
    lost: list[Failure] = []
    client.switch_to_raw(lambda data: None, lost.append)
    assert [f.type for f in lost] == [ConnectionDone]


def test_protocol_switch_command_still_works():
    class Upper(Protocol):
        def dataReceived(self, data):
            self.transport.write(data.upper())

    class Collect(Protocol):
        got = b""

        def dataReceived(self, data):
            self.got += data

    class SwitchToUpper(amp.ProtocolSwitchCommand):
        arguments: list = []
        response: list = []

    class UpperServer(FramedAMP):
        @SwitchToUpper.responder
        def switch(self):
            return Upper()

    class CollectFactory:
        lost = None

        def buildProtocol(self, addr):
            self.proto = Collect()
            return self.proto

        def clientConnectionLost(self, connector, reason):
            self.lost = reason

    client, server, pump = connect(UpperServer, FramedAMP)
    factory = CollectFactory()
    switched = Outcome(client.callRemote(SwitchToUpper, factory))
    pump.flush()
    switched.value
    factory.proto.transport.write(b"hello")
    pump.flush()
    assert factory.proto.got == b"HELLO"
    client.transport.loseConnection()
    pump.flush()
    assert factory.lost is not None


# --- bound on unanswered commands ---------------------------------------------------------------

def test_unanswered_commands_are_bounded():
    client, server, pump = connect()
    transport = server.transport
    server.heartbeats = []
    calls = [Outcome(client.callRemote(Heartbeat)) for _ in range(DEFAULT_MAX_PENDING_COMMANDS)]
    pump.flush()
    assert len(server.heartbeats) == DEFAULT_MAX_PENDING_COMMANDS
    assert not transport.disconnecting
    for d in server.heartbeats:  # answering frees the slots
        d.callback({"server_time": 1.0})
    pump.flush()
    assert all(call.value == {"server_time": 1.0} for call in calls)
    server.heartbeats = []
    calls = [Outcome(client.callRemote(Heartbeat))
             for _ in range(DEFAULT_MAX_PENDING_COMMANDS + 1)]
    with capturedLogs() as events:
        pump.flush()
    assert [e["reason"] for e in warnings_in(events)] == [
        f"more than {DEFAULT_MAX_PENDING_COMMANDS} commands outstanding"]
    assert len(server.heartbeats) == DEFAULT_MAX_PENDING_COMMANDS  # the last one never ran
    assert transport.disconnected
    calls[-1].failure(ConnectionDone, ConnectionLost)


def test_one_way_commands_count_while_their_responder_runs():
    class OneWay(amp.Command):
        arguments: list = []
        requiresAnswer = False

    class OneWayServer(Server):
        @OneWay.responder
        def one_way(self):
            d = defer.Deferred()
            self.one_ways.append(d)
            return d

    server = OneWayServer(max_pending_commands=2)
    server.one_ways = []
    transport = on_string_transport(server)
    one = encode_box({b"_command": b"OneWay"})
    server.dataReceived(one + one)
    server.one_ways[0].callback({})
    server.dataReceived(one)
    assert not transport.disconnecting and len(server.one_ways) == 3
    with capturedLogs() as events:
        server.dataReceived(one)
    assert [e["reason"] for e in warnings_in(events)] == ["more than 2 commands outstanding"]
    assert transport.disconnecting and len(server.one_ways) == 3


def test_reusing_an_unanswered_tag_is_refused():
    server = Server()
    server.heartbeats = []
    transport = on_string_transport(server)
    with capturedLogs() as events:
        server.dataReceived(encode_box({b"_command": b"Heartbeat", b"_ask": b"7"}) * 2)
    assert [e["reason"] for e in warnings_in(events)] == [
        "request tag b'7' reused before it was answered"]
    assert transport.disconnecting and len(server.heartbeats) == 1


def test_an_idle_connection_keeps_no_set_of_answers_due_and_still_answers():
    """Between commands nothing is due: the connection holds the shared empty frozenset, not a
    216-byte set of its own (bench/README.md, issue 14); answers later still find their tag."""
    from protocol.amp_adapter import _NONE_DUE
    server = Server()
    server.heartbeats = []
    transport = on_string_transport(server)
    assert server._answers_due is _NONE_DUE
    server.dataReceived(encode_box({b"_command": b"Heartbeat", b"_ask": b"1"})
                        + encode_box({b"_command": b"Heartbeat", b"_ask": b"2"}))
    assert server._answers_due == {b"1", b"2"}
    server.heartbeats.pop(0).callback({"server_time": 2.5})
    assert server._answers_due == {b"2"}
    server.heartbeats.pop(0).callback({"server_time": 3.5})
    assert server._answers_due is _NONE_DUE
    decoder = BoxDecoder()
    answers = decoder.receive(transport.value())
    assert [(a[b"_answer"], a[b"server_time"]) for a in answers] == [(b"1", b"2.5"), (b"2", b"3.5")]
    transport.clear()
    server.dataReceived(encode_box({b"_command": b"Heartbeat", b"_ask": b"1"}))  # tag free again
    server.heartbeats.pop(0).callback({"server_time": 4.5})
    assert decoder.receive(transport.value())[0][b"_answer"] == b"1"
    assert server._answers_due is _NONE_DUE and not transport.disconnecting
