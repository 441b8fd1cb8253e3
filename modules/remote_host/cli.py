"""``hausmeister-host``: enroll this machine as an unattended host and check its connection."""

from __future__ import annotations

import argparse
import secrets
import socket
import sys

from twisted.internet import defer
from twisted.logger import Logger

from modules.common import enrollment
from modules.common.cli import (
    ModuleError, add_home, add_server_options, add_status_renew, folder_of, main_wrapper,
    read_secret, run_reactor, server_and_fingerprint,
)
from modules.remote_host import settings
from modules.common.connection import MODULE_VERSION, address_of
from modules.common.channel import Credentials, SessionChannel
from modules.common.consent import ConsentState
from modules.common.stream_cli import (
    add_file_options, add_screen_options, exit_code, run_secure_session, say,
)
from modules.common.interrupts import interrupts
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
    salt, secret = settings.load_secret(folder)
    policy = settings.load_policy(folder)
    ca_pem = folder.ca_path.read_bytes()
    credentials = Credentials.from_pem(folder.cert_path.read_bytes(), folder.key_path.read_bytes())
    ended: dict = {}

    async def main(reactor):
        from protocol.runtime import start_logging
        start_logging(args.log_level, "text", quiet_twisted=True)
        finished: defer.Deferred = defer.Deferred()
        busy = {"session": False}

        def admit(confirmed) -> str | None:
            supporter = (confirmed.peer_identity or "").rsplit(":", 1)[-1]
            if not policy.admits(supporter):
                return f"supporter {supporter} is not on this host's allow-list"
            return None

        def on_offer(offer: dict):
            if not policy.admits(offer["supporter"]):
                log.warn("declined session {session_id}: supporter {supporter} is not on this "
                         "host's allow-list", **offer)
                return False
            if not args.pipe and not args.screen:
                log.warn("declined session {session_id} from {supporter}: nothing to share "
                         "(run with --screen DISPLAY or --pipe)", **offer)
                return False
            if busy["session"]:
                log.warn("declined session {session_id} from {supporter}: already in a session",
                         **offer)
                return False
            busy["session"] = True
            say(f"supporter {offer['supporter']} connects: session {offer['session_id']}")

            def channel(session_id: str) -> SessionChannel:
                return SessionChannel("peer", secret, session_id, mode="host", host_salt=salt,
                                      credentials=credentials,
                                      ca_certificate=folder.ca_certificate(),
                                      expected_peer=f"hausmeister:supporter:{offer['supporter']}",
                                      peer_fingerprint=offer["supporter_fingerprint"] or None)

            def serve():
                consent = ConsentState("host", policy={
                    "view": policy.view, "control": policy.control, "files": policy.files})
                d = defer.ensureDeferred(run_secure_session(
                    reactor, offer, ca_pem, folder, channel, consent, args,
                    presence.connection, admit=admit))
                def done(reason):
                    busy["session"] = False
                    if args.pipe and not finished.called:
                        ended["reason"] = reason
                        finished.callback(reason)  # --pipe serves one session, then exits

                def failed(failure):
                    # e.g. a wrong password: the host stays online for the right one
                    busy["session"] = False
                    say(f"session {offer['session_id']} failed: {failure.getErrorMessage()}")
                d.addCallbacks(done, failed)
            reactor.callLater(0, serve)  # answer the offer first, then open the relay leg
            return True

        presence = HostPresence(reactor, folder, address_of(folder), on_offer,
                                max_backoff=args.max_backoff)
        presence.start()
        await presence.registered
        interrupts(reactor)  # Ctrl+C: emergency stop of the session; without one, stop
        say(f"host {folder.identity().name} online; waiting for supporters "
            f"(Ctrl+C during a session stops that session; otherwise it stops this host)")
        reactor.addSystemEventTrigger("before", "shutdown", presence.stop)
        await finished  # only --pipe finishes (after its one session); otherwise run until stopped
        await presence.stop()
    run_reactor(main)
    return exit_code(ended.get("reason"))


def cmd_set_password(args: argparse.Namespace) -> int:
    from modules.common.channel import new_host_secret
    folder = folder_of(args, KIND)
    folder.require_enrolled(KIND)
    if args.generate:
        password = secrets.token_urlsafe(12)
    else:
        password = read_secret(args, "Session password for this host: ")
        if len(password) < 8:
            raise ModuleError("the session password is too short: use at least 8 characters")
    salt, secret = new_host_secret(password)
    settings.save_secret(folder, salt, secret)
    print("session password set; this host stores only its argon2id hash")
    if args.generate:
        print(f"password: {password}   <- shown once; supporters type it to connect")
    return 0


def cmd_policy(args: argparse.Namespace) -> int:
    folder = folder_of(args, KIND)
    folder.require_enrolled(KIND)
    policy = settings.load_policy(folder)
    changed = False
    for right in settings.RIGHTS:
        value = getattr(args, right)
        if value:
            setattr(policy, right, value)
            changed = True
    if args.allow_supporter:
        policy.supporters = sorted(set(policy.supporters) | set(args.allow_supporter))
        changed = True
    if args.any_supporter:
        policy.supporters = []
        changed = True
    if changed:
        settings.save_policy(folder, policy)
    print(f"view: {policy.view}   control: {policy.control}   files: {policy.files}")
    print("supporters: " + (", ".join(policy.supporters) if policy.supporters
                            else "any supporter the server lets through"))
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
    s = sub.add_parser("set-password", help="set the session password supporters type to connect")
    add_home(s, KIND)
    pw = s.add_mutually_exclusive_group()
    pw.add_argument("--password-stdin", action="store_true", help="read it from standard input")
    pw.add_argument("--generate", action="store_true", help="generate one and print it once")
    s.set_defaults(func=cmd_set_password)

    s = sub.add_parser("policy", help="show or set what this host allows unattended")
    add_home(s, KIND)
    for right, what in (("view", "seeing the screen"), ("control", "mouse and keyboard"),
                        ("files", "file transfer")):
        s.add_argument(f"--{right}", choices=settings.CHOICES,
                       help=f"{what}: allow, deny, or ask the logged-in user")
    s.add_argument("--allow-supporter", action="append", metavar="USER",
                   help="only these supporters may connect (repeatable)")
    s.add_argument("--any-supporter", action="store_true",
                   help="drop the supporter allow-list")
    s.set_defaults(func=cmd_policy)

    s = sub.add_parser("run", help="stay connected to the server and accept sessions")
    add_home(s, KIND)
    add_screen_options(s)
    add_file_options(s)
    s.add_argument("--pipe", action="store_true",
                   help="serve one session with stdin/stdout as its stream, then exit")
    s.add_argument("--answers", metavar="SOURCE",
                   help="where the logged-in user's answers come from when the policy says "
                        "ask: a file, a file descriptor number, or the terminal (default)")
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
