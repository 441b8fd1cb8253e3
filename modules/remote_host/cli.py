"""``hausmeister-host``: enroll this machine as an unattended host and check its connection."""

from __future__ import annotations

import argparse
import socket
import sys

from modules.common import enrollment
from modules.common.cli import (
    add_home, add_server_options, add_status_renew, folder_of, main_wrapper,
    server_and_fingerprint,
)
from modules.common.connection import MODULE_VERSION

KIND = "host"


def cmd_enroll(args: argparse.Namespace) -> int:
    server, fp = server_and_fingerprint(args)
    folder = folder_of(args, KIND)
    if folder.is_enrolled() and not args.force:
        print(f"hausmeister-host: error: already enrolled as {folder.identity()} in {folder.path}: "
              "pass --force to enroll again with a new token", file=sys.stderr)
        return 1
    identity = enrollment.enroll_host(folder, server, fp, args.token, args.name)
    print(f"enrolled as host {args.name!r}, host id {identity.name}; key and certificate in {folder.path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hausmeister-host",
                                description="Hausmeister unattended remote-host module.")
    p.add_argument("--version", action="version", version=f"%(prog)s {MODULE_VERSION}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)
    s = sub.add_parser("enroll", help="enroll this machine with a one-time token from an admin")
    add_server_options(s)
    s.add_argument("--token", required=True, help="one-time token (hausmeister-server token create)")
    s.add_argument("--name", default=socket.gethostname(),
                   help="name shown to supporters (default: this machine's host name)")
    s.add_argument("--force", action="store_true", help="enroll again over an existing enrollment")
    add_home(s, KIND)
    s.set_defaults(func=cmd_enroll)
    add_status_renew(sub, KIND)
    return p


def main(argv: list[str] | None = None) -> int:
    return main_wrapper("hausmeister-host", build_parser(), argv)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
