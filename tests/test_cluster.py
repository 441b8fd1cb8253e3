"""Several server nodes on one PostgreSQL (issue 15 part 3), as real processes on 127.0.0.1.

Two ``hausmeister-server run`` nodes and one relay process share a throwaway PostgreSQL, the
certificates, the relay secret and the protocol folder.  A host connects to node B, a supporter
to node A: the session runs (offer and reports through LISTEN/NOTIFY).  A console login on A works
on B with the same cookie.  A customer on node B joins the ad-hoc ID of a supporter on node A.
``kill -9`` node B: a running host fails over to A within 60 s and the cut session's protocol is
closed once; B started again takes the same console cookie.  The crash recovery
of a dead node's sessions is checked on the database alone (what a live node ends, what it
leaves to a relay or to a node still alive).
"""

from __future__ import annotations

import datetime as dt
import re
import signal
import time
import uuid

import pytest
import pytest_twisted
from sqlalchemy import select

from server.db import Database
from server.db.models import Host, ServerNode, Session, Tenant
from server.session_protocol import verify

from modules.common.link.folder import ModuleFolder
from modules.common.link.servers import ServersError, parse_server, set_servers

from .fixtures_cluster import Console, hosts_node, node_config, protocol_lines
from .fixtures_server import (ADMIN_PASSWORD, add_enrolled_host, add_enrolled_supporter,
                              free_port, run_cli)
from .module_process import ModuleProcess
from .test_e2e_brokering import answers, server_args, wait_until

pytestmark = pytest.mark.e2e


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_two_nodes_share_hosts_console_and_survive_a_node_killed(tmp_path, db_url):
    relay_port = free_port()
    node_a = node_config(tmp_path, "node-a", db_url, relay_port)
    node_b = node_config(tmp_path, "node-b", db_url, relay_port)
    assert node_a.cli("init", "--password-stdin", stdin=ADMIN_PASSWORD + "\n").returncode == 0
    db = Database(db_url)
    relay = ModuleProcess("server", "-c", str(node_a.config), "run", "--role", "relay")
    node_a.start()
    node_b.start()
    host = supporter = None
    try:
        relay.wait_for_line(f"relay listening on .*{relay_port}")
        alice = add_enrolled_supporter(node_a, "alice", tmp_path / "alice")
        pc1 = add_enrolled_host(node_a, "pc1", tmp_path / "pc1", "host-password-1")
        pc2 = add_enrolled_host(node_a, "pc2", tmp_path / "pc2", "host-password-2")
        # the hosts try node B first, then A (their module folder's server list)
        nodes = [f"127.0.0.1:{node_b.module_port}", f"127.0.0.1:{node_a.module_port}"]
        result = run_cli("host", "servers", *nodes, "--home", str(pc1))
        assert result.returncode == 0 and result.stdout.split() == nodes, result.stderr
        set_servers(ModuleFolder(pc2), nodes)
        password = tmp_path / "pw"
        password.write_text("host-password-1\n")

        # --- a supporter on node A reaches a host on node B --------------------------------
        # pc1 serves one session (--pipe) and exits after it; pc2 stays (it has no screen to
        # share, so it declines sessions) and shows the fail-over of a running host
        host = ModuleProcess("host", "run", "--pipe", "--max-backoff", "2", "--home", str(pc1))
        staying = ModuleProcess("host", "run", "--max-backoff", "2", "--home", str(pc2))
        host.wait_for_line("online; waiting for supporters")
        staying.wait_for_line("online; waiting for supporters")
        assert hosts_node(db) == {"pc1": ("node-b", True), "pc2": ("node-b", True)}
        listed = run_cli("supporter", "hosts", "--home", str(alice))
        assert listed.returncode == 0 and re.search(r"online +pc1", listed.stdout), listed.stdout
        supporter = ModuleProcess("supporter", "connect", "pc1", "--pipe", "--answers",
                                  "/dev/null", "--password-file", str(password),
                                  "--home", str(alice))
        supporter.wait_for_line("granted control", timeout=60)
        host.send(b"screen of a host on node B")
        supporter.read_exactly(b"screen of a host on node B")
        supporter.send(b"keys from a supporter on node A")
        host.read_exactly(b"keys from a supporter on node A")
        cut = db.call(lambda s: s.scalars(select(Session)).one())
        assert cut.node == "node-a" and cut.ended_at is None
        # the host's reports reached node A's protocol through node B, confirmed by the
        # supporter's (one line per shared event, "confirmed_by" the other party)
        granted = wait_until(lambda: [line for line in protocol_lines(tmp_path, cut.id)
                                      if line["kind"] == "right_granted"],
                             what="the right_granted lines")
        parties = {f"hausmeister:host:{cut.host_id}", "hausmeister:supporter:alice"}
        assert all({line["actor"], line["detail"].get("confirmed_by")} == parties
                   for line in granted), granted  # who reports first is a race

        # --- the console: log in on A, the same cookie works on B ---------------------------
        console = Console(tmp_path / "shared" / "certs" / "ca.crt")
        status, _, page = console.request(node_a.url, "GET", "/console/login")
        csrf = re.search(r'name="csrf" value="([^"]+)"', page).group(1)
        status, where, _ = console.request(node_a.url, "POST", "/console/login", {
            "csrf": csrf, "user": "admin", "password": ADMIN_PASSWORD})
        assert status in (302, 303) and "/console" in where and "login" not in where
        status, _, page = console.request(node_b.url, "GET", "/console/hosts")
        assert status == 200 and "pc1" in page and "admin" in page
        anonymous = Console(tmp_path / "shared" / "certs" / "ca.crt")
        status, where, _ = anonymous.request(node_b.url, "GET", "/console/hosts")
        assert status in (302, 303) and where.endswith("/console/login")

        # --- an ad-hoc ID of a supporter on node A, typed by a customer on node B -----------
        adhoc = ModuleProcess("supporter", "adhoc", "--pipe", "--answers", "/dev/null",
                              "--home", str(alice))
        code = "".join(adhoc.wait_for_line(r"ad-hoc ID: (\d{4}) (\d{4})").groups())
        customer = ModuleProcess("customer", *server_args(node_b), code, "--pipe",
                                 "--answers", answers(tmp_path, "y", "y", "y"))
        try:
            customer.wait_for_line("granted control", timeout=60)
            adhoc.wait_for_line("granted control")
            customer.send(b"a customer on node B")
            adhoc.read_exactly(b"a customer on node B")
        finally:
            customer.stop()
            adhoc.stop()
        joined = db.call(lambda s: s.scalars(select(Session).where(Session.kind == "adhoc")).one())
        assert joined.node == "node-a"

        listed = node_a.ok("node", "list")
        assert re.search(r"node-a +server +live", listed) and re.search(r"node-b +server +live +\d+ .* 2 +-", listed), listed
        assert re.search(r"relay-\S+ +relay +live", listed), listed

        # --- kill -9 node B: the host is back on node A, the cut session is closed ----------
        killed_at = time.monotonic()
        node_b.process.send_signal(signal.SIGKILL)
        node_b.process.wait()
        try:
            wait_until(lambda: hosts_node(db)["pc2"] == ("node-a", True), timeout=60,
                       what="the host back online on node A")
        except AssertionError:
            raise AssertionError(f"host not back on node A: {hosts_node(db)}\n{staying.stderr}")
        back_after = time.monotonic() - killed_at
        assert back_after < 60
        # the cut session ends on both sides ("lost the connection to the server")
        assert host.wait(timeout=30) != 0 and supporter.wait(timeout=30) != 0
        ended = wait_until(lambda: [line for line in protocol_lines(tmp_path, cut.id)
                                    if line["kind"] == "ended"], timeout=30,
                           what="the cut session's ended line")
        assert len(ended) == 1, ended
        row = db.call(lambda s: s.get(Session, cut.id))
        assert row.ended_at is not None and row.protocol_end_hash == ended[0]["hash"]
        assert verify(tmp_path / "shared" / "protocols").ok

        # the console still works on A; node B started again: the same login works there (a
        # restart logs nobody out)
        status, _, page = console.request(node_a.url, "GET", "/console/hosts")
        assert status == 200 and "pc1" in page
        node_b.start()
        status, _, page = console.request(node_b.url, "GET", "/console/hosts")
        assert status == 200 and "pc2" in page
        print(f"host back on node A {back_after:.1f} s after kill -9 of node B")
    finally:
        for proc in (supporter, host, locals().get("staying")):
            if proc is not None:
                proc.stop()
        node_b.stop()
        node_a.stop()
        relay.stop()
        db.dispose()


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_a_live_node_ends_only_what_a_dead_node_left_open(database):
    """The dead-node sweep: sessions of a dead node that no relay carries are ended (once);
    those on a live relay, those still within the pair timeout and a live node's stay open;
    the dead node's hosts go offline.  And the shared single-use rows."""
    from server.session_recovery import _of_dead_nodes
    now = dt.datetime.now(dt.timezone.utc)
    old, fresh, stale = now - dt.timedelta(minutes=5), now, now - dt.timedelta(seconds=60)
    ids = {name: str(uuid.uuid4()) for name in ("dead", "on_relay", "young", "alive", "mine")}

    def setup(s):
        tenant = s.scalar(select(Tenant)) or Tenant(name="default", created_at=old)
        s.add(tenant)
        s.flush()
        s.add_all([
            ServerNode(name="node-dead", kind="server", pid=1, started_at=old, seen_at=stale,
                       sessions=""),
            ServerNode(name="node-live", kind="server", pid=2, started_at=old, seen_at=fresh,
                       sessions=""),
            ServerNode(name="relay-x-3", kind="relay", pid=3, started_at=old, seen_at=fresh,
                       sessions=ids["on_relay"]),
            Host(id=str(uuid.uuid4()), tenant_id=tenant.id, name="on-dead", enrolled_at=old,
                 online=True, node="node-dead"),
            Host(id=str(uuid.uuid4()), tenant_id=tenant.id, name="on-live", enrolled_at=old,
                 online=True, node="node-live"),
        ])
        for key, node, created in (("dead", "node-dead", old), ("on_relay", "node-dead", old),
                                   ("young", "node-dead", fresh), ("alive", "node-live", old),
                                   ("mine", "node-me", old)):
            s.add(Session(id=ids[key], tenant_id=tenant.id, kind="host", created_at=created,
                          started_at=created, node=node, bytes_to_peer=0, bytes_to_supporter=0))
    database.call(setup)
    alive, ended, offline = database.call(_of_dead_nodes, "node-me", 15.0, 45.0)
    assert len(offline) == 1
    assert alive == {"node-live", "node-me"}
    assert [summary.session_id for _, summary in ended] == [ids["dead"]]
    rows = {r.id: r for r in database.call(lambda s: s.scalars(select(Session)).all())}
    assert rows[ids["dead"]].ended_at is not None
    assert rows[ids["dead"]].end_cause == "server_crashed"
    assert all(rows[ids[k]].ended_at is None for k in ("on_relay", "young", "alive", "mine"))
    assert database.call(_of_dead_nodes, "node-me", 15.0, 45.0)[1] == []  # once
    online = dict(database.call(lambda s: s.execute(select(Host.name, Host.online)).all()))
    assert online == {"on-dead": False, "on-live": True}
    # relay tokens are single-use across relay processes, nameplates unique across nodes
    from server.broker_nodes import _claim_nameplate, _take_nameplate
    from server.relay.listener import claim_token
    later = now + dt.timedelta(seconds=30)
    assert database.call(claim_token, "nonce-1", later, now) is True
    assert database.call(claim_token, "nonce-1", later, now) is False
    assert database.call(_claim_nameplate, "1234", "node-live", "hausmeister:supporter:a", now,
                         600.0, 5000) is True
    assert database.call(_claim_nameplate, "1234", "node-me", "hausmeister:supporter:b", now,
                         600.0, 5000) is False
    assert database.call(_take_nameplate, "1234", now) == "node-live"
    assert database.call(_take_nameplate, "1234", now) is None  # single use
    # a module's server list: HOST:PORT each, one clear error otherwise
    assert parse_server("[::1]:8444") == ("::1", 8444)
    with pytest.raises(ServersError, match="HOST:PORT"):
        parse_server("no-port-here")
    # one outbox runner at a time: the advisory lock's holder, until it lets go (or dies)
    from server.cluster import OUTBOX_LOCK, SingleRunner
    other = Database(database.url)
    try:
        first, second = SingleRunner(database, OUTBOX_LOCK), SingleRunner(other, OUTBOX_LOCK)
        assert first.holds() and first.holds() and not second.holds()
        first.release()
        assert second.holds() and not first.holds()
        second.release()
    finally:
        other.dispose()


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
@pytest_twisted.ensureDeferred
async def test_the_node_bus_calls_answers_refuses_and_broadcasts_in_order(database):
    """Two nodes' buses on one PostgreSQL (in this process, each with its own connections):
    a call and its answer, a refusal with the module-facing error code, a node that does not
    answer, and messages to one node arriving in the order they were sent."""
    from twisted.internet import reactor, task

    from protocol import control
    from server.cluster import NodeBus, NodeCallFailed

    other = Database(database.url)
    a = NodeBus(database, "node-a", reactor, call_timeout=5)
    b = NodeBus(other, "node-b", reactor, call_timeout=5)
    seen: list[tuple[str, int]] = []

    def refuse(sender, body):
        raise control.HostOffline("the host is not connected to this node")
    b.handlers.update({"echo": lambda sender, body: {"asked_by": sender, **body},
                       "refuse": refuse})
    a.handlers["seen"] = lambda sender, body: seen.append((sender, body["n"]))
    try:
        await a.start()
        await b.start()
        assert await a.call("node-b", "echo", {"x": 1}) == {"asked_by": "node-a", "x": 1}
        with pytest.raises(NodeCallFailed) as refused:
            await a.call("node-b", "refuse", {})
        assert refused.value.code == "HOST_OFFLINE" and "not connected" in refused.value.message
        with pytest.raises(NodeCallFailed, match="did not answer"):
            await a.call("node-gone", "echo", {}, timeout=0.5)
        for n in range(20):
            b.tell("node-a", "seen", {"n": n})
        b.broadcast("seen", {"n": 99})  # every other node; b does not hear itself
        deadline = time.monotonic() + 20
        while len(seen) < 21 and time.monotonic() < deadline:
            await task.deferLater(reactor, 0.05, lambda: None)
        # in order per destination; the broadcast goes its own way
        assert [n for _, n in seen if n != 99] == list(range(20)) and ("node-b", 99) in seen
        assert {sender for sender, _ in seen} == {"node-b"}
    finally:
        a.stop()
        b.stop()
        other.dispose()
