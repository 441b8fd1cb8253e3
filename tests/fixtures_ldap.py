"""A real OpenLDAP (Debian's slapd) on 127.0.0.1 for the directory sign-in tests.

The test starts its own slapd in a temp folder (cn=config from LDIF, mdb database, the memberof
overlay), listening on free ports for plain LDAP (StartTLS) and LDAPS with a certificate from a
trustme CA, and loads people, a service account and nested groups with ldapadd against the
running slapd (slapadd would skip the overlay).  Recipe: TESTING.md section 12.

People: adam (admin via hausmeister-admins), alice and dave (supporters via helpdesk-level1,
nested in helpdesk), carol (auditor via auditors), bob (in no mapped group).  Passwords are NAME-password-1.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from urllib.parse import quote

import pytest
import trustme

SLAPD = Path("/usr/sbin/slapd")
SUFFIX = "dc=example,dc=test"
ROOT_DN = f"cn=admin,{SUFFIX}"
ROOT_PW = "root-secret-1"
SERVICE_DN = f"cn=hausmeister,ou=services,{SUFFIX}"
SERVICE_PW = "service-secret-1"
PEOPLE = f"ou=people,{SUFFIX}"
GROUPS = f"ou=groups,{SUFFIX}"
ADMINS = f"cn=hausmeister-admins,{GROUPS}"
HELPDESK = f"cn=helpdesk,{GROUPS}"
LEVEL1 = f"cn=helpdesk-level1,{GROUPS}"
AUDITORS = f"cn=auditors,{GROUPS}"
OTHERS = f"cn=others,{GROUPS}"


def password_of(name: str) -> str:
    return f"{name}-password-1"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _config_ldif(d: Path) -> str:
    root_hash = subprocess.run(["slappasswd", "-s", ROOT_PW], capture_output=True, text=True,
                               check=True).stdout.strip()
    schema = "\n".join(f"include: file:///etc/ldap/schema/{name}.ldif"
                       for name in ("core", "cosine", "nis", "inetorgperson"))
    return f"""dn: cn=config
objectClass: olcGlobal
cn: config
olcPidFile: {d}/slapd.pid
olcTLSCACertificateFile: {d}/tls/ca.pem
olcTLSCertificateFile: {d}/tls/cert.pem
olcTLSCertificateKeyFile: {d}/tls/key.pem

dn: cn=module{{0}},cn=config
objectClass: olcModuleList
cn: module{{0}}
olcModulePath: /usr/lib/ldap
olcModuleLoad: back_mdb
olcModuleLoad: memberof

dn: cn=schema,cn=config
objectClass: olcSchemaConfig
cn: schema

{schema}

dn: olcDatabase={{-1}}frontend,cn=config
objectClass: olcDatabaseConfig
objectClass: olcFrontendConfig
olcDatabase: {{-1}}frontend

dn: olcDatabase={{0}}config,cn=config
objectClass: olcDatabaseConfig
olcDatabase: {{0}}config
olcAccess: to * by dn.exact=gidNumber=0+uidNumber=0,cn=peercred,cn=external,cn=auth manage by * break

dn: olcDatabase={{1}}mdb,cn=config
objectClass: olcDatabaseConfig
objectClass: olcMdbConfig
olcDatabase: {{1}}mdb
olcSuffix: {SUFFIX}
olcDbDirectory: {d}/db
olcRootDN: {ROOT_DN}
olcRootPW: {root_hash}
olcAccess: to attrs=userPassword by self write by anonymous auth by * none
olcAccess: to * by users read by * none

dn: olcOverlay={{0}}memberof,olcDatabase={{1}}mdb,cn=config
objectClass: olcOverlayConfig
objectClass: olcMemberOf
olcOverlay: {{0}}memberof
olcMemberOfGroupOC: groupOfNames
olcMemberOfMemberAD: member
olcMemberOfRefInt: TRUE
"""


def _person(uid: str, mail: bool = True) -> str:
    lines = [f"dn: uid={uid},{PEOPLE}", "objectClass: inetOrgPerson", f"uid: {uid}",
             f"cn: {uid.title()}", f"sn: {uid.title()}", f"userPassword: {password_of(uid)}"]
    if mail:
        lines.append(f"mail: {uid}@example.test")
    return "\n".join(lines) + "\n"


def _group(dn: str, *members: str) -> str:
    cn = dn.split(",")[0].split("=")[1]
    return "\n".join([f"dn: {dn}", "objectClass: groupOfNames", f"cn: {cn}",
                      *(f"member: {m}" for m in members)]) + "\n"


def _data_ldif() -> str:
    entries = [
        f"dn: {SUFFIX}\nobjectClass: dcObject\nobjectClass: organization\ndc: example\no: Example\n",
        f"dn: {PEOPLE}\nobjectClass: organizationalUnit\nou: people\n",
        f"dn: {GROUPS}\nobjectClass: organizationalUnit\nou: groups\n",
        f"dn: ou=services,{SUFFIX}\nobjectClass: organizationalUnit\nou: services\n",
        f"dn: {SERVICE_DN}\nobjectClass: organizationalRole\nobjectClass: simpleSecurityObject\n"
        f"cn: hausmeister\nuserPassword: {SERVICE_PW}\n",
        _person("adam"), _person("alice"), _person("bob"), _person("carol", mail=False),
        _person("dave"),
        _group(ADMINS, f"uid=adam,{PEOPLE}"),
        _group(LEVEL1, f"uid=alice,{PEOPLE}", f"uid=dave,{PEOPLE}"),
        _group(HELPDESK, LEVEL1),                      # nested: alice is in helpdesk through level1
        _group(AUDITORS, f"uid=carol,{PEOPLE}"),
        _group(OTHERS, f"uid=bob,{PEOPLE}"),
    ]
    return "\n".join(entries)


class Slapd:
    """One slapd process; ``stop()`` makes the directory unreachable, ``start()`` brings it back."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.ca = trustme.CA()
        self.ldap_port = _free_port()
        self.ldaps_port = _free_port()
        self.process: subprocess.Popen | None = None
        tls = folder / "tls"
        tls.mkdir(parents=True)
        self.ca.cert_pem.write_to_path(str(tls / "ca.pem"))
        leaf = self.ca.issue_cert("127.0.0.1", "localhost")
        leaf.cert_chain_pems[0].write_to_path(str(tls / "cert.pem"))
        leaf.private_key_pem.write_to_path(str(tls / "key.pem"))
        (folder / "db").mkdir()
        (folder / "run").mkdir()
        (folder / "slapd.d").mkdir()
        (folder / "config.ldif").write_text(_config_ldif(folder))
        subprocess.run(["slapadd", "-n0", "-F", str(folder / "slapd.d"), "-l",
                        str(folder / "config.ldif")], check=True, capture_output=True)

    @property
    def ca_pem(self) -> Path:
        return self.folder / "tls" / "ca.pem"

    @property
    def ldaps_url(self) -> str:
        return f"ldaps://127.0.0.1:{self.ldaps_port}"

    @property
    def ldap_url(self) -> str:
        return f"ldap://127.0.0.1:{self.ldap_port}"

    def start(self, timeout: float = 20) -> "Slapd":
        ldapi = "ldapi://" + quote(str(self.folder / "run" / "ldapi"), safe="")
        log = open(self.folder / "slapd.log", "ab")
        self.process = subprocess.Popen(
            [str(SLAPD), "-d", "0", "-F", str(self.folder / "slapd.d"), "-h",
             f"{self.ldap_url}/ {self.ldaps_url}/ {ldapi}"], stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"slapd exited: {self.log()}")
            probe = subprocess.run(["ldapsearch", "-x", "-H", self.ldap_url, "-b", "", "-s", "base"],
                                   capture_output=True, timeout=10)
            if probe.returncode == 0:
                return self
            time.sleep(0.05)
        raise AssertionError(f"slapd did not answer in {timeout} s: {self.log()}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def log(self) -> str:
        path = self.folder / "slapd.log"
        return path.read_text(errors="replace")[-3000:] if path.exists() else ""

    def modify(self, ldif: str) -> None:
        result = subprocess.run(["ldapmodify", "-x", "-H", self.ldap_url, "-D", ROOT_DN, "-w",
                                 ROOT_PW], input=ldif, capture_output=True, text=True, timeout=20)
        assert result.returncode == 0, result.stderr

    def load(self) -> None:
        result = subprocess.run(["ldapadd", "-x", "-H", self.ldap_url, "-D", ROOT_DN, "-w", ROOT_PW],
                                input=_data_ldif(), capture_output=True, text=True, timeout=30)
        assert result.returncode == 0, result.stderr

    def remove_member(self, group: str, member: str) -> None:
        self.modify(f"dn: {group}\nchangetype: modify\ndelete: member\nmember: {member}\n")

    def add_member(self, group: str, member: str) -> None:
        self.modify(f"dn: {group}\nchangetype: modify\nadd: member\nmember: {member}\n")

    def directory_toml(self, security: str = "ldaps", lookup: str = "member",
                       sync: str = "1s", extra: str = "") -> str:
        url = self.ldaps_url if security == "ldaps" else self.ldap_url
        return f"""
[directory]
enabled = true
servers = ["{url}"]
security = "{security}"
ca_bundle = "{self.ca_pem}"
timeout_seconds = 3.0
bind_dn = "{SERVICE_DN}"
bind_password = "{SERVICE_PW}"
user_base = "{PEOPLE}"
group_lookup = "{lookup}"
group_base = "{GROUPS}"
sync_interval = "{sync}"
groups = [
  {{ group = "{ADMINS}", role = "admin", tenant = "default" }},
  {{ group = "{HELPDESK}", role = "supporter", tenant = "default" }},
  {{ group = "{AUDITORS}", role = "auditor", tenant = "default" }},
]
{extra}
"""


@pytest.fixture
def slapd(tmp_path):
    if not SLAPD.exists() or not shutil.which("ldapadd"):
        pytest.fail("Debian slapd/ldap-utils are missing: run `make test-system-packages`")
    folder = tmp_path / "slapd"
    folder.mkdir()
    server = Slapd(folder)
    server.start()
    try:
        server.load()
        yield server
    finally:
        server.stop()


def directory_section(slapd: Slapd, **changes):
    """The [directory] config section for ``slapd`` as the loader builds it."""
    import tomllib
    from server.config import from_mapping
    raw = tomllib.loads(slapd.directory_toml())
    raw["directory"].update(changes)
    return from_mapping(raw, Path(os.getcwd())).directory
