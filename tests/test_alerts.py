"""Alert mails (certificate expiry, disk space) against a real database on SQLite and PostgreSQL;
the disk is a fake usage function, the certificates are real ones from ``server.pki``."""

from __future__ import annotations

import datetime as dt
from collections import namedtuple
from pathlib import Path

import pytest
from sqlalchemy import select

from server import accounts, alerts, pki
from server.config import MailSection
from server.db.models import AlertSent, OutboxMail, Role
from server.mail import Outbox

T0 = dt.datetime(2026, 11, 23, 6, 0, tzinfo=dt.timezone.utc)
Usage = namedtuple("Usage", "total used free")
MAIL = MailSection(smtp_host="127.0.0.1", smtp_port=2525, security="none", username="",
                   password="", from_address="hausmeister@example.test")


def plenty(path: str) -> Usage:
    return Usage(1000, 100, 900)


def nearly_full(path: str) -> Usage:
    return Usage(1000, 950, 50)  # 5 % free


@pytest.fixture
def setup(database, fast_password_hashing):
    """Operator tenant with two admins (one without mail), an auditor; a second tenant's admin."""
    def build(s):
        first = accounts.get_or_create_tenant(s, "operator")
        other = accounts.get_or_create_tenant(s, "customer-b")
        accounts.add_user(s, first, "admin", Role.admin, "admin-password-1", email="ops@example.test")
        accounts.add_user(s, first, "admin2", Role.admin, "admin-password-2")
        accounts.add_user(s, first, "watch", Role.auditor, "audit-password", email="aud@example.test")
        accounts.add_user(s, other, "badmin", Role.admin, "b-password-123", email="b@example.test")
        off = accounts.add_user(s, first, "gone", Role.admin, "gone-password", email="gone@example.test")
        off.disabled = True
    database.call(build)
    return database


def policy(tmp_path: Path, days: int = 30, percent: int = 10) -> alerts.AlertPolicy:
    return alerts.AlertPolicy(days, percent, {"protocol": tmp_path / "protocols",
                                              "recording": tmp_path / "not" / "yet" / "there"},
                              "https://hm.example.test:8443")


def mails(db) -> list[tuple[str, str, str]]:
    return db.call(lambda s: [(m.to_address, m.subject, m.body_text) for m in
                              s.scalars(select(OutboxMail).order_by(OutboxMail.id))])


def certs(days_left: int):
    ca_key, ca = pki.create_ca(now=lambda: T0 - dt.timedelta(days=100))
    _, server = pki.issue_server_cert(ca_key, ca, ("hm.example.test",), (), days=100 + days_left,
                                      now=lambda: T0 - dt.timedelta(days=100))
    return [("CA", ca), ("server", server)]


def test_certificate_expiring_soon_is_mailed_once_to_operator_admins(setup, tmp_path):
    outbox = Outbox(setup, MAIL)
    expiring = certs(days_left=10)

    keys = setup.call(alerts.check, outbox, policy(tmp_path), expiring, T0, plenty)

    server_serial = format(expiring[1][1].serial_number, "x")
    assert keys == [f"cert-expiry:{server_serial}"]  # the CA has years left
    [(to, subject, body)] = mails(setup)
    assert to == "ops@example.test"  # not the admin without mail, the auditor, the other tenant
    assert subject == "Hausmeister alert: the server certificate expires in 9 days"  # 9 d 23:55
    assert server_serial in body and "hm.example.test" in body
    # The next runs (same day, next week) do not mail it again.
    assert setup.call(alerts.check, outbox, policy(tmp_path), expiring, T0, plenty) == []
    later = T0 + dt.timedelta(days=7)
    assert setup.call(alerts.check, outbox, policy(tmp_path), expiring, later, plenty) == []
    assert len(mails(setup)) == 1


def test_expired_certificate_and_threshold_zero(setup, tmp_path):
    outbox = Outbox(setup, MAIL)
    expired = certs(days_left=-2)
    assert setup.call(alerts.check, outbox, policy(tmp_path, days=0), expired, T0, plenty) == []
    keys = setup.call(alerts.check, outbox, policy(tmp_path), expired, T0, plenty)
    assert len(keys) == 1
    assert "has expired" in mails(setup)[0][1]


def test_low_disk_mailed_once_a_day_per_folder(setup, tmp_path):
    outbox = Outbox(setup, MAIL)
    (tmp_path / "protocols").mkdir()
    seen = []

    def usage(path: str) -> Usage:
        seen.append(path)
        return nearly_full(path)

    keys = setup.call(alerts.check, outbox, policy(tmp_path), certs(365), T0, usage)

    assert sorted(keys) == sorted([f"disk:{tmp_path / 'protocols'}:2026-11-23",
                                   f"disk:{tmp_path / 'not' / 'yet' / 'there'}:2026-11-23"])
    # A folder that does not exist yet is measured on its nearest existing parent.
    assert seen == [str(tmp_path / "protocols"), str(tmp_path)]
    subjects = sorted(m[1] for m in mails(setup))
    assert subjects == ["Hausmeister alert: 5.0% free for the protocol folder",
                        "Hausmeister alert: 5.0% free for the recording folder"]
    assert setup.call(alerts.check, outbox, policy(tmp_path), certs(365), T0, usage) == []
    tomorrow = T0 + dt.timedelta(days=1)
    assert len(setup.call(alerts.check, outbox, policy(tmp_path), certs(365), tomorrow, usage)) == 2
    assert len(mails(setup)) == 4
    # Enough space, or the threshold 0: nothing.
    assert setup.call(alerts.check, outbox, policy(tmp_path), certs(365), T0 + dt.timedelta(days=2),
                      plenty) == []
    assert setup.call(alerts.check, outbox, policy(tmp_path, percent=0), certs(365),
                      T0 + dt.timedelta(days=3), usage) == []


def test_unreadable_disk_is_skipped(setup, tmp_path):
    def broken(path: str):
        raise PermissionError(13, "Permission denied", path)
    assert setup.call(alerts.check, Outbox(setup, MAIL), policy(tmp_path), certs(365), T0, broken) == []


def test_no_admin_with_mail_records_nothing_until_one_has_an_address(database, tmp_path,
                                                                     fast_password_hashing):
    def build(s):
        tenant = accounts.get_or_create_tenant(s, "operator")
        accounts.add_user(s, tenant, "admin", Role.admin, "admin-password-1")
    database.call(build)
    outbox = Outbox(database, MAIL)
    expiring = certs(days_left=3)

    assert database.call(alerts.check, outbox, policy(tmp_path), expiring, T0, plenty) == []
    assert mails(database) == []
    assert database.call(lambda s: s.scalars(select(AlertSent)).all()) == []

    database.call(lambda s: setattr(accounts.user_named(s, "admin"), "email", "late@example.test"))
    assert len(database.call(alerts.check, outbox, policy(tmp_path), expiring, T0, plenty)) == 1
    assert [m[0] for m in mails(database)] == ["late@example.test"]


def test_no_relay_no_alert_service():
    class App:
        outbox = None
    assert alerts.service(App()) is None


def test_periodic_runs_after_start_then_every_interval_and_survives_errors():
    from twisted.internet import defer
    from twisted.internet.task import Clock

    clock, runs = Clock(), []

    def tick():
        runs.append(clock.seconds())
        if len(runs) == 2:
            return defer.fail(RuntimeError("database away"))  # logged; the loop goes on
        return defer.succeed(None)

    service = alerts.Periodic("test", tick, interval=60, clock=clock, first_delay=1.0)
    service.startService()
    assert runs == []                 # the server writes its address first
    clock.advance(1)
    assert runs == [1]
    clock.advance(60)
    clock.advance(60)
    assert runs == [1, 61, 121]
    service.stopService()
    clock.advance(600)
    assert runs == [1, 61, 121]
    # Stopped before the first run: nothing runs.
    early = alerts.Periodic("test", tick, interval=60, clock=clock, first_delay=1.0)
    early.startService()
    early.stopService()
    clock.advance(10)
    assert runs == [1, 61, 121]
