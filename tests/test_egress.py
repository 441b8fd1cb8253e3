"""The egress guard refuses connections that are not on the allow-list, before a packet leaves.

Every real connection in this file goes to an address the test itself bound on this machine:
127.0.0.1 and other 127/8 addresses (Linux routes all of 127.0.0.0/8 to the loopback interface),
or an AF_UNIX socket.  No test connects to, or resolves, anything outside the machine; the
"outside" destinations in the policy tests are only ever handed to ``EgressPolicy.allows()``.
The audit hook stays in the process once installed, so every test that changes the policy does
it through ``egress.policy_in_force()`` / ``restore()``, which put the previous state back.
"""

from __future__ import annotations

import errno
import json
import os
import select
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
from pathlib import Path

import pytest
from hypothesis import given, settings, strategies as st

from server import egress
from server.config import ConfigError, from_mapping, load
from server.egress import AllowEntry, EgressPolicy, EgressRefused

REPO = Path(__file__).resolve().parent.parent
INET, INET6, UNIX = socket.AF_INET, socket.AF_INET6, socket.AF_UNIX

FAKE_DNS = {
    "db.internal": ["10.0.0.5"],
    "relay.internal": ["10.0.0.25", "fd00::25"],
    "s3.internal": ["10.0.0.9"],
    "files.internal": ["10.0.0.7"],
    "localhost": ["127.0.0.1", "::1"],
}


def fake_resolve(name: str):
    """Stand-in for DNS, so no test sends a query anywhere."""
    import ipaddress
    return [ipaddress.ip_address(a) for a in FAKE_DNS.get(name.lower(), [])]


def policy_for(raw: dict, own_ports=(), base: Path = Path("/srv")) -> EgressPolicy:
    config = from_mapping(raw, base)
    return EgressPolicy.from_config(config, own_ports, resolve=fake_resolve)


def refused_message(host: str, port: int) -> str:
    return f"egress to {host}:{port} refused: not in the allow-list (config key egress.allow)"


# --- fixtures ---------------------------------------------------------------------------------

@pytest.fixture
def refusals(tmp_path) -> Path:
    return tmp_path / "egress-refusals.jsonl"


@pytest.fixture
def restore_guard():
    """Whatever a test does to the guard, the process gets its previous state back."""
    before = egress.snapshot()
    yield
    egress.restore(before)
    assert egress.snapshot() == before


@pytest.fixture
def guard(refusals, restore_guard):
    """The guard in force with only 127.0.0.1 (any port) allowed."""
    policy = EgressPolicy([AllowEntry("127.0.0.1", None, "test")], name="test")
    with egress.policy_in_force(policy, refusals):
        yield policy


@pytest.fixture
def listen():
    """listen(host, kind) → a socket bound on a loopback address (closed after the test)."""
    opened: list[socket.socket] = []

    def make(host: str, kind: int = socket.SOCK_STREAM) -> socket.socket:
        sock = socket.socket(INET, kind)
        opened.append(sock)
        try:
            sock.bind((host, 0))
        except OSError as exc:
            if exc.errno == errno.EADDRNOTAVAIL:
                pytest.skip(f"{host} is not a loopback address on this system")
            raise
        if kind == socket.SOCK_STREAM:
            sock.listen(8)
        sock.settimeout(5)  # a missing connection fails the test instead of hanging it
        return sock

    yield make
    for sock in opened:
        sock.close()


@pytest.fixture
def client():
    opened: list[socket.socket] = []

    def make(family: int = INET, kind: int = socket.SOCK_STREAM) -> socket.socket:
        sock = socket.socket(family, kind)
        sock.settimeout(5)
        opened.append(sock)
        return sock

    yield make
    for sock in opened:
        sock.close()


@pytest.fixture
def log_events():
    from twisted.logger import globalLogPublisher
    events: list[dict] = []

    def observer(event: dict) -> None:
        if event.get("log_namespace") == "hausmeister.egress":
            events.append(event)

    globalLogPublisher.addObserver(observer)
    yield events
    globalLogPublisher.removeObserver(observer)


def nothing_arrived(sock: socket.socket, wait: float = 0.2) -> bool:
    readable, _, _ = select.select([sock], [], [], wait)
    return not readable


# --- real sockets on loopback -----------------------------------------------------------------

def test_connect_to_loopback_address_not_on_list_is_refused_before_it_happens(
        guard, refusals, listen, client, log_events):
    blocked = listen("127.0.0.2")
    port = blocked.getsockname()[1]
    sock = client()
    with pytest.raises(EgressRefused) as info:
        sock.connect(("127.0.0.2", port))
    assert str(info.value) == refused_message("127.0.0.2", port)
    assert isinstance(info.value, PermissionError) and info.value.errno == errno.EACCES
    assert (info.value.address, info.value.port) == ("127.0.0.2", port)
    with pytest.raises(OSError) as not_connected:
        sock.getpeername()
    assert not_connected.value.errno == errno.ENOTCONN
    assert nothing_arrived(blocked)

    assert egress.refusal_count() == 1
    assert egress.count_refusals(refusals) == 1
    (record,) = egress.read_refusals(refusals)
    assert record["address"] == "127.0.0.2" and record["port"] == port
    assert record["family"] == "AF_INET" and record["event"] == "socket.connect"
    assert record["pid"] == os.getpid()
    this = "test_connect_to_loopback_address_not_on_list_is_refused_before_it_happens"
    assert record["caller"].startswith(__file__ + ":") and record["caller"].endswith(" " + this)

    (event,) = log_events
    assert (event["address"], event["port"], event["caller"]) == ("127.0.0.2", port, record["caller"])
    assert event["log_level"].name == "warn"


def test_connect_ex_as_twisted_uses_it_is_refused_with_eacces(guard, listen, client):
    blocked = listen("127.0.0.2")
    sock = client()
    sock.setblocking(False)
    with pytest.raises(OSError) as info:  # Twisted catches OSError and reads args[0]
        sock.connect_ex(blocked.getsockname())
    assert isinstance(info.value, EgressRefused) and info.value.args[0] == errno.EACCES
    assert nothing_arrived(blocked)
    assert egress.refusal_count() == 1


def test_allowed_loopback_connects(guard, refusals, listen, client):
    server = listen("127.0.0.1")
    sock = client()
    sock.connect(server.getsockname())
    conn, peer = server.accept()
    conn.close()
    assert peer == sock.getsockname()
    assert egress.refusal_count() == 0 and egress.count_refusals(refusals) == 0


def test_the_same_listener_is_reachable_once_allowed(refusals, restore_guard, listen, client):
    """Control: the refusals above are the guard's doing, not the network's."""
    target = listen("127.0.0.2")
    host, port = target.getsockname()
    policy = EgressPolicy([AllowEntry("127.0.0.2", port, "test")])
    with egress.policy_in_force(policy, refusals):
        sock = client()
        sock.connect((host, port))
        conn, _ = target.accept()
        conn.close()
        other = client()
        with pytest.raises(EgressRefused):
            other.connect((host, port + 1 if port < 65535 else port - 1))
    assert egress.count_refusals(refusals) == 1


def test_loopback_name_not_on_list_is_refused_without_a_lookup(
        refusals, restore_guard, listen, client, monkeypatch):
    server = listen("127.0.0.1")
    port = server.getsockname()[1]
    policy = EgressPolicy([AllowEntry("127.0.0.1", port, "test")])

    def no_lookup(*args, **kwargs):
        raise AssertionError("the guard must not resolve names")

    monkeypatch.setattr(socket, "getaddrinfo", no_lookup)
    with egress.policy_in_force(policy, refusals):
        with pytest.raises(EgressRefused) as info:
            client().connect(("localhost", port))
    assert str(info.value) == refused_message("localhost", port)
    assert nothing_arrived(server)


def test_name_on_list_connects(refusals, restore_guard, listen, client):
    server = listen("127.0.0.1")
    port = server.getsockname()[1]
    policy = EgressPolicy([AllowEntry("localhost", port, "test")])
    with egress.policy_in_force(policy, refusals):
        client(INET).connect(("localhost", port))  # an AF_INET socket resolves to 127.0.0.1
        server.accept()[0].close()
        with pytest.raises(EgressRefused):
            client(INET).connect(("127.0.0.1", port))  # the IP was not resolved into this policy
    assert egress.count_refusals(refusals) == 1


def test_udp_datagram_to_address_not_on_list_is_refused(guard, refusals, listen, client):
    blocked = listen("127.0.0.2", socket.SOCK_DGRAM)
    allowed = listen("127.0.0.1", socket.SOCK_DGRAM)
    sock = client(INET, socket.SOCK_DGRAM)
    with pytest.raises(EgressRefused):
        sock.sendto(b"leak", blocked.getsockname())
    with pytest.raises(EgressRefused):
        sock.sendmsg([b"leak"], [], 0, blocked.getsockname())
    assert nothing_arrived(blocked)
    sock.sendto(b"fine", allowed.getsockname())
    assert allowed.recv(16) == b"fine"
    assert egress.refusal_count() == 2
    assert [r["event"] for r in egress.read_refusals(refusals)] == ["socket.sendto", "socket.sendmsg"]


def test_af_unix_is_always_allowed(refusals, restore_guard, listen, client):
    folder = tempfile.mkdtemp(prefix="hm-egress-")  # short: AF_UNIX paths are limited to 108 bytes
    try:
        path = os.path.join(folder, "s")
        server = socket.socket(UNIX, socket.SOCK_STREAM)
        server.bind(path)
        server.listen(1)
        loop = listen("127.0.0.1")
        with egress.policy_in_force(EgressPolicy([], name="nothing"), refusals):
            sock = client(UNIX)
            sock.connect(path)
            server.accept()[0].close()
            with pytest.raises(EgressRefused):  # with an empty list even loopback is refused
                client().connect(loop.getsockname())
        server.close()
    finally:
        shutil.rmtree(folder)
    assert egress.count_refusals(refusals) == 1


def test_refusals_from_many_threads_are_all_counted(guard, refusals, listen):
    blocked = listen("127.0.0.2")
    address = blocked.getsockname()
    outcomes: list[str] = []

    def attempt() -> None:
        for _ in range(20):
            with socket.socket(INET, socket.SOCK_STREAM) as sock:
                try:
                    sock.connect(address)
                    outcomes.append("connected")
                except EgressRefused:
                    outcomes.append("refused")

    threads = [threading.Thread(target=attempt) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert outcomes == ["refused"] * 160
    assert egress.refusal_count() == 160
    lines = refusals.read_text().splitlines()
    assert len(lines) == 160 and all(json.loads(line)["port"] == address[1] for line in lines)
    assert egress.count_refusals(refusals) == 160
    assert nothing_arrived(blocked)


def test_refusal_is_still_refused_and_counted_when_the_file_cannot_be_written(
        tmp_path, restore_guard, listen, client, log_events):
    unwritable = tmp_path / "no-such-folder" / "egress-refusals.jsonl"
    with egress.policy_in_force(EgressPolicy([]), unwritable):
        with pytest.raises(EgressRefused):
            client().connect(listen("127.0.0.2").getsockname())
        assert egress.refusal_count() == 1
    assert not unwritable.exists()
    assert any("not recorded" in e["log_format"] for e in log_events)


def test_hook_fails_closed_when_the_policy_breaks(refusals, restore_guard, listen, client):
    class Broken(EgressPolicy):
        def allows(self, family, address):
            raise RuntimeError("bug")

    server = listen("127.0.0.1")
    with egress.policy_in_force(Broken([]), refusals):
        with pytest.raises(EgressRefused):
            client().connect(server.getsockname())


def test_policy_in_force_restores_the_previous_state(refusals, restore_guard):
    before = egress.snapshot()
    inner = EgressPolicy([], name="inner")
    with egress.policy_in_force(inner, refusals):
        assert egress.current_policy() is inner and egress.is_installed()
        with egress.policy_in_force(EgressPolicy.startup(), None):
            assert egress.current_policy().name == "start-up"
        assert egress.current_policy() is inner
    assert egress.snapshot() == before


import pytest_twisted  # noqa: E402 - a test dependency (pyproject's test extra)


@pytest_twisted.inlineCallbacks
def test_twisted_tcp_client_to_refused_address_fails_and_allowed_one_connects(
        guard, refusals, listen):
    from twisted.internet import reactor
    from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
    from twisted.internet.error import ConnectError
    from twisted.internet.protocol import Protocol

    blocked, allowed = listen("127.0.0.2"), listen("127.0.0.1")
    refused = TCP4ClientEndpoint(reactor, "127.0.0.2", blocked.getsockname()[1], timeout=5)
    with pytest.raises(ConnectError) as info:
        yield connectProtocol(refused, Protocol())
    assert info.value.osError == errno.EACCES
    ok = TCP4ClientEndpoint(reactor, "127.0.0.1", allowed.getsockname()[1], timeout=5)
    protocol = yield connectProtocol(ok, Protocol())
    protocol.transport.loseConnection()

    assert nothing_arrived(blocked)
    allowed.accept()[0].close()
    assert egress.refusal_count() == 1 and egress.count_refusals(refusals) == 1
    assert egress.read_refusals(refusals)[0]["address"] == "127.0.0.2"


def test_configure_puts_the_configured_allow_list_in_force(tmp_path, refusals, restore_guard,
                                                           listen, client):
    own, other, allowed_any = listen("127.0.0.1"), listen("127.0.0.1"), listen("127.0.0.4")
    own_port = own.getsockname()[1]
    config = from_mapping({
        "server": {"data_dir": str(tmp_path)},
        "listen": {"https_port": 0, "module_port": 0},
        "database": {"url": "postgresql+psycopg://hm:secret@127.0.0.3:6543/hm"},
        "egress": {"allow": ["127.0.0.4:*"]},
    }, tmp_path)
    policy = egress.configure(config, own_ports=[own_port], refusals_path=refusals,
                              resolve=fake_resolve)
    assert egress.current_policy() is policy and egress.is_installed()

    client().connect(own.getsockname())  # its own listener
    own.accept()[0].close()
    client().connect(allowed_any.getsockname())  # egress.allow "127.0.0.4:*"
    allowed_any.accept()[0].close()
    with pytest.raises(EgressRefused):  # loopback, but not one of its own ports
        client().connect(other.getsockname())
    assert nothing_arrived(other)
    assert policy.allows(INET, ("127.0.0.3", 6543)) and not policy.allows(INET, ("127.0.0.3", 6544))
    assert egress.count_refusals(refusals) == 1


def test_server_process_refuses_from_the_start_with_the_start_up_policy(tmp_path, listen):
    """A fresh process that calls install() first: loopback 127.0.0.1 works, 127.0.0.2 does not."""
    allowed, blocked = listen("127.0.0.1"), listen("127.0.0.2")
    script = textwrap.dedent(f"""
        from server import egress
        egress.install()
        import json, socket
        result = {{"policy": egress.current_policy().name}}
        with socket.create_connection({allowed.getsockname()!r}, timeout=5):
            result["127.0.0.1"] = "connected"
        try:
            socket.create_connection({blocked.getsockname()!r}, timeout=5)
            result["127.0.0.2"] = "connected"
        except egress.EgressRefused as exc:
            result["127.0.0.2"] = str(exc)
        result["count"] = egress.refusal_count()
        print(json.dumps(result))
    """)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    port = blocked.getsockname()[1]
    assert result == {"policy": "start-up", "127.0.0.1": "connected",
                      "127.0.0.2": refused_message("127.0.0.2", port), "count": 1}
    allowed.accept()[0].close()
    assert nothing_arrived(blocked)


# --- the refusals file -------------------------------------------------------------------------

def test_count_refusals_of_missing_file_is_zero(tmp_path):
    assert egress.count_refusals(tmp_path / "none.jsonl") == 0


def test_count_refusals_skips_lines_that_are_not_records(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text('{"address": "127.0.0.2", "port": 9}\n\nnot json\n[1, 2]\n{"address": "x"}\n{"trunc')
    assert egress.count_refusals(path) == 2


# --- the policy, without sockets ----------------------------------------------------------------

def test_start_up_policy_allows_loopback_only():
    policy = EgressPolicy.startup()
    assert policy.allows(INET, ("127.0.0.1", 5432))
    assert policy.allows(INET6, ("::1", 8443, 0, 0))
    assert policy.allows(INET, ("localhost", 1))
    assert policy.allows(UNIX, "/run/postgresql/.s.PGSQL.5432")
    assert not policy.allows(INET, ("127.0.0.2", 9))
    assert not policy.allows(INET, ("10.0.0.1", 443))
    assert not policy.allows(INET, ("example.org", 443))


def test_default_config_allows_only_its_own_ports_on_loopback():
    policy = EgressPolicy.from_config(load(None), [], resolve=fake_resolve)
    for host in ("127.0.0.1", "localhost", "LOCALHOST."):
        assert policy.allows(INET, (host, 8443)) and policy.allows(INET, (host, 8444))
        assert not policy.allows(INET, (host, 5432))
    assert policy.allows(INET6, ("::1", 8444, 0, 0))
    assert not policy.allows(INET, ("127.0.0.2", 8443))
    assert not policy.allows(INET, ("10.0.0.5", 8443))
    assert {e.source for e in policy.entries} == {"listen (own ports)"}


def test_own_ports_passed_at_configure_time_are_added():
    policy = policy_for({"listen": {"https_port": 0, "module_port": 0, "interface": "10.1.1.1"}},
                        own_ports=[41000, 0])
    assert policy.allows(INET, ("10.1.1.1", 41000)) and policy.allows(INET, ("127.0.0.1", 41000))
    assert not policy.allows(INET, ("127.0.0.1", 8443))
    assert all(e.port == 41000 for e in policy.entries)


@pytest.mark.parametrize("url, allowed, refused", [
    ("", [], [("10.0.0.5", 5432)]),
    ("sqlite:////var/lib/hm/db.sqlite3", [], [("10.0.0.5", 5432)]),
    ("postgresql+psycopg://u:p@10.0.0.5:6543/hm", [("10.0.0.5", 6543)], [("10.0.0.5", 5432)]),
    ("postgresql://u:p@db.internal/hm", [("10.0.0.5", 5432), ("db.internal", 5432),
                                         ("DB.Internal.", 5432)], [("10.0.0.5", 6543)]),
    ("postgresql+psycopg://u:p@[fd00::5]:5433/hm", [("fd00::5", 5433)], [("fd00::5", 5432)]),
    ("postgresql+psycopg://u@/hm?host=/run/postgresql", [], [("127.0.0.1", 5432)]),
    ("postgresql+psycopg://u@/hm?host=10.0.0.5:5433,10.0.0.6", [("10.0.0.5", 5433), ("10.0.0.6", 5432)],
     [("10.0.0.5", 5432)]),
    ("postgresql+psycopg://u@/hm?host=10.0.0.5,10.0.0.6&port=5440,5441",
     [("10.0.0.5", 5440), ("10.0.0.6", 5441)], [("10.0.0.6", 5440)]),
])
def test_database_url_is_on_the_list(url, allowed, refused):
    policy = policy_for({"database": {"url": url}, "listen": {"https_port": 0, "module_port": 0}})
    for host, port in allowed:
        family = INET6 if ":" in host else INET
        assert policy.allows(family, (host, port)), (host, port)
    for host, port in refused:
        family = INET6 if ":" in host else INET
        assert not policy.allows(family, (host, port)), (host, port)
    assert all(e.source == "database.url" for e in policy.entries)


def test_smtp_relay_is_on_the_list_only_when_set():
    none = policy_for({"mail": {"smtp_port": 587}})
    assert not none.allows(INET, ("10.0.0.25", 587))
    relay = policy_for({"mail": {"smtp_host": "relay.internal", "smtp_port": 587}})
    assert relay.allows(INET, ("10.0.0.25", 587)) and relay.allows(INET6, ("fd00::25", 587, 0, 0))
    assert relay.allows(INET, ("relay.internal", 587))
    assert not relay.allows(INET, ("10.0.0.25", 25))
    by_ip = policy_for({"mail": {"smtp_host": "[fd00::26]"}})
    assert by_ip.allows(INET6, ("fd00::26", 25, 0, 0))


def test_s3_endpoint_is_on_the_list_only_when_enabled():
    s3 = {"endpoint_url": "https://s3.internal", "bucket": "rec"}
    off = policy_for({"s3": s3})
    assert not off.allows(INET, ("10.0.0.9", 443))
    on = policy_for({"s3": {**s3, "enabled": True}})
    assert on.allows(INET, ("10.0.0.9", 443)) and not on.allows(INET, ("10.0.0.9", 80))
    plain = policy_for({"s3": {"enabled": True, "endpoint_url": "http://10.0.0.9", "bucket": "r"}})
    assert plain.allows(INET, ("10.0.0.9", 80))
    port = policy_for({"s3": {"enabled": True, "endpoint_url": "http://[fd00::9]:9000", "bucket": "r"}})
    assert port.allows(INET6, ("fd00::9", 9000, 0, 0)) and not port.allows(INET6, ("fd00::9", 80, 0, 0))
    assert {e.source for e in port.entries if e.port == 9000} == {"s3.endpoint_url"}


def test_egress_allow_entries():
    policy = policy_for({"egress": {"allow": [
        "10.9.8.7:636", "files.internal:*", "[fd00::5]:443", "fd00::6", "unknown.internal:80"]}})
    assert policy.allows(INET, ("10.9.8.7", 636)) and not policy.allows(INET, ("10.9.8.7", 389))
    assert policy.allows(INET, ("10.0.0.7", 1)) and policy.allows(INET, ("10.0.0.7", 65535))
    assert policy.allows(INET, ("files.internal", 22))
    assert policy.allows(INET6, ("fd00::5", 443, 0, 0)) and not policy.allows(INET6, ("fd00::5", 80, 0, 0))
    assert policy.allows(INET6, ("fd00::6", 12345, 0, 0))
    assert policy.allows(INET, ("unknown.internal", 80))  # does not resolve: by name only
    assert "unknown.internal:80 (egress.allow) -> does not resolve" in policy.describe()
    assert "files.internal:* (egress.allow) -> 10.0.0.7" in policy.describe()
    assert "[fd00::5]:443 (egress.allow)" in policy.describe()


def test_address_forms():
    policy = EgressPolicy([AllowEntry("10.0.0.5", 5432, "t"), AllowEntry("fe80::1", 22, "t"),
                           AllowEntry("0.0.0.0", 80, "t")])
    assert policy.allows(INET6, ("::ffff:10.0.0.5", 5432, 0, 0))  # IPv4-mapped IPv6
    assert policy.allows(INET6, ("fe80::1%lo", 22, 0, 1))  # scope id
    assert policy.allows(INET, (b"10.0.0.5", 5432))
    assert policy.allows(INET, ("", 80))  # Python's spelling of 0.0.0.0
    assert not policy.allows(INET, ("<broadcast>", 80))
    assert not policy.allows(INET, ("10.0.0.05", 5432))  # not a canonical IP: a name, not listed
    assert not policy.allows(INET, ("167772165", 5432))  # 10.0.0.5 as a number: refused too


@pytest.mark.parametrize("family, address", [
    (INET, ("127.0.0.1",)), (INET, "127.0.0.1:80"), (INET, ("127.0.0.1", "80")),
    (INET, ("127.0.0.1", True)), (INET, (None, 80)), (INET, (b"\xff", 80)),
    (getattr(socket, "AF_PACKET", 17), ("lo", 0)), (None, ("127.0.0.1", 80)), ("x", ("127.0.0.1", 80)),
])
def test_unknown_families_and_malformed_addresses_are_refused(family, address):
    assert not EgressPolicy.startup().allows(family, address)


def test_local_families_are_allowed_even_by_an_empty_policy():
    empty = EgressPolicy([])
    assert empty.allows(UNIX, "/tmp/x") and empty.allows(UNIX, b"\0abstract")
    if hasattr(socket, "AF_NETLINK"):
        assert empty.allows(socket.AF_NETLINK, (0, 0))
    assert not empty.allows(INET, ("127.0.0.1", 80))


def test_from_config_reports_a_bad_database_port_as_one_line():
    config = load(None)
    broken = config.replace(database=type(config.database)(url="postgresql+psycopg://u@h:99999/x"))
    with pytest.raises(ConfigError) as info:
        EgressPolicy.from_config(broken, [], resolve=fake_resolve)
    assert "\n" not in str(info.value) and "database.url" in str(info.value)


octets = st.integers(0, 255)
ipv4 = st.tuples(octets, octets, octets, octets).map(lambda t: ".".join(map(str, t)))
ports = st.integers(1, 65535)


@settings(max_examples=200, deadline=None)
@given(entries=st.lists(st.tuples(ipv4, st.one_of(st.none(), ports)), max_size=8),
       probe=st.tuples(ipv4, ports))
def test_policy_allows_exactly_its_entries(entries, probe):
    policy = EgressPolicy([AllowEntry(host, port, "t") for host, port in entries])
    host, port = probe
    expected = any(h == host and p in (None, port) for h, p in entries)
    assert policy.allows(INET, (host, port)) is expected
    assert policy.allows(INET6, (f"::ffff:{host}", port, 0, 0)) is expected
    for h, p in entries:
        assert policy.allows(INET, (h, p if p is not None else port))
