"""What the three module CLIs share: the module folder option, enrollment options, password
input, and running a Twisted coroutine on the asyncio reactor with one-line errors."""

from __future__ import annotations

import argparse
import getpass
import sys
from pathlib import Path
from typing import Any, Callable, Coroutine

from twisted.internet import defer as tdefer

from modules.common.errors import ModuleError  # noqa: F401 (printed as <prog>: error: ...)
from modules.common.link import enrollment

from modules.common.link import proxy

from modules.common.link import ws_tunnel
from modules.common.link.failures import explain
from modules.common.link.connection import address_of, addresses_of, connect, hello
from modules.common.link.servers import ServersError, server_list, set_servers
from modules.common.link.folder import ModuleFolder, ModuleFolderError, default_home


#: How long ``status`` waits for the TLS handshake and the Hello answer together.
HELLO_TIMEOUT_SECONDS = 30.0


class UsageError(ModuleError):
    """A command line the module cannot use: exit 2."""

    exit_code = 2


def add_home(parser: argparse.ArgumentParser, kind: str) -> None:
    parser.add_argument("--home", type=Path, default=None,
                        help=f"module folder with key and certificate (default: $HAUSMEISTER_HOME "
                             f"or ~/.config/hausmeister/{kind})")


def folder_of(args: argparse.Namespace, kind: str) -> ModuleFolder:
    return ModuleFolder(args.home or default_home(kind))


def add_server_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--server", help="the server's HTTPS address, e.g. https://hausmeister.lan:8443")
    parser.add_argument("--ca-fingerprint", metavar="FP",
                        help="SHA-256 fingerprint of the server's CA, as your administrator gave it")
    parser.add_argument("--server-config", metavar="FILE",
                        help="downloaded server config (TOML/JSON with server and ca_fingerprint) "
                             "instead of --server/--ca-fingerprint")


def server_and_fingerprint(args: argparse.Namespace) -> tuple[str, str]:
    if args.server_config:
        return enrollment.read_server_config(args.server_config)
    if not args.server or not args.ca_fingerprint:
        raise ModuleError("say where the server is: --server URL --ca-fingerprint FP "
                          "(or --server-config FILE)")
    return args.server, args.ca_fingerprint


def read_secret(args: argparse.Namespace, prompt: str) -> str:
    if getattr(args, "password_stdin", False):
        line = sys.stdin.readline().rstrip("\n")
        if not line:
            raise ModuleError("no password on standard input (--password-stdin expects one line)")
        return line
    if not sys.stdin.isatty():
        raise ModuleError("no terminal to ask for the password: use --password-stdin")
    return getpass.getpass(prompt)


def run_reactor(main: Callable[[Any], Coroutine]) -> None:
    """Run ``main(reactor)`` on the asyncio reactor; its exceptions propagate as ModuleError."""
    from twisted.internet import asyncioreactor
    asyncioreactor.install()
    from twisted.internet import defer, task
    outcome: dict[str, BaseException] = {}

    def wrapped(reactor):
        d = defer.ensureDeferred(main(reactor))
        d.addErrback(lambda f: outcome.setdefault("error", f.value))
        return d
    try:
        task.react(wrapped)
    except SystemExit as exit_:
        if "error" not in outcome and exit_.code:
            raise
    if "error" in outcome:
        raise explain(outcome["error"]) from None


def status(args: argparse.Namespace, kind: str) -> int:
    """Renew the certificate if due, then a mutual-TLS Hello on the module port."""
    folder = folder_of(args, kind)
    folder.require_enrolled(kind)
    if folder.renewal_due() and not args.no_renew:
        identity = enrollment.renew(folder)
        print(f"certificate renewed for {identity}")
    result: dict = {}

    async def main(reactor):
        conn = await connect(reactor, addresses_of(folder), folder.ca_path.read_bytes(), folder)
        try:
            answer = tdefer.ensureDeferred(hello(conn, kind))
            answer.addTimeout(HELLO_TIMEOUT_SECONDS, reactor)
            result.update(await answer)
        finally:
            conn.transport.loseConnection()
    run_reactor(main)
    cert = folder.certificate()
    print(f"server:      {folder.settings()['server']} (module port "
          f"{address_of(folder).host}:{address_of(folder).port}), version {result['server_version']}")
    print(f"identity:    {result['identity']} (role {result['role']}, tenant {result['tenant']})")
    print(f"certificate: serial {cert.serial_number:x}, valid until "
          f"{cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC")
    through = proxy.proxy_for(address_of(folder).host)
    transport = "WebSocket over TLS" if ws_tunnel.enabled() else "TLS"
    print(f"path:        {'through the proxy ' + through.shown if through else 'direct'} "
          f"({transport})")
    return 0


def renew_command(args: argparse.Namespace, kind: str) -> int:
    folder = folder_of(args, kind)
    folder.require_enrolled(kind)
    if not args.force and not folder.renewal_due():
        until = folder.certificate().not_valid_after_utc
        print(f"certificate valid until {until:%Y-%m-%d}; renewal not due yet (use --force)")
        return 0
    identity = enrollment.renew(folder)
    print(f"certificate renewed for {identity}, valid until "
          f"{folder.certificate().not_valid_after_utc:%Y-%m-%d %H:%M} UTC")
    return 0


def add_status_renew(sub, kind: str) -> None:
    s = sub.add_parser("status", help="connect to the server with this module's certificate and "
                       "show who the server says we are (renews the certificate when due)")
    add_home(s, kind)
    s.add_argument("--no-renew", action="store_true", help="do not renew even if due")
    s.set_defaults(func=lambda a: status(a, kind))
    s = sub.add_parser("renew", help="renew this module's certificate (new key, same identity)")
    add_home(s, kind)
    s.add_argument("--force", action="store_true", help="renew even if not due yet")
    s.set_defaults(func=lambda a: renew_command(a, kind))
    s = sub.add_parser("servers", help="show or set the server addresses this module tries in "
                       "turn (the nodes of a server with several nodes)")
    add_home(s, kind)
    s.add_argument("address", nargs="*", metavar="HOST:PORT",
                   help="module ports to try, first one first (e.g. node-a.lan:8444 "
                        "node-b.lan:8444); --reset goes back to the enrolled one")
    s.add_argument("--reset", action="store_true", help="use only the address from enrollment")
    s.set_defaults(func=lambda a: servers_command(a, kind))


def servers_command(args: argparse.Namespace, kind: str) -> int:
    folder = folder_of(args, kind)
    folder.require_enrolled(kind)
    if args.address or args.reset:
        try:
            set_servers(folder, [] if args.reset else args.address)
        except ServersError as exc:
            raise UsageError(f"{exc}; nothing was changed")
    for host, port in server_list(folder):
        print(f"[{host}]:{port}" if ":" in host else f"{host}:{port}")
    return 0


def _proxy_first(argv: list[str]) -> list[str]:
    """``--proxy URL`` and ``--websocket`` may stand anywhere on the command line; argparse
    wants them before the command, where they are declared."""
    front, rest, i = [], [], 0
    while i < len(argv):
        if argv[i] == "--websocket":
            front.append(argv[i])
            i += 1
            continue
        if argv[i] == "--proxy" and i + 1 < len(argv):
            front += argv[i:i + 2]
            i += 2
            continue
        (front if argv[i].startswith("--proxy=") else rest).append(argv[i])
        i += 1
    return front + rest


def main_wrapper(prog: str, parser: argparse.ArgumentParser, argv: list[str] | None) -> int:
    parser.add_argument("--proxy", metavar="URL",
                        help="reach the server through this HTTP proxy with CONNECT, e.g. "
                             "http://USER:PASSWORD@proxy.lan:3128 (default: $https_proxy)")
    parser.add_argument("--websocket", action="store_true",
                        help="connect through a WebSocket over TLS, where only web traffic "
                             "passes (needs the server's single port, listen.single_port)")
    args = parser.parse_args(_proxy_first(list(sys.argv[1:] if argv is None else argv)))
    ws_tunnel.configure(args.websocket)
    try:
        proxy.configure(args.proxy)
    except ValueError as exc:
        print(f"{prog}: error: --proxy: {exc}", file=sys.stderr)
        return 2
    try:
        return args.func(args)
    except (ModuleError, enrollment.EnrollmentFailed, ModuleFolderError, proxy.ProxyError) as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return getattr(exc, "exit_code", 1)  # 2 for a usage error such as a bad --server-config
    except KeyboardInterrupt:
        return 130


__all__ = ["ModuleError", "add_home", "add_server_options", "folder_of", "main_wrapper",
           "read_secret", "run_reactor", "server_and_fingerprint", "add_status_renew"]
