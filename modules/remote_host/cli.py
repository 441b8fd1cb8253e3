"""``hausmeister-host``: enroll this machine as an unattended host and check its connection."""

from __future__ import annotations

import argparse
import socket
import sys

from twisted.internet import defer
from twisted.logger import Logger

from modules.common import enrollment
from modules.common.cli import (
    add_home, add_server_options, add_status_renew, folder_of, main_wrapper, run_reactor,
    server_and_fingerprint,
)
from modules.common.connection import MODULE_VERSION, address_of
from modules.common.stream_cli import run_stream, say
from modules.remote_host.presence import HostPresence

KIND = "host"
log = Logger()


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


def cmd_run(args: argparse.Namespace) -> int:
    folder = folder_of(args, KIND)
    folder.require_enrolled(KIND)
    if folder.renewal_due():
        enrollment.renew(folder)
    ca_pem = folder.ca_path.read_bytes()

    async def main(reactor):
        from protocol.runtime import start_logging
        start_logging(args.log_level, "text")
        finished: defer.Deferred = defer.Deferred()
        busy = {"session": False}

        def on_offer(offer: dict):
            if not args.pipe:
                log.warn("declined session {session_id} from {supporter}: this host has no "
                         "session service yet (run with --pipe)", **offer)
                return False
            if busy["session"]:
                log.warn("declined session {session_id} from {supporter}: already in a session",
                         **offer)
                return False
            busy["session"] = True
            say(f"supporter {offer['supporter']} connects: session {offer['session_id']}")

            def serve():
                d = defer.ensureDeferred(run_stream(reactor, offer, ca_pem, folder, True))
                d.addBoth(lambda r: finished.called or finished.callback(r))
            reactor.callLater(0, serve)  # answer the offer first, then open the relay leg
            return True

        presence = HostPresence(reactor, folder, address_of(folder), on_offer,
                                max_backoff=args.max_backoff)
        presence.start()
        await presence.registered
        say(f"host {folder.identity().name} online; waiting for supporters")
        reactor.addSystemEventTrigger("before", "shutdown", presence.stop)
        await finished  # only --pipe finishes (after its one session); otherwise run until stopped
        await presence.stop()
    run_reactor(main)
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
    s = sub.add_parser("run", help="stay connected to the server and accept sessions")
    add_home(s, KIND)
    s.add_argument("--pipe", action="store_true",
                   help="serve one session with stdin/stdout as its stream, then exit")
    s.add_argument("--max-backoff", type=float, default=60.0,
                   help="longest wait between reconnect attempts in seconds (default 60)")
    s.add_argument("--log-level", default="info",
                   choices=["debug", "info", "warn", "error", "critical"])
    s.set_defaults(func=cmd_run)
    return p


def main(argv: list[str] | None = None) -> int:
    return main_wrapper("hausmeister-host", build_parser(), argv)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
