"""The one configuration loader: TOML file in, validated ``Config`` out.

Every key is declared once below with its type, default and what is allowed; the example file
``config/hausmeister.example.toml`` documents the same keys for operators.  A bad key becomes a
``ConfigError`` whose message is one line naming the key, the value and what is allowed.
Relative paths are resolved against the folder that holds the config file.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import math
import os
import re
import stat
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit


class ConfigError(ValueError):
    """A configuration problem, worded as one line an operator can act on."""


@dataclass(frozen=True)
class ServerSection:
    data_dir: Path
    cert_dir: Path
    protocol_dir: Path
    recording_dir: Path
    downloads_dir: Path
    names: tuple[str, ...]
    addresses: tuple[str, ...]
    public_host: str


@dataclass(frozen=True)
class ListenSection:
    interface: str
    https_port: int
    module_port: int
    single_port: int = 0  # 0: off; else browsers and modules also share this port (ALPN)


@dataclass(frozen=True)
class LimitsSection:
    """Deadlines and caps for connections that have not proved themselves yet (TLS handshake,
    first control command, request headers); see ``server.connection_guard``."""

    tls_handshake_seconds: float
    first_command_seconds: float
    http_header_seconds: float
    pending_per_address: int
    pending_total: int
    raise_open_file_limit: bool
    refusal_log_seconds: float


@dataclass(frozen=True)
class DatabaseSection:
    url: str


@dataclass(frozen=True)
class CertificateSection:
    module_days: int
    renew_before_days: int
    server_days: int
    min_tls: str
    revocation_poll_seconds: float


@dataclass(frozen=True)
class SecuritySection:
    lockout_free_attempts: int
    lockout_base_seconds: float
    lockout_max_seconds: float
    token_default_ttl: str


@dataclass(frozen=True)
class MailSection:
    smtp_host: str
    smtp_port: int
    security: str
    username: str
    password: str
    from_address: str
    ca_bundle: str = ""

    @property
    def enabled(self) -> bool:
        return bool(self.smtp_host)


@dataclass(frozen=True)
class S3Section:
    enabled: bool
    endpoint_url: str
    bucket: str
    region: str
    access_key: str
    secret_key: str
    ca_bundle: str


@dataclass(frozen=True)
class AvatarSection:
    gravatar: bool
    gravatar_url: str
    max_upload_kib: int


@dataclass(frozen=True)
class ConsoleSection:
    idle_timeout: str
    reset_link_ttl: str
    invitation_ttl: str
    totp_issuer: str

    @property
    def idle_seconds(self) -> float:
        return parse_duration(self.idle_timeout)


@dataclass(frozen=True)
class AlertSection:
    cert_expiry_days: int
    disk_free_percent: int
    check_interval: str


@dataclass(frozen=True)
class RetentionSection:
    protocol_days: int


@dataclass(frozen=True)
class RecordingSection:
    """Session recordings (``server.recordings``): where they go and how strict the upload is."""

    storage: str              # folder | s3
    default_policy: str       # off | on | required, where neither tenant nor host group says
    input: str                # off | masked | on: input events in recordings
    stall_seconds: float      # under 'required': an upload silent this long ends the session
    auditor_key: str          # PEM public key of an auditor (private half kept elsewhere)
    module_buffer_mib: int    # what a recording module holds unacknowledged before giving up
    quota_mib: float          # per tenant; 0 = no quota
    supporter_records: bool = False  # the supporter's module records what it views too
    resume_seconds: float = 120.0    # how long an upload waits for its recorder to come back


@dataclass(frozen=True)
class EgressSection:
    allow: tuple[str, ...]


@dataclass(frozen=True)
class AdhocSection:
    nameplate_ttl: str
    terms: str

    @property
    def nameplate_ttl_seconds(self) -> float:
        return parse_duration(self.nameplate_ttl)


#: seconds over which even a few hosts spread their return after a clean shutdown: a server
#: starting on a busy machine registers far fewer than ``reconnects_per_second``, and a TLS
#: handshake waiting longer than ``limits.tls_handshake_seconds`` is dropped (bench/README.md)
MIN_RETURN_SPREAD = 10.0


@dataclass(frozen=True)
class PresenceSection:
    heartbeat_seconds: float
    missed_heartbeats: int
    flush_seconds: float
    restart_seconds: float
    reconnects_per_second: float

    def going_away(self, hosts: int) -> tuple[float, float]:
        """(back in, spread) for a clean shutdown's notice to ``hosts`` connected hosts: they
        return over ``hosts / reconnects_per_second`` seconds (at least 10) after the restart."""
        return self.restart_seconds, max(MIN_RETURN_SPREAD, hosts / self.reconnects_per_second)


@dataclass(frozen=True)
class RelaySection:
    idle_timeout_seconds: float
    pair_timeout_seconds: float
    port: int
    external: tuple[str, ...]
    secret_file: Path


@dataclass(frozen=True)
class DirectoryGroup:
    """One mapping of ``[directory] groups``: members of ``group`` (a DN) get ``role`` in ``tenant``."""

    group: str
    role: str
    tenant: str


@dataclass(frozen=True)
class DirectorySection:
    """Sign-in against the organisation's LDAP or Active Directory (``server.directory``)."""

    enabled: bool
    servers: tuple[str, ...]
    security: str
    allow_plain: bool
    ca_bundle: str
    timeout_seconds: float
    bind_dn: str
    bind_password: str
    user_base: str
    user_filter: str
    user_bind_template: str
    name_attribute: str
    mail_attribute: str
    group_lookup: str
    group_base: str
    groups: tuple[DirectoryGroup, ...]
    sync_interval: str

    @property
    def sync_seconds(self) -> float:
        return parse_duration(self.sync_interval)


@dataclass(frozen=True)
class ClusterSection:
    """Several server nodes on one PostgreSQL (``node_name`` unique per node)."""

    enabled: bool
    node_name: str
    node_timeout_seconds: float
    call_timeout_seconds: float


@dataclass(frozen=True)
class LoggingSection:
    level: str
    format: str


@dataclass(frozen=True)
class Config:
    source: Path | None
    server: ServerSection
    listen: ListenSection
    limits: LimitsSection
    database: DatabaseSection
    certificates: CertificateSection
    security: SecuritySection
    mail: MailSection
    s3: S3Section
    avatars: AvatarSection
    console: ConsoleSection
    alerts: AlertSection
    retention: RetentionSection
    recording: RecordingSection
    egress: EgressSection
    logging: LoggingSection
    adhoc: AdhocSection
    presence: PresenceSection
    relay: RelaySection
    directory: DirectorySection
    cluster: ClusterSection

    @property
    def database_url(self) -> str:
        if self.database.url:
            return self.database.url
        return f"sqlite:///{self.server.data_dir / 'hausmeister.sqlite3'}"

    def replace(self, **sections: Any) -> "Config":
        return dataclasses.replace(self, **sections)


# --- key declarations ---------------------------------------------------------------------

@dataclass(frozen=True)
class Key:
    name: str
    kind: str  # str, int, float, bool, path, list, choice, port, duration, url, host
    default: Any
    allowed: str = ""
    choices: tuple[str, ...] = ()
    minimum: float | None = None
    maximum: float | None = None


DEFAULT_TERMS = (
    "Remote support terms: a supporter of your IT service will see your screen and, only if you "
    "allow it, control your mouse and keyboard and exchange files. Every right is granted "
    "separately and can be withdrawn at any moment; the emergency stop ends the session at "
    "once. The session is logged.")

LOG_LEVELS = ("debug", "info", "warn", "error", "critical")

SCHEMA: dict[str, tuple[Key, ...]] = {
    "server": (
        Key("data_dir", "path", "/var/lib/hausmeister"),
        Key("cert_dir", "path", ""),
        Key("protocol_dir", "path", ""),
        Key("recording_dir", "path", ""),
        Key("downloads_dir", "path", ""),
        Key("names", "list", ["localhost"]),
        Key("addresses", "iplist", ["127.0.0.1"]),
        Key("public_host", "host", "127.0.0.1"),
    ),
    "listen": (
        Key("interface", "ip", "127.0.0.1"),
        Key("https_port", "port", 8443),
        Key("module_port", "port", 8444),
        Key("single_port", "port", 0),
    ),
    "limits": (
        Key("tls_handshake_seconds", "float", 10.0, minimum=0.05, maximum=600),
        Key("first_command_seconds", "float", 10.0, minimum=0.05, maximum=600),
        Key("http_header_seconds", "float", 15.0, minimum=0.05, maximum=600),
        Key("pending_per_address", "int", 1024, minimum=1, maximum=1_000_000),
        Key("pending_total", "int", 0, minimum=0, maximum=1_000_000),
        Key("raise_open_file_limit", "bool", True),
        Key("refusal_log_seconds", "float", 10.0, minimum=0.1, maximum=3600),
    ),
    "database": (Key("url", "dburl", ""),),
    "certificates": (
        Key("module_days", "int", 90, minimum=1, maximum=3650),
        Key("renew_before_days", "int", 30, minimum=0, maximum=3650),
        Key("server_days", "int", 825, minimum=1, maximum=3650),
        Key("min_tls", "choice", "1.2", choices=("1.2", "1.3")),
        Key("revocation_poll_seconds", "float", 2.0, minimum=0.1, maximum=3600),
    ),
    "security": (
        Key("lockout_free_attempts", "int", 3, minimum=0, maximum=100),
        Key("lockout_base_seconds", "float", 1.0, minimum=0.0, maximum=3600),
        Key("lockout_max_seconds", "float", 900.0, minimum=0.0, maximum=86400),
        Key("token_default_ttl", "duration", "1h"),
    ),
    "mail": (
        Key("smtp_host", "str", ""),
        Key("smtp_port", "port", 25),
        Key("security", "choice", "starttls", choices=("none", "starttls", "tls")),
        Key("username", "str", ""),
        Key("password", "str", ""),
        Key("from_address", "str", "hausmeister@localhost"),
        Key("ca_bundle", "str", ""),
    ),
    "s3": (
        Key("enabled", "bool", False),
        Key("endpoint_url", "url", ""),
        Key("bucket", "str", ""),
        Key("region", "str", "us-east-1"),
        Key("access_key", "str", ""),
        Key("secret_key", "str", ""),
        Key("ca_bundle", "str", ""),
    ),
    "avatars": (
        Key("gravatar", "bool", False),
        Key("gravatar_url", "url", "https://www.gravatar.com/avatar/"),
        Key("max_upload_kib", "int", 512, minimum=1, maximum=10240),
    ),
    "console": (
        Key("idle_timeout", "duration", "15m"),
        Key("reset_link_ttl", "duration", "1h"),
        Key("invitation_ttl", "duration", "7d"),
        Key("totp_issuer", "str", "Hausmeister"),
    ),
    "alerts": (
        Key("cert_expiry_days", "int", 30, minimum=0, maximum=3650),
        Key("disk_free_percent", "int", 10, minimum=0, maximum=99),
        Key("check_interval", "duration", "1h"),
    ),
    "retention": (Key("protocol_days", "int", 0, minimum=0, maximum=36500),),
    "recording": (
        Key("storage", "choice", "folder", choices=("folder", "s3")),
        Key("default_policy", "choice", "off", choices=("off", "on", "required")),
        Key("input", "choice", "off", choices=("off", "masked", "on")),
        Key("stall_seconds", "float", 30.0, minimum=0.5, maximum=3600),
        Key("auditor_key", "str", ""),
        Key("module_buffer_mib", "int", 64, minimum=1, maximum=4096),
        Key("quota_mib", "float", 0, minimum=0, maximum=100_000_000),
        Key("supporter_records", "bool", False),
        Key("resume_seconds", "float", 120.0, minimum=1, maximum=86400),
    ),
    "egress": (Key("allow", "endpointlist", []),),
    "adhoc": (
        Key("nameplate_ttl", "duration", "10m"),
        Key("terms", "str", DEFAULT_TERMS),
    ),
    "relay": (
        Key("idle_timeout_seconds", "float", 300.0, minimum=0.05, maximum=86400),
        Key("pair_timeout_seconds", "float", 30.0, minimum=0.05, maximum=3600),
        Key("port", "port", 8445),
        Key("external", "endpointlist", []),
        Key("secret_file", "path", ""),
    ),
    "presence": (
        Key("heartbeat_seconds", "float", 60.0, minimum=0.05, maximum=3600),
        Key("missed_heartbeats", "int", 3, minimum=1, maximum=100),
        Key("flush_seconds", "float", 10.0, minimum=0.05, maximum=3600),
        Key("restart_seconds", "float", 5.0, minimum=0, maximum=600),
        Key("reconnects_per_second", "float", 400.0, minimum=1, maximum=100000),
    ),
    "directory": (
        Key("enabled", "bool", False),
        Key("servers", "ldapurllist", []),
        Key("security", "choice", "ldaps", choices=("ldaps", "starttls", "plain")),
        Key("allow_plain", "bool", False),
        Key("ca_bundle", "str", ""),
        Key("timeout_seconds", "float", 5.0, minimum=0.1, maximum=120),
        Key("bind_dn", "str", ""),
        Key("bind_password", "str", ""),
        Key("user_base", "str", ""),
        Key("user_filter", "str", "(&(objectClass=inetOrgPerson)(uid={user}))"),
        Key("user_bind_template", "str", ""),
        Key("name_attribute", "str", "uid"),
        Key("mail_attribute", "str", "mail"),
        Key("group_lookup", "choice", "memberof", choices=("memberof", "member", "in_chain")),
        Key("group_base", "str", ""),
        Key("groups", "groupmap", []),
        Key("sync_interval", "duration", "5m"),
    ),
    "cluster": (
        Key("enabled", "bool", False),
        Key("node_name", "str", ""),
        Key("node_timeout_seconds", "float", 15.0, minimum=1.0, maximum=3600),
        Key("call_timeout_seconds", "float", 10.0, minimum=0.5, maximum=600),
    ),
    "logging": (
        Key("level", "choice", "info", choices=LOG_LEVELS),
        Key("format", "choice", "json", choices=("json", "text")),
    ),
}


def _fail(section: str, key: Key, value: Any, allowed: str) -> ConfigError:
    return ConfigError(f"config key {section}.{key.name} = {value!r} is invalid: {allowed}")


def parse_duration(text: str) -> float:
    """'90s', '15m', '1h', '7d' → seconds."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    text = text.strip()
    if len(text) < 2 or text[-1] not in units or not (text[:-1].isascii() and text[:-1].isdigit()):
        raise ValueError(f"{text!r} is not a duration like 90s, 15m, 1h or 7d")
    seconds = int(text[:-1]) * units[text[-1]]
    if seconds <= 0:
        raise ValueError(f"{text!r} must be longer than zero")
    return float(seconds)


def split_endpoint(text: str) -> tuple[str, int | None]:
    """'host:port', '[v6]:port', 'host:*' or 'host' → (host, port or None for any port)."""
    if text.startswith("["):
        host, bracket, rest = text[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            raise ValueError("expected [IPv6 address]:port")
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{host!r} in brackets is not an IPv6 address")
        port_text = rest[1:]
    elif text.count(":") == 1:
        host, port_text = text.split(":")
    else:
        host, port_text = text, ""
    if not host:
        raise ValueError("missing host")
    if "/" in host or any(c.isspace() for c in host):
        raise ValueError(f"host {host!r} is not a host name or IP address")
    if port_text in ("", "*"):
        return host, None
    if not (port_text.isascii() and port_text.isdigit()) or not 0 < int(port_text) < 65536:
        raise ValueError(f"port {port_text!r} is not 1-65535")
    return host, int(port_text)


def _check(section: str, key: Key, value: Any, base: Path) -> Any:
    kind = key.kind
    if kind in ("str", "host", "url", "dburl", "path", "duration", "choice", "ip"):
        if not isinstance(value, str):
            raise _fail(section, key, value, "expected a string")
    if kind == "str":
        return value
    if kind == "path":
        if not value:
            return None
        if "\0" in value:
            raise _fail(section, key, value, "a path must not contain a NUL character")
        try:
            path = Path(value).expanduser()
        except RuntimeError:  # "~name" of a user this machine does not know
            raise _fail(section, key, value, "the user of this ~ path does not exist here: "
                                             "write the folder's full path")
        return path if path.is_absolute() else (base / path).resolve()
    if kind == "host":
        if not value or any(c.isspace() for c in value) or "/" in value:
            raise _fail(section, key, value, "expected a host name or IP address")
        return value
    if kind == "ip":
        try:
            ipaddress.ip_address(value)
        except ValueError:
            raise _fail(section, key, value, "expected an IP address such as 127.0.0.1 or ::1")
        return value
    if kind == "url":
        if value:
            try:
                parts = urlsplit(value)
                good = (parts.scheme in ("http", "https") and bool(parts.hostname)
                        and parts.port != 0)
            except ValueError:  # unbalanced [ ] or a port that is no number or out of range
                good = False
            if not good:
                raise _fail(section, key, value, "expected an http:// or https:// URL with a host "
                            "and a port from 1 to 65535, or empty")
        return value
    if kind == "dburl":
        if value and not value.startswith(("sqlite", "postgresql")):
            raise _fail(section, key, value,
                        "expected empty (SQLite in data_dir), sqlite:///FILE or postgresql+psycopg://...")
        try:
            urlsplit(value).port
        except ValueError as exc:
            raise _fail(section, key, value, f"not a valid URL ({exc}); the port must be 1-65535")
        if value.startswith("postgresql://"):
            value = "postgresql+psycopg://" + value[len("postgresql://"):]
        return value
    if kind == "choice":
        if value not in key.choices:
            raise _fail(section, key, value, "allowed: " + ", ".join(key.choices))
        return value
    if kind == "duration":
        try:
            parse_duration(value)
        except ValueError as exc:
            raise _fail(section, key, value, str(exc))
        return value
    if kind == "bool":
        if not isinstance(value, bool):
            raise _fail(section, key, value, "expected true or false")
        return value
    if kind in ("int", "port"):
        if isinstance(value, bool) or not isinstance(value, int):
            raise _fail(section, key, value, "expected a whole number")
        low, high = (0, 65535) if kind == "port" else (key.minimum, key.maximum)
        if (low is not None and value < low) or (high is not None and value > high):
            raise _fail(section, key, value, f"expected a number from {low:g} to {high:g}")
        return value
    if kind == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
            raise _fail(section, key, value, "expected a number")
        if (key.minimum is not None and value < key.minimum) or (
                key.maximum is not None and value > key.maximum):
            raise _fail(section, key, value, f"expected a number from {key.minimum:g} to {key.maximum:g}")
        return float(value)
    if kind == "groupmap":
        return _check_groupmap(section, key, value)
    if kind in ("list", "iplist", "endpointlist", "ldapurllist"):
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            raise _fail(section, key, value, "expected a list of non-empty strings")
        for item in value:
            try:
                if kind == "iplist":
                    ipaddress.ip_address(item)
                elif kind == "endpointlist":
                    split_endpoint(item)
                elif kind == "ldapurllist":
                    _check_ldap_url(item)
            except ValueError as exc:
                raise _fail(section, key, value, f"entry {item!r}: {exc}")
        return tuple(value)
    raise AssertionError(kind)


def _check_ldap_url(text: str) -> None:
    parts = urlsplit(text)
    if parts.scheme not in ("ldap", "ldaps") or not parts.hostname or parts.path not in ("", "/"):
        raise ValueError("expected ldaps://HOST[:PORT] or ldap://HOST[:PORT]")
    parts.port  # raises ValueError for a port out of range


ROLES = ("admin", "supporter", "auditor")


def _check_groupmap(section: str, key: Key, value: Any) -> tuple[DirectoryGroup, ...]:
    shape = ('expected a list of tables like { group = "cn=helpdesk,ou=groups,dc=example,dc=org", '
             'role = "supporter", tenant = "default" }')
    if not isinstance(value, list):
        raise _fail(section, key, value, shape)
    mapped = []
    for item in value:
        if (not isinstance(item, dict) or set(item) != {"group", "role", "tenant"}
                or not all(isinstance(v, str) and v.strip() for v in item.values())):
            raise _fail(section, key, item, shape)
        if item["role"] not in ROLES:
            raise _fail(section, key, item, "role must be one of " + ", ".join(ROLES))
        mapped.append(DirectoryGroup(item["group"].strip(), item["role"], item["tenant"].strip()))
    return tuple(mapped)


def _check_directory(d: dict[str, Any]) -> None:
    """The rules between the keys of [directory]; only checked when it is turned on."""
    def fail(name: str, why: str) -> ConfigError:
        return ConfigError(f"config key directory.{name} = {d[name]!r} is invalid: {why}")
    if not d["enabled"]:
        return
    if not d["servers"]:
        raise fail("servers", 'give at least one server, e.g. ["ldaps://dc1.example.org:636"]')
    if d["security"] == "plain" and not d["allow_plain"]:
        raise fail("security", "plain LDAP sends passwords unencrypted; use ldaps or starttls, "
                   "or set directory.allow_plain = true if you really mean it")
    scheme = "ldaps" if d["security"] == "ldaps" else "ldap"
    for url in d["servers"]:
        if urlsplit(url).scheme != scheme:
            raise fail("servers", f"with security = {d['security']!r} every server must start "
                       f"with {scheme}://")
    if d["ca_bundle"] and not Path(d["ca_bundle"]).is_file():
        raise fail("ca_bundle", "no such file; give the absolute path of the PEM file of the CA "
                   "that signed the directory's certificate, or \"\" for the system's CAs")
    for name in ("bind_dn", "bind_password", "user_base"):
        if not d[name]:
            raise fail(name, "must be set when the directory is enabled (a read-only service "
                       "account finds users and lets the periodic sync take access from removed ones)")
    if "{user}" not in d["user_filter"]:
        raise fail("user_filter", "must contain {user} where the login name goes")
    if d["user_bind_template"] and "{user}" not in d["user_bind_template"]:
        raise fail("user_bind_template", 'must contain {user}, e.g. "{user}@corp.example.org"')
    if d["group_lookup"] == "member" and not d["group_base"]:
        raise fail("group_base", 'must be set with group_lookup = "member" (where groups are searched)')
    if not d["groups"]:
        raise fail("groups", "map at least one directory group to a role and tenant; only "
                   "members of a mapped group may sign in")


NODE_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,39}")


def _check_cluster(cluster: dict[str, Any], database: dict[str, Any],
                   relay: dict[str, Any]) -> None:
    """Several nodes need what they can share: PostgreSQL, separate relay processes, a name."""
    if not cluster["enabled"]:
        return
    if not str(database["url"]).startswith("postgresql"):
        raise ConfigError("config key cluster.enabled = true is invalid: several server nodes "
                          "share one PostgreSQL; set database.url = \"postgresql+psycopg://...\"")
    if not relay["external"]:
        raise ConfigError("config key cluster.enabled = true is invalid: with several nodes the "
                          "relays run as their own processes; list them in relay.external and "
                          "start them with `hausmeister-server run --role relay`")
    if not NODE_NAME.fullmatch(cluster["node_name"]):
        raise ConfigError(f"config key cluster.node_name = {cluster['node_name']!r} is invalid: "
                          "give each node its own name of 1-40 of a-z 0-9 _ - (e.g. \"node-a\")")


def _check_shared_folders(cluster: dict[str, Any], unset: set[str],
                          recording: dict[str, Any]) -> None:
    """Several nodes write every session's protocol and take recordings wherever a party is
    connected (with S3, spooled in the recordings folder until they end): those folders cannot be
    the defaults inside each node's own ``data_dir``."""
    if not cluster["enabled"]:
        return
    for key in ("protocol_dir", "recording_dir"):
        if key in unset:
            raise ConfigError(f"config key server.{key} is missing: with [cluster] enabled every "
                              "node and relay process must use one shared folder (e.g. NFS), not "
                              f"the default inside this node's own data_dir; set server.{key}")


SECTION_TYPES: dict[str, type] = {
    "server": ServerSection, "listen": ListenSection, "limits": LimitsSection,
    "database": DatabaseSection,
    "certificates": CertificateSection, "security": SecuritySection, "mail": MailSection,
    "s3": S3Section, "avatars": AvatarSection, "console": ConsoleSection, "alerts": AlertSection,
    "retention": RetentionSection, "recording": RecordingSection, "egress": EgressSection, "logging": LoggingSection,
    "adhoc": AdhocSection, "presence": PresenceSection, "relay": RelaySection,
    "directory": DirectorySection, "cluster": ClusterSection,
}


def _show(name: str) -> str:
    """A TOML key as written in a one-line message (quoted if it holds unprintable characters)."""
    return name if name.isprintable() else repr(name)


def from_mapping(raw: dict[str, Any], base: Path, source: Path | None = None) -> Config:
    """Validate a parsed TOML mapping; unknown sections and keys are errors, not silence."""
    for section, body in raw.items():
        if section not in SCHEMA:
            raise ConfigError(f"config section [{_show(section)}] is unknown: allowed sections are "
                              + ", ".join(SCHEMA))
        if not isinstance(body, dict):
            raise ConfigError(f"config section [{section}] must be a table, got {body!r}")
        known = {k.name for k in SCHEMA[section]}
        for name in body:
            if name not in known:
                raise ConfigError(f"config key {section}.{_show(name)} is unknown: allowed keys in "
                                  f"[{section}] are " + ", ".join(sorted(known)))
    sections: dict[str, Any] = {}
    for section, keys in SCHEMA.items():
        body = raw.get(section, {})
        values = {k.name: _check(section, k, body.get(k.name, k.default), base) for k in keys}
        sections[section] = values
    server = sections["server"]
    if server["data_dir"] is None:
        raise ConfigError("config key server.data_dir = '' is invalid: expected a folder path")
    data_dir = server["data_dir"]
    unset = {key for key in ("protocol_dir", "recording_dir") if not server[key]}
    server["cert_dir"] = server["cert_dir"] or data_dir / "certs"
    server["protocol_dir"] = server["protocol_dir"] or data_dir / "protocols"
    sections["relay"]["secret_file"] = sections["relay"]["secret_file"] or data_dir / "relay.secret"
    server["recording_dir"] = server["recording_dir"] or data_dir / "recordings"
    server["downloads_dir"] = server["downloads_dir"] or data_dir / "downloads"
    listen = sections["listen"]
    if listen["https_port"] and listen["https_port"] == listen["module_port"]:
        raise ConfigError(f"config key listen.module_port = {listen['module_port']} is invalid: "
                          "it must differ from listen.https_port")
    certs = sections["certificates"]
    if certs["renew_before_days"] >= certs["module_days"]:
        raise ConfigError(f"config key certificates.renew_before_days = {certs['renew_before_days']} "
                          "is invalid: it must be smaller than certificates.module_days")
    for section in ("mail", "s3"):
        bundle = sections[section]["ca_bundle"]
        if bundle and not Path(bundle).is_file():
            raise ConfigError(f"config key {section}.ca_bundle = {bundle!r} is invalid: no such file; "
                              "give the absolute path of a PEM file or \"\" for the system's CAs")
    if listen["single_port"] and listen["single_port"] in (listen["https_port"],
                                                          listen["module_port"]):
        raise ConfigError(f"config key listen.single_port = {listen['single_port']} is invalid: "
                          "it must differ from listen.https_port and listen.module_port")
    _check_directory(sections["directory"])
    s3 = sections["s3"]
    if s3["enabled"] and not (s3["endpoint_url"] and s3["bucket"]):
        raise ConfigError("config key s3.enabled = true is invalid: set s3.endpoint_url and s3.bucket too")
    rec = sections["recording"]
    if rec["storage"] == "s3" and not s3["enabled"]:
        raise ConfigError("config key recording.storage = 's3' is invalid: turn on [s3] (enabled, "
                          "endpoint_url, bucket) or store recordings in the folder")
    if rec["auditor_key"] and not Path(rec["auditor_key"]).is_file():
        raise ConfigError(f"config key recording.auditor_key = {rec['auditor_key']!r} is invalid: no "
                          "such file; give the path of the auditor's PEM public key or \"\"")
    _check_cluster(sections["cluster"], sections["database"], sections["relay"])
    _check_shared_folders(sections["cluster"], unset, rec)
    built = {name: SECTION_TYPES[name](**values) for name, values in sections.items()}
    return Config(source=source, **built)


MAX_CONFIG_BYTES = 1 << 20  # a real config is a few KiB; more is the wrong file


def _read_text(path: Path) -> str:
    """The config file's text, or a one-line ``ConfigError`` naming the file, the problem and the
    fix.  Opened without blocking and read up to a bound, so a FIFO or a device such as
    ``/dev/zero`` is refused instead of hanging or filling memory."""
    example = "see config/hausmeister.example.toml"
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist: pass --config with an existing file "
                          f"({example})")
    except PermissionError:
        raise ConfigError(f"config file {path} cannot be read: permission denied; make it readable "
                          "for the user that runs hausmeister-server (chmod/chown)")
    except OSError as exc:
        raise ConfigError(f"config file {path} cannot be read: {exc.strerror}; pass --config with "
                          f"a readable TOML file ({example})")
    mode = os.fstat(fd).st_mode
    if not (stat.S_ISREG(mode) or stat.S_ISCHR(mode)):  # /dev/null stays usable for the defaults
        os.close(fd)
        what = "a folder" if stat.S_ISDIR(mode) else "not a regular file (a pipe or socket)"
        raise ConfigError(f"config file {path} cannot be read: it is {what}; pass --config with "
                          f"the TOML file itself ({example})")
    with os.fdopen(fd, "rb") as file:
        try:
            data = file.read(MAX_CONFIG_BYTES + 1)
        except OSError as exc:
            raise ConfigError(f"config file {path} cannot be read: {exc.strerror}; pass --config "
                              f"with a readable TOML file ({example})")
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError(f"config file {path} is larger than {MAX_CONFIG_BYTES >> 20} MiB, so it "
                          f"is not a Hausmeister config; pass --config with the TOML file ({example})")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise ConfigError(f"config file {path} is not UTF-8 text (byte {data[exc.start]:#04x} on "
                          f"line {line}): save it as UTF-8, or pass --config with the TOML file "
                          f"({example})")
    return text.removeprefix("\ufeff")  # a byte-order mark some editors write


def load(path: str | Path | None) -> Config:
    """Load and validate a config file; ``None`` gives the built-in air-gapped defaults."""
    if path is None:
        return from_mapping({}, Path.cwd())
    path = Path(path)
    text = _read_text(path)
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}")
    return from_mapping(raw, path.resolve().parent, path.resolve())
