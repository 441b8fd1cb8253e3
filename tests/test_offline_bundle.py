"""The offline bundle, installed with no network: build, verify, install, upgrade, roll back.

The bundles are built from a frozen copy of this checkout with ``--wheels installed`` (the wheels
are repacked from the test environment, so no registry is needed), ``--debs none`` (fetching
.debs needs Debian's registry; the dependency closure itself is computed offline below) and
``--extras none`` (the desktop apps' Qt wheels are packed the same way but would add 250 MB and
minutes to every install here; the customer one-file has its own test).  Every
install runs in a network namespace that has only ``lo`` (``unshare -n``), with all ``PIP_*``
variables and pip configuration files neutralised by the installer, so only the bundle can serve
pip.  The installs share one prefix in this order: 0.1.0 fresh → upgrade to .post1 (one new
migration) → .post2 whose migration fails → rolled back to .post1.
"""

from __future__ import annotations

import base64
import importlib.util
import json
import os
import re
import shutil
import sqlite3
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings, strategies as st

ROOT = Path(__file__).resolve().parent.parent
PACKAGING = ROOT / "packaging"
SOURCE_PARTS = ("server", "protocol", "modules", "offline_pages", "config", "pyproject.toml")

pytestmark = pytest.mark.skipif(shutil.which("unshare") is None or os.geteuid() != 0,
                                reason="needs root and unshare for the network namespace")


def _load_installer():
    spec = importlib.util.spec_from_file_location("hausmeister_installer", PACKAGING / "install.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


installer = _load_installer()


# --- the verifier the installer carries ---------------------------------------------------------

_KEY = Ed25519PrivateKey.generate()
_PUBLIC = _KEY.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


@settings(max_examples=25, deadline=None)
@given(message=st.binary(max_size=2000), flip=st.integers(min_value=0, max_value=64 * 8 - 1))
def test_installer_ed25519_agrees_with_cryptography(message, flip):
    signature = _KEY.sign(message)
    assert installer.ed25519_verify(_PUBLIC, message, signature)
    bad = bytearray(signature)
    bad[flip // 8] ^= 1 << (flip % 8)
    assert not installer.ed25519_verify(_PUBLIC, message, bytes(bad))
    assert not installer.ed25519_verify(_PUBLIC, message + b"x", signature)


def test_installer_ed25519_rejects_malformed_input():
    signature = _KEY.sign(b"m")
    assert not installer.ed25519_verify(_PUBLIC[:31], b"m", signature)
    assert not installer.ed25519_verify(_PUBLIC, b"m", signature[:63])
    assert not installer.ed25519_verify(b"\xff" * 32, b"m", signature)  # not a curve point
    s_too_big = signature[:32] + (2 ** 253).to_bytes(32, "little")
    assert not installer.ed25519_verify(_PUBLIC, b"m", s_too_big)


# --- Debian packages: the closure against a minimal Debian 12 (offline) -------------------------

def test_debs_closure_is_what_minimal_debian_lacks():
    sys.path.insert(0, str(PACKAGING))
    try:
        import debs
    finally:
        sys.path.remove(str(PACKAGING))
    if not debs.base_seeds():
        pytest.skip("no apt lists on this machine (apt-get update)")
    base, needed = debs.needed_packages()
    assert "dpkg" in base and "libc6" in base and "python3" not in base
    assert "python3-venv" in needed and "python3.11" in needed and "python3-minimal" in needed
    assert not set(needed) & set(base)


# --- building the bundles -------------------------------------------------------------------------

def _run(cmd, **kw) -> subprocess.CompletedProcess:
    """Without PYTHONPATH: an installed site's programs must run on their own venv's code (a
    developer's PYTHONPATH pointing at a work tree would shadow it)."""
    env = {k: v for k, v in kw.pop("env", os.environ).items() if k != "PYTHONPATH"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=kw.pop("timeout", 300),
                          env=env, **kw)


def _source_copy(dest: Path, version: str, migration: str | None = None) -> Path:
    dest.mkdir(parents=True)
    for part in SOURCE_PARTS:
        src = ROOT / part
        if src.is_dir():
            shutil.copytree(src, dest / part, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copyfile(src, dest / part)
    pyproject = dest / "pyproject.toml"
    pyproject.write_text(re.sub(r'(?m)^version = "[^"]*"', f'version = "{version}"',
                                pyproject.read_text(), count=1))
    if migration:
        versions = dest / "server" / "db" / "migrations" / "versions"
        (versions / "9901_bundle_probe.py").write_text(migration.replace("HEAD", _head(versions)))
    return dest


def _head(versions: Path) -> str:
    revisions, parents = set(), set()
    for path in versions.glob("*.py"):
        text = path.read_text()
        revisions.add(re.search(r"^revision = ['\"]([^'\"]+)", text, re.M).group(1))
        down = re.search(r"^down_revision = ['\"]([^'\"]+)", text, re.M)
        if down:
            parents.add(down.group(1))
    (head,) = revisions - parents
    return head


NEW_MIGRATION = '''"""bundle test: one more table"""
from alembic import op
import sqlalchemy as sa

revision = "9901"
down_revision = "HEAD"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table("bundle_probe", sa.Column("id", sa.Integer, primary_key=True))


def downgrade() -> None:
    op.drop_table("bundle_probe")
'''

BROKEN_MIGRATION = NEW_MIGRATION.replace('revision = "9901"', 'revision = "9902"').replace(
    'down_revision = "HEAD"', 'down_revision = "9901"').replace(
    '"bundle_probe", sa.Column', '"half_done", sa.Column').replace(
    'sa.Integer, primary_key=True))\n\n\ndef downgrade', 'sa.Integer, primary_key=True))\n'
    '    raise RuntimeError("this migration fails on purpose")\n\n\ndef downgrade')


@pytest.fixture(scope="module")
def release(tmp_path_factory) -> dict:
    """Release key and three bundles (current, .post1 with a migration, .post2 whose fails)."""
    base = tmp_path_factory.mktemp("bundle")
    key = base / "release.key"
    created = _run([sys.executable, str(PACKAGING / "release_key.py"), "create", str(key)])
    assert created.returncode == 0, created.stderr
    version = re.search(r'(?m)^version = "([^"]+)"', (ROOT / "pyproject.toml").read_text()).group(1)
    sources = {
        version: _source_copy(base / "src-0", version),
        f"{version}.post1": _source_copy(base / "src-1", f"{version}.post1", NEW_MIGRATION),
    }
    post2 = _source_copy(base / "src-2", f"{version}.post2", NEW_MIGRATION)
    (post2 / "server/db/migrations/versions/9902_broken.py").write_text(BROKEN_MIGRATION)
    sources[f"{version}.post2"] = post2
    bundles = {}
    for ver, src in sources.items():
        built = _run([sys.executable, str(PACKAGING / "build_bundle.py"), "--key", str(key),
                      "--out", str(base / "dist"), "--source", str(src), "--wheels", "installed",
                      "--wheel-cache", str(base / "wheel-cache"), "--debs", "none",
                      "--customer-onefile", "none", "--extras", "none"], timeout=600)
        assert built.returncode == 0, built.stderr + built.stdout
        tar_path = base / "dist" / f"hausmeister-{ver}-offline.tar"
        unpacked = base / "unpacked" / ver
        unpacked.mkdir(parents=True)
        with tarfile.open(tar_path) as tar:
            tar.extractall(unpacked, filter="data")
        bundles[ver] = unpacked / f"hausmeister-{ver}"
        print(built.stdout.strip())
    return {"key": key, "base": base, "versions": list(sources), "bundles": bundles,
            "tar": base / "dist" / f"hausmeister-{version}-offline.tar"}


def _site(base: Path) -> dict:
    site = {"prefix": base / "opt", "etc": base / "etc", "data": base / "data",
            "units": base / "units"}
    site["etc"].mkdir(parents=True, exist_ok=True)
    config = site["etc"] / "hausmeister.toml"
    if not config.exists():
        config.write_text(f'[server]\ndata_dir = "{site["data"]}"\n\n'
                          "[listen]\nhttps_port = 0\nmodule_port = 0\n")
    site["config"] = config
    return site


def _install(bundle: Path, site: dict, *extra: str) -> subprocess.CompletedProcess:
    """install.sh inside a fresh network namespace with only loopback (and the PIP_* noise of
    this machine left in the environment, which the installer must neutralise)."""
    args = " ".join([f"--prefix {site['prefix']}", f"--config-dir {site['etc']}",
                     f"--data-dir {site['data']}", f"--systemd-dir {site['units']}",
                     "--user ''", *extra])
    script = f"ip link set lo up; exec sh {bundle}/install.sh {args}"
    return _run(["unshare", "-n", "sh", "-c", script], env={**os.environ}, timeout=600)


def _one_error_line(result: subprocess.CompletedProcess) -> str:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


@pytest.fixture(scope="module")
def installed(release) -> dict:
    """The current bundle installed offline into a fresh prefix."""
    site = _site(release["base"] / "site")
    first = release["versions"][0]
    result = _install(release["bundles"][first], site)
    assert result.returncode == 0, result.stderr + result.stdout
    site["install_output"] = result.stdout
    return site


# --- tests ----------------------------------------------------------------------------------------

def test_bundle_contents_and_signature(release):
    bundle = release["bundles"][release["versions"][0]]
    meta = json.loads((bundle / "BUNDLE.json").read_text())
    names = {w.split("-")[0].lower() for w in meta["wheels"]}
    for needed in ("hausmeister", "twisted", "cryptography", "sqlalchemy", "alembic", "psycopg",
                   "psycopg_binary", "jinja2", "spake2", "pip"):
        assert needed in names, f"{needed} missing from {sorted(names)}"
    assert (bundle / "systemd" / "hausmeister-server.service").is_file()
    assert (bundle / "systemd" / "hausmeister-backup.timer").is_file()
    assert (bundle / "config" / "hausmeister.example.toml").is_file()
    checked = _run([sys.executable, str(PACKAGING / "release_key.py"), "verify",
                    str(release["tar"])])
    assert checked.returncode == 0, checked.stderr
    public = _run([sys.executable, str(PACKAGING / "release_key.py"), "public",
                   str(release["key"])]).stdout
    assert meta["release_key"] in public
    assert f'RELEASE_PUBLIC_KEY = "{meta["release_key"]}"' in (bundle / "install.py").read_text()


def test_install_offline_then_server_and_modules_work_in_the_namespace(release, installed):
    out = installed["install_output"]
    for line in ("CA fingerprint:", "First admin:      admin", "Admin password:",
                 "Customer module:  no customer one-file in this bundle",
                 "Console and enrollment: https://127.0.0.1:", "Module port:"):
        assert line in out, out
    prefix = installed["prefix"]
    assert (prefix / "current").resolve() == prefix / "releases" / release["versions"][0]
    unit = (installed["units"] / "hausmeister-server.service").read_text()
    assert f"ExecStart={prefix}/current/venv/bin/hausmeister-server run" in unit
    # the installed venv holds no link back to the test environment
    assert not list((prefix / "current" / "venv").rglob("__editable__*"))
    python = prefix / "current" / "venv" / "bin" / "python"
    probe = _run(["unshare", "-n", "sh", "-c",
                  f"ip link set lo up; exec {python} {ROOT}/tests/helpers/installed_probe.py "
                  f"{prefix} {installed['config']} {installed['data']} {release['base']} "
                  f"{release['bundles'][release['versions'][0]]}"],
                 timeout=300)
    assert probe.returncode == 0, probe.stderr
    seen = json.loads(probe.stdout.strip().splitlines()[-1])
    assert seen.get("error") is None, (seen, (release["base"] / "installed-server.log").read_text()[-3000:])
    assert seen["interfaces"] == ["lo"]
    assert seen["https_url"].startswith("https://127.0.0.1:")
    assert seen["console_status"] == 200 and seen["console_has_fingerprint"]
    assert seen["host_enroll"] == 0, seen["host_enroll_out"]  # the installer's --role host
    assert "Unit:" in seen["host_enroll_out"]
    assert seen["host_status"] == 0
    assert seen["supporter_enroll"] == 0, seen["supporter_enroll_out"]
    assert seen["session"] == "ok"
    assert seen["customer_check"] == 0, seen["customer_check_out"]


def test_units_verify_clean(installed):
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed")
    for unit in ("hausmeister-server.service", "hausmeister-backup.service",
                 "hausmeister-backup.timer", "hausmeister-relay@.service",
                 "hausmeister-host.service"):
        path = installed["units"] / unit
        if unit.endswith("@.service"):  # an instance name makes a template verifiable
            path = installed["units"] / "hausmeister-relay@9001.service"
            shutil.copyfile(installed["units"] / unit, path)
        result = _run(["systemd-analyze", "verify", "--man=no", "--recursive-errors=no",
                       str(path)], cwd=installed["units"])
        complaints = [line for line in result.stderr.splitlines()
                      if "hausmeister" in line and "not found" not in line.lower()]
        assert result.returncode == 0 and not complaints, result.stderr


def test_tampered_bundles_are_refused_with_one_line(release, tmp_path):
    bundle = release["bundles"][release["versions"][0]]

    def copy() -> Path:
        dest = tmp_path / f"b{len(list(tmp_path.iterdir()))}"
        _run(["cp", "-al", str(bundle), str(dest)])  # hard links: cheap; replaced files break them
        return dest

    def verify(path: Path) -> subprocess.CompletedProcess:
        return _run([sys.executable, "-I", "-B", str(path / "install.py"), "--verify-only",
                     "--prefix", str(tmp_path / "nowhere")])

    good = verify(copy())
    assert good.returncode == 0, good.stderr
    wheel = sorted((bundle / "wheels").glob("spake2-*.whl"))[0].name

    changed = copy()
    data = (changed / "wheels" / wheel).read_bytes()
    (changed / "wheels" / wheel).unlink()
    (changed / "wheels" / wheel).write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    result = verify(changed)
    assert result.returncode == 2
    assert f"wheels/{wheel}: its SHA-256 does not match" in _one_error_line(result)

    resummed = copy()  # the attacker also fixes SHA256SUMS: then the signature no longer fits
    (resummed / "wheels" / wheel).unlink()
    (resummed / "wheels" / wheel).write_bytes(data + b"x")
    sums = (resummed / "SHA256SUMS").read_text().splitlines()
    digest = installer._sha256(resummed / "wheels" / wheel)
    sums = [f"{digest}  wheels/{wheel}" if line.endswith(f"  wheels/{wheel}") else line
            for line in sums]
    (resummed / "SHA256SUMS").unlink()
    (resummed / "SHA256SUMS").write_text("\n".join(sums) + "\n")
    result = verify(resummed)
    assert result.returncode == 2
    assert "is not a valid signature of SHA256SUMS" in _one_error_line(result)

    extra = copy()
    shutil.copyfile(bundle / "wheels" / wheel, extra / "wheels" / "evil-1.0-py3-none-any.whl")
    result = verify(extra)
    assert result.returncode == 2
    assert "wheels/evil-1.0-py3-none-any.whl is in the bundle but not in the signed" in \
        _one_error_line(result)

    other_key = Ed25519PrivateKey.generate()
    resigned = copy()  # signed, but by a key this installer does not carry
    (resigned / "SHA256SUMS.sig").unlink()
    (resigned / "SHA256SUMS.sig").write_bytes(
        base64.b64encode(other_key.sign((resigned / "SHA256SUMS").read_bytes())) + b"\n")
    result = verify(resigned)
    assert result.returncode == 2
    assert "is not a valid signature" in _one_error_line(result)

    nosig = copy()
    (nosig / "SHA256SUMS.sig").unlink()
    result = verify(nosig)
    assert result.returncode == 2 and "no SHA256SUMS and SHA256SUMS.sig" in _one_error_line(result)


def _sqlite(site: dict) -> sqlite3.Connection:
    return sqlite3.connect(site["data"] / "hausmeister.sqlite3")


def _tables(site: dict) -> set[str]:
    with _sqlite(site) as db:
        return {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}


def test_upgrade_keeps_data_migrates_and_failed_upgrade_rolls_back(release, installed):
    site = installed
    first, post1, post2 = release["versions"]
    server = site["prefix"] / "current" / "venv" / "bin" / "hausmeister-server"
    added = _run([str(server), "--config", str(site["config"]), "user", "add", "carla",
                  "--role", "supporter", "--generate-password"])
    assert added.returncode == 0, added.stderr
    ca_before = (site["data"] / "certs" / "ca.crt").read_bytes()
    key_before = (site["data"] / "certs" / "ca.key").read_bytes()

    result = _install(release["bundles"][post1], site, "--no-compile")
    assert result.returncode == 0, result.stderr + result.stdout
    assert f"Hausmeister {first} -> {post1}" in result.stdout
    assert "-> 9901 (migrated)" in result.stdout
    assert (site["prefix"] / "current").resolve().name == post1
    assert "bundle_probe" in _tables(site)
    with _sqlite(site) as db:
        assert db.execute("SELECT count(*) FROM users WHERE name='carla'").fetchone()[0] == 1
        assert db.execute("SELECT version_num FROM alembic_version").fetchone()[0] == "9901"
    assert (site["data"] / "certs" / "ca.crt").read_bytes() == ca_before
    assert (site["data"] / "certs" / "ca.key").read_bytes() == key_before
    server = site["prefix"] / "current" / "venv" / "bin" / "hausmeister-server"
    check = _run([str(server), "--config", str(site["config"]), "check"])
    assert check.returncode == 0 and "schema current" in check.stdout, check.stdout

    again = _install(release["bundles"][post1], site)
    assert again.returncode == 0 and "already installed" in again.stdout

    failed = _install(release["bundles"][post2], site, "--no-compile")
    assert failed.returncode == 1
    line = _one_error_line(failed)
    assert f"upgrade to {post2} failed" in line and f"rolled back to {post1}" in line
    assert "this migration fails on purpose" in line or "migration failed" in line
    assert (site["prefix"] / "current").resolve().name == post1
    assert "half_done" not in _tables(site)  # the snapshot undid the half-applied migration
    with _sqlite(site) as db:
        assert db.execute("SELECT version_num FROM alembic_version").fetchone()[0] == "9901"
    check = _run([str(server), "--config", str(site["config"]), "check"])
    assert check.returncode == 0 and "schema current" in check.stdout, check.stdout
    state = json.loads((site["prefix"] / "installed.json").read_text())
    assert state["version"] == post1


def test_fresh_install_from_a_backup(release, installed, tmp_path):
    """Disaster recovery: a new machine installs the bundle and starts from the backup."""
    server = installed["prefix"] / "current" / "venv" / "bin" / "hausmeister-server"
    backup = tmp_path / "backup.tar.gz.enc"
    passphrase = tmp_path / "passphrase"
    passphrase.write_text("recovery passphrase\n")
    made = _run([str(server), "--config", str(installed["config"]), "backup", "--passphrase-file",
                 str(passphrase), str(backup)])
    assert made.returncode == 0, made.stderr
    users = _run([str(server), "--config", str(installed["config"]), "user", "list"]).stdout
    site = _site(tmp_path / "new-machine")
    result = _install(release["bundles"][release["versions"][1]], site, "--no-compile",
                      "--restore", str(backup), "--restore-passphrase-file", str(passphrase))
    assert result.returncode == 0, result.stderr + result.stdout
    assert "restored" in result.stdout and "Admin password" not in result.stdout
    ca = (installed["data"] / "certs" / "ca.crt").read_bytes()
    assert (site["data"] / "certs" / "ca.crt").read_bytes() == ca
    new_server = site["prefix"] / "current" / "venv" / "bin" / "hausmeister-server"
    assert _run([str(new_server), "--config", str(site["config"]), "user", "list"]).stdout == users
    assert not list(site["data"].glob(".restore-*"))  # the staged copies are gone


def test_bundle_of_another_release_key_is_refused_by_an_installation(release, installed, tmp_path):
    """A bundle that is self-consistent but made with a different key cannot upgrade."""
    bundle = tmp_path / "foreign"
    shutil.copytree(release["bundles"][release["versions"][1]], bundle)
    other = Ed25519PrivateKey.generate()
    other_pub = base64.b64encode(other.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw)).decode()
    script = (bundle / "install.py").read_text()
    script = re.sub(r'(?m)^RELEASE_PUBLIC_KEY = "[^"]*"', f'RELEASE_PUBLIC_KEY = "{other_pub}"',
                    script)
    (bundle / "install.py").write_text(script)
    sys.path.insert(0, str(PACKAGING))
    try:
        import build_bundle
    finally:
        sys.path.remove(str(PACKAGING))
    (bundle / "SHA256SUMS").write_bytes(build_bundle.sha256sums(bundle))
    (bundle / "SHA256SUMS").write_bytes(  # SHA256SUMS must not list itself
        b"".join(l for l in (bundle / "SHA256SUMS").read_bytes().splitlines(True)
                 if not l.rstrip().endswith((b"  SHA256SUMS", b"  SHA256SUMS.sig"))))
    (bundle / "SHA256SUMS.sig").write_bytes(
        base64.b64encode(other.sign((bundle / "SHA256SUMS").read_bytes())) + b"\n")
    result = _install(bundle, installed)
    assert result.returncode == 2
    assert "but the installed Hausmeister trusts" in _one_error_line(result)
