"""``hausmeister-supporter``: enroll this supporter module and check its connection."""

from __future__ import annotations

import argparse
import sys

from modules.common import enrollment
from modules.common.cli import (
    add_home, add_server_options, add_status_renew, folder_of, main_wrapper, read_secret,
    server_and_fingerprint,
)
from modules.common.connection import MODULE_VERSION

KIND = "supporter"


def cmd_enroll(args: argparse.Namespace) -> int:
    server, fp = server_and_fingerprint(args)
    folder = folder_of(args, KIND)
    if folder.is_enrolled() and not args.force:
        print(f"hausmeister-supporter: error: already enrolled as {folder.identity()} in {folder.path}: "
              "pass --force to enroll again (the old certificate stays valid until revoked)",
              file=sys.stderr)
        return 1
    password = read_secret(args, f"Password for {args.user}: ")
    identity = enrollment.enroll_supporter(folder, server, fp, args.user, password)
    print(f"enrolled as {identity}; key and certificate in {folder.path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hausmeister-supporter",
                                description="Hausmeister supporter module.")
    p.add_argument("--version", action="version", version=f"%(prog)s {MODULE_VERSION}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)
    s = sub.add_parser("enroll", help="get a supporter certificate with your user name and password")
    add_server_options(s)
    s.add_argument("--user", required=True, help="your user name on the server")
    s.add_argument("--password-stdin", action="store_true",
                   help="read the password from standard input instead of asking")
    s.add_argument("--force", action="store_true", help="enroll again over an existing enrollment")
    add_home(s, KIND)
    s.set_defaults(func=cmd_enroll)
    add_status_renew(sub, KIND)
    return p


def main(argv: list[str] | None = None) -> int:
    return main_wrapper("hausmeister-supporter", build_parser(), argv)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
