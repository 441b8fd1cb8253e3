#!/usr/bin/env python3
"""Install or upgrade Hausmeister from this offline bundle, with no network at all.

Standard library only: it runs on a Debian 12 that has python3 and nothing else.  In order:

1. check ``SHA256SUMS.sig`` against the release key (Ed25519, the key is written into this file
   when the bundle is built; an installed Hausmeister insists on the key it was installed with),
   then every file against ``SHA256SUMS`` — and that no file is there that the list does not name;
2. install the Debian packages of ``debs/`` that are missing (``dpkg -i``);
3. create the system user, ``/etc/hausmeister`` and ``/var/lib/hausmeister``;
4. make ``PREFIX/releases/<version>/venv`` with ``pip install --no-index --find-links wheels``;
5. first install: write the config, run ``hausmeister-server init``, write and enable the
   systemd units, and print what ``make run`` prints;
   upgrade: stop the services, snapshot the database, switch ``PREFIX/current``, run the
   migrations, check, start again and say what changed — or, if any step fails, put the previous
   release, its units and the database snapshot back and start that again.

A refusal is one line on stderr, exit 2 (the bundle or the command line) or 1 (a failed step).
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

#: base64 of the release key's 32 raw bytes; written by packaging/build_bundle.py
RELEASE_PUBLIC_KEY = ""

SERVICE_UNITS = ("hausmeister-server.service",)
ENABLED_UNITS = ("hausmeister-server.service", "hausmeister-backup.timer")
SIGNATURE_FILES = ("SHA256SUMS", "SHA256SUMS.sig")


class InstallError(Exception):
    """One line for the operator; ``code`` 2 = refused bundle/arguments, 1 = a failed step."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


# --- Ed25519 verification (RFC 8032, 5.1.7), standard library only ----------------------------
# Why here and not `cryptography`: the signature must be checked before anything from the bundle
# is installed, on a python3 without third-party packages.  The RFC's reference algorithm, for
# verifying only (public data, so timing does not matter); tests check it against `cryptography`.

_P = 2 ** 255 - 19
_L = 2 ** 252 + 27742317777372353535851937790883648493
_D = -121665 * pow(121666, _P - 2, _P) % _P
_SQRT_M1 = pow(2, (_P - 1) // 4, _P)


def _add(a, b):
    aa = (a[1] - a[0]) * (b[1] - b[0]) % _P
    bb = (a[1] + a[0]) * (b[1] + b[0]) % _P
    cc = 2 * a[3] * b[3] * _D % _P
    dd = 2 * a[2] * b[2] % _P
    e, f, g, h = bb - aa, dd - cc, dd + cc, bb + aa
    return (e * f % _P, g * h % _P, f * g % _P, e * h % _P)


def _multiply(scalar, point):
    result = (0, 1, 1, 0)
    while scalar > 0:
        if scalar & 1:
            result = _add(result, point)
        point = _add(point, point)
        scalar >>= 1
    return result


def _recover_x(y, sign):
    if y >= _P:
        return None
    x2 = (y * y - 1) * pow(_D * y * y + 1, _P - 2, _P)
    if x2 == 0:
        return None if sign else 0
    x = pow(x2, (_P + 3) // 8, _P)
    if (x * x - x2) % _P != 0:
        x = x * _SQRT_M1 % _P
    if (x * x - x2) % _P != 0:
        return None
    return _P - x if (x & 1) != sign else x


def _decompress(data):
    y = int.from_bytes(data, "little")
    sign, y = y >> 255, y & ((1 << 255) - 1)
    x = _recover_x(y, sign)
    return None if x is None else (x, y, 1, x * y % _P)


_GY = 4 * pow(5, _P - 2, _P) % _P
_BASE = (_recover_x(_GY, 0), _GY, 1, _recover_x(_GY, 0) * _GY % _P)


def ed25519_verify(public_key: bytes, message: bytes, signature: bytes) -> bool:
    if len(public_key) != 32 or len(signature) != 64:
        return False
    a, r = _decompress(public_key), _decompress(signature[:32])
    s = int.from_bytes(signature[32:], "little")
    if a is None or r is None or s >= _L:
        return False
    h = int.from_bytes(hashlib.sha512(signature[:32] + public_key + message).digest(),
                       "little") % _L
    left, right = _multiply(s, _BASE), _add(r, _multiply(h, a))
    return ((left[0] * right[2] - right[0] * left[2]) % _P == 0
            and (left[1] * right[2] - right[1] * left[2]) % _P == 0)


def key_fingerprint(key_b64: str) -> str:
    """SHA-256 of the raw public key, hex: what the release notes and the installer print."""
    return hashlib.sha256(base64.b64decode(key_b64)).hexdigest()


# --- the bundle -------------------------------------------------------------------------------

def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def verify_bundle(bundle: Path, key_b64: str) -> dict[str, str]:
    """Signature, then every hash, then no stray file; returns {relative path: sha256}."""
    sums_path, sig_path = bundle / "SHA256SUMS", bundle / "SHA256SUMS.sig"
    if not sums_path.is_file() or not sig_path.is_file():
        raise InstallError(f"{bundle} has no SHA256SUMS and SHA256SUMS.sig: this is not a "
                           "complete Hausmeister bundle; unpack the whole .tar again", 2)
    if not key_b64:
        raise InstallError("this installer carries no release key: use a bundle made by "
                           "`make bundle`", 2)
    sums = sums_path.read_bytes()
    try:
        signature = base64.b64decode(sig_path.read_bytes().strip(), validate=True)
        key = base64.b64decode(key_b64, validate=True)
    except ValueError:
        signature, key = b"", b""
    if not ed25519_verify(key, sums, signature):
        raise InstallError("SHA256SUMS.sig is not a valid signature of SHA256SUMS by release key "
                           f"{key_fingerprint(key_b64)[:16]}…: the bundle was changed or not "
                           "signed by this key; do not install it", 2)
    listed: dict[str, str] = {}
    for line in sums.decode().splitlines():
        digest, _, name = line.partition("  ")
        if len(digest) != 64 or not name or name.startswith("/") or ".." in name.split("/"):
            raise InstallError(f"SHA256SUMS has a malformed line {line!r}", 2)
        listed[name] = digest
    present = {p.relative_to(bundle).as_posix() for p in bundle.rglob("*")
               if p.is_file() or p.is_symlink()}
    for name in sorted(present - set(listed) - set(SIGNATURE_FILES)):
        raise InstallError(f"{name} is in the bundle but not in the signed SHA256SUMS: someone "
                           "added it; do not install this bundle", 2)
    for name, digest in sorted(listed.items()):
        path = bundle / name
        if path.is_symlink() or not path.is_file():
            raise InstallError(f"{name} is listed in SHA256SUMS but missing from the bundle: "
                               "unpack the whole .tar again", 2)
        if _sha256(path) != digest:
            raise InstallError(f"{name}: its SHA-256 does not match the signed SHA256SUMS (the "
                               "file was changed after signing); do not install this bundle", 2)
    return listed


# --- helpers ----------------------------------------------------------------------------------

def clean_env() -> dict[str, str]:
    """No PIP_* variable and no pip configuration file: only the bundle can serve pip."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PIP_", "PYTHON"))}
    env.update(PIP_CONFIG_FILE=os.devnull, PYTHONNOUSERSITE="1", LC_ALL="C.UTF-8",
               PIP_NO_INDEX="1", PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_CACHE_DIR="1")
    return env


def run(cmd: list[str], what: str, user: str = "", capture: bool = True,
        env: dict | None = None) -> str:
    if user and os.geteuid() == 0:
        cmd = ["runuser", "-u", user, "--", *cmd]
    proc = subprocess.run(cmd, capture_output=capture, text=True, env=env or clean_env())
    if proc.returncode != 0:
        detail = ((proc.stderr or "") + (proc.stdout or "")).strip().splitlines()
        raise InstallError(f"{what} failed: {detail[-1] if detail else f'exit {proc.returncode}'}")
    return proc.stdout or ""


def systemd_running() -> bool:
    return Path("/run/systemd/system").is_dir() and shutil.which("systemctl") is not None


class Layout:
    """Where things go; every folder can be moved for tests and unusual sites."""

    def __init__(self, args: argparse.Namespace, version: str) -> None:
        self.prefix = Path(args.prefix).resolve()
        self.config_dir = Path(args.config_dir)
        self.config = self.config_dir / "hausmeister.toml"
        self.data_dir = Path(args.data_dir)
        self.systemd_dir = Path(args.systemd_dir)
        self.releases = self.prefix / "releases"
        self.current = self.prefix / "current"
        self.state = self.prefix / "installed.json"
        self.release = self.releases / version
        self.user = args.user
        self.role = args.role
        self.host_home = Path(args.host_home)

    def server(self, release: Path) -> str:
        return str(release / "venv" / "bin" / "hausmeister-server")


# --- steps ------------------------------------------------------------------------------------

def install_debs(bundle: Path, skip: bool) -> list[str]:
    debs = sorted((bundle / "debs").glob("*.deb"))
    if skip or not debs or shutil.which("dpkg-query") is None:
        return []
    missing = []
    for deb in debs:
        package = run(["dpkg-deb", "-f", str(deb), "Package"], f"reading {deb.name}").strip()
        status = subprocess.run(["dpkg-query", "-W", "-f", "${Status}", package],
                                capture_output=True, text=True).stdout
        if "install ok installed" not in status:
            missing.append(deb)
    if missing and os.geteuid() != 0:
        raise InstallError(f"{len(missing)} Debian packages of the bundle are missing here "
                           f"({', '.join(d.name.split('_')[0] for d in missing)}): run install.sh as root")
    if missing:
        run(["dpkg", "-i", *map(str, missing)], "dpkg -i (Debian packages of the bundle)")
    return [d.name.split("_")[0] for d in missing]


def ensure_user(layout: Layout) -> None:
    if not layout.user or os.geteuid() != 0:
        return
    if subprocess.run(["id", "-u", layout.user], capture_output=True).returncode != 0:
        run(["useradd", "--system", "--user-group", "--home-dir", str(layout.data_dir),
             "--no-create-home", "--shell", "/usr/sbin/nologin", layout.user],
            f"creating the system user {layout.user}", user="")


def _chown(path: Path, user: str) -> None:
    if user and os.geteuid() == 0:
        shutil.chown(path, user, user)


def make_release(bundle: Path, layout: Layout, meta: dict, python: str,
                 compile_bytecode: bool = True) -> None:
    """A fresh virtualenv with the bundle's wheels, from nothing but the bundle."""
    if layout.release.exists():
        shutil.rmtree(layout.release)
    layout.releases.mkdir(parents=True, exist_ok=True)
    venv = layout.release / "venv"
    run([python, "-m", "venv", "--without-pip", str(venv)], "creating the virtualenv")
    wheels = bundle / "wheels"
    pip_wheels = sorted(wheels.glob("pip-*.whl"))
    if not pip_wheels:
        raise InstallError("the bundle has no pip wheel in wheels/", 2)
    # the server needs no desktop app; a maintained machine gets the apps' extras (its window)
    extras = meta.get("extras") if layout.role == "host" else []
    target = meta["name"] + (f"[{','.join(extras)}]" if extras else "")
    run([str(venv / "bin" / "python"), f"{pip_wheels[-1]}/pip", "install", "-q", "--no-index",
         "--find-links", str(wheels), "--no-cache-dir", "--disable-pip-version-check",
         "--compile" if compile_bytecode else "--no-compile",
         f"{target}=={meta['version']}", "pip"], "pip install --no-index from the bundle")
    (layout.release / "BUNDLE.json").write_text(json.dumps(meta, indent=1))
    units = layout.release / "systemd"
    units.mkdir()
    for unit in sorted((bundle / "systemd").iterdir()):
        text = unit.read_text()
        text = text.replace("/var/lib/hausmeister-host", "\0HOST_HOME\0")
        for default, chosen in (("/opt/hausmeister", str(layout.prefix)),
                                ("/etc/hausmeister", str(layout.config_dir)),
                                ("/var/lib/hausmeister", str(layout.data_dir)),
                                ("\0HOST_HOME\0", str(layout.host_home))):
            text = text.replace(default, chosen)
        if layout.user != "hausmeister":
            text = text.replace("User=hausmeister", f"User={layout.user or 'root'}")
            text = text.replace("Group=hausmeister", f"Group={layout.user or 'root'}")
        (units / unit.name).write_text(text)


CONFIG_PROBE = """
import json, sys
from server.config import load
from server import bootstrap
c = load(sys.argv[1])
url = c.database_url
rev = None
try:
    import sqlalchemy as sa
    engine = sa.create_engine(url)
    with engine.connect() as conn:
        rev = conn.execute(sa.text("SELECT version_num FROM alembic_version")).scalar()
    engine.dispose()
except Exception:
    pass
print(json.dumps({"data_dir": str(c.server.data_dir), "database_url": url,
                  "https_port": c.listen.https_port, "module_port": c.listen.module_port,
                  "public_host": c.server.public_host, "initialised": bootstrap.is_initialised(c),
                  "schema": rev}))
"""


def config_facts(layout: Layout, release: Path) -> dict:
    out = run([str(release / "venv" / "bin" / "python"), "-c", CONFIG_PROBE, str(layout.config)],
              "reading the configuration", user=layout.user)
    return json.loads(out.strip().splitlines()[-1])


def write_config(bundle: Path, layout: Layout) -> bool:
    """The example config with this site's data folder; an existing config is never touched."""
    layout.config_dir.mkdir(parents=True, exist_ok=True)
    if layout.config.exists():
        return False
    text = (bundle / "config" / "hausmeister.example.toml").read_text()
    text = text.replace('data_dir = "/var/lib/hausmeister"', f'data_dir = "{layout.data_dir}"')
    layout.config.write_text(text)
    os.chmod(layout.config, 0o640)
    if layout.user and os.geteuid() == 0:
        shutil.chown(layout.config, "root", layout.user)
        shutil.chown(layout.config_dir, "root", layout.user)
        os.chmod(layout.config_dir, 0o750)
    return True


def install_units(layout: Layout, release: Path) -> list[str]:
    layout.systemd_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for unit in sorted((release / "systemd").iterdir()):
        shutil.copyfile(unit, layout.systemd_dir / unit.name)
        written.append(unit.name)
    return written


def services(action: str, layout: Layout, no_start: bool) -> bool:
    """start/stop/enable the units through systemd; False where systemd does not run."""
    if no_start or not systemd_running():
        return False
    if action == "enable":
        run(["systemctl", "daemon-reload"], "systemctl daemon-reload", user="")
        run(["systemctl", "enable", "--now", *ENABLED_UNITS], "systemctl enable --now", user="")
    elif action == "start":
        run(["systemctl", "daemon-reload"], "systemctl daemon-reload", user="")
        run(["systemctl", "start", *SERVICE_UNITS], "systemctl start", user="")
        time.sleep(2)  # Restart=on-failure: a server that dies at once shows as failed by now
        run(["systemctl", "is-active", "--quiet", *SERVICE_UNITS],
            "the server did not stay up (journalctl -u hausmeister-server)", user="")
    else:
        run(["systemctl", action, *SERVICE_UNITS], f"systemctl {action}", user="")
    return True


def switch_current(layout: Layout, release: Path) -> None:
    tmp = layout.prefix / "current.new"
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    tmp.symlink_to(release.relative_to(layout.prefix))
    tmp.replace(layout.current)


def sqlite_path(url: str) -> Path | None:
    for head in ("sqlite:///", "sqlite+pysqlite:///"):
        if url.startswith(head):
            return Path(url[len(head):].split("?")[0])
    return None


def snapshot_database(facts: dict, dest: Path, layout: Layout, release: Path) -> Path:
    """A consistent copy of the database before migrations touch it."""
    dest.mkdir(parents=True, exist_ok=True)
    db_file = sqlite_path(facts["database_url"])
    if db_file is not None:
        copy = dest / "database.sqlite3"
        source, target = sqlite3.connect(db_file), sqlite3.connect(copy)
        with target:
            source.backup(target)
        source.close()
        target.close()
        return copy
    copy = dest / "database.backup"
    run([layout.server(release), "--config", str(layout.config), "backup", "--database-only",
         str(copy)], "snapshot of the PostgreSQL database (hausmeister-server backup)",
        user=layout.user)
    return copy


def restore_database(facts: dict, copy: Path, layout: Layout, release: Path) -> None:
    db_file = sqlite_path(facts["database_url"])
    if db_file is not None:
        source, target = sqlite3.connect(copy), sqlite3.connect(db_file)
        with target:
            source.backup(target)
        source.close()
        target.close()
        return
    run([layout.server(release), "--config", str(layout.config), "restore", "--database-only",
         "--force", str(copy)], "restoring the PostgreSQL snapshot", user=layout.user)


def offer_customer_module(bundle: Path, layout: Layout, release: Path) -> str:
    """Put the bundle's customer one-file on the download page, with this server inside.

    Not fatal: the server runs without it; the line printed says what happened."""
    onefiles = sorted((bundle / "modules").glob("hausmeister-customer-*")) \
        if (bundle / "modules").is_dir() else []
    if not onefiles:
        return "no customer one-file in this bundle"
    kept = release / "modules"
    kept.mkdir(exist_ok=True)
    offered = []
    for onefile in onefiles:
        shutil.copyfile(onefile, kept / onefile.name)
        os.chmod(kept / onefile.name, 0o755)
        try:
            run([layout.server(release), "--config", str(layout.config), "downloads",
                 "add-customer", str(kept / onefile.name)], "downloads add-customer",
                user=layout.user)
            offered.append(onefile.name)
        except InstallError as exc:
            return f"not offered ({exc})"
    return "offered on the download page, signed: " + ", ".join(offered)


def wheel_versions(meta: dict) -> dict[str, str]:
    return {w.split("-")[0].lower(): w.split("-")[1] for w in meta.get("wheels", [])}


def what_changed(old_meta: dict, new_meta: dict, old_schema, new_schema) -> list[str]:
    lines = [f"Hausmeister {old_meta.get('version')} -> {new_meta['version']}",
             f"database schema {old_schema or 'none'} -> {new_schema or 'none'}"
             + (" (unchanged)" if old_schema == new_schema else " (migrated)")]
    old, new = wheel_versions(old_meta), wheel_versions(new_meta)
    for name in sorted(set(old) | set(new)):
        if old.get(name) != new.get(name) and name != new_meta["name"]:
            lines.append(f"  {name}: {old.get(name, '-')} -> {new.get(name, '-')}")
    return lines


# --- the two paths ----------------------------------------------------------------------------

def restore_backup(layout: Layout, data: Path, args) -> str:
    """``--restore``: the new install starts from a backup instead of ``init``.  The backup and
    its key are copied into the data folder for the service user and removed afterwards."""
    staged = []
    try:
        def stage(path: str) -> str:
            source = Path(path)
            if not source.is_file():
                raise InstallError(f"{path}: no such file", 2)
            copy = data / f".restore-{len(staged)}-{source.name}"
            shutil.copyfile(source, copy)
            os.chmod(copy, 0o600)
            _chown(copy, layout.user)
            staged.append(copy)
            return str(copy)

        cmd = [layout.server(layout.release), "--config", str(layout.config), "restore",
               stage(args.restore)]
        if args.restore_passphrase_file:
            cmd += ["--passphrase-file", stage(args.restore_passphrase_file)]
        if args.restore_identity:
            cmd += ["--identity", stage(args.restore_identity)]
        return run(cmd, "hausmeister-server restore", user=layout.user)
    finally:
        for copy in staged:
            copy.unlink(missing_ok=True)


def first_install(bundle: Path, layout: Layout, meta: dict, args) -> None:
    wrote = write_config(bundle, layout)
    facts = config_facts(layout, layout.release)
    data = Path(facts["data_dir"])
    data.mkdir(parents=True, exist_ok=True)
    os.chmod(data, 0o700)
    _chown(data, layout.user)
    switch_current(layout, layout.release)
    print(f"Installed:        Hausmeister {meta['version']} in {layout.release}")
    print(f"Config:           {layout.config} ({'written from the example' if wrote else 'kept'})")
    if facts["initialised"]:
        run([layout.server(layout.release), "--config", str(layout.config), "migrate"],
            "hausmeister-server migrate", user=layout.user)
        print(f"Data folder:      {data} (kept; schema migrated)")
    elif args.restore:
        print(restore_backup(layout, data, args), end="")
    else:
        print(run([layout.server(layout.release), "--config", str(layout.config), "init"],
                  "hausmeister-server init", user=layout.user), end="")
    facts = config_facts(layout, layout.release)
    units = install_units(layout, layout.release)
    print(f"Customer module:  {offer_customer_module(bundle, layout, layout.release)}")
    enabled = services("enable", layout, args.no_start)
    host = facts["public_host"]
    print(f"Console and enrollment: https://{host}:{facts['https_port']}/")
    print(f"Module port:            {host}:{facts['module_port']}")
    print(f"Units:            {', '.join(units)} in {layout.systemd_dir}")
    if enabled:
        print("Started:          systemctl status hausmeister-server")
    else:
        print(f"Not started (no systemd here): {layout.server(layout.current)} "
              f"--config {layout.config} run")
    write_state(layout, meta, args.release_key_b64, facts["schema"])


def upgrade(bundle: Path, layout: Layout, meta: dict, state: dict, args) -> None:
    old_release = layout.releases / state["version"]
    old_meta = json.loads((old_release / "BUNDLE.json").read_text())
    facts = config_facts(layout, layout.release)
    old_schema = facts["schema"]
    stopped = services("stop", layout, args.no_start)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    snapshot_dir = layout.prefix / "snapshots" / f"{state['version']}-to-{meta['version']}-{stamp}"
    snapshot = snapshot_database(facts, snapshot_dir, layout, old_release)
    try:
        switch_current(layout, layout.release)
        run([layout.server(layout.release), "--config", str(layout.config), "migrate"],
            "the database migration", user=layout.user)
        run([layout.server(layout.release), "--config", str(layout.config), "check"],
            "hausmeister-server check after the migration", user=layout.user)
        install_units(layout, layout.release)
        if stopped:
            services("start", layout, args.no_start)
    except InstallError as exc:
        switch_current(layout, old_release)
        restore_database(facts, snapshot, layout, old_release)
        install_units(layout, old_release)
        if stopped:
            try:
                services("start", layout, args.no_start)
            except InstallError:
                pass
        raise InstallError(f"upgrade to {meta['version']} failed ({exc}); rolled back to "
                           f"{state['version']}: its program, units and database are back "
                           f"(snapshot kept in {snapshot_dir})")
    new_schema = config_facts(layout, layout.release)["schema"]
    for line in what_changed(old_meta, meta, old_schema, new_schema):
        print(line)
    print(f"Customer module:  {offer_customer_module(bundle, layout, layout.release)}")
    print(f"Kept:             config {layout.config}, data {facts['data_dir']}")
    print(f"Snapshot:         {snapshot} (the database before the upgrade)")
    write_state(layout, meta, args.release_key_b64, new_schema, previous=state["version"])
    prune_releases(layout, keep={meta["version"], state["version"]})


HOST_UNIT = "hausmeister-host.service"


def host_install(layout: Layout, meta: dict, args) -> None:
    """A maintained machine: the host module enrolled with a one-time token, as a service."""
    if not args.host_token or not (args.server_config or (args.server and args.ca_fingerprint)):
        raise InstallError("--role host needs --host-token TOKEN and --server-config FILE (or "
                           "--server URL --ca-fingerprint FP) from the server's download page", 2)
    switch_current(layout, layout.release)
    host = str(layout.release / "venv" / "bin" / "hausmeister-host")
    target = (["--server-config", args.server_config] if args.server_config
              else ["--server", args.server, "--ca-fingerprint", args.ca_fingerprint])
    layout.host_home.mkdir(parents=True, exist_ok=True, mode=0o700)
    env = {**clean_env(), "HAUSMEISTER_HOME": str(layout.host_home)}
    print(run([host, "enroll", *target, "--token", args.host_token, "--name", args.host_name],
              "hausmeister-host enroll", env=env).strip())
    layout.systemd_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(layout.release / "systemd" / HOST_UNIT, layout.systemd_dir / HOST_UNIT)
    if not args.no_start and systemd_running():
        run(["systemctl", "daemon-reload"], "systemctl daemon-reload")
        run(["systemctl", "enable", "--now", HOST_UNIT], "systemctl enable --now " + HOST_UNIT)
        print(f"Started:          systemctl status {HOST_UNIT}")
    else:
        print(f"Unit:             {layout.systemd_dir / HOST_UNIT} (not started: no systemd here)")
    write_state(layout, meta, args.release_key_b64, None, role="host")


def host_upgrade(layout: Layout, meta: dict, state: dict, args) -> None:
    old_release = layout.releases / state["version"]
    running = not args.no_start and systemd_running()
    try:
        switch_current(layout, layout.release)
        shutil.copyfile(layout.release / "systemd" / HOST_UNIT, layout.systemd_dir / HOST_UNIT)
        if running:
            run(["systemctl", "daemon-reload"], "systemctl daemon-reload")
            run(["systemctl", "restart", HOST_UNIT], "systemctl restart " + HOST_UNIT)
    except InstallError as exc:
        switch_current(layout, old_release)
        shutil.copyfile(old_release / "systemd" / HOST_UNIT, layout.systemd_dir / HOST_UNIT)
        raise InstallError(f"upgrade to {meta['version']} failed ({exc}); rolled back to "
                           f"{state['version']}")
    print(f"Hausmeister host module {state['version']} -> {meta['version']}; enrollment in "
          f"{layout.host_home} kept")
    write_state(layout, meta, args.release_key_b64, None, previous=state["version"], role="host")
    prune_releases(layout, keep={meta["version"], state["version"]})


def write_state(layout: Layout, meta: dict, key_b64: str, schema, previous=None,
                role: str = "server") -> None:
    state = {"version": meta["version"], "release_key": key_b64, "schema": schema, "role": role,
             "previous": previous, "installed_at": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                 time.gmtime())}
    tmp = layout.state.with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=1))
    tmp.replace(layout.state)


def prune_releases(layout: Layout, keep: set[str]) -> None:
    for release in layout.releases.iterdir():
        if release.name not in keep:
            shutil.rmtree(release, ignore_errors=True)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="install.sh", description="Install or upgrade Hausmeister "
                                "from this offline bundle (no network needed).")
    p.add_argument("--prefix", default="/opt/hausmeister", help="program folder")
    p.add_argument("--config-dir", default="/etc/hausmeister")
    p.add_argument("--data-dir", default="/var/lib/hausmeister")
    p.add_argument("--systemd-dir", default="/etc/systemd/system")
    p.add_argument("--user", default="hausmeister",
                   help="system user the server runs as ('' = the current user, no useradd)")
    p.add_argument("--python", default="/usr/bin/python3" if Path("/usr/bin/python3").exists()
                   else sys.executable, help="Python for the virtualenv")
    p.add_argument("--release-key", metavar="BASE64",
                   help="expect this release key (default: the key in this installer)")
    p.add_argument("--no-debs", action="store_true", help="do not install the bundle's .debs")
    p.add_argument("--no-start", action="store_true", help="write the units but do not "
                   "start or stop anything")
    p.add_argument("--verify-only", action="store_true", help="check the bundle and stop")
    p.add_argument("--restore", metavar="BACKUP", help="first install: start from this backup "
                   "(hausmeister-server backup) instead of a new CA and admin")
    p.add_argument("--restore-passphrase-file", metavar="FILE")
    p.add_argument("--restore-identity", metavar="BACKUP_KEY")
    p.add_argument("--no-compile", action="store_true", help="skip byte-compiling (install in "
                   "half the time; Python then compiles in memory at every start)")
    host = p.add_argument_group("a maintained machine (--role host): the host module as a service")
    host.add_argument("--role", choices=["server", "host"], default="server")
    host.add_argument("--host-token", metavar="TOKEN", help="one-time enrollment token")
    host.add_argument("--server-config", metavar="FILE", help="customer.toml from the download page")
    host.add_argument("--server", metavar="URL")
    host.add_argument("--ca-fingerprint", metavar="FP")
    host.add_argument("--host-name", default=os.uname().nodename)
    host.add_argument("--host-home", default="/var/lib/hausmeister-host",
                      help="the host module's folder (key, certificate, policy)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    bundle = Path(__file__).resolve().parent
    try:
        meta = json.loads((bundle / "BUNDLE.json").read_text()) \
            if (bundle / "BUNDLE.json").is_file() else {}
        args.release_key_b64 = args.release_key or RELEASE_PUBLIC_KEY
        layout = Layout(args, meta.get("version", "unknown"))
        state = json.loads(layout.state.read_text()) if layout.state.is_file() else None
        if state and not args.release_key and state.get("release_key") != args.release_key_b64:
            raise InstallError(
                f"this bundle carries release key {key_fingerprint(args.release_key_b64)[:16]}…, "
                f"but the installed Hausmeister trusts {key_fingerprint(state['release_key'])[:16]}…: "
                "refusing (pass --release-key only if you changed the release key on purpose)", 2)
        verify_bundle(bundle, args.release_key_b64)
        print(f"Bundle:           Hausmeister {meta['version']}, signature and "
              f"{len(meta.get('wheels', []))} wheels checked (release key "
              f"{key_fingerprint(args.release_key_b64)[:16]}…)")
        if args.verify_only:
            return 0
        if state and state["version"] == meta["version"] and (layout.release / "venv").exists():
            print(f"Hausmeister {meta['version']} is already installed in {layout.prefix}; "
                  "nothing to do")
            return 0
        added = install_debs(bundle, args.no_debs)
        if added:
            print(f"Debian packages:  installed {', '.join(added)}")
        if state and state.get("role", "server") != args.role:
            raise InstallError(f"{layout.prefix} holds a {state.get('role', 'server')} install; "
                               f"pass --role {state.get('role', 'server')}", 2)
        if args.role == "server":
            ensure_user(layout)
        make_release(bundle, layout, meta, args.python, not args.no_compile)
        if args.role == "host":
            (host_upgrade(layout, meta, state, args) if state else host_install(layout, meta, args))
        elif state:
            upgrade(bundle, layout, meta, state, args)
        else:
            first_install(bundle, layout, meta, args)
        return 0
    except InstallError as exc:
        print(f"install: error: {exc}", file=sys.stderr)
        return exc.code
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
