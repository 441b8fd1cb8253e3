"""The Debian packages a minimal Debian 12 lacks for the server, found by apt's own resolver.

"Minimal Debian 12" is what debootstrap installs by default: every package of Priority
``required`` or ``important`` and what those depend on.  We never guess the difference by hand:

1. the seeds are the ``required``/``important`` packages of the machine's apt lists
   (``apt-cache dumpavail``);
2. ``apt-get -s install SEEDS`` against an *empty* dpkg status file gives that base system as apt
   would install it (alternatives and virtual packages resolved the way apt resolves them);
3. ``apt-get -s install --no-install-recommends python3-venv [postgresql]`` against a status file
   that says exactly that base system is installed lists what the bundle must carry;
4. ``apt-get download`` fetches those ``.deb`` files (the one step here that needs the registry).

Steps 1–3 read only the local apt lists (``apt-get update`` first), so they run offline.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
from pathlib import Path

#: what the server needs from Debian beyond the base system: a Python with venv (and pip's wheel)
SERVER_PACKAGES = ("python3-venv",)
POSTGRESQL_PACKAGES = ("postgresql",)


def _simulate(status_file: Path, packages: list[str]) -> list[str]:
    """Package names apt would install on a system whose dpkg status is ``status_file``."""
    out = subprocess.run(
        ["apt-get", "-s", "-o", f"Dir::State::status={status_file}",
         "-o", "APT::Install-Recommends=false", "-o", "APT::Install-Suggests=false",
         "install", *packages],
        check=True, capture_output=True, text=True, env={**os.environ, "LC_ALL": "C"}).stdout
    return [line.split()[1] for line in out.splitlines() if line.startswith("Inst ")]


def base_seeds() -> list[str]:
    """Packages of Priority required or important in the apt lists."""
    dump = subprocess.run(["apt-cache", "dumpavail"], check=True, capture_output=True,
                          text=True).stdout
    seeds, name = set(), None
    for line in dump.splitlines():
        if line.startswith("Package: "):
            name = line.split(None, 1)[1]
        elif line.startswith("Priority: ") and line.split(None, 1)[1] in ("required", "important"):
            seeds.add(name)
    return sorted(seeds)


def _status_of(packages: list[str]) -> str:
    """A dpkg status file saying ``packages`` (the apt candidates) are installed."""
    shown = subprocess.run(["apt-cache", "show", "--no-all-versions", *packages], check=True,
                           capture_output=True, text=True).stdout
    lines = []
    for line in shown.splitlines():
        lines.append(line)
        if line.startswith("Package: "):
            lines.append("Status: install ok installed")
    return "\n".join(lines) + "\n"


def needed_packages(with_postgresql: bool = False) -> tuple[list[str], list[str]]:
    """(the base system, the packages the bundle must carry on top of it)."""
    wanted = list(SERVER_PACKAGES) + (list(POSTGRESQL_PACKAGES) if with_postgresql else [])
    with tempfile.TemporaryDirectory() as tmp:
        empty = Path(tmp, "empty-status")
        empty.write_text("")
        base = _simulate(empty, base_seeds())
        base_status = Path(tmp, "base-status")
        base_status.write_text(_status_of(base))
        return base, _simulate(base_status, wanted)


def download(packages: list[str], dest: Path) -> list[Path]:
    """``apt-get download`` the packages into ``dest`` (needs the Debian registry)."""
    dest.mkdir(parents=True, exist_ok=True)
    # root downloads itself (apt's _apt user may not write into a private build folder)
    subprocess.run(["apt-get", "download", "-q", "-o", "APT::Sandbox::User=root", *packages],
                   cwd=dest, check=True)
    return sorted(dest.glob("*.deb"))
