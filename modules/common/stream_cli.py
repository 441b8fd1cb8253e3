"""Running a session stream from a module CLI: open the relay leg, then pipe or hold it."""

from __future__ import annotations

import sys

from .folder import ModuleFolder
from .session_stream import discard, open_leg, pipe_stdio


def say(message: str) -> None:
    """Status lines go to stderr: with --pipe, stdout is the session stream."""
    print(message, file=sys.stderr, flush=True)


async def run_stream(reactor, ticket: dict, ca_pem: bytes, folder: ModuleFolder | None,
                     pipe: bool) -> str:
    leg = await open_leg(reactor, ticket["relay_host"], int(ticket["relay_port"]),
                         ticket["relay_token"], ca_pem, folder)
    say(f"session {leg.session_id} connected through the relay")
    reason = await (pipe_stdio(leg, reactor) if pipe else discard(leg))
    say(f"session {leg.session_id} ended ({reason}); {leg.bytes_out} bytes sent, "
        f"{leg.bytes_in} received")
    return reason
