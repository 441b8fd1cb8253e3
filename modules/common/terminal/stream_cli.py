"""Running a session from a module CLI: open the relay leg, secure it, then pipe or hold it."""

from __future__ import annotations

import argparse
import datetime as dt
import io
import json
import sys
from pathlib import Path
from typing import Any, Callable

from modules.common.errors import ModuleError
from modules.common.session.consent import ConsentState
from modules.common.terminal.consent_terminal import TerminalConsentUI, open_answers
from modules.common.link.folder import ModuleFolder
from modules.common.terminal.interrupts import interrupts
from modules.common.session.session_runner import CliDelegate, open_session, say


def add_session_options(parser, supporter: bool = False) -> None:
    parser.add_argument("--pipe", action="store_true",
                        help="join stdin/stdout to the session stream (status goes to stderr)")
    parser.add_argument("--answers", metavar="SOURCE",
                        help="where consent answers are read from: a file, a file descriptor "
                             "number, or the terminal (default)")
    add_file_options(parser)
    parser.add_argument("--chat", action="append", default=[], metavar="TEXT",
                        help="send this chat message once the session is set up (repeatable)")
    add_screen_options(parser)   # the supporter shows its screen after a direction change
    add_viewer_options(parser)   # ... and the other side then sees it
    if supporter:
        add_supporter_options(parser)


def add_viewer_options(parser) -> None:
    """How whoever views shows the remote screen (every side, after a direction change)."""
    parser.add_argument("--vnc-listen", metavar="HOST:PORT",
                        help="show the remote screen to any VNC viewer on this loopback "
                             "address, e.g. 127.0.0.1:5901")
    parser.add_argument("--snapshot", metavar="PNG",
                        help="save the remote screen to this PNG file once it has arrived "
                             "(again after each direction change)")


def add_supporter_options(parser) -> None:
    """What only the supporter asks for: rights, its notes, and what it does on the remote screen."""
    parser.add_argument("--max-screen", metavar="WxH", type=_screen_limit,
                        help="the largest remote screen to accept, in either orientation "
                             "(default 7680x4320, 8K); a larger one is refused before "
                             "memory is set aside for it")
    parser.add_argument("--type", metavar="TEXT",
                        help="type TEXT into the remote screen once it has arrived "
                             "(needs the control right; \\n is Return)")
    parser.add_argument("--clipboard", metavar="TEXT",
                        help="put TEXT on the remote clipboard (needs control)")
    parser.add_argument("--clipboard-file", metavar="FILE",
                        help="write the remote clipboard's text to FILE whenever it changes")
    parser.add_argument("--request", default="view,control", metavar="RIGHTS",
                        help="rights to ask for, comma-separated: view, control, files "
                             "(default view,control)")
    parser.add_argument("--show-my-screen", action="store_true",
                        help="ask to show your own screen instead (a direction change)")
    parser.add_argument("--comment", action="append", default=[], metavar="TEXT",
                        help="a note for the session protocol only; the customer never "
                             "sees it (repeatable)")
    parser.add_argument("--protocol-copy", metavar="DIR",
                        help="also keep a local copy of this session's events in DIR "
                             "(one JSON-lines file per session)")


def _screen_limit(text: str):
    """``--max-screen WxH`` → ``ScreenLimit`` (imported here: the viewer needs numpy)."""
    from modules.supporter.rfb_client import ScreenLimit
    try:
        return ScreenLimit.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def consent_ui(args, me=None) -> TerminalConsentUI:
    try:
        answers = open_answers(args.answers)
    except OSError as exc:
        if args.answers:
            raise ModuleError(f"--answers {args.answers}: {exc.strerror}")
        # No terminal (a service, a script): every question is answered "no".
        say("no terminal to ask questions on: every consent question is answered no "
            "(use --answers to script them)")
        answers = io.StringIO("")
    return TerminalConsentUI(answers, sys.stderr, me=me)


def with_local_copy(report: Callable, folder: Path, session_id: str) -> Callable:
    """Every event this module reports is also appended to ``folder/<session>.jsonl``."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{session_id}.jsonl"

    def report_and_copy(kind: str, detail: dict):
        line = {"time": dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds"),
                "session": session_id, "kind": kind, "detail": detail}
        with open(path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(line, sort_keys=True, default=str) + "\n")
        return report(kind, detail)
    return report_and_copy


def add_file_options(parser) -> None:
    parser.add_argument("--send", action="append", default=[], metavar="FILE",
                        help="send this file once the files right is granted (repeatable)")
    parser.add_argument("--receive-dir", metavar="DIR",
                        help="accept files from the other side into DIR (without it, every "
                             "file offered is refused)")


def add_screen_options(parser) -> None:
    parser.add_argument("--screen", metavar="DISPLAY|vnc://127.0.0.1:5900",
                        help="share this X display (e.g. :0), or the screen of a VNC server on "
                             "this machine (vnc://127.0.0.1:5900: wayvnc, gnome-remote-desktop, "
                             "x11vnc, x0vncserver), once the supporter may see it")
    parser.add_argument("--screen-password-file", metavar="FILE",
                        help="the password of the VNC server --screen names (its first line)")
    parser.add_argument("--screen-owner", metavar="USER",
                        help="the user whose VNC server --screen names, when it is not this "
                             "module's user or root (a host module running as root sharing "
                             "the desktop user's wayvnc); anyone else's listener is refused")
    parser.add_argument("--window", metavar="TITLE|ID",
                        help="share only this window (its title or X window id), not the screen")
    parser.add_argument("--list-windows", action="store_true",
                        help="print the windows of --screen that --window can share, then exit")
    parser.add_argument("--hide-background", action="store_true",
                        help="show a flat colour instead of the desktop background")


def screen_offer(args):
    """(capture source, injector factory) for sharing the display ``args`` name, or None."""
    display = getattr(args, "screen", None)
    password_file = getattr(args, "screen_password_file", None)
    owner = getattr(args, "screen_owner", None)
    if not display:
        if password_file or owner:
            option = "--screen-password-file" if password_file else "--screen-owner"
            raise _usage(f"{option} needs --screen vnc://127.0.0.1:5900")
        return None
    window = getattr(args, "window", None)
    from modules.common.screen.capture_vnc import VncSourceError, is_vnc_url, vnc_screen_offer
    if is_vnc_url(display):
        try:
            return vnc_screen_offer(display, password_file, window=window, owner=owner,
                                    hide_background=getattr(args, "hide_background", False))
        except VncSourceError as exc:
            raise _usage(str(exc)) from None
    if password_file or owner:
        option = "--screen-password-file" if password_file else "--screen-owner"
        raise _usage(f"{option} applies to a VNC server (--screen vnc://127.0.0.1:5900), "
                     f"not to the X display {display}")
    from modules.common.screen.input_x11 import XTestInjector
    from modules.common.screen.capture_x11 import ScreenSource
    window = window_choice(window)
    try:
        source = ScreenSource(display, window=window,
                              hide_background=getattr(args, "hide_background", False))
    except Exception as exc:
        raise ModuleError(f"cannot share X display {display}: {exc}")

    def injector(allowed):
        # pointer positions are relative to the shared area (a window may be chosen later)
        return XTestInjector(display, allowed, origin=source.origin)
    return source, injector


def window_choice(text: str | None) -> int | str | None:
    """``--window``: an X window id (decimal, or hex as ``--list-windows`` prints it) or a
    title."""
    if not text:
        return None
    try:
        return int(text, 16) if text.lower().startswith("0x") else int(text, 10)
    except ValueError:
        return text


def print_windows(args) -> int:
    """``--list-windows``: one line per window of ``--screen`` (id, geometry, title)."""
    display = getattr(args, "screen", None)
    if not display:
        raise _usage("--list-windows needs the display to look at: add --screen DISPLAY (e.g. :0)")
    if display.startswith("vnc://"):
        raise _usage("--list-windows looks at an X display (--screen :0); a VNC server shows "
                     "its whole screen")
    from modules.common.screen.capture_vnc import is_vnc_url
    if is_vnc_url(display):
        raise _usage(f"--list-windows needs an X display: the VNC server at {display} decides "
                     "what it shows")
    from modules.common.screen.capture_x11 import ScreenSource
    try:
        source = ScreenSource(display, with_cursor=False)
    except Exception as exc:
        raise ModuleError(f"cannot open X display {display}: {exc}")
    try:
        windows = source.windows()
    finally:
        source.close()
    if not windows:
        print(f"no windows with a title on {display}")
    for window in windows:
        print(window.line())
    return 0


def _usage(text: str) -> ModuleError:
    error = ModuleError(text)
    error.exit_code = 2
    return error


async def run_secure_session(reactor, ticket: dict, ca_pem: bytes, folder: ModuleFolder | None,
                             make_channel: Callable[[str], Any], consent: ConsentState, args,
                             conn, host_password: str | None = None,
                             admit: Callable | None = None):
    """Run one session to its end; returns its ``EndReason`` (after one line saying it)."""
    copy = getattr(args, "protocol_copy", None)
    runner = await open_session(
        reactor, conn, ticket, ca_pem, folder, make_channel, consent,
        consent_ui(args, consent.role), delegate=CliDelegate(),
        wrap_report=(lambda report, sid: with_local_copy(report, Path(copy), sid)) if copy else None,
        pipe=args.pipe, host_password=host_password, admit=admit, screen=screen_offer(args),
        **session_options(args))
    return await run_to_end(reactor, runner)


async def run_to_end(reactor, runner):
    """The CLI's part of a session: Ctrl+C is its emergency stop; one line says how it ended."""
    leg = runner.leg
    say(f"session {leg.session_id} connected through the relay; securing it ...")
    stops = interrupts(reactor)
    stops.session(runner.emergency_stop, runner.toggle_pause)
    try:
        reason = await runner.run()
    finally:
        stops.session(None)
    say(f"session ended: {reason.text()} ({leg.bytes_out} bytes sent, {leg.bytes_in} received, "
        f"encrypted)")
    return reason


def session_options(args) -> dict:
    """The session's options from a CLI's arguments (``SessionRunner`` keyword arguments)."""
    rights = tuple(r.strip() for r in getattr(args, "request", "").split(",") if r.strip())
    return dict(request_rights=rights,
                show_my_screen=getattr(args, "show_my_screen", False),
                chat=tuple(getattr(args, "chat", ())),
                comments=tuple(getattr(args, "comment", ())),
                send_files=tuple(getattr(args, "send", ())),
                receive_dir=getattr(args, "receive_dir", None),
                viewer={"vnc_listen": getattr(args, "vnc_listen", None),
                        "snapshot": getattr(args, "snapshot", None),
                        "type": (getattr(args, "type", None) or "").replace("\\n", "\n"),
                        "clipboard": getattr(args, "clipboard", None),
                        "clipboard_file": getattr(args, "clipboard_file", None),
                        "max_screen": getattr(args, "max_screen", None)})


def exit_code(reason) -> int:
    """A module exits non-zero when its session did not end in order (``EndReason.abnormal``)."""
    return 1 if reason is not None and reason.abnormal else 0
