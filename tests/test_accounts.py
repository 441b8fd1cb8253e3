"""Tenants, users, argon2id passwords, authentication and the exponential lock-out."""

from __future__ import annotations

import datetime as dt

import pytest
from sqlalchemy import func, select

from server import accounts
from server.accounts import (
    AccountError, LockedOut, LockoutPolicy, Lockouts, Refused, authenticate,
)
from server.db import Database, KeepChanges
from server.db.models import AuditEntry, Lockout, Role, User

PASSWORD = "correct horse battery"
START = dt.datetime(2026, 11, 23, 9, 0, tzinfo=dt.timezone.utc)


class Clock:
    """An injected clock: tests move time forward instead of sleeping."""

    def __init__(self, start: dt.datetime = START) -> None:
        self.moment = start

    def __call__(self) -> dt.datetime:
        return self.moment

    def advance(self, seconds: float) -> None:
        self.moment += dt.timedelta(seconds=seconds)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def lockouts(clock: Clock) -> Lockouts:
    return Lockouts(LockoutPolicy(free_attempts=3, base_seconds=1.0, max_seconds=900.0), now=clock)


@pytest.fixture
def accounts_db(database: Database, fast_password_hashing) -> Database:
    """A migrated database with tenant ``acme`` and users alice (supporter), bob (admin)."""
    with database.session() as session:
        tenant = accounts.get_or_create_tenant(session, "acme", now=lambda: START)
        accounts.add_user(session, tenant, "alice", Role.supporter, PASSWORD, now=lambda: START)
        accounts.add_user(session, tenant, "bob", Role.admin, PASSWORD + " bob", now=lambda: START)
    return database


def login(db: Database, lockouts: Lockouts, name: str, password: str, source: str) -> User:
    """Through ``Database.call``, so a refusal's KeepChanges commit really happens."""
    return db.call(authenticate, lockouts, name, password, source)


def lockout_row(db: Database, key: str) -> Lockout | None:
    with db.session() as session:
        return session.get(Lockout, key)


# --- users ------------------------------------------------------------------------------------

def test_add_user_stores_an_argon2id_hash(accounts_db: Database) -> None:
    with accounts_db.session() as session:
        alice = accounts.user_named(session, "alice")
        assert alice.role is Role.supporter
        assert alice.tenant.name == "acme"
        assert alice.disabled is False
        assert alice.created_at == START
        assert alice.password_hash.startswith("$argon2id$")
        assert PASSWORD not in alice.password_hash
        assert accounts.password_matches(alice.password_hash, PASSWORD)


def test_duplicate_user_refused_and_nothing_changed(accounts_db: Database) -> None:
    def add_twice(session):
        tenant = accounts.tenant_named(session, "acme")
        accounts.add_user(session, tenant, "carol", Role.auditor, PASSWORD)
        accounts.add_user(session, tenant, "alice", Role.admin, PASSWORD)

    with pytest.raises(AccountError, match="user 'alice' already exists"):
        accounts_db.call(add_twice)
    with accounts_db.session() as session:
        # carol was rolled back with the failed transaction; alice is untouched
        assert session.scalar(select(func.count()).select_from(User)) == 2
        assert accounts.user_named(session, "alice").role is Role.supporter


@pytest.mark.parametrize("name", ["", "-alice", ".hidden", "with space", "a/b", "ümlaut",
                                  "x" * 101, "semi;colon"])
def test_invalid_user_names_refused(accounts_db: Database, name: str) -> None:
    with accounts_db.session() as session:
        tenant = accounts.tenant_named(session, "acme")
        with pytest.raises(AccountError, match="is not valid"):
            accounts.add_user(session, tenant, name, Role.supporter, PASSWORD)
        assert session.scalar(select(func.count()).select_from(User)) == 2


@pytest.mark.parametrize("name", ["carol", "c.arol-2", "carol@example.org", "C_9", "x" * 100])
def test_valid_user_names_accepted(accounts_db: Database, name: str) -> None:
    with accounts_db.session() as session:
        tenant = accounts.tenant_named(session, "acme")
        accounts.add_user(session, tenant, name, Role.auditor, PASSWORD)
    with accounts_db.session() as session:
        assert accounts.user_named(session, name).role is Role.auditor


def test_short_password_refused(accounts_db: Database) -> None:
    minimum = accounts.MIN_PASSWORD_LENGTH
    with accounts_db.session() as session:
        tenant = accounts.tenant_named(session, "acme")
        with pytest.raises(AccountError, match=f"too short: use at least {minimum}"):
            accounts.add_user(session, tenant, "carol", Role.supporter, "p" * (minimum - 1))
        accounts.add_user(session, tenant, "carol", Role.supporter, "p" * minimum)


def test_parse_role() -> None:
    assert accounts.parse_role("admin") is Role.admin
    assert accounts.parse_role("supporter") is Role.supporter
    assert accounts.parse_role("auditor") is Role.auditor
    for bad in ("root", "Admin", "", "supporters"):
        with pytest.raises(AccountError, match="unknown: use admin, supporter or auditor"):
            accounts.parse_role(bad)


def test_unknown_user_tenant_and_group_named_clearly(accounts_db: Database) -> None:
    with accounts_db.session() as session:
        with pytest.raises(AccountError, match="user 'nobody' does not exist"):
            accounts.user_named(session, "nobody")
        with pytest.raises(AccountError,
                           match=r"tenant 'other' does not exist \(known tenants: acme\)"):
            accounts.tenant_named(session, "other")
        tenant = accounts.tenant_named(session, "acme")
        with pytest.raises(AccountError, match="group 'office' does not exist"):
            accounts.group_named(session, tenant, "office")
        group = accounts.add_group(session, tenant, "office")
        assert accounts.group_named(session, tenant, "office").id == group.id
        with pytest.raises(AccountError, match="already exists"):
            accounts.add_group(session, tenant, "office")
        with pytest.raises(AccountError, match="not valid"):
            accounts.add_group(session, tenant, "bad name")
        assert accounts.get_or_create_tenant(session, "acme").id == tenant.id


# --- password hashing (production parameters) ---------------------------------------------------

def test_password_hash_is_argon2id_with_random_salt() -> None:
    first = accounts.hash_password(PASSWORD)
    second = accounts.hash_password(PASSWORD)
    assert first.startswith("$argon2id$v=19$")
    assert first != second  # salted
    assert accounts.password_matches(first, PASSWORD)
    assert not accounts.password_matches(first, PASSWORD + "!")
    assert not accounts.password_matches("not a hash", PASSWORD)
    assert not accounts.password_matches("", PASSWORD)


def test_generated_passwords_are_long_enough_and_random() -> None:
    passwords = {accounts.generate_password() for _ in range(20)}
    assert len(passwords) == 20
    assert all(len(p) >= accounts.MIN_PASSWORD_LENGTH for p in passwords)


# --- authentication -----------------------------------------------------------------------------

def test_authenticate_success(accounts_db: Database, lockouts: Lockouts) -> None:
    user = login(accounts_db, lockouts, "alice", PASSWORD, "10.0.0.1")
    assert user.name == "alice" and user.role is Role.supporter


def test_wrong_password_and_unknown_user_look_the_same(accounts_db: Database,
                                                       lockouts: Lockouts) -> None:
    with pytest.raises(Refused) as wrong:
        login(accounts_db, lockouts, "alice", "wrong password", "10.0.0.1")
    with pytest.raises(Refused) as unknown:
        login(accounts_db, lockouts, "mallory", PASSWORD, "10.0.0.2")
    assert str(wrong.value) == str(unknown.value) == "wrong user name or password"
    assert isinstance(wrong.value, KeepChanges)


def test_disabled_user_refused(accounts_db: Database, lockouts: Lockouts) -> None:
    with accounts_db.session() as session:
        accounts.user_named(session, "alice").disabled = True
    with pytest.raises(Refused, match="user 'alice' is disabled; ask an administrator"):
        login(accounts_db, lockouts, "alice", PASSWORD, "10.0.0.1")
    # A wrong password for a disabled user does not reveal that it is disabled.
    with pytest.raises(Refused) as info:
        login(accounts_db, lockouts, "alice", "wrong password", "10.0.0.1")
    assert "disabled" not in str(info.value)
    assert lockout_row(accounts_db, "user:alice").failures == 2
    # Enabled again, the right password works.
    with accounts_db.session() as session:
        accounts.user_named(session, "alice").disabled = False
    assert login(accounts_db, lockouts, "alice", PASSWORD, "10.0.0.1").name == "alice"


def test_failures_are_committed_although_authenticate_raises(accounts_db: Database,
                                                             lockouts: Lockouts) -> None:
    for expected in (1, 2):
        with pytest.raises(Refused):
            login(accounts_db, lockouts, "alice", "wrong password", "10.0.0.1")
        assert lockout_row(accounts_db, "user:alice").failures == expected
        assert lockout_row(accounts_db, "addr:10.0.0.1").failures == expected


def test_failures_roll_back_without_keepchanges(accounts_db: Database, lockouts: Lockouts) -> None:
    """Counterpart: if the caller's transaction fails for another reason, the count goes too."""
    def fail_then_crash(session):
        try:
            authenticate(session, lockouts, "alice", "wrong password", "10.0.0.1")
        except Refused:
            pass
        raise RuntimeError("unrelated failure")

    with pytest.raises(RuntimeError):
        accounts_db.call(fail_then_crash)
    assert lockout_row(accounts_db, "user:alice") is None


# --- lock-out ---------------------------------------------------------------------------------

def test_policy_doubles_the_wait_up_to_the_cap() -> None:
    policy = LockoutPolicy(free_attempts=3, base_seconds=1.0, max_seconds=900.0)
    assert [policy.wait_after(n) for n in range(0, 9)] == [0, 0, 0, 0, 1, 2, 4, 8, 16]
    assert policy.wait_after(50) == 900.0
    assert policy.forget_after >= dt.timedelta(seconds=900)


def test_exponential_lockout_per_user(accounts_db: Database, lockouts: Lockouts,
                                      clock: Clock) -> None:
    # Each guess from another address, so only the per-user counter can lock.
    sources = (f"10.0.1.{i}" for i in range(1, 100))
    for _ in range(3):  # the free attempts
        with pytest.raises(Refused, match="^wrong user name or password$"):
            login(accounts_db, lockouts, "alice", "guess", next(sources))
    for wait in (1, 2, 4, 8):
        with pytest.raises(Refused, match=f"; try again in {wait} s$"):
            login(accounts_db, lockouts, "alice", "guess", next(sources))
        # While locked even the right password is refused, and costs nothing more.
        with pytest.raises(LockedOut,
                           match=f"too many failed attempts: try again in {wait} s") as info:
            login(accounts_db, lockouts, "alice", PASSWORD, next(sources))
        assert info.value.wait_seconds == pytest.approx(wait)
        clock.advance(wait - 0.5)
        with pytest.raises(LockedOut):
            login(accounts_db, lockouts, "alice", PASSWORD, next(sources))
        clock.advance(0.5)
    assert lockout_row(accounts_db, "user:alice").failures == 7

    # After the wait the right password works and resets the user's counter.
    assert login(accounts_db, lockouts, "alice", PASSWORD, next(sources)).name == "alice"
    assert lockout_row(accounts_db, "user:alice") is None
    with pytest.raises(Refused, match="^wrong user name or password$"):
        login(accounts_db, lockouts, "alice", "guess", next(sources))


def test_exponential_lockout_per_source_address(accounts_db: Database, lockouts: Lockouts,
                                                clock: Clock) -> None:
    # Spraying different (unknown) user names from one address locks the address.
    attacker = "192.0.2.66"
    for i in range(3):
        with pytest.raises(Refused, match="^wrong user name or password$"):
            login(accounts_db, lockouts, f"user{i}", "guess", attacker)
    for i, wait in enumerate((1, 2, 4), start=3):
        with pytest.raises(Refused, match=f"try again in {wait} s$"):
            login(accounts_db, lockouts, f"user{i}", "guess", attacker)
        # A real user with the right password is refused from that address while it is locked...
        with pytest.raises(LockedOut, match=f"try again in {wait} s"):
            login(accounts_db, lockouts, "bob", PASSWORD + " bob", attacker)
        clock.advance(wait)
    assert lockout_row(accounts_db, "addr:192.0.2.66").failures == 6
    # ...but not from anywhere else, and no real user's counter moved.
    assert login(accounts_db, lockouts, "bob", PASSWORD + " bob", "10.0.0.5").name == "bob"
    assert lockout_row(accounts_db, "user:bob") is None
    assert lockout_row(accounts_db, "user:alice") is None


def test_one_locked_user_does_not_affect_others(accounts_db: Database, lockouts: Lockouts,
                                                clock: Clock) -> None:
    for i in range(6):
        with pytest.raises((Refused, LockedOut)):
            login(accounts_db, lockouts, "alice", "guess", f"10.0.2.{i}")
    with pytest.raises(LockedOut):
        login(accounts_db, lockouts, "alice", PASSWORD, "10.0.9.9")
    # bob, from a fresh address, logs in at once; so does bob from one of the addresses that
    # guessed alice's password only once (below the per-address threshold).
    assert login(accounts_db, lockouts, "bob", PASSWORD + " bob", "10.0.9.9").name == "bob"
    assert login(accounts_db, lockouts, "bob", PASSWORD + " bob", "10.0.2.0").name == "bob"
    with accounts_db.session() as session:
        keys = set(session.scalars(select(Lockout.key)))
    assert "user:bob" not in keys and "addr:10.0.9.9" not in keys


def test_lockout_is_forgotten_after_a_quiet_period(accounts_db: Database, lockouts: Lockouts,
                                                   clock: Clock) -> None:
    for i in range(5):
        with pytest.raises(Refused):
            login(accounts_db, lockouts, "alice", "guess", f"10.0.3.{i}")
        clock.advance(60)
    assert lockout_row(accounts_db, "user:alice").failures == 5
    clock.advance(lockouts.policy.forget_after.total_seconds() + 1)
    with pytest.raises(Refused, match="^wrong user name or password$"):
        login(accounts_db, lockouts, "alice", "guess", "10.0.3.99")
    row = lockout_row(accounts_db, "user:alice")
    assert row.failures == 1 and row.locked_until is None


def test_lockout_wait_is_capped(accounts_db: Database, clock: Clock) -> None:
    policy = LockoutPolicy(free_attempts=0, base_seconds=1.0, max_seconds=5.0)
    lockouts = Lockouts(policy, now=clock)
    waits = []
    for i in range(6):
        with pytest.raises(Refused):
            login(accounts_db, lockouts, "alice", "guess", f"10.0.4.{i}")
        with accounts_db.session() as session:
            waits.append(lockouts.wait_seconds(session, ["user:alice"]))
        clock.advance(waits[-1])
    assert waits == [1, 2, 4, 5, 5, 5]


def test_audit_entries_are_stored(accounts_db: Database) -> None:
    with accounts_db.session() as session:
        accounts.audit(session, "admin", "user.add", "name=carol", now=lambda: START)
        accounts.audit(session, "admin", "user.disable")
    with accounts_db.session() as session:
        rows = list(session.scalars(select(AuditEntry).order_by(AuditEntry.id)))
    assert [(r.actor, r.action, r.detail) for r in rows] == [
        ("admin", "user.add", "name=carol"), ("admin", "user.disable", None)]
    assert rows[0].at == START
