"""The directory itself: find a user, check a password by binding, resolve (nested) groups and map
them to a role and tenant.

Every call opens its own connections (ldap3 connections are not shared between threads) and
blocks; callers run it with ``protocol.runtime.run_blocking``.  TLS is LDAPS or StartTLS against
the operator's CA bundle with the host name checked; plain LDAP only where the config explicitly
allows it.  Referrals are never followed (they would lead to hosts the operator did not name).

Two kinds of failure, kept apart on purpose: ``DirectoryRefused`` (this user may not sign in: wrong
password, unknown, filtered out, in no mapped group) and ``DirectoryUnavailable`` (the directory
cannot answer: nobody is refused or disabled because of it).
"""

from __future__ import annotations

import math
import ssl
from dataclasses import dataclass
from typing import Iterable
from urllib.parse import urlsplit

import ldap3
from ldap3.core import exceptions as ldap_errors
from ldap3.utils.conv import escape_filter_chars
from ldap3.utils.dn import escape_rdn, parse_dn

from protocol.identity import valid_user_name

from ..config import DirectorySection

INVALID_CREDENTIALS = 49
MAX_NAME = 200
MAX_GROUPS = 1000        # groups followed per user; a directory with more nests is refused
MAX_DEPTH = 16           # nesting levels followed
IN_CHAIN = "1.2.840.113556.1.4.1941"   # Active Directory's LDAP_MATCHING_RULE_IN_CHAIN


class DirectoryRefused(Exception):
    """This user may not sign in (the reason is for the log; users see a general message)."""

    def __init__(self, reason: str, password_ok: bool = False) -> None:
        super().__init__(reason)
        self.password_ok = password_ok


class DirectoryUnavailable(Exception):
    """The directory could not be asked (network, TLS, service account): one line for the log."""


@dataclass(frozen=True)
class DirectoryAccount:
    name: str             # the local user name (``name_attribute``)
    dn: str
    mail: str | None
    role: str
    tenant: str


def normal_dn(dn: str) -> str:
    """A DN in one spelling for comparisons (attribute types and values are case-insensitive
    for the group DNs we compare; spaces around separators do not count)."""
    try:
        parts = parse_dn(dn, escape=False, strip=True)
    except (ldap_errors.LDAPInvalidDnError, ValueError, TypeError):
        return dn.strip().lower()
    return ",".join(f"{attr.strip().lower()}={value.strip().lower()}" for attr, value, _ in parts)


def _first(entry: dict, attribute: str) -> str | None:
    for key, value in entry.items():
        if key.lower() == attribute.lower():
            if isinstance(value, (list, tuple)):
                return str(value[0]) if value else None
            return str(value) if value not in (None, "") else None
    return None


def _all(entry: dict, attribute: str) -> list[str]:
    for key, value in entry.items():
        if key.lower() == attribute.lower():
            return [str(v) for v in value] if isinstance(value, (list, tuple)) else [str(value)]
    return []


class Directory:
    def __init__(self, section: DirectorySection) -> None:
        self.section = section
        self._mapped = [(normal_dn(g.group), g) for g in section.groups]

    # --- connections ---------------------------------------------------------------------------

    def _servers(self) -> list[ldap3.Server]:
        s = self.section
        servers = []
        for url in s.servers:
            tls = None
            if s.security != "plain":  # no CA bundle: the system's CAs; the host name is checked
                tls = ldap3.Tls(validate=ssl.CERT_REQUIRED, version=ssl.PROTOCOL_TLS_CLIENT,
                                ca_certs_file=s.ca_bundle or None, sni=urlsplit(url).hostname)
            servers.append(ldap3.Server(url, use_ssl=s.security == "ldaps", tls=tls,
                                        connect_timeout=s.timeout_seconds, get_info=ldap3.NONE))
        return servers

    def _open(self, user: str, password: str) -> ldap3.Connection:
        """An open (TLS where configured) connection to the first server that answers.  Tried
        once each, in order: ldap3's ServerPool would sleep 10 s between rounds."""
        problems = []
        for server in self._servers():
            conn = ldap3.Connection(server, user=user, password=password,
                                    auto_bind=ldap3.AUTO_BIND_NONE, auto_referrals=False,
                                    receive_timeout=max(1, math.ceil(self.section.timeout_seconds)),
                                    raise_exceptions=False, read_only=True)
            try:
                conn.open()
                if self.section.security == "starttls" and not conn.start_tls():
                    raise ldap_errors.LDAPStartTLSError(f"StartTLS was refused: {conn.result}")
                return conn
            except ldap_errors.LDAPException as exc:
                conn.unbind()
                problems.append(f"{server.host}:{server.port}: {type(exc).__name__}: {exc}")
        raise DirectoryUnavailable("no directory server answered (" + "; ".join(problems) + ")")

    def _bind(self, user: str, password: str) -> ldap3.Connection:
        """A bound connection, or ``DirectoryRefused`` for wrong credentials (result 49);
        anything else that goes wrong is ``DirectoryUnavailable``."""
        if not password:
            # an empty password would be an unauthenticated bind, which "succeeds"
            raise DirectoryRefused("empty password")
        conn = self._open(user, password)
        try:
            if conn.bind():
                return conn
            result = conn.result or {}
        except ldap_errors.LDAPException as exc:
            conn.unbind()
            raise DirectoryUnavailable(f"bind failed: {type(exc).__name__}: {exc}") from None
        conn.unbind()
        if result.get("result") == INVALID_CREDENTIALS:
            raise DirectoryRefused(f"the directory refused the password of {user}")
        raise DirectoryUnavailable(f"bind as {user} failed: {result.get('description')} "
                                   f"{result.get('message', '')}".strip())

    def _service(self) -> ldap3.Connection:
        try:
            return self._bind(self.section.bind_dn, self.section.bind_password)
        except DirectoryRefused:
            raise DirectoryUnavailable("the directory refused the service account "
                                       "(directory.bind_dn / bind_password)") from None

    @staticmethod
    def _search(conn: ldap3.Connection, base: str, query: str, attributes: Iterable[str],
                scope=ldap3.SUBTREE) -> list[dict]:
        try:
            ok = conn.search(base, query, search_scope=scope, attributes=list(attributes),
                             size_limit=MAX_GROUPS)
        except ldap_errors.LDAPException as exc:
            raise DirectoryUnavailable(f"search under {base!r} failed: {exc}") from None
        result = conn.result or {}
        if not ok and result.get("result") not in (0, 4, 32):  # 4: size limit, 32: no such object
            raise DirectoryUnavailable(f"search under {base!r} failed: {result.get('description')}")
        return [{"dn": e["dn"], **dict(e.get("attributes", {}))}
                for e in conn.response or [] if e.get("type") == "searchResEntry"]

    # --- users and groups ----------------------------------------------------------------------

    def _find(self, conn: ldap3.Connection, login: str) -> dict | None:
        s = self.section
        query = s.user_filter.replace("{user}", escape_filter_chars(login))
        found = self._search(conn, s.user_base, query, [s.name_attribute, s.mail_attribute,
                                                        "memberOf"])
        if len(found) > 1:
            raise DirectoryRefused(f"{len(found)} directory entries match {login!r}; "
                                   "directory.user_filter must find exactly one")
        return found[0] if found else None

    def _groups(self, conn: ldap3.Connection, entry: dict) -> set[str]:
        """Normalised DNs of every group the user is in, nested groups included."""
        lookup = self.section.group_lookup
        if lookup == "in_chain":
            member_of = set()
            for normal, group in self._mapped:
                query = f"(memberOf:{IN_CHAIN}:={escape_filter_chars(group.group)})"
                if self._search(conn, entry["dn"], query, [], scope=ldap3.BASE):
                    member_of.add(normal)
            return member_of
        seen: set[str] = set()
        if lookup == "memberof":
            frontier = _all(entry, "memberOf")
        else:
            frontier = self._groups_with_members(conn, [entry["dn"]])
        for _ in range(MAX_DEPTH):
            fresh = [dn for dn in frontier if normal_dn(dn) not in seen]
            if not fresh:
                break
            seen.update(normal_dn(dn) for dn in fresh)
            if len(seen) > MAX_GROUPS:
                raise DirectoryUnavailable(f"more than {MAX_GROUPS} groups for {entry['dn']}")
            if lookup == "memberof":
                frontier = []
                for dn in fresh:
                    for group in self._search(conn, dn, "(objectClass=*)", ["memberOf"],
                                              scope=ldap3.BASE):
                        frontier.extend(_all(group, "memberOf"))
            else:
                frontier = self._groups_with_members(conn, fresh)
        return seen

    def _groups_with_members(self, conn: ldap3.Connection, dns: list[str]) -> list[str]:
        found: list[str] = []
        for start in range(0, len(dns), 50):
            part = "".join(f"(member={escape_filter_chars(dn)})" for dn in dns[start:start + 50])
            found.extend(g["dn"] for g in self._search(conn, self.section.group_base,
                                                       f"(|{part})", []))
        return found

    def _account(self, conn: ldap3.Connection, entry: dict, password_ok: bool) -> DirectoryAccount:
        s = self.section
        name = _first(entry, s.name_attribute)
        if not name or not valid_user_name(name):
            raise DirectoryRefused(f"{entry['dn']} has no usable {s.name_attribute} ({name!r}); "
                                   "user names are letters, digits, . _ @ -", password_ok)
        groups = self._groups(conn, entry)
        for normal, mapped in self._mapped:
            if normal in groups:
                return DirectoryAccount(name, entry["dn"], _first(entry, s.mail_attribute),
                                        mapped.role, mapped.tenant)
        raise DirectoryRefused(f"{entry['dn']} is in no group of directory.groups", password_ok)

    # --- what the server asks ------------------------------------------------------------------

    def probe(self) -> str:
        """For ``hausmeister-server check``: the service account binds and the user base is
        there, or ``DirectoryUnavailable`` saying what is wrong."""
        service = self._service()
        try:
            if not self._search(service, self.section.user_base, "(objectClass=*)", [],
                                scope=ldap3.BASE):
                raise DirectoryUnavailable(f"user_base {self.section.user_base!r} was not found")
            server = service.server
            return f"{server.host}:{server.port} ({self.section.security}, service account bound)"
        finally:
            service.unbind()

    def authenticate(self, login: str, password: str) -> DirectoryAccount:
        """The account behind ``login`` if ``password`` is right and a mapped group admits it."""
        if not login or len(login) > MAX_NAME or not login.isprintable():
            raise DirectoryRefused("not a user name")
        service = self._service()
        try:
            entry = self._find(service, login)
            if entry is None:
                raise DirectoryRefused(f"no directory entry for {login!r} (user_filter)")
            template = self.section.user_bind_template
            if template:
                value = escape_rdn(login) if "=" in template else login
                bind_as = template.replace("{user}", value)
            else:
                bind_as = entry["dn"]
            self._bind(bind_as, password).unbind()
            return self._account(service, entry, password_ok=True)
        finally:
            service.unbind()

    def still_admitted(self, names: Iterable[str]) -> dict[str, DirectoryAccount | str]:
        """For the sync: each name's current account, or why it may no longer sign in.
        ``DirectoryUnavailable`` if the directory cannot be asked (then nobody is judged)."""
        service = self._service()
        verdicts: dict[str, DirectoryAccount | str] = {}
        try:
            for name in names:
                try:
                    entry = self._find(service, name)
                    if entry is None:
                        verdicts[name] = "not found in the directory or disabled there"
                    else:
                        verdicts[name] = self._account(service, entry, password_ok=False)
                except DirectoryRefused as exc:
                    verdicts[name] = str(exc)
        finally:
            service.unbind()
        return verdicts
