#!/usr/bin/env python3
"""The customer module as one file for Linux x86-64 (PyInstaller), without server settings.

    .venv/bin/python packaging/build_customer_onefile.py [--out DIR] [--source DIR]

The result, ``hausmeister-customer-linux-x86_64``, is the customer's window (PySide6) on a
desktop and the terminal module elsewhere; it goes into the offline bundle; the installed
server appends its own address and CA fingerprint when it puts the file on its download page
(``hausmeister-server downloads add-customer FILE``).  Needs PyInstaller (in the test extras).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NAME = "hausmeister-customer-linux-x86_64"


def build(out: Path, source: Path = ROOT) -> Path:
    started = time.monotonic()
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="onefile-") as tmp:
        subprocess.run([sys.executable, "-m", "PyInstaller", "--onefile", "--noconfirm",
                        "--log-level", "WARN", "--name", NAME, "--paths", str(source),
                        "--distpath", str(out), "--workpath", tmp, "--specpath", tmp,
                        # the window (modules/customer/gui.py) is imported lazily: name it
                        "--hidden-import", "modules.customer.gui",
                        str(source / "modules" / "customer" / "onefile.py")], check=True)
    path = out / NAME
    print(f"{path}: {path.stat().st_size / 2**20:.1f} MiB, {time.monotonic() - started:.0f} s")
    return path


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=ROOT / "dist")
    p.add_argument("--source", type=Path, default=ROOT)
    args = p.parse_args()
    build(args.out, args.source)
    return 0


if __name__ == "__main__":
    sys.exit(main())
