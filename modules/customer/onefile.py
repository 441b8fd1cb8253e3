"""Entry point of the customer module's one-file download (PyInstaller).

The server appends its address and CA fingerprint to the file it offers
(``protocol.embedded_settings``).  Started without arguments it opens the customer window (the
Qt app) on a desktop, or on a terminal names the server and asks for the 8-digit ID — either way
with the embedded server preset; ``check``, ``join`` and ``gui`` get the embedded server unless
the customer names one; ``update`` replaces the file with the server's signed newer download
(``modules.customer.update``).  Without embedded settings it is the plain ``hausmeister-customer``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from modules.common.errors import ModuleError
from modules.customer import cli, update
from protocol import embedded_settings

SERVER_OPTIONS = ("--server", "--ca-fingerprint", "--server-config")


def with_embedded(argv: list[str], settings: dict | None, ask=input,
                  desktop: bool = False) -> list[str]:
    """``argv`` with the embedded server filled in (the window, or the ID asked for, when the
    customer gave nothing)."""
    if not settings or any(a.split("=", 1)[0] in SERVER_OPTIONS for a in argv):
        return ["gui"] if desktop and not argv else argv
    preset = ["--server", settings["server"], "--ca-fingerprint", settings["ca_fingerprint"]]
    if not argv and desktop:
        return ["gui", *preset]
    if not argv:
        print(f"Hausmeister remote support: server {settings['server']}")
        print(f"Server fingerprint: {settings['ca_fingerprint']}")
        code = ask("Enter the 8-digit ID your supporter reads out: ")
        return ["join", *preset, *code.split()]
    if argv[0] in ("check", "join", "gui"):
        return [argv[0], *preset, *argv[1:]]
    if argv[0][:1].isdigit():
        return ["join", *preset, *argv]
    return argv


def main() -> int:
    settings = embedded_settings.read(sys.executable)
    if sys.argv[1:] == ["update"]:
        try:
            print(update.update(Path(sys.executable), settings))
            return 0
        except ModuleError as exc:
            print(f"hausmeister-customer: error: {exc}", file=sys.stderr)
            return 1
    try:
        desktop = bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))
        argv = with_embedded(sys.argv[1:], settings, desktop=desktop)
    except (EOFError, KeyboardInterrupt):
        return 130
    return cli.main(argv)


if __name__ == "__main__":
    sys.exit(main())
