"""SQLAlchemy 2 models: the server's whole persistent state.

Files that belong to the operator (session protocols, recordings, the CA) live in folders; the
database only indexes them.
"""

from __future__ import annotations

import datetime as dt
import enum

from sqlalchemy import (
    BigInteger, Boolean, DateTime, Enum, ForeignKey, Index, Integer, String, Text,
    UniqueConstraint, false,
)
from sqlalchemy import text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship
from sqlalchemy.types import TypeDecorator


class UTCDateTime(TypeDecorator):
    """Timezone-aware UTC datetimes on every backend (SQLite stores naive values)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value, dialect):
        if value is not None:
            if value.tzinfo is None:
                raise ValueError("naive datetime given; use UTC-aware datetimes")
            value = value.astimezone(dt.timezone.utc)
        return value

    def process_result_value(self, value, dialect):
        if value is not None and value.tzinfo is None:
            value = value.replace(tzinfo=dt.timezone.utc)
        return value


class Base(DeclarativeBase):
    pass


class Role(str, enum.Enum):
    admin = "admin"
    supporter = "supporter"
    auditor = "auditor"


class CertRole(str, enum.Enum):
    server = "server"
    supporter = "supporter"
    host = "host"


class Tenant(Base):
    __tablename__ = "tenants"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    # session recordings: off | on | required; None: the config's recording.default_policy
    recording_policy: Mapped[str | None] = mapped_column(String(16), nullable=True)


class User(Base):
    __tablename__ = "users"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id"))
    name: Mapped[str] = mapped_column(String(100), unique=True)
    role: Mapped[Role] = mapped_column(Enum(Role, name="user_role"))
    password_hash: Mapped[str] = mapped_column(String(255))
    email: Mapped[str | None] = mapped_column(String(255), nullable=True)
    disabled: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    # base32 TOTP secret once the user turned TOTP on (console login asks for a code then)
    totp_secret: Mapped[str | None] = mapped_column(String(64), nullable=True)
    # the last accepted TOTP time step: a code works once, across restarts and server nodes
    totp_last_step: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    # where an uploaded profile picture lives (``server.avatars``); None: generated initials
    avatar_key: Mapped[str | None] = mapped_column(String(255), nullable=True)
    # opt-in: mail the session protocol to this user after each session
    protocol_mail: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    # console and mail language ('en', 'de'); None: not chosen (browser decides, mails in English)
    language: Mapped[str | None] = mapped_column(String(8), nullable=True)
    # set for a user who signs in through the directory (``server.directory``): the password is
    # checked there, never here, and the directory sync may disable the user
    directory_dn: Mapped[str | None] = mapped_column(String(1024), nullable=True)
    tenant: Mapped[Tenant] = relationship()


class HostGroup(Base):
    __tablename__ = "host_groups"
    __table_args__ = (UniqueConstraint("tenant_id", "name"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id"))
    name: Mapped[str] = mapped_column(String(100))
    # session recordings for this group's hosts: off | on | required; None: the tenant's policy
    recording_policy: Mapped[str | None] = mapped_column(String(16), nullable=True)
    tenant: Mapped[Tenant] = relationship()


class UserGroup(Base):
    """Which host groups a supporter may reach; a supporter in no group reaches its whole tenant."""

    __tablename__ = "user_groups"
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), primary_key=True)
    group_id: Mapped[int] = mapped_column(ForeignKey("host_groups.id", ondelete="CASCADE"),
                                          primary_key=True)


class Host(Base):
    __tablename__ = "hosts"
    id: Mapped[str] = mapped_column(String(36), primary_key=True)  # uuid4, stable host id
    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id"))
    group_id: Mapped[int | None] = mapped_column(ForeignKey("host_groups.id"), nullable=True)
    name: Mapped[str] = mapped_column(String(200))
    enrolled_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    last_seen: Mapped[dt.datetime | None] = mapped_column(UTCDateTime, nullable=True)
    last_address: Mapped[str | None] = mapped_column(String(64), nullable=True)
    module_version: Mapped[str | None] = mapped_column(String(40), nullable=True)
    online: Mapped[bool] = mapped_column(Boolean, default=False)
    # the server node that holds the host's control connection (several nodes on one database)
    node: Mapped[str | None] = mapped_column(String(64), nullable=True)
    group: Mapped[HostGroup | None] = relationship()


class Certificate(Base):
    """Every certificate the CA issued; revocation lives here."""

    __tablename__ = "certificates"
    serial: Mapped[str] = mapped_column(String(40), primary_key=True)  # lowercase hex
    role: Mapped[CertRole] = mapped_column(Enum(CertRole, name="cert_role"))
    identity: Mapped[str] = mapped_column(String(255), index=True)  # SAN URI or server name
    fingerprint: Mapped[str] = mapped_column(String(64), unique=True)  # SHA-256 hex of DER
    not_before: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    not_after: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    pem: Mapped[str] = mapped_column(Text)
    issued_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    revoked_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime, nullable=True)
    revocation_reason: Mapped[str | None] = mapped_column(String(200), nullable=True)
    replaced_by: Mapped[str | None] = mapped_column(String(40), nullable=True)

    # the revoked ones, which every server polls for every few seconds
    # (certificates.revoked_serials): without it each poll read the whole table, ~9 ms of CPU
    # per poll at 20,000 hosts (0.45 % of a core at the default 2 s; bench/README.md)
    __table_args__ = (Index("ix_certificates_revoked", "revoked_at",
                            postgresql_where=text("revoked_at IS NOT NULL"),
                            sqlite_where=text("revoked_at IS NOT NULL")),)


class EnrollmentToken(Base):
    __tablename__ = "enrollment_tokens"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)  # SHA-256 hex
    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id"))
    group_id: Mapped[int | None] = mapped_column(ForeignKey("host_groups.id"), nullable=True)
    created_by: Mapped[str] = mapped_column(String(100))
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    expires_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    used_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime, nullable=True)
    used_by_host: Mapped[str | None] = mapped_column(String(36), nullable=True)


class Lockout(Base):
    """Failed-attempt counter per key (``user:NAME``, ``addr:IP``, ``nameplate:N``...)."""

    __tablename__ = "lockouts"
    key: Mapped[str] = mapped_column(String(200), primary_key=True)
    failures: Mapped[int] = mapped_column(Integer, default=0)
    last_failure: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    locked_until: Mapped[dt.datetime | None] = mapped_column(UTCDateTime, nullable=True)


class Session(Base):
    __tablename__ = "sessions"
    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    tenant_id: Mapped[int | None] = mapped_column(ForeignKey("tenants.id"), nullable=True)
    kind: Mapped[str] = mapped_column(String(20))  # adhoc | host
    supporter_identity: Mapped[str | None] = mapped_column(String(255), nullable=True)
    supporter_address: Mapped[str | None] = mapped_column(String(64), nullable=True)
    peer_identity: Mapped[str | None] = mapped_column(String(255), nullable=True)
    peer_address: Mapped[str | None] = mapped_column(String(64), nullable=True)
    host_id: Mapped[str | None] = mapped_column(ForeignKey("hosts.id"), nullable=True)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    started_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime, nullable=True)
    ended_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime, nullable=True)
    bytes_to_peer: Mapped[int] = mapped_column(BigInteger, default=0)
    bytes_to_supporter: Mapped[int] = mapped_column(BigInteger, default=0)
    end_reason: Mapped[str | None] = mapped_column(String(200), nullable=True)
    # protocol.session_end: the cause (e.g. emergency_stop) and the party (customer, host, ...)
    end_cause: Mapped[str | None] = mapped_column(String(40), nullable=True)
    ended_by: Mapped[str | None] = mapped_column(String(20), nullable=True)
    protocol_file: Mapped[str | None] = mapped_column(String(500), nullable=True)
    protocol_mailed_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime, nullable=True)
    # the protocol's "ended" line (seq and hash): anchors the file's hash chain in the database, so
    # cutting or rewriting the end of the file is caught, not only edits in its middle
    protocol_end_seq: Mapped[int | None] = mapped_column(Integer, nullable=True)
    protocol_end_hash: Mapped[str | None] = mapped_column(String(64), nullable=True)
    # the server node whose broker set the session up: its crash recovery is that node's job, or
    # a live node's once that node stopped heartbeating (server.session_recovery)
    node: Mapped[str | None] = mapped_column(String(64), nullable=True)

    # the unfinished sessions per node, which every node's dead-node sweep looks at
    __table_args__ = (Index("ix_sessions_unfinished_node", "node",
                            postgresql_where=text("ended_at IS NULL"),
                            sqlite_where=text("ended_at IS NULL")),)


class SessionEvent(Base):
    __tablename__ = "session_events"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    session_id: Mapped[str] = mapped_column(ForeignKey("sessions.id"), index=True)
    at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    kind: Mapped[str] = mapped_column(String(50))
    actor: Mapped[str | None] = mapped_column(String(255), nullable=True)
    detail: Mapped[str | None] = mapped_column(Text, nullable=True)  # JSON


class AuditEntry(Base):
    """Administrative actions (CLI and console); ``tenant_id`` scopes what a tenant admin sees."""

    __tablename__ = "audit_log"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    tenant_id: Mapped[int | None] = mapped_column(ForeignKey("tenants.id"), nullable=True, index=True)
    at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    actor: Mapped[str] = mapped_column(String(100))
    action: Mapped[str] = mapped_column(String(100))
    detail: Mapped[str | None] = mapped_column(Text, nullable=True)


class OutboxMail(Base):
    """A mail waiting for, or done with, the SMTP relay (``server.mail.Outbox``).

    ``status`` is ``queued`` (to be tried at ``next_attempt_at``), ``sent`` or ``failed`` (given
    up: too many attempts or a permanent refusal; ``last_error`` says why).
    """

    __tablename__ = "outbox_mails"
    __table_args__ = (Index("ix_outbox_mails_status_next", "status", "next_attempt_at"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    to_address: Mapped[str] = mapped_column(String(320))
    subject: Mapped[str] = mapped_column(String(998))
    body_text: Mapped[str] = mapped_column(Text)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    sent_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime, nullable=True)
    last_error: Mapped[str | None] = mapped_column(Text, nullable=True)
    status: Mapped[str] = mapped_column(String(16), default="queued")


class UserLink(Base):
    """A single-use link mailed to a user: ``reset`` (new password) or ``invite`` (first password).

    Only the SHA-256 of the 128-bit token is stored; ``used_at`` makes it single use.
    """

    __tablename__ = "user_links"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    purpose: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    expires_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    used_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime, nullable=True)


class Setting(Base):
    """A setting changed in the console (server-wide); absent keys fall back to the config file."""

    __tablename__ = "settings"
    key: Mapped[str] = mapped_column(String(100), primary_key=True)
    value: Mapped[str] = mapped_column(Text)  # JSON
    changed_by: Mapped[str] = mapped_column(String(100))
    changed_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)


class Recording(Base):
    """One uploaded session recording (``server.recordings``); the file itself (encrypted) lives
    in the recordings folder or the S3 bucket under ``location``.

    ``status``: ``uploading`` (the module is sending), ``complete`` (the module closed it) or
    ``incomplete`` (the session ended without the FINAL record: kept up to its last whole record).
    """

    __tablename__ = "recordings"
    __table_args__ = (UniqueConstraint("session_id", "party"),)
    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    session_id: Mapped[str] = mapped_column(ForeignKey("sessions.id"), index=True)
    tenant_id: Mapped[int | None] = mapped_column(ForeignKey("tenants.id"), nullable=True, index=True)
    party: Mapped[str] = mapped_column(String(20))       # supporter | host | customer
    storage: Mapped[str] = mapped_column(String(10))     # folder | s3
    location: Mapped[str] = mapped_column(String(500))   # path under recording_dir, or S3 key
    key_id: Mapped[str] = mapped_column(String(32))
    policy: Mapped[str] = mapped_column(String(16))
    status: Mapped[str] = mapped_column(String(16), default="uploading")
    size: Mapped[int] = mapped_column(BigInteger, default=0)
    records: Mapped[int] = mapped_column(Integer, default=0)
    sha256: Mapped[str | None] = mapped_column(String(64), nullable=True)
    started_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    ended_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime, nullable=True)
    last_chunk_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime, nullable=True)


class AlertSent(Base):
    """Alerts already mailed (``key`` names the condition, e.g. ``cert-expiry:SERIAL``)."""

    __tablename__ = "alerts_sent"
    key: Mapped[str] = mapped_column(String(200), primary_key=True)
    sent_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)


class ConsoleSessionRow(Base):
    """A logged-in console session, shared by every server node (a login works on each, a
    restart logs nobody out).  Only the SHA-256 of the cookie value is stored."""

    __tablename__ = "console_sessions"
    id_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    csrf: Mapped[str] = mapped_column(String(64))
    user_name: Mapped[str] = mapped_column(String(200), index=True)
    user_id: Mapped[int | None] = mapped_column(Integer, nullable=True)
    role: Mapped[str] = mapped_column(String(20))
    tenant_id: Mapped[int | None] = mapped_column(Integer, nullable=True)
    tenant: Mapped[str | None] = mapped_column(String(200), nullable=True)
    operator: Mapped[bool] = mapped_column(Boolean, default=False)
    language: Mapped[str | None] = mapped_column(String(10), nullable=True)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    last_active: Mapped[dt.datetime] = mapped_column(UTCDateTime, index=True)


class ConsolePendingLogin(Base):
    """A console login whose password step passed and that waits for its TOTP code, keyed by
    the SHA-256 of the browser's pre-login cookie: the code may be typed on another node than
    the password (a load balancer switching nodes mid-login).  Used once, kept 5 minutes."""

    __tablename__ = "console_pending_logins"
    id_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    user_id: Mapped[int] = mapped_column(Integer)
    language: Mapped[str | None] = mapped_column(String(10), nullable=True)  # chosen before
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, index=True)


class ServerNode(Base):
    """A running ``hausmeister-server run`` node (several may share one PostgreSQL), or a relay
    process (``kind`` relay, with the sessions it carries); each refreshes ``seen_at``."""

    __tablename__ = "server_nodes"
    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    kind: Mapped[str] = mapped_column(String(10))  # server | relay
    pid: Mapped[int] = mapped_column(Integer)
    started_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    seen_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    sessions: Mapped[str] = mapped_column(Text, default="")  # relay: live session ids, one a line


class RelayTokenUse(Base):
    """A relay token's nonce once a relay process admitted its leg: single use across every
    relay process (several nodes); kept until the token expires."""

    __tablename__ = "relay_token_uses"
    nonce: Mapped[str] = mapped_column(String(32), primary_key=True)
    expires_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, index=True)


class NameplateRow(Base):
    """A live ad-hoc nameplate; the primary key keeps it unique across server nodes."""

    __tablename__ = "nameplates"
    code: Mapped[str] = mapped_column(String(8), primary_key=True)
    node: Mapped[str] = mapped_column(String(64))
    supporter: Mapped[str] = mapped_column(String(255))
    expires_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, index=True)
