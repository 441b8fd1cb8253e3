"""``hausmeister-customer``: the ad-hoc module a customer starts.

``hausmeister-customer 1234 5678`` joins the supporter who read out that ID.  The module has no
certificate: it trusts the server only through the CA fingerprint it was shipped with (or given),
and sends the server only the first four digits (the nameplate); the last four stay here.
"""

from __future__ import annotations

import argparse
import sys

from cryptography.hazmat.primitives import serialization

from modules.common.terminal.cli import (
    add_server_options, main_wrapper, run_reactor, server_and_fingerprint,
)
from modules.common.link.connection import MODULE_VERSION, ServerAddress, connect, hello
from modules.common.link.enrollment import fetch_pinned_ca, server_info
from modules.common.session.session_runner import CliDelegate
from modules.common.terminal.stream_cli import (
    add_session_options, consent_ui, exit_code, print_windows, run_to_end, say, screen_offer,
    session_options,
)
from modules.common.session import recorder
from modules.common.session.recorder import RESUME_WAIT_SECONDS
from modules.customer.join import join, parse_adhoc_id, upload_cut_off_recording


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


def cmd_join(args: argparse.Namespace) -> int:
    if args.list_windows:
        return print_windows(args)
    adhoc_id = " ".join(args.id)
    parse_adhoc_id(adhoc_id)   # a wrong ID is refused before anything goes out
    server, fp = server_and_fingerprint(args)
    ended: dict = {}

    async def main(reactor):
        def make_ui(ticket, consent):
            say(f"joined the session of supporter {ticket['supporter']}")
            return consent_ui(args, consent.role)
        conn, runner = await join(reactor, server, fp, adhoc_id, make_ui,
                                  delegate=CliDelegate(), pipe=args.pipe,
                                  screen=screen_offer(args), **session_options(args))
        try:
            ended["reason"] = await run_to_end(reactor, runner)
        finally:
            if conn.transport is not None:  # None once the connection was lost
                conn.transport.loseConnection()
        if recorder.waiting_count():  # the connection was lost while the screen was recorded
            say(f"uploading the rest of the session recording (up to "
                f"{RESUME_WAIT_SECONDS:.0f} s) ...")
            done = await upload_cut_off_recording(reactor, server, fp, RESUME_WAIT_SECONDS)
            say("the session recording is complete on the server" if done else
                "the rest of the session recording could not be uploaded")
    run_reactor(main)
    return exit_code(ended.get("reason"))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hausmeister-customer",
                                description="Hausmeister ad-hoc customer module.")
    p.add_argument("--version", action="version", version=f"%(prog)s {MODULE_VERSION}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)
    s = sub.add_parser("check", help="check that this module reaches the server (no certificate needed)")
    add_server_options(s)
    s.set_defaults(func=cmd_check)
    s = sub.add_parser("join", help="join a supporter's session with the 8-digit ID (the default: "
                       "`hausmeister-customer 1234 5678` means `join 1234 5678`)")
    add_server_options(s)
    s.add_argument("id", nargs="*", help="the 8-digit ID your supporter read out, e.g. 1234 5678")
    add_session_options(s)
    s.set_defaults(func=cmd_join)
    s = sub.add_parser("gui", help="the customer's window: type the ID, answer each question, "
                       "stop everything with one button")
    add_server_options(s)
    s.add_argument("--language", choices=["de", "en"], help="default: the system's language")
    s.add_argument("--screen", metavar="DISPLAY",
                   help="the X display to share (default: $DISPLAY, the one the window is on)")
    s.set_defaults(func=cmd_gui)
    return p


def cmd_gui(args: argparse.Namespace) -> int:
    from modules.customer.gui import run
    return run(args)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    takes_value = {"--server", "--ca-fingerprint", "--server-config", "--answers"}
    for i, arg in enumerate(argv):
        if arg.startswith("-") or (i and argv[i - 1] in takes_value):
            continue
        if arg[:1].isdigit():  # `hausmeister-customer 1234 5678` is short for `join 1234 5678`
            argv.insert(0, "join")
        break
    return main_wrapper("hausmeister-customer", build_parser(), argv)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
