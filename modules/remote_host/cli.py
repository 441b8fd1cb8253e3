"""``hausmeister-host``: enroll this machine as an unattended host and check its connection."""

from __future__ import annotations

import argparse
import secrets
import socket
import sys

from twisted.internet import defer

from modules.common.link import enrollment
from modules.common.terminal.cli import (
    ModuleError, add_home, add_server_options, add_status_renew, folder_of, main_wrapper,
    read_secret, run_reactor, server_and_fingerprint,
)
from modules.remote_host import settings
from modules.common.link.connection import MODULE_VERSION
from modules.common.session.consent import Role
from modules.common.session import recorder
from modules.common.session.session_runner import CliDelegate
from modules.common.terminal.stream_cli import (
    add_file_options, add_screen_options, add_viewer_options, consent_ui, exit_code, print_windows, say, screen_offer,
    session_options,
)
from modules.common.terminal.interrupts import interrupts
from modules.remote_host.service import HostService

KIND = "host"
RESUME_WAIT_SECONDS = recorder.RESUME_WAIT_SECONDS  # --pipe: how long a cut-off recording may take to go up on exit


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
    if args.list_windows:
        return print_windows(args)
    folder = folder_of(args, KIND)
    folder.require_enrolled(KIND)
    if folder.renewal_due():
        enrollment.renew(folder)
    screen = screen_offer(with_saved_screen(args, folder))
    ended: dict = {}

    async def main(reactor):
        from protocol.runtime import start_logging
        start_logging(args.log_level, "text", quiet_twisted=True)
        stops = interrupts(reactor)  # Ctrl+C: emergency stop of the session; without one, stop

        def on_change() -> None:
            runner = service.runner
            stops.session(runner.emergency_stop if runner is not None else None,
                          runner.toggle_pause if runner is not None else None)

        service = HostService(
            reactor, folder, make_ui=lambda: consent_ui(args, Role.HOST),
            make_delegate=lambda offer: CliDelegate(), screen=screen, pipe=args.pipe,
            options=session_options(args), max_backoff=args.max_backoff, on_change=on_change,
            tell=say)
        await service.start()
        say(f"host {folder.identity().name} online; waiting for supporters "
            f"(Ctrl+C during a session stops that session; otherwise it stops this host)")
        reactor.addSystemEventTrigger("before", "shutdown", service.stop)
        if args.pipe:   # --pipe serves one session, then exits
            ended["reason"] = await service.sessions
            if recorder.waiting_count():  # cut off by a lost connection: sent once back
                say(f"waiting up to {RESUME_WAIT_SECONDS:.0f} s to upload the rest of the "
                    f"session recording")
                await recorder.settled(reactor, RESUME_WAIT_SECONDS)
            await service.stop()
        else:
            await defer.Deferred()  # run until stopped
    run_reactor(main)
    return exit_code(ended.get("reason"))


def cmd_set_password(args: argparse.Namespace) -> int:
    from modules.common.session.channel import new_host_secret
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


def with_saved_screen(args: argparse.Namespace, folder) -> argparse.Namespace:
    """``--screen`` as given, or else the screen this host was configured to share."""
    if getattr(args, "screen", None) is None:
        saved = settings.load_screen(folder)
        if saved.source:
            args.screen = saved.source
            if getattr(args, "screen_password_file", None) is None:
                args.screen_password_file = saved.password_file
            if getattr(args, "screen_owner", None) is None:
                args.screen_owner = saved.owner
    return args


def cmd_screen(args: argparse.Namespace) -> int:
    folder = folder_of(args, KIND)
    folder.require_enrolled(KIND)
    if args.clear:
        setting = settings.ScreenSetting()
        settings.save_screen(folder, setting)
    elif args.screen or args.screen_password_file or args.screen_owner:
        setting = settings.ScreenSetting(args.screen, args.screen_password_file,
                                         args.screen_owner)
        if args.screen and args.screen.lower().startswith("vnc://"):
            screen_offer(args)   # the checks of `run`: loopback only, password file readable
        settings.save_screen(folder, setting)
    else:
        setting = settings.load_screen(folder)
    print(f"screen: {setting.source or 'none configured (run takes --screen)'}"
          + (f"   password file: {setting.password_file}" if setting.password_file else "")
          + (f"   owner: {setting.owner}" if setting.owner else ""))
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

    s = sub.add_parser("screen", help="show or set the screen run and gui share without "
                       "--screen: an X display or a VNC server on this machine")
    add_home(s, KIND)
    s.add_argument("--screen", metavar="DISPLAY|vnc://127.0.0.1:5900",
                   help="an X display (:0) or a VNC server on this machine "
                        "(vnc://127.0.0.1:5900: wayvnc, gnome-remote-desktop, x11vnc, x0vncserver)")
    s.add_argument("--screen-password-file", metavar="FILE",
                   help="the VNC server's password is the first line of FILE (the path is "
                        "stored, not the password)")
    s.add_argument("--screen-owner", metavar="USER",
                   help="the desktop user whose VNC server it is (this module runs as root; "
                        "a listener of anyone else is refused)")
    s.add_argument("--clear", action="store_true", help="forget the configured screen")
    s.set_defaults(func=cmd_screen)

    s = sub.add_parser("run", help="stay connected to the server and accept sessions")
    add_home(s, KIND)
    add_screen_options(s)
    add_viewer_options(s)   # the supporter's screen, after a direction change
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

    s = sub.add_parser("gui", help="the host's status window: online state, the session, "
                       "emergency stop, policy and password")
    add_home(s, KIND)
    add_screen_options(s)
    s.add_argument("--language", choices=["de", "en"], help="default: the system's language")
    s.set_defaults(func=cmd_gui)
    return p


def cmd_gui(args: argparse.Namespace) -> int:
    from modules.remote_host.gui import run
    return run(args)


def main(argv: list[str] | None = None) -> int:
    return main_wrapper("hausmeister-host", build_parser(), argv)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
