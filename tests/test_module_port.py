"""The module port against bad input: each refusal is a logged reason and an error answer or a
closed connection, and every other connection goes on undisturbed.

A raw TLS client speaks AMP boxes with our own codec, the way a broken or hostile module would.
"""

from __future__ import annotations

import socket
import ssl

import pytest

from protocol.framing import BoxDecoder, encode_box

from .fixtures_server import run_cli

pytestmark = pytest.mark.e2e


class RawModule:
    def __init__(self, srv, home=None) -> None:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.load_verify_locations(cadata=(srv.cert_dir / "ca.crt").read_text())
        if home is not None:
            ctx.load_cert_chain(home / "cert.pem", home / "key.pem")
        raw = socket.create_connection(("127.0.0.1", srv.module_port), timeout=10)
        self.sock = ctx.wrap_socket(raw, server_hostname="127.0.0.1")
        self.decoder = BoxDecoder()
        self.tag = 0

    def call(self, command: str, **arguments: bytes) -> dict:
        self.tag += 1
        box = {b"_command": command.encode(), b"_ask": str(self.tag).encode(), **{
            k.encode(): v for k, v in arguments.items()}}
        self.sock.sendall(encode_box(box))
        return self.read_box()

    def read_box(self) -> dict:
        while True:
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError("closed by the server")
            boxes = self.decoder.receive(data)
            if boxes:
                return boxes[0]

    def closed_by_server(self) -> bool:
        try:
            while self.sock.recv(65536):
                pass
            return True
        except (ConnectionError, ssl.SSLError):
            return True
        except socket.timeout:
            return False

    def hello(self) -> dict:
        return self.call("Hello", protocol_version=b"1", module_version=b"test", module_kind=b"test")


def read_boxes(module: RawModule, count: int) -> list[dict]:
    """The next ``count`` boxes the server sends (several may come in one read)."""
    boxes: list[dict] = []
    while len(boxes) < count:
        data = module.sock.recv(65536)
        if not data:
            raise ConnectionError("closed by the server")
        boxes.extend(module.decoder.receive(data))
    return boxes


def error_code(box: dict) -> bytes:
    assert b"_error" in box, box
    return box[b"_error_code"]


def still_serving(srv, home) -> None:
    status = run_cli("supporter", "status", "--home", str(home))
    assert status.returncode == 0, status.stderr


def test_commands_out_of_order_or_for_another_role_are_refused(running_server, enrolled_supporter,
                                                               enrolled_host):
    srv = running_server
    m = RawModule(srv, enrolled_supporter)
    assert error_code(m.call("AllocateNameplate")) == b"WRONG_STATE"  # no Hello yet
    assert m.hello()[b"identity"] == b"hausmeister:supporter:alice"
    assert error_code(m.hello()) == b"WRONG_STATE"  # Hello twice
    assert len(m.call("AllocateNameplate")[b"nameplate"]) == 4  # the connection goes on
    # A relay leg must be a connection of its own: asked later, it is a violation.
    assert error_code(m.call("OpenRelayLeg", relay_token=b"x")) == b"WRONG_STATE"
    assert m.closed_by_server()

    customer = RawModule(srv)  # no certificate
    customer.hello()
    assert error_code(customer.call("ListHosts")) == b"NOT_ENROLLED"
    assert error_code(customer.call("AllocateNameplate")) == b"NOT_ENROLLED"
    assert error_code(customer.call("JoinAdhoc", nameplate=b"12")) == b"UNKNOWN_NAMEPLATE"
    assert error_code(customer.call("JoinAdhoc", nameplate=b"1234")) == b"WRONG_STATE"  # once only

    host = RawModule(srv, enrolled_host)
    assert error_code(host.call("Heartbeat")) == b"WRONG_STATE"  # no Hello yet
    answer = host.hello()  # identity and expiry from what the verify callback parsed
    assert answer[b"role"] == b"host" and answer[b"identity"].startswith(b"hausmeister:host:")
    assert answer[b"certificate_not_after"].startswith(b"20")
    beat = host.call("Heartbeat")  # answered without AMP's responder machinery, same box
    assert beat[b"_answer"] == str(host.tag).encode() and float(beat[b"server_time"]) > 0
    # heartbeats several to a TLS record and one split over two records: each answered, in order
    beats = [encode_box({b"_command": b"Heartbeat", b"_ask": b"b%d" % i}) for i in range(4)]
    host.sock.sendall(beats[0] + beats[1] + beats[2][:5])
    host.sock.sendall(beats[2][5:] + beats[3])
    assert [box[b"_answer"] for box in read_boxes(host, 4)] == [b"b0", b"b1", b"b2", b"b3"]
    assert error_code(host.call("AllocateNameplate")) == b"FORBIDDEN"
    assert error_code(host.call("ConnectHost", host=b"pc1")) == b"FORBIDDEN"

    old = RawModule(srv)
    assert error_code(old.call("Hello", protocol_version=b"99", module_version=b"x",
                               module_kind=b"x")) == b"PROTOCOL_VERSION"
    assert "refused" in srv.log()

    # A heartbeat is answered ahead of AMP's dispatcher, yet its tag is checked as any other:
    # the tag of a command still unanswered (ListHosts waits for the database) closes the
    # connection, and so does a heartbeat beyond the 32 commands a connection may have open.
    reused = RawModule(srv, enrolled_supporter)
    reused.hello()
    reused.sock.sendall(encode_box({b"_command": b"ListHosts", b"_ask": b"7"})
                        + encode_box({b"_command": b"Heartbeat", b"_ask": b"7"}))
    assert reused.closed_by_server()
    crowd = RawModule(srv, enrolled_supporter)
    crowd.hello()
    crowd.sock.sendall(b"".join(encode_box({b"_command": b"ListHosts", b"_ask": b"%d" % i})
                                for i in range(32))
                       + encode_box({b"_command": b"Heartbeat", b"_ask": b"x"}))
    assert crowd.closed_by_server()
    log = srv.log()
    assert "request tag b'7' reused before it was answered" in log
    assert "more than 32 commands outstanding" in log


def test_malformed_and_oversized_frames_close_only_that_connection(running_server,
                                                                    enrolled_supporter):
    srv = running_server
    bystander = RawModule(srv, enrolled_supporter)
    bystander.hello()

    garbage = RawModule(srv)
    garbage.sock.sendall(b"\x01\x00" + b"A" * 300)  # key longer than 255 bytes
    assert garbage.closed_by_server()

    huge = RawModule(srv)
    key = b"k"
    value = b"v" * 65535
    try:
        for _ in range(6):  # > 256 KiB in one box
            huge.sock.sendall(len(key).to_bytes(2, "big") + key + len(value).to_bytes(2, "big") + value)
            key = bytes([key[0] + 1])
    except (ConnectionError, ssl.SSLError):
        pass
    assert huge.closed_by_server()

    nonsense = RawModule(srv)
    nonsense.sock.sendall(encode_box({b"hello": b"world"}))  # neither command nor answer
    assert nonsense.closed_by_server()

    unknown = RawModule(srv)
    unknown.hello()
    answer = unknown.call("NoSuchCommand")
    assert b"_error" in answer  # answered, connection stays
    assert error_code(unknown.call("AllocateNameplate")) == b"NOT_ENROLLED"

    # The bystander never noticed.
    assert len(bystander.call("AllocateNameplate")[b"nameplate"]) == 4
    still_serving(srv, enrolled_supporter)
    log = srv.log()
    assert "closing AMP connection" in log


def test_relay_leg_with_a_bad_token_is_refused(running_server):
    srv = running_server
    leg = RawModule(srv)
    box = leg.call("OpenRelayLeg", relay_token=b"not-a-token")
    assert error_code(box) == b"RELAY_REFUSED"
    assert leg.closed_by_server()


def test_malformed_commands_are_one_logged_line_and_a_precise_answer(running_server,
                                                                     enrolled_supporter):
    """Issue 10, finding 8: a Hello without protocol_version (or with a value of the wrong type)
    and command names that are not ASCII are answered BAD_REQUEST, logged as one line per
    connection without a traceback, and that connection is closed."""
    srv = running_server
    bystander = RawModule(srv, enrolled_supporter)
    bystander.hello()
    before = len(srv.log().splitlines())

    forgetful = RawModule(srv, enrolled_supporter)
    box = forgetful.call("Hello", module_version=b"test", module_kind=b"supporter")
    assert error_code(box) == b"BAD_REQUEST"
    assert box[b"_error_description"] == b"Hello without argument protocol_version"
    assert forgetful.closed_by_server()

    typo = RawModule(srv)
    box = typo.call("Hello", protocol_version=b"1.0", module_version=b"t", module_kind=b"t")
    assert error_code(box) == b"BAD_REQUEST" and b"protocol_version" in box[b"_error_description"]
    assert typo.closed_by_server()

    silent = RawModule(srv)  # an unknown command without an answer tag: nobody to answer
    silent.sock.sendall(encode_box({b"_command": b"NoSuchCommand"}) * 50)
    assert silent.closed_by_server()

    flooders = []
    for _ in range(5):  # each sends 200 non-ASCII commands in one go
        flooder = RawModule(srv)
        flooder.sock.sendall(b"".join(encode_box({b"_command": "Grüß".encode(), b"_ask": b"%d" % i})
                                      for i in range(200)))
        flooders.append(flooder)
    for flooder in flooders:
        assert error_code(flooder.read_box()) == b"BAD_REQUEST"
        assert flooder.closed_by_server()

    assert len(bystander.call("AllocateNameplate")[b"nameplate"]) == 4
    new_lines = srv.log().splitlines()[before:]
    assert not [line for line in new_lines if "Traceback" in line or "Unknown Error" in line
                or '"level": "critical"' in line or "unhandled by client" in line], new_lines
    assert sum("without argument protocol_version" in line for line in new_lines) == 1
    assert sum("protocol_version = b'1.0' is not a valid Integer" in line for line in new_lines) == 1
    assert sum("is not printable ASCII" in line for line in new_lines) == 5  # one per connection
    assert sum("one-way command b'NoSuchCommand' failed" in line for line in new_lines) == 1


def tls_module(srv, home=None, session=None, contexts: dict = {}) -> RawModule:  # noqa: B006
    """A raw module connection (``home``'s certificate, or none: a customer) offering ``session``
    (a session is offered only on the context that made it: one context per certificate)."""
    ctx = contexts.get((srv.module_port, home))
    if ctx is None:
        ctx = contexts[(srv.module_port, home)] = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.load_verify_locations(cadata=(srv.cert_dir / "ca.crt").read_text())
        if home is not None:
            ctx.load_cert_chain(home / "cert.pem", home / "key.pem")
    raw = socket.create_connection(("127.0.0.1", srv.module_port), timeout=10)
    module = RawModule.__new__(RawModule)
    module.sock = ctx.wrap_socket(raw, server_hostname="127.0.0.1", session=session)
    module.decoder, module.tag = BoxDecoder(), 0
    return module


def test_tls_sessions_resume_for_supporters_and_customers_never_for_hosts_nor_revoked(
        running_server, enrolled_supporter, enrolled_host):
    """A resumed TLS session skips OpenSSL's verify callback (chain and revocation checks).
    The module port lets supporters and customers resume (their relay legs save a third of the
    handshake) and judges the session's certificate again; hosts get no resumable session.
    Each first connection stays open while its session is offered: OpenSSL marks the session
    of a connection freed without a close_notify unresumable, and the client would not offer it."""
    srv = running_server
    first_host = tls_module(srv, enrolled_host)
    assert first_host.hello()[b"role"] == b"host"  # reading the answer reads the tickets too
    again = tls_module(srv, enrolled_host, first_host.sock.session)
    assert not again.sock.session_reused  # a host's ticket is not resumable
    assert again.hello()[b"role"] == b"host"

    first_customer = tls_module(srv)
    assert first_customer.hello()[b"role"] == b"customer"
    again = tls_module(srv, None, first_customer.sock.session)
    assert again.sock.session_reused
    assert again.hello()[b"identity"] == b"anonymous"

    first = tls_module(srv, enrolled_supporter)
    assert first.hello()[b"identity"] == b"hausmeister:supporter:alice"
    session = first.sock.session
    resumed = tls_module(srv, enrolled_supporter, session)
    assert resumed.sock.session_reused
    # the identity comes from the session's certificate, as from a full handshake
    assert resumed.hello()[b"identity"] == b"hausmeister:supporter:alice"
    assert len(resumed.call("AllocateNameplate")[b"nameplate"]) == 4

    srv.ok("cert", "revoke", "hausmeister:supporter:alice", "--reason", "laptop stolen")
    assert resumed.closed_by_server()  # dropped once the server has read the revocation
    after = tls_module(srv, enrolled_supporter, session)
    assert after.sock.session_reused  # TLS resumed it: the module port refuses it above TLS
    with pytest.raises((ConnectionError, ssl.SSLError)):
        after.hello()  # closed before its first command is answered
    assert "refused a resumed session of revoked certificate" in srv.log()
    first.sock.close()
