"""Protocol mails to supporters who opted in, against a real database (SQLite and PostgreSQL) and
real protocol files written by ``SessionProtocols``."""

from __future__ import annotations

import datetime as dt
import uuid

import pytest
from sqlalchemy import select

from server import accounts, protocol_delivery
from server.config import MailSection
from server.db.models import OutboxMail, Role, Session
from server.mail import Outbox
from server.session_protocol import SessionProtocols, SessionSummary

T0 = dt.datetime(2026, 11, 23, 6, 0, tzinfo=dt.timezone.utc)
MAIL = MailSection(smtp_host="127.0.0.1", smtp_port=2525, security="none", username="",
                   password="", from_address="hausmeister@example.test")
BASE = "https://hm.example.test:8443"


@pytest.fixture
def world(database, fast_password_hashing, tmp_path):
    """Tenant acme: alice (opted in, mail), bob (mail, not opted in), carol (opted in, no mail),
    dave (opted in, disabled); tenant other: eve (opted in, mail)."""
    def build(s):
        acme = accounts.get_or_create_tenant(s, "acme")
        other = accounts.get_or_create_tenant(s, "other")
        for tenant, name, email, opted, disabled in (
                (acme, "alice", "alice@example.test", True, False),
                (acme, "bob", "bob@example.test", False, False),
                (acme, "carol", None, True, False),
                (acme, "dave", "dave@example.test", True, True),
                (other, "eve", "eve@example.test", True, False)):
            user = accounts.add_user(s, tenant, name, Role.supporter, "supporter-pass-1", email=email)
            user.protocol_mail, user.disabled = opted, disabled
        return {"acme": acme.id, "other": other.id}
    tenants = database.call(build)
    return database, tenants, SessionProtocols(tmp_path / "protocols", clock=lambda: T0)


def ended_session(db, protocols, tenants, tenant: str, supporter: str | None, ended: dt.datetime,
                  protocol_file: bool = True) -> str:
    sid = str(uuid.uuid4())
    identity = f"hausmeister:supporter:{supporter}" if supporter else None
    start = ended - dt.timedelta(minutes=10)
    row = dict(id=sid, tenant_id=tenants[tenant], kind="adhoc", supporter_identity=identity,
               peer_address="10.0.0.7", created_at=start, started_at=start, ended_at=ended,
               end_reason="supporter ended")
    db.call(lambda s: s.add(Session(**row)))
    if protocol_file:
        protocols.record(tenant, sid, "joined", identity or "customer@10.0.0.7", "192.0.2.1",
                         {"text": "<b>hello</b>\nsecond line"})
        protocols.ended(tenant, SessionSummary(sid, "adhoc", start, ended, identity, "customer@10.0.0.7"))
    return sid


def mails(db):
    return db.call(lambda s: [(m.to_address, m.subject, m.body_text) for m in
                              s.scalars(select(OutboxMail).order_by(OutboxMail.id))])


def mailed_at(db, sid):
    return db.call(lambda s: s.get(Session, sid).protocol_mailed_at)


def test_protocol_mailed_once_to_the_opted_in_supporter(world):
    db, tenants, protocols = world
    outbox = Outbox(db, MAIL)
    ended = T0 - dt.timedelta(minutes=1)
    sid = ended_session(db, protocols, tenants, "acme", "alice", ended)

    done = db.call(protocol_delivery.deliver, outbox, protocols.protocol_dir, BASE, T0, T0)

    assert done == [sid]
    [(to, subject, body)] = mails(db)
    assert to == "alice@example.test"
    assert subject == f"Hausmeister: protocol of session {sid}"
    assert "joined" in body and "ended" in body and "chain intact" in body
    assert "<b>hello</b>" in body and "\\nsecond line" in body  # text mail; line break escaped
    assert BASE in body
    assert mailed_at(db, sid) == T0
    # The next scan has nothing left to do.
    assert db.call(protocol_delivery.deliver, outbox, protocols.protocol_dir, BASE, T0,
                   T0 + dt.timedelta(seconds=10)) == []
    assert len(mails(db)) == 1


def test_sessions_not_to_mail_are_marked_without_a_mail(world):
    db, tenants, protocols = world
    outbox = Outbox(db, MAIL)
    ended = T0 - dt.timedelta(minutes=1)
    quiet = [ended_session(db, protocols, tenants, "acme", name, ended)
             for name in ("bob", "carol", "dave", "nobody", None)]
    # eve is opted in but belongs to another tenant than the session
    quiet.append(ended_session(db, protocols, tenants, "acme", "eve", ended))

    assert db.call(protocol_delivery.deliver, outbox, protocols.protocol_dir, BASE, T0, T0) == []
    assert mails(db) == []
    assert all(mailed_at(db, sid) == T0 for sid in quiet)


def test_old_sessions_are_not_mailed_and_fresh_ones_wait_to_settle(world):
    db, tenants, protocols = world
    outbox = Outbox(db, MAIL)
    since = T0
    old = ended_session(db, protocols, tenants, "acme", "alice", since - dt.timedelta(days=3))
    recent = ended_session(db, protocols, tenants, "acme", "alice", since - dt.timedelta(minutes=30))
    just_now = ended_session(db, protocols, tenants, "acme", "alice", since + dt.timedelta(seconds=9))
    running = str(uuid.uuid4())
    db.call(lambda s: s.add(Session(id=running, tenant_id=tenants["acme"], kind="adhoc",
                                    supporter_identity="hausmeister:supporter:alice",
                                    created_at=T0, started_at=T0)))

    now = since + dt.timedelta(seconds=10)
    assert db.call(protocol_delivery.deliver, outbox, protocols.protocol_dir, BASE, since, now) == [recent]
    assert mailed_at(db, old) == now and mailed_at(db, running) is None
    assert mailed_at(db, just_now) is None  # ended 1 s ago: its protocol's last line may be on its way
    later = now + dt.timedelta(seconds=10)
    assert db.call(protocol_delivery.deliver, outbox, protocols.protocol_dir, BASE, since, later) == [just_now]
    assert len(mails(db)) == 2


def test_missing_protocol_file_still_mails_the_session_facts(world):
    db, tenants, protocols = world
    sid = ended_session(db, protocols, tenants, "acme", "alice", T0 - dt.timedelta(minutes=1),
                        protocol_file=False)
    assert db.call(protocol_delivery.deliver, Outbox(db, MAIL), protocols.protocol_dir, BASE, T0, T0) == [sid]
    assert "(no events recorded)" in mails(db)[0][2]


def test_no_relay_no_service():
    class App:
        outbox = None
    assert protocol_delivery.service(App()) is None
