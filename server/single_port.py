"""One port for browsers and modules (``listen.single_port``): after the TLS handshake, each
connection goes to the module port's factory or the web plane's, by the ALPN protocol the
handshake chose (``tls.single_port_context``: ``hausmeister/1`` for modules, anything else web).

The decision is made when the handshake completes (no byte of the plane has arrived yet); the
chosen protocol then takes the place of the chooser inside the TLS layer, so nothing stands
between TLS and the plane afterwards (relay legs splice at full speed).  Not here: the
certificate checks (``tls``) and the deadlines for connections that do not speak
(``connection_guard``, which the listener is wrapped in).
"""

from __future__ import annotations

from twisted.internet.interfaces import IHandshakeListener
from twisted.internet.protocol import Factory, Protocol
from zope.interface import implementer

from .tls import ALPN_MODULE


class PlaneSplit(Factory):
    def __init__(self, module_factory: Factory, web_factory: Factory) -> None:
        self.module_factory = module_factory
        self.web_factory = web_factory

    def buildProtocol(self, addr) -> Protocol:
        return _Undecided(self, addr)


@implementer(IHandshakeListener)
class _Undecided(Protocol):
    def __init__(self, split: PlaneSplit, addr) -> None:
        self.split = split
        self.addr = addr

    def handshakeCompleted(self) -> None:
        module = getattr(self.transport, "negotiatedProtocol", None) == ALPN_MODULE
        factory = self.split.module_factory if module else self.split.web_factory
        chosen = factory.buildProtocol(self.addr)
        if chosen is None:
            self.transport.loseConnection()
            return
        self.transport.wrappedProtocol = chosen  # TLS delivers to the plane directly from now on
        chosen.makeConnection(self.transport)
        if IHandshakeListener.providedBy(chosen):  # the module port reads the certificate here
            chosen.handshakeCompleted()
