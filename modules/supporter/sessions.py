"""The supporter's ways into a session, for the CLI and the app alike: an unattended host by
id or name (``ConnectHost`` + the host password) or an ad-hoc customer (an 8-digit ID whose
last four digits never leave this machine)."""

from __future__ import annotations

import secrets
from typing import Any, Callable

from protocol import control

from ..common.session.channel import Credentials, SessionChannel, adhoc_password
from ..common.session.consent import ConsentState
from ..common.link.folder import ModuleFolder
from ..common.session.session_runner import SessionRunner, open_session, release_screen_offer


def credentials_of(folder: ModuleFolder) -> Credentials:
    return Credentials.from_pem(folder.cert_path.read_bytes(), folder.key_path.read_bytes())


async def list_hosts(conn) -> list[dict]:
    return (await conn.callRemote(control.ListHosts))["hosts"]


async def connect_host(reactor, conn, folder: ModuleFolder, host: str, password: str, ui: Any,
                       on_accepted: Callable[[dict], None] | None = None,
                       **options: Any) -> SessionRunner:
    """Ask the server for a session with ``host``; the host password keys the channel."""
    try:
        ticket = await conn.callRemote(control.ConnectHost, host=host)
    except BaseException:
        release_screen_offer(options.get("screen"))  # unknown, offline, refused, no connection
        raise
    if on_accepted is not None:
        on_accepted(ticket)

    def channel(session_id: str) -> SessionChannel:
        return SessionChannel("supporter", None, session_id, mode="host",
                              credentials=credentials_of(folder),
                              ca_certificate=folder.ca_certificate(),
                              expected_peer=f"hausmeister:host:{ticket['host_id']}",
                              peer_fingerprint=ticket["host_fingerprint"] or None)
    return await open_session(reactor, conn, ticket, folder.ca_path.read_bytes(), folder,
                              channel, ConsentState("supporter", peer="host"), ui,
                              host_password=password, **options)


def draw_secret(avoid: str | None = None) -> str:
    """The ID's last four digits (``secrets``); a new ID never repeats the old one's."""
    while True:
        secret = f"{secrets.randbelow(10_000):04d}"
        if secret != avoid:
            return secret


class AdhocInvitation:
    """One ad-hoc ID on one control connection: ``nameplate`` (allocated by the server) +
    ``secret`` (drawn here, never sent; not ``avoid_secret``, the one shown before).  Kept on
    offer, replaced when it goes and handed over when the customer joins by ``AdhocOffer``."""

    def __init__(self, conn, avoid_secret: str | None = None) -> None:
        self.conn = conn
        self.nameplate = ""
        self.secret = draw_secret(avoid_secret)
        self.expires_in = 0.0

    @property
    def adhoc_id(self) -> str:
        return f"{self.nameplate} {self.secret}"

    async def allocate(self) -> "AdhocInvitation":
        answer = await self.conn.callRemote(control.AllocateNameplate)
        self.nameplate, self.expires_in = answer["nameplate"], answer["expires_in"]
        return self

    async def session(self, reactor, folder: ModuleFolder, ticket: dict, ui: Any,
                      **options: Any) -> SessionRunner:
        code = f"{self.nameplate}{self.secret}"

        def channel(session_id: str) -> SessionChannel:
            return SessionChannel("supporter", adhoc_password(code), session_id, mode="adhoc",
                                  credentials=credentials_of(folder))
        return await open_session(reactor, self.conn, ticket, folder.ca_path.read_bytes(),
                                  folder, channel, ConsentState("supporter", peer="customer"),
                                  ui, **options)
