"""Egress guard: the server opens no network connection that the operator did not configure.

How it works
    ``install()`` adds a Python audit hook (``sys.addaudithook``) that sees every
    ``socket.connect`` / ``socket.connect_ex`` (audit event ``socket.connect``) and every datagram
    sent to an explicit address (``socket.sendto``, ``socket.sendmsg``) made by Python code in the
    process, Twisted's reactor included (it calls ``connect_ex``).  The hook asks the policy in
    force (an ``EgressPolicy``) whether the destination is on the allow-list; if not, it raises
    ``EgressRefused`` (a ``PermissionError``, errno EACCES) from inside the hook, so the system call
    is never made and no packet leaves.  Each refusal is logged (``twisted.logger``, namespace
    ``hausmeister.egress``, fields ``address``, ``port``, ``caller``), counted in memory
    (``refusal_count()``) and appended as one JSON line to the refusals file, which another
    process (``hausmeister-server check``) counts with ``count_refusals(path)``.

The allow-list (``EgressPolicy.from_config``)
    * the server's own listeners: its ports on ``listen.interface``, 127.0.0.1, ::1 and the name
      ``localhost`` (loopback on other ports is refused too: 127.0.0.1:5999 is not "own");
    * the database host and port from ``database.url`` (SQLite has none; ``?host=`` query values
      and a missing host mean a Unix socket, which is always allowed);
    * the SMTP relay ``mail.smtp_host``:``mail.smtp_port`` when ``mail.smtp_host`` is set;
    * the S3 endpoint from ``s3.endpoint_url`` when ``s3.enabled`` (port 443/80 by scheme);
    * each directory server in ``directory.servers`` when ``directory.enabled`` (636/389 by scheme);
    * each relay process of ``relay.external`` (a WebSocket module's relay leg passes through
      the node, ``server.relay_tunnel``);
    * every ``egress.allow`` entry: ``host:port``, ``host:*`` (any port), ``[v6]:port``.
    Host names are resolved once, when the policy is built, to their IP addresses; the name is
    kept as well, so a connect by that name is allowed too.  A connect to a name that is *not*
    on the list is refused without resolving it: a DNS query for an arbitrary name is itself a way
    out of the network.  IPv4-mapped IPv6 addresses (``::ffff:a.b.c.d``) count as the IPv4
    address.  AF_UNIX (and AF_NETLINK, which talks to the local kernel) are always allowed; any
    other address family (AF_PACKET, AF_VSOCK, Bluetooth, ...) is refused.

The default policy (design decision)
    A process that never called ``install()`` has no hook and is not checked at all: that is the
    state of client tools and of a test process before a test opts in.  Once ``install()`` ran,
    there is *always* a policy, never an "inactive, allow everything" state: until
    ``configure()`` has read the configuration, the start-up policy allows AF_UNIX and
    127.0.0.1 / ::1 / ``localhost`` on any port (what start-up needs) and refuses everything else.
    ``hausmeister-server`` calls ``install()`` as its very first statement and ``configure()`` as
    soon as its listeners are bound.  Audit hooks cannot be removed, so the hook consults the
    module-level guard state; tests swap the policy with ``policy_in_force()`` (or
    ``snapshot()`` / ``restore()``), which puts the previous state back afterwards, including
    "never installed" when the test process had not installed the guard before.  A test that runs
    the server in-process (which calls ``configure()``) should do the same, or later tests that
    connect to other loopback ports are refused.

What the hook cannot see
    Connections made outside Python code: C libraries that call ``connect(2)`` themselves
    (libpq under psycopg, so the PostgreSQL connection is not checked here; the database is on the
    allow-list anyway), the system resolver's own DNS traffic, and child processes.  The guard
    stops accidental egress by the server's Python code and its Python libraries; it is not a
    sandbox against hostile code in the process, and a host firewall is still the operator's job.
"""

from __future__ import annotations

import errno
import ipaddress
import json
import os
import socket
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator
from urllib.parse import parse_qs, urlsplit

from twisted.logger import Logger

from .config import Config, ConfigError, split_endpoint

log = Logger(namespace="hausmeister.egress")

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Resolver = Callable[[str], Iterable[IPAddress]]

#: Audit events that carry a destination address.
AUDIT_EVENTS = frozenset({"socket.connect", "socket.sendto", "socket.sendmsg"})
#: Address families that never leave the machine.
LOCAL_FAMILIES = frozenset(int(f) for f in (getattr(socket, "AF_UNIX", None),
                                            getattr(socket, "AF_NETLINK", None)) if f is not None)
NETWORK_FAMILIES = frozenset({int(socket.AF_INET), int(socket.AF_INET6)})
LOOPBACK_HOSTS = ("127.0.0.1", "::1", "localhost")
DEFAULT_DB_PORTS = {"postgresql": 5432}
REFUSALS_FILE = "egress-refusals.jsonl"


class EgressRefused(PermissionError):
    """An outgoing connection or datagram to a destination that is not on the allow-list."""

    def __init__(self, message: str, address: str | None = None, port: int | None = None):
        super().__init__(errno.EACCES, message)
        self.address = address
        self.port = port

    def __str__(self) -> str:
        return self.strerror


# --- the policy (pure: no sockets, no global state) -------------------------------------------

def _as_ip(host: str) -> IPAddress | None:
    """An IP literal as an address object (IPv4-mapped IPv6 → IPv4, scope dropped), else None."""
    text = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    text = text.split("%", 1)[0]
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def _norm_name(name: str) -> str:
    return name.strip().rstrip(".").lower()


def resolve_host(name: str) -> frozenset[IPAddress]:
    """The IP addresses a name resolves to now (empty if it does not resolve)."""
    try:
        infos = socket.getaddrinfo(name, None, proto=socket.IPPROTO_TCP)
    except (OSError, UnicodeError):
        return frozenset()
    found = set()
    for family, _type, _proto, _canon, sockaddr in infos:
        if int(family) in NETWORK_FAMILIES:
            ip = _as_ip(str(sockaddr[0]))
            if ip is not None:
                found.add(ip)
    return frozenset(found)


@dataclass(frozen=True)
class AllowEntry:
    """One allowed destination: a host (IP or name) and a port (None: any port)."""

    host: str
    port: int | None
    source: str  # the config key it comes from
    addresses: frozenset[IPAddress] = frozenset()

    @property
    def is_name(self) -> bool:
        return _as_ip(self.host) is None

    def describe(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        text = f"{host}:{'*' if self.port is None else self.port} ({self.source})"
        if self.is_name:
            ips = ", ".join(sorted(str(ip) for ip in self.addresses)) or "does not resolve"
            text += f" -> {ips}"
        return text


def _target(family: int, address: Any) -> tuple[str, int] | None:
    """(host, port) of an AF_INET/AF_INET6 address tuple, or None if it is not one."""
    if not isinstance(address, (tuple, list)) or len(address) < 2:
        return None
    host, port = address[0], address[1]
    if isinstance(host, (bytes, bytearray)):
        try:
            host = bytes(host).decode("ascii")
        except UnicodeDecodeError:
            return None
    if not isinstance(host, str) or isinstance(port, bool) or not isinstance(port, int):
        return None
    if host == "":  # Python's spelling of INADDR_ANY
        host = "0.0.0.0" if family == socket.AF_INET else "::"
    elif host == "<broadcast>":
        host = "255.255.255.255"
    return host, port


class EgressPolicy:
    """An allow-list of destinations; ``allows()`` answers without touching the network."""

    def __init__(self, entries: Iterable[AllowEntry], name: str = "configured"):
        self.entries: tuple[AllowEntry, ...] = tuple(entries)
        self.name = name
        self._by_ip: dict[IPAddress, set[int | None]] = {}
        self._by_name: dict[str, set[int | None]] = {}
        for entry in self.entries:
            ip = _as_ip(entry.host)
            if ip is None:
                self._by_name.setdefault(_norm_name(entry.host), set()).add(entry.port)
            for addr in ({ip} if ip is not None else set()) | set(entry.addresses):
                self._by_ip.setdefault(addr, set()).add(entry.port)

    def __repr__(self) -> str:
        return f"<EgressPolicy {self.name}: {len(self.entries)} entries>"

    def allows(self, family: int | None, address: Any) -> bool:
        """May a socket of ``family`` connect / send to ``address``?"""
        try:
            family = int(family)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            return False
        if family in LOCAL_FAMILIES:
            return True
        if family not in NETWORK_FAMILIES:
            return False
        target = _target(family, address)
        if target is None:
            return False
        host, port = target
        ip = _as_ip(host)
        ports = self._by_ip.get(ip) if ip is not None else self._by_name.get(_norm_name(host))
        return ports is not None and (None in ports or port in ports)

    def describe(self) -> list[str]:
        """One line per entry, for ``check`` and the start-up log."""
        return [entry.describe() for entry in self.entries]

    # --- building ---------------------------------------------------------------------------

    @classmethod
    def startup(cls) -> "EgressPolicy":
        """Before the configuration is read: loopback (any port) and AF_UNIX only."""
        return cls([AllowEntry(host, None, "start-up (loopback)") for host in LOOPBACK_HOSTS],
                   name="start-up")

    @classmethod
    def from_config(cls, config: Config, own_ports: Iterable[int] = (),
                    resolve: Resolver = resolve_host) -> "EgressPolicy":
        """The allow-list for a configuration; host names are resolved once, here."""
        wanted: list[tuple[str, int | None, str]] = []
        ports = sorted({int(p) for p in own_ports if p}
                       | {p for p in (config.listen.https_port, config.listen.module_port) if p})
        own_hosts = dict.fromkeys((config.listen.interface,) + LOOPBACK_HOSTS)
        for host in own_hosts:
            for port in ports:
                wanted.append((host, port, "listen (own ports)"))
        for host, port in database_endpoints(config.database_url):
            wanted.append((host, port, "database.url"))
        if config.mail.smtp_host:
            wanted.append((_strip_brackets(config.mail.smtp_host.strip()), config.mail.smtp_port,
                           "mail.smtp_host"))
        if config.s3.enabled and config.s3.endpoint_url:
            wanted.append(_url_endpoint(config.s3.endpoint_url, "s3.endpoint_url"))
        if config.directory.enabled:
            for url in config.directory.servers:
                parts = urlsplit(url)
                default = 636 if parts.scheme == "ldaps" else 389
                wanted.append((parts.hostname or "", parts.port or default, "directory.servers"))
        for item in config.relay.external:  # relay legs of WebSocket modules (relay_tunnel)
            try:
                host, port = split_endpoint(item)
            except ValueError as exc:
                raise ConfigError(f"config key relay.external entry {item!r} is invalid: {exc}")
            wanted.append((host, port or config.relay.port, "relay.external"))
        for item in config.egress.allow:
            try:
                host, port = split_endpoint(item)
            except ValueError as exc:
                raise ConfigError(f"config key egress.allow entry {item!r} is invalid: {exc}")
            wanted.append((host, port, "egress.allow"))

        resolved: dict[str, frozenset[IPAddress]] = {}
        entries = []
        for host, port, source in wanted:
            addresses: frozenset[IPAddress] = frozenset()
            if _as_ip(host) is None:
                key = _norm_name(host)
                if key not in resolved:
                    resolved[key] = frozenset(resolve(host))
                    if not resolved[key]:
                        log.warn("egress allow-list: {host} ({source}) does not resolve now; "
                                 "allowed by name only", host=host, source=source)
                addresses = resolved[key]
                host = key
            entries.append(AllowEntry(host, port, source, addresses))
        return cls(entries)


def _strip_brackets(host: str) -> str:
    return host[1:-1] if host.startswith("[") and host.endswith("]") else host


def _url_endpoint(url: str, key: str) -> tuple[str, int, str]:
    parts = urlsplit(url)
    try:
        port = parts.port
    except ValueError as exc:
        raise ConfigError(f"config key {key} = {url!r} is invalid: {exc}")
    if not parts.hostname:
        raise ConfigError(f"config key {key} = {url!r} is invalid: the URL has no host")
    return parts.hostname, port or (443 if parts.scheme == "https" else 80), key


def database_endpoints(url: str) -> list[tuple[str, int | None]]:
    """Network (host, port) pairs a SQLAlchemy URL connects to; [] for SQLite and Unix sockets."""
    parts = urlsplit(url)
    backend = parts.scheme.split("+", 1)[0]
    if not url or backend == "sqlite":
        return []
    default_port = DEFAULT_DB_PORTS.get(backend)
    try:
        port = parts.port or default_port
    except ValueError as exc:
        raise ConfigError(f"config key database.url is invalid: {exc}")
    query = parse_qs(parts.query)
    found: list[tuple[str, int | None]] = []
    if parts.hostname:
        found.append((parts.hostname, port))
    query_ports = [p for value in query.get("port", []) for p in value.split(",")]
    for value in query.get("host", []):
        for index, item in enumerate(value.split(",")):
            item = item.strip()
            if not item or item.startswith("/"):
                continue  # a Unix socket folder
            try:
                host, item_port = split_endpoint(item)
                if item_port is None and index < len(query_ports) and query_ports[index].isdigit():
                    item_port = int(query_ports[index])
            except ValueError as exc:
                raise ConfigError(f"config key database.url host {item!r} is invalid: {exc}")
            found.append((host, item_port or port))
    return found


# --- the guard: process-wide state consulted by the audit hook ---------------------------------

@dataclass(frozen=True)
class GuardSnapshot:
    installed: bool
    policy: EgressPolicy
    refusals_path: Path | None
    refused: int


class _Guard:
    def __init__(self) -> None:
        self.installed = False  # True once install() ran in this process
        self.policy = EgressPolicy.startup()
        self.refusals_path: Path | None = None
        self.refused = 0


_guard = _Guard()
_lock = threading.RLock()
_local = threading.local()
_hook_added = False


def install() -> None:
    """Start checking (idempotent). Until ``configure()``, the start-up policy applies."""
    global _hook_added
    with _lock:
        if not _hook_added:
            sys.addaudithook(_audit_hook)
            _hook_added = True
        _guard.installed = True


def configure(config: Config, own_ports: Iterable[int], refusals_path: Path | str | None,
              resolve: Resolver = resolve_host) -> EgressPolicy:
    """Put the allow-list for ``config`` in force (installs the guard if needed)."""
    policy = EgressPolicy.from_config(config, own_ports, resolve)
    install()
    with _lock:
        _guard.policy = policy
        _guard.refusals_path = Path(refusals_path) if refusals_path is not None else None
    log.info("egress guard: {count} allow-list entries: {entries}", count=len(policy.entries),
             entries="; ".join(policy.describe()))
    return policy


def current_policy() -> EgressPolicy:
    return _guard.policy


def is_installed() -> bool:
    return _guard.installed


def refusal_count() -> int:
    """Refusals counted in this process (the file also holds other processes' and earlier runs')."""
    return _guard.refused


def snapshot() -> GuardSnapshot:
    with _lock:
        return GuardSnapshot(_guard.installed, _guard.policy, _guard.refusals_path, _guard.refused)


def restore(state: GuardSnapshot) -> None:
    """Put back a ``snapshot()`` (for tests; "not installed" again makes the hook inert)."""
    with _lock:
        _guard.installed = state.installed
        _guard.policy = state.policy
        _guard.refusals_path = state.refusals_path
        _guard.refused = state.refused


@contextmanager
def policy_in_force(policy: EgressPolicy, refusals_path: Path | str | None = None
                    ) -> Iterator[EgressPolicy]:
    """Install the guard with ``policy`` (count from 0) and restore the previous state after."""
    before = snapshot()
    install()
    with _lock:
        _guard.policy = policy
        _guard.refusals_path = Path(refusals_path) if refusals_path is not None else None
        _guard.refused = 0
    try:
        yield policy
    finally:
        restore(before)


def _audit_hook(event: str, args: tuple) -> None:
    if event not in AUDIT_EVENTS or not _guard.installed:
        return
    try:
        sock, address = args[0], args[1]
    except (IndexError, TypeError):
        return
    if address is None:  # sendmsg() on a connected socket: checked when it connected
        return
    family = getattr(sock, "family", None)
    policy = _guard.policy
    try:
        allowed = policy.allows(family, address)
    except Exception:  # never let a surprise open the door
        allowed = False
    if not allowed:
        raise _refuse(event, family, address)


def _family_name(family: Any) -> str:
    try:
        return socket.AddressFamily(int(family)).name
    except (TypeError, ValueError):
        return str(family)


def _refuse(event: str, family: Any, address: Any) -> EgressRefused:
    try:
        fam = int(family)
    except (TypeError, ValueError):
        fam = -1
    target = _target(fam, address) if fam in NETWORK_FAMILIES else None
    if target is not None:
        host, port = target
        where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        message = f"egress to {where} refused: not in the allow-list (config key egress.allow)"
    else:
        host, port = (repr(address), None)
        where = host
        message = (f"egress over {_family_name(family)} to {where} refused: only AF_UNIX and "
                   "allow-listed AF_INET/AF_INET6 destinations are allowed (config key egress.allow)")
    caller = _caller()
    with _lock:
        _guard.refused += 1
        path = _guard.refusals_path
    if getattr(_local, "busy", False):  # a refusal while reporting a refusal: just refuse
        return EgressRefused(message, host, port)
    _local.busy = True
    try:
        if path is not None:
            record = {"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                      "pid": os.getpid(), "event": event, "family": _family_name(family),
                      "address": host, "port": port, "caller": caller}
            _append(path, record)
        log.warn("{message}; caller {caller}", message=message, address=host, port=port,
                 caller=caller, family=_family_name(family), audit_event=event)
    finally:
        _local.busy = False
    return EgressRefused(message, host, port)


def _append(path: Path, record: dict) -> None:
    line = (json.dumps(record, sort_keys=True) + "\n").encode("utf-8")
    try:
        with _lock:  # one write(2) per line with O_APPEND: lines of several processes never mix
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                os.write(fd, line)
            finally:
                os.close(fd)
    except OSError as exc:
        log.error("egress refusal not recorded in {path}: {error}", path=str(path),
                  error=exc.strerror or str(exc))


_SKIP_FILES = {os.path.normcase(os.path.abspath(f)) for f in
               (__file__, socket.__file__, getattr(sys.modules.get("ssl"), "__file__", None) or
                os.path.join(os.path.dirname(socket.__file__), "ssl.py")) if f}
_SKIP_PARTS = (f"{os.sep}twisted{os.sep}", f"{os.sep}asyncio{os.sep}")


def _caller() -> str:
    """The first stack frame outside socket, ssl, Twisted, asyncio and this module."""
    frame = sys._getframe(1)
    while frame is not None:
        filename = frame.f_code.co_filename
        if not (os.path.normcase(os.path.abspath(filename)) in _SKIP_FILES
                or any(part in filename for part in _SKIP_PARTS)):
            return f"{filename}:{frame.f_lineno} {frame.f_code.co_name}"
        frame = frame.f_back
    return "unknown"


# --- reading the refusals file (``hausmeister-server check``) --------------------------------

def read_refusals(path: Path | str) -> list[dict]:
    """The recorded refusals, oldest first; lines that are not JSON objects are skipped."""
    records = []
    try:
        with open(path, "rb") as handle:
            for line in handle:
                try:
                    record = json.loads(line)
                except ValueError:
                    continue
                if isinstance(record, dict):
                    records.append(record)
    except FileNotFoundError:
        return []
    return records


def count_refusals(path: Path | str) -> int:
    """How many refusals the file records (0 if it does not exist)."""
    return len(read_refusals(path))
