"""``hausmeister-customer``: the ad-hoc module a customer starts.

Joining a session by its 8-digit ID arrives with the brokering work; today the module can check
that it reaches the right server (CA pinned by fingerprint) over the module port, without any
certificate of its own.
"""

from __future__ import annotations

import argparse
import sys

from cryptography.hazmat.primitives import serialization

from modules.common.cli import add_server_options, main_wrapper, run_reactor, server_and_fingerprint
from modules.common.connection import MODULE_VERSION, ServerAddress, connect, hello
from modules.common.enrollment import fetch_pinned_ca, server_info


def cmd_check(args: argparse.Namespace) -> int:
    server, fp = server_and_fingerprint(args)
    ca = fetch_pinned_ca(server, fp)
    info = server_info(server, ca)
    host, port = info["module_host"], int(info["module_port"])
    result: dict = {}

    async def main(reactor):
        conn = await connect(reactor, ServerAddress(host, port),
                             ca.public_bytes(serialization.Encoding.PEM), None)
        try:
            result.update(await hello(conn, "customer"))
        finally:
            conn.transport.loseConnection()
    run_reactor(main)
    print(f"reached Hausmeister {result['server_version']} at {host}:{port} "
          f"as {result['identity']}; the server's CA matches the fingerprint")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hausmeister-customer",
                                description="Hausmeister ad-hoc customer module.")
    p.add_argument("--version", action="version", version=f"%(prog)s {MODULE_VERSION}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)
    s = sub.add_parser("check", help="check that this module reaches the server (no certificate needed)")
    add_server_options(s)
    s.set_defaults(func=cmd_check)
    return p


def main(argv: list[str] | None = None) -> int:
    return main_wrapper("hausmeister-customer", build_parser(), argv)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
