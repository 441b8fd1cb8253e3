"""Several server nodes on one PostgreSQL: what runs between the nodes besides a session
(issue 15 part 3), as real processes on 127.0.0.1.

One cluster for the whole file (``ops``): a throwaway PostgreSQL database, nodes A and B, two
relay processes that both nodes hand out, one SMTP server (aiosmtpd).  The tests run in order;
each leaves both nodes running.

- a supporter on A watching the host list (``hosts --watch``, pushed by the server) sees a host
  on B come online and go offline;
- a relay token used at one relay process is refused by the other (``relay_token_uses``);
- node B stopped (SIGSTOP) between the supporter's ConnectHost and the pairing, then killed: the
  supporter gets a clear error, no session row stays running, the created protocol is closed;
- the mail outbox: one node delivers (advisory lock), a mail goes out once; ``kill -9`` of that
  node: the other takes over and sends the next one;
- a console login begun on one node (form, password) finishes on the other (TOTP code);
- ``--websocket`` modules on node B's single port: their relay legs reach the relay process
  through node B (``/api/v1/relay-tunnel``), and only the relays of ``relay.external``.
"""

from __future__ import annotations

import re
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import pytest_twisted
from aiosmtpd.controller import Controller
from sqlalchemy import select

from server.db import Database
from server.db.models import Host, Session
from server.session_protocol import verify

from modules.common.link.connection import ServerAddress, connect, hello
from modules.common.link.folder import ModuleFolder
from modules.common.link.servers import set_servers

from .fixtures_cluster import Console, hosts_node, node_config, protocol_lines
from .fixtures_db import new_postgres_database
from .fixtures_mail import Inbox, mail_toml
from .fixtures_server import (ADMIN_PASSWORD, ServerProcess, add_enrolled_host,
                              add_enrolled_supporter, free_port)
from .module_process import ModuleProcess
from .test_e2e_brokering import wait_until

pytestmark = pytest.mark.e2e

#: presence changes reach a supporter on another node within this (issue: "a few seconds")
PRESENCE_SECONDS = 5.0


@dataclass
class Ops:
    tmp: Path
    db: Database
    a: ServerProcess
    b: ServerProcess
    relays: dict[int, ModuleProcess]   # port -> relay process
    inbox: Inbox
    alice: Path
    pc1: Path
    pc2: Path

    def node(self, name: str) -> ServerProcess:
        return {"node-a": self.a, "node-b": self.b}[name]

    def log_since_start(self, name: str) -> str:
        """What node ``name`` logged since it was last started."""
        node = self.node(name)
        return node.log_path.read_text(errors="replace")[node.info.get("log_from", 0):]

    def restart(self, node: ServerProcess) -> None:
        """Start a killed node again (its log goes on in the same file)."""
        node.process = None
        log_from = len(node.log_path.read_text(errors="replace"))
        node.start()
        node.info["log_from"] = log_from


@pytest.fixture(scope="module")
def ops(tmp_path_factory, postgres_url):
    tmp = tmp_path_factory.mktemp("ops")
    inbox = Inbox()
    smtp = Controller(inbox, hostname="127.0.0.1", port=free_port())
    smtp.start()
    relays: dict[int, ModuleProcess] = {}
    nodes: list[ServerProcess] = []
    db = None
    with new_postgres_database(postgres_url) as db_url:  # dropped after the nodes stopped
        try:
            ports = [free_port(), free_port()]
            # a call to another node waits 3 s; a node is dead after 6 s without a beat (the
            # mid-set-up test stops node B and needs A to still count it alive for the call)
            cluster = "call_timeout_seconds = 3\nnode_timeout_seconds = 6"
            a, b = (node_config(tmp, name, db_url, ports[0], relay_ports=ports, extra=mail_toml(
                smtp.port), cluster_extra=cluster) for name in ("node-a", "node-b"))
            for node in (a, b):  # node_config's own node_timeout_seconds gives way to ours
                node.config.write_text(node.config.read_text().replace(
                    "node_timeout_seconds = 3\n", ""))
            # node B also has the single port, where WebSocket modules come in
            b.config.write_text(b.config.read_text().replace(
                "module_port = 0", f"module_port = 0\nsingle_port = {free_port()}"))
            assert a.cli("init", "--password-stdin", stdin=ADMIN_PASSWORD + "\n").returncode == 0
            db = Database(db_url)
            # two relay processes (their own state folders: A's and B's config)
            relays[ports[0]] = ModuleProcess("server", "-c", str(a.config), "run", "--role",
                                             "relay")
            relays[ports[1]] = ModuleProcess("server", "-c", str(b.config), "run", "--role",
                                             "relay", "--relay-port", str(ports[1]))
            nodes += [a, b]
            a.start()
            b.start()
            for port, relay in relays.items():
                relay.wait_for_line(f"relay listening on .*{port}")
            alice = add_enrolled_supporter(a, "alice", tmp / "alice")
            pc1 = add_enrolled_host(a, "pc1", tmp / "pc1", "host-password-1")
            pc2 = add_enrolled_host(a, "pc2", tmp / "pc2", "host-password-2")
            # pc1 tries node B first, then A; pc2 knows node B only
            set_servers(ModuleFolder(pc1), [f"127.0.0.1:{b.module_port}",
                                            f"127.0.0.1:{a.module_port}"])
            set_servers(ModuleFolder(pc2), [f"127.0.0.1:{b.module_port}"])
            yield Ops(tmp, db, a, b, relays, inbox, alice, pc1, pc2)
            for node in nodes:  # nothing went wrong that a node only logged
                assert "Unhandled Error" not in node.log(), node.log()[-5000:]
        finally:
            for node in nodes:
                node.stop()
            for relay in relays.values():
                relay.stop()
            if db is not None:
                db.dispose()
            smtp.stop()


def test_a_supporter_on_node_a_sees_a_host_on_node_b_come_and_go(ops):
    watch = ModuleProcess("supporter", "hosts", "--watch", "--home", str(ops.alice))
    host = None
    try:
        watch.wait_for_output(r"offline +pc2 ")  # the list as it was; then the pushed changes
        host = ModuleProcess("host", "run", "--max-backoff", "2", "--home", str(ops.pc2))
        host.wait_for_line("online; waiting for supporters")
        online_at = time.monotonic()
        watch.wait_for_output(r"online +pc2 ", timeout=PRESENCE_SECONDS)
        came = time.monotonic() - online_at
        assert hosts_node(ops.db)["pc2"] == ("node-b", True)
        host.proc.send_signal(signal.SIGKILL)  # no goodbye: node B sees the connection drop
        host.proc.wait()
        killed_at = time.monotonic()
        watch.wait_for_output(r"offline +pc2 ", timeout=PRESENCE_SECONDS)
        went = time.monotonic() - killed_at
        assert watch.proc.poll() is None  # still watching
        print(f"presence across nodes: online after {came:.2f} s, offline {went:.2f} s after "
              "kill -9 of the host")
    finally:
        if host is not None:
            host.stop()
        watch.stop()


def _relay_log_since(relay: ModuleProcess, start: int) -> str:
    return "\n".join(relay.stderr.splitlines()[start:])


@pytest_twisted.ensureDeferred
async def test_a_second_relay_process_refuses_a_used_token(ops):
    from twisted.internet import defer, endpoints, reactor

    from protocol import control
    from modules.common.link.connection import client_tls, path_to
    from modules.common.link.session_stream import RelayLeg

    folder = ModuleFolder(ops.alice)
    ca_pem = folder.ca_path.read_bytes()
    host = ModuleProcess("host", "run", "--pipe", "--max-backoff", "2", "--home", str(ops.pc1))
    conn = first = None
    try:
        host.wait_for_line("online; waiting for supporters")
        conn = await connect(reactor, ServerAddress("127.0.0.1", ops.a.module_port), ca_pem,
                             folder)
        await hello(conn, "supporter")
        ticket = await conn.callRemote(control.ConnectHost, host="pc1")
        used_at = ticket["relay_port"]
        other = next(port for port in ops.relays if port != used_at)
        lines_before = len(ops.relays[other].stderr.splitlines())

        class WatchedLeg(RelayLeg):
            """The module's relay leg, telling when its connection closes (also when the relay
            refused it: ``RelayLeg.ended`` only covers a leg that was opened)."""

            def __init__(self) -> None:
                super().__init__()
                self.closed = defer.Deferred()

            def connectionLost(self, reason) -> None:
                super().connectionLost(reason)
                if not self.closed.called:
                    self.closed.callback(reason.getErrorMessage())

        async def leg_at(port: int) -> WatchedLeg:
            tls = client_tls("127.0.0.1", ca_pem, folder)
            endpoint = endpoints.wrapClientTLS(tls, path_to(reactor, "127.0.0.1", port, ca_pem))
            return await endpoints.connectProtocol(endpoint, WatchedLeg())

        first = await leg_at(used_at)
        await first.start(ticket["relay_token"])
        assert first.session_id == ticket["session_id"]
        second = await leg_at(other)
        with pytest.raises(control.RelayRefused, match="relay token already used"):
            await second.start(ticket["relay_token"])
        await second.closed.addTimeout(30, reactor)  # the relay closed the connection
        wait_until(lambda: re.search(
            r"relay refused connection from 127\.0\.0\.1: relay token already used",
            _relay_log_since(ops.relays[other], lines_before)),
            what="relay 2's logged reason")  # its log line may come after its answer
        assert not first.closed.called  # the first use is untouched: its leg stays open
    finally:
        if first is not None:
            first.close()
        if conn is not None:
            conn.transport.loseConnection()
        host.stop()


@pytest_twisted.ensureDeferred
async def test_node_b_dying_mid_set_up_leaves_nothing_running(ops):
    from twisted.internet import reactor

    from protocol import control

    folder = ModuleFolder(ops.alice)
    host = ModuleProcess("host", "run", "--pipe", "--max-backoff", "2", "--home", str(ops.pc1))
    conn = None
    try:
        host.wait_for_line("online; waiting for supporters")
        assert hosts_node(ops.db)["pc1"] == ("node-b", True)
        conn = await connect(reactor, ServerAddress("127.0.0.1", ops.a.module_port),
                             folder.ca_path.read_bytes(), folder)
        await hello(conn, "supporter")
        before = {row.id for row in ops.db.call(lambda s: s.scalars(select(Session)).all())}
        # node B stops before it reads node A's offer: the offer waits in its queue
        ops.b.process.send_signal(signal.SIGSTOP)
        try:
            asked_at = time.monotonic()
            with pytest.raises(control.ControlError) as refused:
                await conn.callRemote(control.ConnectHost, host="pc1")
            answered = time.monotonic() - asked_at
        finally:
            ops.b.process.send_signal(signal.SIGKILL)
            ops.b.process.wait()
        message = str(refused.value)
        assert refused.value.code == b"HOST_OFFLINE", message
        assert re.search(r"host 'pc1' did not answer: its server node node-b did not answer in "
                         r"time \(it may be down\); try again", message), message
        created = [row for row in ops.db.call(lambda s: s.scalars(select(Session)).all())
                   if row.id not in before]
        assert len(created) == 1 and created[0].ended_at is not None, created
        cut = created[0]
        lines = protocol_lines(ops.tmp, cut.id)
        assert [line["kind"] for line in lines if line["kind"] in ("created", "ended")] == [
            "created", "ended"], lines
        assert cut.protocol_end_hash == [line for line in lines if line["kind"] == "ended"][0]["hash"]
        # the host fails over to node A, nothing runs, and the protocols verify
        wait_until(lambda: hosts_node(ops.db)["pc1"] == ("node-a", True), timeout=60,
                   what="pc1 back online on node A")
        running = ops.db.call(lambda s: s.scalars(select(Session).where(
            Session.ended_at.is_(None))).all())
        assert running == [], running
        assert verify(ops.tmp / "shared" / "protocols").ok
        print(f"supporter refused {answered:.1f} s after ConnectHost: {message}")
    finally:
        if conn is not None:
            conn.transport.loseConnection()
        host.stop()
        if ops.b.process is None or ops.b.process.poll() is not None:
            ops.restart(ops.b)


def _lock_state(text: str) -> bool:
    """Whether a node's log (since its start) ends with it holding the outbox lock."""
    said = re.findall(r"mail outbox: (this node delivers|another node holds)", text)
    return bool(said) and said[-1] == "this node delivers"


def test_one_node_delivers_mail_and_another_takes_over_after_kill_9(ops):
    names = ("node-a", "node-b")
    assert "queued" in ops.a.ok("mail", "test", "first@example.test")
    ops.inbox.wait("test mail")
    holder = wait_until(lambda: [n for n in names if _lock_state(ops.log_since_start(n))],
                        what="the node holding the outbox lock")
    assert len(holder) == 1, holder
    holder, survivor = holder[0], next(n for n in names if n != holder[0])
    killed = ops.node(holder)
    offset = len(ops.node(survivor).log_path.read_text(errors="replace"))
    killed.process.send_signal(signal.SIGKILL)
    killed.process.wait()
    try:
        assert "queued" in ops.node(survivor).ok("mail", "test", "second@example.test")
        ops.inbox.wait("test mail", count=2)
        taken = ops.node(survivor).log_path.read_text(errors="replace")[offset:]
        assert "mail outbox: this node delivers the mail now" in taken, taken[-3000:]
        to = [m["X-Envelope-To"] for m in ops.inbox.messages if "test mail" in m["Subject"]]
        assert sorted(to) == ["first@example.test", "second@example.test"], to  # once each
    finally:
        ops.restart(killed)


def test_a_console_login_begun_on_one_node_finishes_on_the_other(ops):
    """A load balancer switching nodes mid-login: the form from A posted to B (CSRF), the
    password on B, the TOTP code on A, and the waiting login used once on every node."""
    import pyotp

    from server.db.models import ConsolePendingLogin, User
    ops.a.ok("user", "add", "tina", "--role", "admin", "--password-stdin",
             stdin="tina-password-789\n")
    secret = pyotp.random_base32()

    def with_totp(s):
        s.scalars(select(User).where(User.name == "tina")).one().totp_secret = secret
    ops.db.call(with_totp)
    console = Console(ops.tmp / "shared" / "certs" / "ca.crt")
    status, _, page = console.request(ops.a.url, "GET", "/console/login")
    csrf = re.search(r'name="csrf" value="([^"]+)"', page).group(1)
    status, where, page = console.request(ops.b.url, "POST", "/console/login", {
        "csrf": csrf, "user": "tina", "password": "tina-password-789"})
    assert status in (302, 303) and where.endswith("/console/login/totp"), (status, page[:500])
    status, _, page = console.request(ops.a.url, "GET", "/console/login/totp")
    assert status == 200 and "tina" in page, page[:500]
    csrf = re.search(r'name="csrf" value="([^"]+)"', page).group(1)
    totp = pyotp.TOTP(secret)
    wrong = "000000" if totp.now() != "000000" else "111111"
    status, _, page = console.request(ops.b.url, "POST", "/console/login/totp",
                                      {"csrf": csrf, "code": wrong})
    assert status == 401 and "wrong or expired code" in page, (status, page[:500])
    before_login = console.cookie
    status, where, _ = console.request(ops.a.url, "POST", "/console/login/totp",
                                       {"csrf": csrf, "code": totp.now()})
    assert status in (302, 303) and "login" not in where, (status, where)
    assert console.cookie != before_login  # a fresh id at login
    status, _, page = console.request(ops.b.url, "GET", "/console/hosts")
    assert status == 200 and "pc1" in page and "tina" in page
    # the waiting login was used once: the pre-login cookie cannot finish it again, on either node
    assert ops.db.call(lambda s: s.scalars(select(ConsolePendingLogin)).all()) == []
    replay = Console(ops.tmp / "shared" / "certs" / "ca.crt")
    replay.cookie = before_login
    for node in (ops.a, ops.b):
        status, where, _ = replay.request(node.url, "POST", "/console/login/totp",
                                          {"csrf": csrf, "code": totp.at(time.time() + 30)})
        assert status in (302, 303) and where.endswith("/console/login"), (status, where)
    # a made-up cookie is an anonymous session of its own: its form token is not the other's
    stranger = Console(ops.tmp / "shared" / "certs" / "ca.crt")
    stranger.cookie = "x" * 43
    status, _, _ = stranger.request(ops.b.url, "POST", "/console/login", {
        "csrf": csrf, "user": "tina", "password": "tina-password-789"})
    assert status == 403


def test_websocket_modules_reach_a_relay_process_through_their_node(ops):
    """A host and a supporter that reach node B only through a WebSocket on its single port: the
    session runs through a relay process (its own TLS end to end inside the node's tunnel)."""
    single = ops.b.info["single_port"]
    bob = add_enrolled_supporter(ops.a, "bob", ops.tmp / "bob")
    pc3 = add_enrolled_host(ops.a, "pc3", ops.tmp / "pc3", "host-password-3")
    for home in (bob, pc3):
        set_servers(ModuleFolder(home), [f"127.0.0.1:{single}"])
    password = ops.tmp / "pw3"
    password.write_text("host-password-3\n")
    host = ModuleProcess("host", "run", "--websocket", "--pipe", "--home", str(pc3))
    supporter = None
    try:
        host.wait_for_line("online; waiting for supporters")
        supporter = ModuleProcess("supporter", "connect", "pc3", "--pipe", "--answers",
                                  "/dev/null", "--password-file", str(password), "--home",
                                  str(bob), "--websocket")
        supporter.wait_for_line("granted control", timeout=60)
        payload = bytes(range(256)) * 800   # ~200 KB: many WebSocket messages each way
        host.send(payload)
        supporter.read_exactly(payload)
        supporter.send(b"keys through the relay tunnel")
        host.read_exactly(b"keys through the relay tunnel")
        supporter.close_stdin()
        assert supporter.wait() == 0 and host.wait() == 0
    finally:
        if supporter is not None:
            supporter.stop()
        host.stop()
    row = ops.db.call(lambda s: s.scalars(select(Session).where(
        Session.peer_identity.like("%pc3%") | Session.host_id.in_(
            select(Host.id).where(Host.name == "pc3")))).one())
    assert row.ended_at is not None and row.bytes_to_supporter >= len(payload), row.end_reason
    tunnels = re.findall(r"relay tunnel \(WebSocket\) from 127\.0\.0\.1 to relay "
                         r"127\.0\.0\.1:(\d+)", ops.log_since_start("node-b"))
    assert len(tunnels) == 2 and int(tunnels[0]) in ops.relays, tunnels  # both legs
    # the node passes bytes to the relays of relay.external only
    console = Console(ops.tmp / "shared" / "certs" / "ca.crt")
    status, _, page = console.request(ops.b.url, "GET",
                                      f"/api/v1/relay-tunnel?to=127.0.0.1:{ops.a.module_port}")
    assert status == 403 and "not a relay of this server" in page, (status, page)
    assert "relay tunnel refused from 127.0.0.1" in ops.log_since_start("node-b")
