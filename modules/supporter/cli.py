"""``hausmeister-supporter``: enroll this supporter module and check its connection."""

from __future__ import annotations

import argparse
import json
import sys

from twisted.internet import defer

from modules.common.link import enrollment
from modules.common.link.failures import explain
from modules.common.terminal.cli import (
    ModuleError, add_home, add_server_options, add_status_renew, folder_of, main_wrapper,
    read_secret, run_reactor, server_and_fingerprint,
)
from modules.common.link.connection import (
    MODULE_VERSION, addresses_of, connect, greeted, hello,
)
from modules.common.session.consent import Role
from modules.common.session.session_runner import CliDelegate
from modules.common.terminal.stream_cli import (
    add_session_options, consent_ui, exit_code, print_windows, run_to_end, say, screen_offer,
    session_options,
)
from modules.supporter.host_directory import HostDirectory
from modules.supporter.adhoc_offer import (
    AdhocOffer, CustomerJoined, IdOffered, IdReplaced, Offline, ReplaceReason,
)
from modules.supporter.sessions import connect_host, list_hosts

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


def _control(args: argparse.Namespace):
    folder = folder_of(args, KIND)
    folder.require_enrolled(KIND)
    return folder, addresses_of(folder), folder.ca_path.read_bytes()


def _options(args: argparse.Namespace) -> dict:
    return dict(delegate=CliDelegate(), pipe=args.pipe, screen=screen_offer(args),
                wrap_report=_local_copy(args), **session_options(args))


def _local_copy(args: argparse.Namespace):
    from pathlib import Path

    from modules.common.terminal.stream_cli import with_local_copy
    copy = getattr(args, "protocol_copy", None)
    return (lambda report, sid: with_local_copy(report, Path(copy), sid)) if copy else None


def _validity(seconds: float) -> str:
    return f"{int(seconds // 60)} min" if seconds >= 120 else f"{int(seconds)} s"


class AdhocLines:
    """``adhoc``: one line on stderr per change of the ID on offer (the offer's events)."""

    def adhoc_event(self, event) -> None:
        if isinstance(event, IdOffered):
            say(f"ad-hoc ID: {event.adhoc_id}  (valid {_validity(event.expires_in)}; tell it "
                "to your customer)")
            say("waiting for the customer ...")
        elif isinstance(event, Offline):
            if isinstance(event.why, BaseException):   # an attempt to connect again failed
                say(f"still not connected, trying again in {event.retry_in:.1f} s: "
                    f"{explain(event.why)}")
            else:
                say(f"lost the connection to the server ({event.why}): the ID {event.old_id} "
                    f"is no longer valid; trying again in {event.retry_in:.1f} s")
        elif isinstance(event, IdReplaced):
            if event.reason is ReplaceReason.CONNECTION_LOST:
                why = "the connection to the server was lost"
            elif event.old_valid_for:
                why = (f"{event.old_id} is about to expire unused; a customer who already has it "
                       f"can still use it for {event.old_valid_for:.0f} s")
            else:
                why = f"{event.old_id} expired unused"
            say(f"new ad-hoc ID: {event.adhoc_id}  ({why}; tell your customer the new ID, "
                f"valid {_validity(event.expires_in)})")
        elif isinstance(event, CustomerJoined):
            say(f"customer joined from {event.peer_address}")


def cmd_adhoc(args: argparse.Namespace) -> int:
    if args.list_windows:
        return print_windows(args)
    folder = _control(args)[0]
    ended: dict = {}

    async def main(reactor):
        # the ID stays on offer until the customer joins: a lost connection or an expired ID
        # draws a new one (a line each); Ctrl+C ends
        offer = AdhocOffer(reactor, lambda: greeted(reactor, folder, KIND), AdhocLines())
        await offer.start()
        invitation, ticket = await offer.joined
        runner = await invitation.session(reactor, folder, ticket,
                                          consent_ui(args, Role.SUPPORTER), **_options(args))
        ended["reason"] = await run_to_end(reactor, runner)
        invitation.conn.transport.loseConnection()
    run_reactor(main)
    return exit_code(ended.get("reason"))


def _print_hosts(hosts: list, as_json: bool) -> None:
    if as_json:
        print(json.dumps(hosts, indent=1), flush=True)
        return
    if not hosts:
        print("no hosts you may reach", flush=True)
        return
    print(f"{'STATUS':8} {'NAME':24} {'GROUP':14} {'LAST SEEN':20} {'ADDRESS':16} HOST ID")
    for h in hosts:
        seen = h["last_seen"][:19].replace("T", " ") if h["last_seen"] else "never"
        print(f"{'online' if h['online'] else 'offline':8} {h['name'][:24]:24} {h['group'][:14]:14} "
              f"{seen:20} {h['address'][:16]:16} {h['host_id']}")
    sys.stdout.flush()


def _print_change(host: dict, as_json: bool) -> None:
    """One line per presence change the server pushes (``--watch``)."""
    if as_json:
        print(json.dumps({k: host[k] for k in ("host_id", "name", "online", "last_seen",
                                               "address")}), flush=True)
        return
    seen = host["last_seen"][:19].replace("T", " ") if host["last_seen"] else "never"
    print(f"{'online' if host['online'] else 'offline':8} {host['name'][:24]:24} {seen:20} "
          f"{host['address'][:16]:16} {host['host_id']}", flush=True)


class WatchLines:
    """``hosts --watch``: the host directory's events as lines (changes on stdout, the
    connection's state on stderr)."""

    def __init__(self, as_json: bool) -> None:
        self.as_json = as_json
        self.shown = False

    def hosts_listed(self, hosts: list, changed: list) -> None:
        if not self.shown:
            _print_hosts(hosts, self.as_json)
            self.shown = True
        for host in changed:
            _print_change(host, self.as_json)

    def host_changed(self, host: dict) -> None:
        _print_change(host, self.as_json)

    def connection_changed(self, state: str, why, retry_in: float) -> None:
        if state == "online":
            say("connected to the server again; the list is current")
            return
        if isinstance(why, BaseException):   # an attempt to connect again failed
            say(f"still not connected, trying again in {retry_in:.0f} s: {explain(why)}")
        else:
            say(f"lost the connection to the server ({why}): trying again in {retry_in:.0f} s")


def cmd_hosts(args: argparse.Namespace) -> int:
    folder = _control(args)[0]
    hosts: list = []

    async def main(reactor):
        if not args.watch:
            conn = await greeted(reactor, folder, KIND)
            hosts.extend(await list_hosts(conn))
            conn.transport.loseConnection()
            return
        # the server pushes each listed host's changes (no polling); a lost connection is
        # retried until Ctrl+C
        directory = HostDirectory(reactor, lambda: greeted(reactor, folder, KIND),
                                  WatchLines(args.json))
        await directory.start()
        await defer.Deferred()   # until interrupted
    run_reactor(main)
    if not args.watch:
        _print_hosts(hosts, args.json)
    return 0


def _host_password(args: argparse.Namespace) -> str:
    if args.password_file:
        try:
            with open(args.password_file) as fh:
                password = fh.readline().rstrip("\n")
        except OSError as exc:
            raise ModuleError(f"--password-file {args.password_file}: {exc.strerror}")
    elif args.pipe:
        raise ModuleError("with --pipe, stdin is the session: give the host password with "
                          "--password-file FILE")
    else:
        password = read_secret(args, f"Session password of host {args.host}: ")
    if not password:
        raise ModuleError("the host password is empty")
    return password


def cmd_connect(args: argparse.Namespace) -> int:
    if args.list_windows:
        return print_windows(args)
    folder, address, ca_pem = _control(args)
    password = _host_password(args)
    ended: dict = {}

    async def main(reactor):
        conn = await connect(reactor, address, ca_pem, folder)
        await hello(conn, KIND)
        runner = await connect_host(
            reactor, conn, folder, args.host, password, consent_ui(args, Role.SUPPORTER),
            on_accepted=lambda ticket: say(f"host {ticket['host_name']} ({ticket['host_id']}) "
                                           f"accepted the session"), **_options(args))
        ended["reason"] = await run_to_end(reactor, runner)
        conn.transport.loseConnection()
    run_reactor(main)
    return exit_code(ended.get("reason"))


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

    s = sub.add_parser("adhoc", help="get an 8-digit ad-hoc ID for a customer and wait for them")
    add_home(s, KIND)
    add_session_options(s, supporter=True)
    s.set_defaults(func=cmd_adhoc)

    s = sub.add_parser("hosts", help="list the hosts you may reach, online first")
    add_home(s, KIND)
    s.add_argument("--json", action="store_true", help="print JSON instead of a table")
    s.add_argument("--watch", action="store_true",
                   help="stay connected and print a line whenever a listed host comes online or "
                   "goes offline (pushed by the server; Ctrl+C ends)")
    s.set_defaults(func=cmd_hosts)

    s = sub.add_parser("connect", help="start a session with an unattended host")
    add_home(s, KIND)
    s.add_argument("host", help="host id or name (see `hosts`)")
    add_session_options(s, supporter=True)
    s.add_argument("--password-file", metavar="FILE",
                   help="read the host's session password from the first line of FILE")
    s.add_argument("--password-stdin", action="store_true",
                   help="read the host's session password from standard input (not with --pipe)")
    s.set_defaults(func=cmd_connect)

    s = sub.add_parser("gui", help="the supporter's window: host list, double-click into a live "
                       "viewer, ad-hoc sessions (enrolls on the first start)")
    add_home(s, KIND)
    s.add_argument("--server", help="preset for the enrollment dialog")
    s.add_argument("--ca-fingerprint", metavar="FP", help="preset for the enrollment dialog")
    s.add_argument("--language", choices=["de", "en"], help="default: the system's language")
    s.set_defaults(func=cmd_gui)
    return p


def cmd_gui(args: argparse.Namespace) -> int:
    from modules.supporter.gui import run
    return run(args)


def main(argv: list[str] | None = None) -> int:
    return main_wrapper("hausmeister-supporter", build_parser(), argv)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
