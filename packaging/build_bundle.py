#!/usr/bin/env python3
"""``make bundle``: write ``dist/hausmeister-<version>-offline.tar``, signed by the release key.

    HAUSMEISTER_RELEASE_KEY=~/hausmeister-release.key make bundle
    .venv/bin/python packaging/build_bundle.py --key FILE [--wheels download|installed]
                                               [--debs download|none] [--with-postgresql]

The tar holds one folder ``hausmeister-<version>/`` with ``install.sh`` and ``install.py`` (the
release key's public half written into it), ``wheels/`` (Hausmeister and every dependency for
this Python and platform, plus pip), ``debs/`` (what a minimal Debian 12 lacks, see debs.py),
``systemd/``, ``config/hausmeister.example.toml``, ``BUNDLE.json`` and ``SHA256SUMS`` with its
signature ``SHA256SUMS.sig``.  Only ``--wheels download`` and ``--debs download`` use the
registries; ``--wheels installed`` repacks the wheels of the running environment (tests).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import build_customer_onefile  # noqa: E402
import debs  # noqa: E402
import release_key  # noqa: E402
import wheelhouse  # noqa: E402

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
KEY_LINE = 'RELEASE_PUBLIC_KEY = ""'
UNIT_SUFFIXES = (".service", ".timer")


def sha256sums(folder: Path) -> bytes:
    lines = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        name = path.relative_to(folder).as_posix()
        lines.append(f"{hashlib.sha256(path.read_bytes()).hexdigest()}  {name}\n")
    return "".join(lines).encode()


def _tar_filter(info: tarfile.TarInfo) -> tarfile.TarInfo:
    info.uid = info.gid = 0
    info.uname = info.gname = "root"
    info.mtime = int(os.environ.get("SOURCE_DATE_EPOCH", info.mtime))
    return info


def export_commit(commit: str, dest: Path) -> str:
    """The committed tree (not the work tree with others' unfinished edits) to build from."""
    full = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--verify", commit + "^{commit}"],
                          check=True, capture_output=True, text=True).stdout.strip()
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", "--format=tar", full],
                             check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    return full


def build(args: argparse.Namespace) -> Path:
    if args.source:
        return _build(args, Path(args.source).resolve(), "work tree")
    with tempfile.TemporaryDirectory() as tmp:
        commit = export_commit(args.commit, Path(tmp))
        return _build(args, Path(tmp), commit)


def _build(args: argparse.Namespace, source: Path, origin: str) -> Path:
    started = time.monotonic()
    key = release_key.load(args.key)
    public = release_key.public_b64(key)
    project = wheelhouse.read_project(source)
    version = project["version"]
    extras = wheelhouse.bundle_extras(project) if args.extras is None else \
        [e for e in args.extras.split(",") if e and e != "none"]
    out = Path(args.out).resolve()
    stage = out / f"hausmeister-{version}"
    if stage.exists():
        shutil.rmtree(stage)
    wheels = stage / "wheels"
    own = wheelhouse.project_wheel(source, wheels)
    if args.wheels == "download":
        wheelhouse.download(own, extras, wheels)
    elif args.wheel_cache:
        cache = Path(args.wheel_cache)
        if not any(cache.glob("*.whl")):
            wheelhouse.repack_installed(project, extras, cache)
        for wheel in cache.glob("*.whl"):
            shutil.copyfile(wheel, wheels / wheel.name)
    else:
        wheelhouse.repack_installed(project, extras, wheels)
    deb_dir = stage / "debs"
    deb_dir.mkdir()
    needed: list[str] = []
    if args.debs == "download":
        _base, needed = debs.needed_packages(args.with_postgresql)
        debs.download(needed, deb_dir)
    modules = stage / "modules"
    modules.mkdir()
    if args.customer_onefile == "build":
        build_customer_onefile.build(modules, source)
    units = stage / "systemd"
    units.mkdir()
    for unit in sorted((HERE / "systemd").iterdir()):
        if unit.suffix in UNIT_SUFFIXES:
            shutil.copyfile(unit, units / unit.name)
    (stage / "config").mkdir()
    shutil.copyfile(source / "config" / "hausmeister.example.toml",
                    stage / "config" / "hausmeister.example.toml")
    installer = (HERE / "install.py").read_text()
    if KEY_LINE not in installer:
        raise SystemExit("error: packaging/install.py lost its RELEASE_PUBLIC_KEY line")
    (stage / "install.py").write_text(installer.replace(KEY_LINE, f'RELEASE_PUBLIC_KEY = "{public}"'))
    shutil.copyfile(HERE / "install.sh", stage / "install.sh")
    os.chmod(stage / "install.sh", 0o755)
    meta = {"name": project["name"], "version": version, "extras": extras,
            "python": f"cp{sys.version_info.major}{sys.version_info.minor}",
            "machine": platform.machine(), "built": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "release_key": public, "release_key_fingerprint": release_key.fingerprint(public),
            "wheels": sorted(p.name for p in wheels.glob("*.whl")),
            "debs": sorted(p.name for p in deb_dir.glob("*.deb")), "debs_needed": needed,
            "modules": sorted(p.name for p in modules.iterdir()),
            "wheel_source": args.wheels, "source": origin}
    (stage / "BUNDLE.json").write_text(json.dumps(meta, indent=1) + "\n")
    sums = sha256sums(stage)
    (stage / "SHA256SUMS").write_bytes(sums)
    (stage / "SHA256SUMS.sig").write_bytes(release_key.sign(key, sums))
    tar_path = out / f"hausmeister-{version}-offline.tar"
    with tarfile.open(tar_path.with_suffix(".tmp"), "w", format=tarfile.PAX_FORMAT) as tar:
        for path in sorted(stage.rglob("*")):
            tar.add(path, arcname=path.relative_to(out).as_posix(), recursive=False,
                    filter=_tar_filter)
    tar_path.with_suffix(".tmp").replace(tar_path)
    shutil.rmtree(stage)
    size = tar_path.stat().st_size
    print(f"{tar_path}: {size / 2**20:.1f} MiB, {len(meta['wheels'])} wheels, "
          f"{len(meta['debs'])} debs, {time.monotonic() - started:.1f} s")
    print(f"release key fingerprint: {meta['release_key_fingerprint']}")
    return tar_path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="build_bundle.py", description=__doc__.splitlines()[0])
    p.add_argument("--key", default=os.environ.get("HAUSMEISTER_RELEASE_KEY"),
                   help="release key file (default: $HAUSMEISTER_RELEASE_KEY)")
    p.add_argument("--out", default=str(ROOT / "dist"))
    p.add_argument("--commit", default="HEAD", help="git commit to bundle (default: HEAD)")
    p.add_argument("--source", help="bundle this folder instead of a git commit")
    p.add_argument("--wheels", choices=["download", "installed"], default="download")
    p.add_argument("--wheel-cache", metavar="DIR", help="with --wheels installed: repack into "
                   "DIR once and reuse those wheels for later bundles")
    p.add_argument("--debs", choices=["download", "none"], default="download")
    p.add_argument("--extras", help="optional dependency groups to carry, comma-separated, or "
                   "'none' (default: all but test, i.e. the desktop apps' Qt for hosts)")
    p.add_argument("--customer-onefile", choices=["build", "none"], default="build",
                   help="build the customer module as one file (PyInstaller) into modules/")
    p.add_argument("--with-postgresql", action="store_true",
                   help="also carry PostgreSQL's Debian packages")
    args = p.parse_args(argv)
    if not args.key:
        print("build_bundle: error: no release key: pass --key FILE or set HAUSMEISTER_RELEASE_KEY "
              "(create one with `packaging/release_key.py create FILE`)", file=sys.stderr)
        return 2
    try:
        build(args)
    except release_key.KeyError_ as exc:
        print(f"build_bundle: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
