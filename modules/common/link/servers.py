"""Several server addresses for one module: the nodes of a server with several nodes, tried in
turn until one answers (``FailoverEndpoint``), and their place in the module folder.

The addresses live in the folder's ``module.json`` under ``servers`` (``HOST:PORT`` each, set with
``hausmeister-host servers`` / ``hausmeister-supporter servers``); without that key the module
uses the one address its enrollment gave.  One DNS name with several addresses works too: each
address of a name is tried (``twisted``'s ``HostnameEndpoint``).  The certificate check is the
same for every address: the server's name must be in its certificate, signed by the pinned CA.
"""

from __future__ import annotations

from twisted.internet import defer
from twisted.logger import Logger

from modules.common.link.folder import ModuleFolder, ModuleFolderError

log = Logger()

MAX_SERVERS = 16


class ServersError(ValueError):
    """A server address list that cannot be used; the message says how to write it."""


def parse_server(text: str) -> tuple[str, int]:
    """``HOST:PORT`` or ``[IPv6]:PORT`` → (host, port)."""
    host, sep, port = text.strip().rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536 \
            or any(c.isspace() for c in host):
        raise ServersError(f"server address {text!r} is not HOST:PORT (e.g. node-a.example.org:8444)")
    return host, int(port)


def server_list(folder: ModuleFolder) -> list[tuple[str, int]]:
    """The addresses to try, in order: the folder's ``servers``, else the enrolled one."""
    settings = folder.settings()
    listed = settings.get("servers")
    if listed:
        try:
            return [parse_server(entry) for entry in listed]
        except (ServersError, TypeError, AttributeError) as exc:
            raise ModuleFolderError(f"module settings {folder.settings_path}: servers: {exc}")
    return [(settings["module_host"], int(settings["module_port"]))]


def set_servers(folder: ModuleFolder, entries: list[str]) -> list[tuple[str, int]]:
    """Store ``entries`` (checked) as the folder's server list; an empty list goes back to the
    enrolled address."""
    if len(entries) > MAX_SERVERS:
        raise ServersError(f"at most {MAX_SERVERS} server addresses")
    parsed = [parse_server(entry) for entry in entries]
    settings = folder.settings()
    if parsed:
        settings["servers"] = [f"[{h}]:{p}" if ":" in h else f"{h}:{p}" for h, p in parsed]
    else:
        settings.pop("servers", None)
    folder.save_settings(settings)
    return server_list(folder)


class FailoverEndpoint:
    """An ``IStreamClientEndpoint`` over several endpoints: connects to the one that answered
    last, else tries each in turn; fails with the last error when none answers."""

    def __init__(self, endpoints: list, names: list[str]) -> None:
        if not endpoints:
            raise ValueError("no server address to connect to")
        self.endpoints = endpoints
        self.names = names
        self.current = 0

    @defer.inlineCallbacks
    def connect(self, factory):
        failure = None
        count = len(self.endpoints)
        for step in range(count):
            index = (self.current + step) % count
            try:
                proto = yield self.endpoints[index].connect(factory)
            except Exception as exc:
                failure = exc
                if count > 1:
                    log.info("server {name} does not answer ({why}); trying the next one",
                             name=self.names[index], why=str(exc) or type(exc).__name__)
                continue
            if index != self.current and count > 1:
                log.info("connected to server {name}", name=self.names[index])
            self.current = index
            return proto
        raise failure
