"""How sessions end, end to end through the real server, relay and module CLIs (issue 10,
findings 5 and 6): every module prints one line naming who ended the session and why, in the
wording the server records; emergency stops are recorded as such; Ctrl+C on ``host run`` stops
the session and not the host; a dead server is "lost the connection to the server", exit 1.
"""

from __future__ import annotations

import json
import signal

import pytest

from .fixtures_server import add_enrolled_supporter, run_cli
from .fixtures_x11 import xvfb  # noqa: F401 - fixture
from .module_process import ModuleProcess
from .test_e2e_brokering import wait_until
from .test_e2e_sessions import finish, protocol_events, start_adhoc, world  # noqa: F401

pytestmark = pytest.mark.e2e


def ended_line(srv) -> dict:
    return wait_until(lambda: next((e for e in protocol_events(srv) if e["kind"] == "ended"
                                    and e["actor"] == "server"), None), timeout=30,
                      what="the protocol's ended line")


def end_causes(srv) -> list[tuple[str, str]]:
    """(cause, ended_by) of every ``ended`` line: what the parties' ``ending`` reports said."""
    return [(e["detail"].get("cause"), e["detail"].get("ended_by")) for e in protocol_events(srv)
            if e["kind"] == "ended" and e["actor"] == "server"]


def test_customer_emergency_stop_is_named_on_both_sides_and_in_the_protocol(world):
    w = world
    supporter, customer = start_adhoc(w)
    try:
        customer.wait_for_line("granted control")
        supporter.wait_for_line("granted control")
        customer.proc.send_signal(signal.SIGINT)  # the CLI's emergency stop
        for side in (customer, supporter):
            side.wait_for_line("session ended: emergency stop by the customer")
        assert customer.wait() == 1 and supporter.wait() == 1   # not an orderly end
    finally:
        finish(supporter, customer)
    for side in (customer, supporter):
        assert side.stderr.count("session ended:") == 1, side.stderr
        assert "Connection was closed cleanly" not in side.stderr  # every report arrived
    srv = w["srv"]
    assert "emergency stop by the customer" in json.dumps(ended_line(srv))
    stops = [e for e in protocol_events(srv) if e["kind"] == "emergency_stop"]
    assert stops and {e["detail"]["by"] for e in stops} == {"customer"}
    assert end_causes(srv) == [("emergency_stop", "customer")]
    # both parties' reports of one consent event carry the same event id
    ids = {}
    for e in protocol_events(srv):
        if e["kind"] == "right_granted":
            ids.setdefault(e["detail"]["event_id"], set()).add(e["actor"])
    assert ids and all(len(actors) <= 2 for actors in ids.values())


def test_supporter_ending_is_ended_by_the_supporter_with_exit_0(world):
    w = world
    supporter, customer = start_adhoc(w)
    try:
        customer.wait_for_line("granted control")
        supporter.close_stdin()
        for side in (customer, supporter):
            side.wait_for_line("session ended: ended by the supporter")
        assert supporter.wait() == 0 and customer.wait() == 0
    finally:
        finish(supporter, customer)
    assert "ended by the supporter" in json.dumps(ended_line(w["srv"]))
    assert end_causes(w["srv"]) == [("ended", "supporter")]


def test_chat_prints_once_in_sentences(world):
    w = world
    supporter, customer = start_adhoc(w, supporter_args=("--chat", "Hello from Alice."))
    try:
        customer.wait_for_line("The supporter writes: Hello from Alice.")
        customer.wait_for_line("granted control")
        supporter.close_stdin()
        assert supporter.wait() == 0 and customer.wait() == 0
    finally:
        finish(supporter, customer)
    assert customer.stderr.count("Hello from Alice.") == 1, customer.stderr
    for side in (customer, supporter):
        assert '{"right"' not in side.stderr and '"by":' not in side.stderr, side.stderr


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_host_ctrl_c_stops_the_session_not_the_host(world, xvfb):  # noqa: F811
    w = world
    assert run_cli("host", "policy", "--view", "allow", "--control", "allow",
                   "--home", str(w["pc1"])).returncode == 0
    right = w["tmp"] / "right"
    right.write_text("right-host-password\n")
    host = ModuleProcess("host", "run", "--screen", xvfb.name, "--home", str(w["pc1"]))
    first = second = None

    def connect() -> ModuleProcess:
        return ModuleProcess("supporter", "connect", "pc1", "--pipe", "--answers", "/dev/null",
                             "--password-file", str(right), "--home", str(w["alice"]))
    try:
        host.wait_for_line("online; waiting for supporters")
        first = connect()
        first.wait_for_line("granted control")
        host.wait_for_line("sharing the screen")
        host.proc.send_signal(signal.SIGINT)   # the person at the host stops this session
        first.wait_for_line("session ended: emergency stop by the host")
        host.wait_for_line("session ended: emergency stop by the host")
        assert first.wait() == 1
        assert host.proc.poll() is None, host.stderr          # still online ...
        second = connect()                                    # ... for the next supporter
        second.wait_for_line("granted control")
        second.close_stdin()
        second.wait_for_line("session ended: ended by the supporter")
        assert second.wait() == 0
        host.wait_for_line("session ended: ended by the supporter")
        assert host.proc.poll() is None
        host.proc.send_signal(signal.SIGINT)   # no session: Ctrl+C stops the host service
        assert host.wait() == 0
    finally:
        finish(host, *[p for p in (first, second) if p is not None])
    for noise in ("Starting factory", "Stopping factory", "connection established",
                  "could not report"):
        assert noise not in host.stderr, host.stderr
    reasons = wait_until(lambda: len(end_causes(w["srv"])) == 2 and end_causes(w["srv"]),
                         what="two ended lines")
    assert sorted(reasons) == [("emergency_stop", "host"), ("ended", "supporter")]
    stops = [e for e in protocol_events(w["srv"]) if e["kind"] == "emergency_stop"]
    assert {e["detail"]["by"] for e in stops} == {"host"}


def test_server_killed_during_a_session_is_lost_connection_on_both_sides(world):
    w = world
    supporter, customer = start_adhoc(w)
    try:
        customer.wait_for_line("granted control")
        supporter.wait_for_line("granted control")
        w["srv"].process.kill()    # kill -9: no SessionEnded, no orderly close
        w["srv"].process.wait()
        for side in (customer, supporter):
            side.wait_for_line("session ended: lost the connection to the server")
        assert customer.wait() == 1 and supporter.wait() == 1
    finally:
        finish(supporter, customer)
    for side in (customer, supporter):
        assert "stdio closed" not in side.stderr and "ended by the" not in side.stderr


def test_server_killed_with_the_in_process_relay(running_server, enrolled_supporter, tmp_path):
    from .test_e2e_brokering import answers, server_args
    srv = running_server
    supporter = ModuleProcess("supporter", "adhoc", "--pipe", "--answers", "/dev/null",
                              "--home", str(enrolled_supporter))
    customer = None
    try:
        code = "".join(supporter.wait_for_line(r"ad-hoc ID: (\d{4}) (\d{4})").groups())
        customer = ModuleProcess("customer", *server_args(srv), code, "--pipe",
                                 "--answers", answers(tmp_path, "y", "y", "y"))
        customer.wait_for_line("granted control")
        # both relay legs resumed their control connection's TLS session (server.tls.Resumption)
        handshakes = [json.loads(line) for line in srv.log().splitlines()
                      if '"TLS handshake with' in line]
        assert sorted(h["identity"] for h in handshakes if h["resumed"]) == [
            "anonymous", "hausmeister:supporter:alice"], handshakes
        srv.process.kill()         # the relay legs and the control connections die together
        srv.process.wait()
        for side in (customer, supporter):
            side.wait_for_line("session ended: lost the connection to the server")
        assert customer.wait() == 1 and supporter.wait() == 1
    finally:
        finish(supporter, *([customer] if customer else []))


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_a_quiet_session_outlives_the_relay_idle_timeout(tmp_path, db_url):
    """Nothing to show or type for longer than the relay's idle timeout (people talking on the
    phone, a screen that does not change): the session stays up — the server tells the modules
    the relay's idle timeout in the ticket and a quiet side sends keep-alives within it — and
    ends only when a person ends it.  (The relay's own idle end of dead legs: test_relay.)"""
    import time

    from .fixtures_server import ADMIN_PASSWORD, ServerProcess, write_config
    data = tmp_path / "data"
    srv = ServerProcess(write_config(tmp_path / "h.toml", data, db_url, extra="""
[relay]
idle_timeout_seconds = 1.5
"""), data)
    assert srv.cli("init", "--password-stdin", stdin=ADMIN_PASSWORD + "\n").returncode == 0
    srv.start()
    try:
        w = {"srv": srv, "alice": add_enrolled_supporter(srv, "alice", tmp_path / "alice"),
             "tmp": tmp_path}
        supporter, customer = start_adhoc(w)
        try:
            customer.wait_for_line("granted control")
            supporter.wait_for_line("granted control")
            time.sleep(4.5)     # three idle timeouts without a byte of either person
            assert supporter.proc.poll() is None and customer.proc.poll() is None, \
                supporter.stderr + customer.stderr
            supporter.close_stdin()
            for side in (customer, supporter):
                side.wait_for_line("session ended: ended by the supporter")
            assert supporter.wait() == 0 and customer.wait() == 0
        finally:
            finish(supporter, customer)
        assert end_causes(srv) == [("ended", "supporter")]
    finally:
        srv.stop()
