"""End to end through the real CLIs: ad-hoc sessions, unattended hosts, the relay plane.

Every byte goes supporter ⇄ relay ⇄ customer/host over real TLS on 127.0.0.1; ``--pipe`` joins
each module's stdin/stdout to the session stream so the test can push bytes through.
"""

from __future__ import annotations

import json
import os
import time

import pytest

from .fixtures_server import ServerProcess, free_port, run_cli, write_config
from .module_process import ModuleProcess

pytestmark = pytest.mark.e2e


def server_args(srv) -> tuple[str, ...]:
    return ("--server", srv.url, "--ca-fingerprint", srv.fingerprint)


def sessions(srv) -> list[dict]:
    return json.loads(srv.ok("session", "list", "--json"))


def wait_until(predicate, timeout: float = 20, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def answers(tmp_path, *lines: str) -> str:
    """A scripted answer file for the consent questions (the same reader a terminal uses)."""
    path = tmp_path / f"answers-{len(list(tmp_path.glob('answers-*')))}.txt"
    path.write_text("".join(line + "\n" for line in lines))
    return str(path)


def exchange(a: ModuleProcess, b: ModuleProcess, size: int = 200_000) -> None:
    """Bytes both ways, more than one TLS record and one relay read each."""
    to_b = os.urandom(size)
    to_a = b"reply:" + os.urandom(size // 2)
    a.send(to_b)
    b.read_exactly(to_b)
    b.send(to_a)
    a.read_exactly(to_a)


def test_adhoc_session_bytes_flow_both_ways(running_server, enrolled_supporter, tmp_path):
    srv = running_server
    supporter = ModuleProcess("supporter", "adhoc", "--pipe", "--answers", "/dev/null",
                              "--home", str(enrolled_supporter))
    customer = None
    try:
        match = supporter.wait_for_line(r"ad-hoc ID: (\d{4}) (\d{4})")
        nameplate, secret = match.group(1), match.group(2)
        customer = ModuleProcess("customer", *server_args(srv), f"{nameplate} {secret}", "--pipe",
                                 "--answers", answers(tmp_path, "y", "y", "y"))
        customer.wait_for_line("joined the session of supporter alice")
        supporter.wait_for_line("customer joined from 127.0.0.1")
        exchange(supporter, customer)
        supporter.close_stdin()  # the supporter ends the session
        assert supporter.wait() == 0, supporter.stderr
        assert customer.wait() == 0, customer.stderr
        assert "ended" in customer.stderr
    finally:
        supporter.stop()
        if customer:
            customer.stop()
    # The server never saw the secret half of the ID, and recorded the session.
    assert f"{nameplate} {secret}" not in srv.log() and f"{nameplate}{secret}" not in srv.log()
    record = wait_until(lambda: [s for s in sessions(srv) if s["ended_at"]], what="session end")[0]
    assert record["kind"] == "adhoc" and record["supporter"] == "hausmeister:supporter:alice"
    assert record["peer_address"] == "127.0.0.1"
    assert record["bytes_to_peer"] >= 200_000 and record["bytes_to_supporter"] >= 100_000
    one_offer_one_customer(srv, enrolled_supporter, sessions_before=1)  # this test's server


def one_offer_one_customer(srv, supporter_home, sessions_before: int) -> None:
    """Two IDs live on one supporter connection (the offer drew the next one ahead of the
    first's expiry): a customer joins with one, the other is refused at once and the server
    writes no session for it."""
    from protocol.framing import encode_box
    from .test_module_port import RawModule, error_code
    offer = RawModule(srv, supporter_home)
    offer.hello()
    first, ahead = (offer.call("AllocateNameplate")[b"nameplate"] for _ in range(2))
    customer, second = RawModule(srv), RawModule(srv)
    customer.hello()
    customer.sock.sendall(encode_box({b"_command": b"JoinAdhoc", b"_ask": b"1",
                                      b"nameplate": ahead}))
    ready = offer.read_box()
    assert ready[b"_command"] == b"SessionReady" and ready[b"nameplate"] == ahead
    offer.sock.sendall(encode_box({b"_answer": ready[b"_ask"]}))
    assert b"session_id" in customer.read_box()
    second.hello()
    assert error_code(second.call("JoinAdhoc", nameplate=first)) == b"UNKNOWN_NAMEPLATE"
    assert len(sessions(srv)) == sessions_before + 1
    for module in (offer, customer, second):
        module.sock.close()


def test_host_session_listed_online_connect_and_bytes_flow(running_server, enrolled_supporter,
                                                           enrolled_host, tmp_path):
    srv = running_server
    password_file = tmp_path / "host-password"
    password_file.write_text("host-password-1\n")
    assert run_cli("host", "set-password", "--password-stdin", "--home", str(enrolled_host),
                   stdin="host-password-1\n").returncode == 0
    host = ModuleProcess("host", "run", "--pipe", "--home", str(enrolled_host))
    supporter = None
    try:
        host.wait_for_line("online; waiting for supporters")
        listing = run_cli("supporter", "hosts", "--json", "--home", str(enrolled_supporter))
        assert listing.returncode == 0, listing.stderr
        hosts = json.loads(listing.stdout)
        assert [(h["name"], h["online"], h["group"]) for h in hosts] == [("pc1", True, "office")]
        table = run_cli("supporter", "hosts", "--home", str(enrolled_supporter)).stdout
        assert "online" in table and "pc1" in table
        supporter = ModuleProcess("supporter", "connect", "pc1", "--pipe", "--answers", "/dev/null",
                                  "--password-file", str(password_file),
                                  "--home", str(enrolled_supporter))
        try:
            supporter.wait_for_line("accepted the session")
        except AssertionError:
            raise AssertionError(host.stderr)
        host.wait_for_line("connects: session")
        exchange(supporter, host)
        host.close_stdin()  # this time the host side ends it
        assert host.wait() == 0, host.stderr
        assert supporter.wait() == 0, supporter.stderr
    finally:
        host.stop()
        if supporter:
            supporter.stop()
    record = wait_until(lambda: [s for s in sessions(srv) if s["ended_at"]], what="session end")[0]
    assert record["kind"] == "host" and record["host_id"] == hosts[0]["host_id"]
    # Offline now: the server notices the host is gone and says so at once.
    wait_until(lambda: not json.loads(run_cli("supporter", "hosts", "--json", "--home",
                                              str(enrolled_supporter)).stdout)[0]["online"],
               what="host offline")
    started = time.monotonic()
    offline = run_cli("supporter", "connect", "pc1", "--password-file", str(password_file),
                      "--home", str(enrolled_supporter))
    assert offline.returncode == 1 and "is offline" in offline.stderr
    assert time.monotonic() - started < 10


def test_unknown_host_and_wrong_id_are_clear_errors(running_server, enrolled_supporter):
    srv = running_server
    unknown = run_cli("supporter", "connect", "nosuchhost", "--password-stdin",
                      "--home", str(enrolled_supporter), stdin="whatever\n")
    assert unknown.returncode == 1 and "no host 'nosuchhost'" in unknown.stderr
    bad_format = run_cli("customer", *server_args(srv), "12 34")
    assert bad_format.returncode == 1 and "8 digits" in bad_format.stderr
    wrong = run_cli("customer", *server_args(srv), "0000 0000")
    assert wrong.returncode == 1 and "unknown or expired" in wrong.stderr


def test_flood_of_wrong_ids_locks_out_the_address(running_server):
    srv = running_server
    messages = [run_cli("customer", *server_args(srv), f"{n:04d} 1111").stderr for n in range(4)]
    assert "unknown or expired" in messages[0]
    assert "try again in" in messages[-1]
    locked = run_cli("customer", *server_args(srv), "9999 1111")
    assert locked.returncode == 1 and "try again in" in locked.stderr


def test_host_comes_back_after_server_restart(tmp_path, db_url, enrolled_host_on_fixed_ports):
    """A clean shutdown tells the host when to come back (no back-off growth); a host the
    server then refuses logs one line per attempt and never an "Unhandled Error"."""
    srv, host_home, supporter_home = enrolled_host_on_fixed_ports
    host = ModuleProcess("host", "run", "--max-backoff", "0.5", "--home", str(host_home))
    watch = adhoc = None
    try:
        host.wait_for_line("online; waiting for supporters")
        # a supporter watching the host list stays through the restart and sees it current again
        watch = ModuleProcess("supporter", "hosts", "--watch", "--home", str(supporter_home))
        watch.wait_for_output(r"online +kiosk ")
        # and a supporter waiting with an ad-hoc ID gets a new one after the restart
        adhoc = ModuleProcess("supporter", "adhoc", "--pipe", "--answers", "/dev/null",
                              "--home", str(supporter_home))
        before = adhoc.wait_for_line(r"ad-hoc ID: (\d{4} \d{4})").group(1)
        srv.stop()
        notice = host.wait_for_line(r"the server is shutting down cleanly: trying again in about "
                                    r"(\d+) s, spread over (\d+) s")
        assert notice.groups() == ("5", "10")  # presence.restart_seconds; 1 host: the minimum
        host.wait_for_line("the server closed the connection for its shutdown")
        assert "told 3 modules to come back in 5 s, spread over 10 s" in srv.log()
        watch.wait_for_line(r"lost the connection to the server \(the server is restarting\): "
                            r"trying again in [0-5] s")
        adhoc.wait_for_line(r"lost the connection to the server \(the server is restarting\): "
                            rf"the ID {before} is no longer valid; trying again in [0-5]\.\d s")
        srv.start()
        after = adhoc.wait_for_line(r"new ad-hoc ID: (\d{4} \d{4})  \(the connection to the "
                                    r"server was lost; tell your customer the new ID", timeout=30)
        assert after.group(1) != before and adhoc.proc.poll() is None
        wait_until(lambda: json.loads(run_cli("supporter", "hosts", "--json", "--home",
                                              str(supporter_home)).stdout or "[{}]")[0].get("online"),
                   timeout=30, what="host online again")
        assert host.proc.poll() is None
        watch.wait_for_line("connected to the server again; the list is current", timeout=30)
        # the host came back after the supporter's new listing or before it: either way a line
        # says online (the first "online" line was read before the stop)
        watch.wait_for_output(r"online +kiosk ", timeout=30)
        assert watch.proc.poll() is None and "Traceback" not in watch.stderr, watch.stderr

        srv.ok("host", "remove", "kiosk")  # revoked: its connection drops, every retry is refused
        host.wait_for_line("lost the server \\(")
        host.wait_for_line("the server refused this host: TLS failed \\(.+\\); the certificate "
                           "may be revoked")
        wait_until(lambda: host.stderr.count("the server refused this host") >= 2, timeout=30,
                   what="a second refused attempt")
        assert "before it answered Hello" not in host.stderr, host.stderr
        assert "Unhandled" not in host.stderr and "Traceback" not in host.stderr, host.stderr
    finally:
        host.stop()
        for module in (watch, adhoc):
            if module:
                module.stop()


@pytest.fixture
def enrolled_host_on_fixed_ports(tmp_path, db_url):
    """Server on fixed ports (a restart must come back where the modules know it)."""
    from .fixtures_server import ADMIN_PASSWORD, add_enrolled_supporter
    data = tmp_path / "data"
    cfg = write_config(tmp_path / "h.toml", data, db_url, extra="""
[presence]
heartbeat_seconds = 1.0
""")
    text = cfg.read_text().replace("https_port = 0", f"https_port = {free_port()}").replace(
        "module_port = 0", f"module_port = {free_port()}")
    cfg.write_text(text)
    srv = ServerProcess(cfg, data)
    assert srv.cli("init", "--password-stdin", stdin=ADMIN_PASSWORD + "\n").returncode == 0
    srv.start()
    try:
        token = srv.ok("token", "create", "-q").strip()
        host_home = tmp_path / "host"
        assert run_cli("host", "enroll", *server_args(srv), "--token", token, "--name", "kiosk",
                       "--home", str(host_home)).returncode == 0
        assert run_cli("host", "set-password", "--generate",
                       "--home", str(host_home)).returncode == 0
        supporter_home = add_enrolled_supporter(srv, "sam", tmp_path / "sam")
        yield srv, host_home, supporter_home
    finally:
        srv.stop()


def test_session_through_a_separate_relay_process(tmp_path, db_url):
    from .fixtures_server import add_enrolled_supporter, server_with_external_relay
    srv, relay_port = server_with_external_relay(tmp_path, db_url)
    relay = ModuleProcess("server", "-c", str(srv.config), "run", "--role", "relay")
    supporter = customer = None
    srv.start()
    try:
        relay.wait_for_line(f"relay.*{relay_port}")
        home = add_enrolled_supporter(srv, "rita", tmp_path / "rita")
        supporter = ModuleProcess("supporter", "adhoc", "--pipe", "--answers", "/dev/null",
                                  "--home", str(home))
        code = "".join(supporter.wait_for_line(r"ad-hoc ID: (\d{4}) (\d{4})").groups())
        customer = ModuleProcess("customer", *server_args(srv), code, "--pipe",
                                 "--answers", answers(tmp_path, "y", "y", "y"))
        customer.wait_for_line("joined the session")
        exchange(supporter, customer, size=50_000)
        supporter.close_stdin()
        assert supporter.wait() == 0 and customer.wait() == 0
        record = wait_until(lambda: [s for s in sessions(srv) if s["ended_at"]], what="session end")[0]
        assert record["bytes_to_peer"] >= 50_000
    finally:
        for proc in (supporter, customer, relay):
            if proc:
                proc.stop()
        srv.stop()
