"""The wheels of the bundle: Hausmeister's own wheel and one wheel per dependency.

* ``project_wheel`` builds ``hausmeister-<version>-py3-none-any.whl`` straight from the source
  tree with ``zipfile`` (no setuptools/wheel needed, the same bytes every time).  It carries the
  packages ``server``, ``protocol``, ``modules`` and the ``offline_pages`` folder the server reads
  beside its package (``server/web.py``: ``<site-packages>/offline_pages``).
* ``download`` is the registry step of ``make bundle``: ``pip download --only-binary=:all:`` of
  every dependency (and pip itself, which the installer runs from its wheel).
* ``repack_installed`` makes the same set of wheels offline from an environment that already has
  them installed (each distribution's RECORD lists its files; console scripts are left out because
  pip writes them again from ``entry_points.txt``).  Tests use it so they need no registry.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import importlib.metadata as md
import io
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

PROJECT_PACKAGES = ("server", "protocol", "modules")
PROJECT_DATA = ("offline_pages",)
#: a fixed time for every zip entry, so the same tree gives the same wheel
ZIP_TIME = (2024, 1, 1, 0, 0, 0)


def read_project(root: Path) -> dict:
    return tomllib.loads((root / "pyproject.toml").read_text())["project"]


def bundle_extras(project: dict) -> list[str]:
    """Optional dependency groups the appliance carries: all but the test tools."""
    return sorted(k for k in project.get("optional-dependencies", {}) if k != "test")


def _record_hash(data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"sha256={digest}"


def _write_wheel(path: Path, files: dict[str, bytes], dist_info: str) -> Path:
    """Write ``files`` (archive name -> bytes) plus a fresh RECORD as a wheel."""
    rows = [(name, _record_hash(data), str(len(data))) for name, data in files.items()]
    record_name = f"{dist_info}/RECORD"
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerows(rows + [(record_name, "", "")])
    tmp = path.with_suffix(".tmp")
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in list(files.items()) + [(record_name, buf.getvalue().encode())]:
            info = zipfile.ZipInfo(name, ZIP_TIME)
            info.external_attr = (0o755 if name.endswith(".so") else 0o644) << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(info, data)
    tmp.replace(path)
    return path


def _tree_files(root: Path, top: str) -> dict[str, bytes]:
    files = {}
    for path in sorted((root / top).rglob("*")):
        rel = path.relative_to(root)
        if path.is_file() and "__pycache__" not in rel.parts and path.suffix != ".pyc":
            files[rel.as_posix()] = path.read_bytes()
    return files


def project_wheel(root: Path, dest: Path, version: str | None = None) -> Path:
    """Hausmeister's own wheel, built from the source tree ``root``."""
    project = read_project(root)
    name, version = project["name"], version or project["version"]
    dist_info = f"{name}-{version}.dist-info"
    files: dict[str, bytes] = {}
    for top in PROJECT_PACKAGES + PROJECT_DATA:
        files.update(_tree_files(root, top))
    meta = [f"Metadata-Version: 2.1", f"Name: {name}", f"Version: {version}",
            f"Summary: {project.get('description', '')}",
            f"Requires-Python: {project.get('requires-python', '>=3.11')}"]
    meta += [f"Requires-Dist: {req}" for req in project.get("dependencies", [])]
    for extra, reqs in sorted(project.get("optional-dependencies", {}).items()):
        meta.append(f"Provides-Extra: {extra}")
        for req in reqs:
            r = Requirement(req)
            marker = f"({r.marker}) and extra == '{extra}'" if r.marker else f"extra == '{extra}'"
            r.marker = None
            meta.append(f"Requires-Dist: {r}; {marker}")
    files[f"{dist_info}/METADATA"] = ("\n".join(meta) + "\n").encode()
    files[f"{dist_info}/WHEEL"] = (b"Wheel-Version: 1.0\nGenerator: hausmeister-packaging\n"
                                   b"Root-Is-Purelib: true\nTag: py3-none-any\n")
    scripts = project.get("scripts", {})
    files[f"{dist_info}/entry_points.txt"] = ("[console_scripts]\n" + "".join(
        f"{k} = {v}\n" for k, v in sorted(scripts.items()))).encode()
    files[f"{dist_info}/top_level.txt"] = ("\n".join(PROJECT_PACKAGES + PROJECT_DATA) + "\n").encode()
    dest.mkdir(parents=True, exist_ok=True)
    return _write_wheel(dest / f"{name}-{version}-py3-none-any.whl", files, dist_info)


def download(project_whl: Path, extras: list[str], dest: Path, python: str = sys.executable) -> None:
    """The registry step: every dependency as a binary wheel for this Python and platform."""
    spec = f"{read_wheel_name(project_whl)}[{','.join(extras)}] @ {project_whl.resolve().as_uri()}" \
        if extras else str(project_whl.resolve())
    subprocess.run([python, "-m", "pip", "download", "-q", "--only-binary=:all:", "-d", str(dest),
                    spec, "pip"], check=True)


def read_wheel_name(path: Path) -> str:
    return path.name.split("-")[0]


# --- wheels from an installed environment -----------------------------------------------------

def _closure(requirements: list[str]) -> dict[str, md.Distribution]:
    """Installed distributions that ``requirements`` need (markers evaluated for this Python)."""
    found: dict[str, md.Distribution] = {}
    done: set[tuple[str, str]] = set()
    todo = [(Requirement(r), "") for r in requirements]
    while todo:
        req, extra = todo.pop()
        if req.marker is not None and not req.marker.evaluate({**default_environment(),
                                                               "extra": extra}):
            continue
        key = canonicalize_name(req.name)
        if key not in found:
            try:
                found[key] = md.distribution(req.name)
            except md.PackageNotFoundError:
                raise SystemExit(f"error: {req.name} is not installed in {sys.prefix}: install it "
                                 "(make install) or build the bundle with pip download")
        for want in {""} | set(req.extras):
            if (key, want) not in done:
                done.add((key, want))
                todo += [(Requirement(r), want) for r in (found[key].requires or [])]
    return found


def _wheel_tag(wheel_text: str) -> str:
    tags = [line.split(":", 1)[1].strip() for line in wheel_text.splitlines()
            if line.startswith("Tag:")]
    parts = [sorted({t.split("-")[i] for t in tags}) for i in range(3)]
    return "-".join(".".join(p) for p in parts)


SKIPPED_META = {"RECORD", "INSTALLER", "REQUESTED", "direct_url.json"}


def repack(dist: md.Distribution, dest: Path) -> Path:
    """One installed distribution back into a wheel, from the files its RECORD lists."""
    files: dict[str, bytes] = {}
    dist_info = None
    if not dist.files:
        raise SystemExit(f"error: {dist.metadata['Name']} has no RECORD: cannot make a wheel of it")
    for entry in dist.files:
        name = entry.as_posix()
        if name.startswith("..") or "__pycache__" in entry.parts or name.endswith(".pyc"):
            continue  # console scripts (pip writes them again) and byte code
        top = entry.parts[0]
        if top.endswith(".dist-info"):
            dist_info = top
            if entry.name in SKIPPED_META:
                continue
        path = Path(dist.locate_file(entry))
        if path.is_file():
            files[name] = path.read_bytes()
    if dist_info is None or f"{dist_info}/WHEEL" not in files:
        raise SystemExit(f"error: {dist.metadata['Name']} was not installed from a wheel")
    tag = _wheel_tag(files[f"{dist_info}/WHEEL"].decode())
    stem = dist_info[: -len(".dist-info")]
    dest.mkdir(parents=True, exist_ok=True)
    return _write_wheel(dest / f"{stem}-{tag}.whl", files, dist_info)


def repack_installed(project: dict, extras: list[str], dest: Path) -> list[Path]:
    requirements = list(project.get("dependencies", []))
    for extra in extras:
        requirements += project["optional-dependencies"][extra]
    requirements.append("pip")
    return [repack(dist, dest) for dist in _closure(requirements).values()]
