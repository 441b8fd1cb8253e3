"""Can the operator's folders take what the server must write?  (protocols, recordings)

A trusted audit system never runs a session it cannot record, so the server asks before a
session starts (``probe``), ``check`` and start-up print what is wrong, and the broker ends a
running session whose protocol write fails.  Blocking calls: run them off the reactor.
"""

from __future__ import annotations

import os
import secrets
import shutil
from pathlib import Path
from typing import Any, Callable

Usage = Callable[[str], Any]  # shutil.disk_usage: .total .used .free


def _existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def probe(folder: Path) -> str | None:
    """None if a file can be created, written, fsynced and removed in ``folder`` (created if
    missing); else one line saying what failed and what to do."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True, mode=0o750)
    except OSError as exc:
        return f"{folder} cannot be created: {exc.strerror or exc}; create it or fix its parent's permissions"
    if not folder.is_dir():
        return f"{folder} is not a folder"
    path = folder / f".write-probe-{secrets.token_hex(6)}"
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, b"probe\n")
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as exc:
        return (f"{folder} is not writable: {exc.strerror or exc}; make it writable for the "
                "server's user (and mounted read-write with free space)")
    finally:
        try:
            path.unlink()
        except OSError:
            pass
    return None


def low_space(folder: Path, min_free_percent: int, usage: Usage = shutil.disk_usage) -> str | None:
    """One line if the disk of ``folder`` has less free space than ``min_free_percent``."""
    if min_free_percent <= 0:
        return None
    try:
        figures = usage(str(_existing(Path(folder))))
    except OSError as exc:
        return f"free space of {folder} cannot be read: {exc.strerror or exc}"
    if not figures.total:
        return None
    free = 100.0 * figures.free / figures.total
    if free >= min_free_percent:
        return None
    return (f"{folder} has {free:.1f} % free ({figures.free // (1024 * 1024)} MiB), below the "
            f"floor of {min_free_percent} % (alerts.disk_free_percent): free space or move the folder")


def folder_problems(folders: dict[str, Path], min_free_percent: int,
                    usage: Usage = shutil.disk_usage) -> list[tuple[str, Path, str]]:
    """``(what, folder, problem)`` for each of the operator's folders that is not fit."""
    problems = []
    for what, folder in folders.items():
        problem = probe(folder) or low_space(folder, min_free_percent, usage)
        if problem:
            problems.append((what, Path(folder), problem))
    return problems


def operator_folders(config: Any) -> dict[str, Path]:
    return {"protocol": config.server.protocol_dir, "recording": config.server.recording_dir}


__all__ = ["probe", "low_space", "folder_problems", "operator_folders"]
