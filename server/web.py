"""The HTTPS plane: the CA download, the enrollment API and the server's own start page.

Handlers parse and validate on the reactor thread, then do all database and CA work through
``Database.run`` (the blocking pool).  Errors come back as JSON ``{"error": "..."}`` with one line
the module prints as is.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

from cryptography.hazmat.primitives import serialization
from jinja2 import Environment, FileSystemLoader, select_autoescape
from twisted.internet.defer import Deferred, fail
from twisted.logger import Logger
from twisted.web import http, resource, server

from protocol import enrollment as api
from protocol.identity import fingerprint

from . import __version__
from .certificates import Enrollment, EnrollmentError, Issued
from .connection_guard import note_refusal, settle as settle_pending
from .db import Database
from .pki import CertStore, PKIError, cert_pem

log = Logger()

OFFLINE_PAGES = Path(__file__).resolve().parent.parent / "offline_pages"

SECURITY_HEADERS = {
    b"Strict-Transport-Security": b"max-age=31536000",
    b"X-Content-Type-Options": b"nosniff",
    b"X-Frame-Options": b"DENY",
    b"Referrer-Policy": b"no-referrer",
    b"Content-Security-Policy": b"default-src 'self'; frame-ancestors 'none'; form-action 'self'",
    b"Cache-Control": b"no-store",
}


def _headers(request: server.Request, content_type: bytes) -> None:
    request.setHeader(b"Content-Type", content_type)
    for name, value in SECURITY_HEADERS.items():
        request.setHeader(name, value)


def _json(request: server.Request, status: int, body: dict[str, Any]) -> bytes:
    request.setResponseCode(status)
    _headers(request, b"application/json")
    return json.dumps(body).encode()


class JSONEndpoint(resource.Resource):
    """POST only; body ≤ 64 KiB of JSON with exactly the expected fields."""

    isLeaf = True

    def __init__(self, handler: Callable[[server.Request, dict[str, str]], Deferred],
                 fields: tuple[str, ...]) -> None:
        super().__init__()
        self.handler = handler
        self.fields = fields

    def render_GET(self, request: server.Request) -> bytes:
        request.setHeader(b"Allow", b"POST")
        return _json(request, 405, {"error": "use POST with a JSON body"})

    def render_POST(self, request: server.Request):
        raw = request.content.read(api.MAX_REQUEST_BYTES + 1)
        try:
            if len(raw) > api.MAX_REQUEST_BYTES:
                raise api.RequestError(f"the request is larger than {api.MAX_REQUEST_BYTES} bytes", 413)
            try:
                body = json.loads(raw)
            except (ValueError, UnicodeDecodeError):
                raise api.RequestError("the request body is not JSON")
            fields = api.validate(body, self.fields)
        except api.RequestError as exc:
            log.info("refused {path} from {address}: {reason}", path=request.path.decode(),
                     address=request.getClientAddress().host, reason=str(exc))
            return _json(request, exc.status, {"error": str(exc)})

        def done(answer: dict[str, Any]) -> None:
            request.write(_json(request, 200, answer))
            request.finish()

        def refused(failure) -> None:
            if failure.check(EnrollmentError, PKIError, api.RequestError):
                status = getattr(failure.value, "status", 403)
                log.info("refused {path} from {address}: {reason}", path=request.path.decode(),
                         address=request.getClientAddress().host, reason=str(failure.value))
                body = _json(request, status, {"error": str(failure.value)})
            else:
                log.failure("enrollment request failed", failure)
                body = _json(request, 500, {"error": "internal server error; see the server log"})
            request.write(body)
            request.finish()

        d = self.handler(request, fields)
        d.addCallbacks(done, refused)
        return server.NOT_DONE_YET


MAX_BODY_BYTES = 1024 * 1024


#: After a 413 the rest of the body is thrown away undecrypted, at most this much and this long,
#: so the client can finish its write and read the answer; then the connection is cut.
DRAIN_BYTES = 4 * 1024 * 1024
DRAIN_SECONDS = 2.0


class BoundedRequest(server.Request):
    """A request whose body is larger than ``max_body`` is answered 413 as soon as that is known
    (from Content-Length, or while a chunked body arrives) and its connection is closed: the
    body is neither parsed, kept nor decrypted.

    Twisted would otherwise read, spool and parse a whole multipart upload before any page sees it.
    """

    max_body = MAX_BODY_BYTES
    too_large = False
    _received = 0

    def gotLength(self, length):
        if length is not None and length > self.max_body:
            self.requestHeaders.removeHeader(b"expect")  # no "100 Continue": we do not want it
            super().gotLength(0)
            self._refuse_unread()
            return
        super().gotLength(length)

    def handleContentChunk(self, data: bytes) -> None:
        if self.too_large:
            return
        self._received += len(data)
        if self._received > self.max_body:  # chunked body without a length
            self.content.seek(0)
            self.content.truncate()
            self._refuse_unread()
            return
        super().handleContentChunk(data)

    def _refuse_unread(self) -> None:
        self.too_large = True
        channel = self.channel
        tls = channel.transport
        address = tls.getPeer().host
        channel.dataReceived = lambda data: None  # parse nothing more on this connection
        body = (f"request body larger than {self.max_body // 1024} KiB; nothing was stored\n"
                .encode())
        head = [b"HTTP/1.1 413 Request Entity Too Large",
                b"Content-Type: text/plain; charset=utf-8",
                b"Content-Length: " + str(len(body)).encode(), b"Connection: close"]
        head += [name + b": " + value for name, value in SECURITY_HEADERS.items()]
        tls.write(b"\r\n".join(head) + b"\r\n\r\n" + body)
        note_refusal(tls, "request body too large",
                     f"answered 413: request body larger than {self.max_body // 1024} KiB")
        tcp = getattr(tls, "transport", None)
        tls.unregisterProducer()  # the channel registered itself; TLS closes only without one
        tls.loseConnection()      # the answer and TLS close_notify go out
        if tcp is None or not hasattr(tls, "dataReceived"):
            return
        left = [DRAIN_BYTES]

        def drain(data: bytes) -> None:  # below TLS: thrown away without decrypting
            left[0] -= len(data)
            if left[0] <= 0:
                tcp.abortConnection()
        tls.dataReceived = drain
        channel.callLater(DRAIN_SECONDS, tcp.abortConnection)


def bounded_request(max_body: int) -> type[BoundedRequest]:
    return type("BoundedRequest", (BoundedRequest,), {"max_body": max_body})


#: Default deadline for a request's headers (``[limits] http_header_seconds``).
HEADER_SECONDS = 15.0


class HeaderDeadlineChannel(http.HTTPChannel):
    """``HTTPChannel`` that gives every request ``header_seconds`` for its complete headers.

    Twisted's own timeout is an idle timeout that every byte resets, so a client sending one
    header line every few seconds (slowloris) would hold the connection for ever.  The first
    request's deadline (from the end of the TLS handshake) is the connection guard's; for later
    requests on a kept-alive connection the clock starts with the request's first byte.
    """

    def __init__(self, header_seconds: float) -> None:
        super().__init__()
        self.header_seconds = header_seconds
        self._between_requests = False
        self._header_timer = None

    def dataReceived(self, data: bytes) -> None:
        if self._between_requests and data:
            self._between_requests = False
            self._header_timer = self.callLater(self.header_seconds, self._headers_too_slow)
        super().dataReceived(data)

    def allHeadersReceived(self) -> None:
        self._cancel_header_timer()
        settle_pending(self.transport)
        super().allHeadersReceived()

    def requestDone(self, request) -> None:
        self._between_requests = self.persistent  # buffered pipelined bytes start the clock
        super().requestDone(request)

    def _headers_too_slow(self) -> None:
        self._header_timer = None
        note_refusal(self.transport, "no complete request headers",
                     f"closed: no complete request headers within {self.header_seconds:g} s")
        self.transport.abortConnection()

    def _cancel_header_timer(self) -> None:
        if self._header_timer is not None and self._header_timer.active():
            self._header_timer.cancel()
        self._header_timer = None

    def connectionLost(self, reason) -> None:
        self._cancel_header_timer()
        super().connectionLost(reason)


class DeadlineSite(server.Site):
    """``server.Site`` whose connections are ``HeaderDeadlineChannel``s."""

    header_seconds = HEADER_SECONDS

    def protocol(self):
        return http._GenericHTTPChannelProtocol(HeaderDeadlineChannel(self.header_seconds))


class StaticBytes(resource.Resource):
    isLeaf = True

    def __init__(self, body: Callable[[], bytes], content_type: bytes) -> None:
        super().__init__()
        self.body = body
        self.content_type = content_type

    def render_GET(self, request: server.Request) -> bytes:
        _headers(request, self.content_type)
        return self.body()


class WebPlane:
    """Builds the resource tree; ``module_port`` is read at request time (it may be port 0)."""

    def __init__(self, db: Database, store: CertStore, enrollment: Enrollment,
                 module_host: str, module_port: Callable[[], int], renew_before_days: int,
                 console: Any = None, signin: Any = None) -> None:
        self.db = db
        self.console = console
        if signin is None:
            from .directory.signin import SignIn
            signin = SignIn(db, enrollment.lockouts)
        self.signin = signin  # the password check: local accounts, then the directory
        self.module_tunnel: resource.Resource | None = None
        self.relay_tunnel: resource.Resource | None = None   # server.relay_tunnel
        self.store = store
        self.enrollment = enrollment
        self.module_host = module_host
        self.module_port = module_port
        self.renew_before_days = renew_before_days
        self.templates = Environment(loader=FileSystemLoader(str(OFFLINE_PAGES)),
                                     autoescape=select_autoescape(["html"]))

    def ca_pem(self) -> bytes:
        return cert_pem(self.store.ca_cert())

    def info(self) -> bytes:
        return json.dumps({"server_version": __version__,
                           "ca_fingerprint": fingerprint(self.store.ca_cert()),
                           "module_host": self.module_host,
                           "module_port": self.module_port()}).encode()

    def index(self) -> bytes:
        page = self.templates.get_template("index.html").render(
            version=__version__, ca_fingerprint=fingerprint(self.store.ca_cert()),
            module_host=self.module_host, module_port=self.module_port())
        return page.encode()

    def _issued(self, issued: Issued) -> dict[str, Any]:
        return api.issued_response(
            cert_pem(issued.certificate).decode(),
            issued.ca_certificate.public_bytes(serialization.Encoding.PEM).decode(),
            issued.identity.uri, issued.tenant, self.module_host, self.module_port(),
            self.renew_before_days, issued.host_id)

    def enroll_supporter(self, request: server.Request, f: dict[str, str]) -> Deferred:
        source = request.getClientAddress().host
        d = self.signin.authenticate(f["user"], f["password"], source)
        d.addErrback(self._enrollment_refused)
        d.addCallback(lambda user_id: self.db.run(self.enrollment.enroll_user, user_id, f["csr"],
                                                  source))
        return d.addCallback(self._issued)

    @staticmethod
    def _enrollment_refused(failure):
        """A refused sign-in as the enrollment API's answer (the English text, one line)."""
        from . import accounts
        from .directory.signin import DirectoryDown
        failure.trap(accounts.AccountError)
        error = EnrollmentError(str(failure.value))
        if failure.check(DirectoryDown):
            error.status = 503
        elif failure.check(accounts.LockedOut):
            error.status = 429
        raise error

    def enroll_host(self, request: server.Request, f: dict[str, str]) -> Deferred:
        source = request.getClientAddress().host
        d = self.db.run(self.enrollment.enroll_host, f["token"], f["name"], f["csr"], source)
        return d.addCallback(self._issued)

    def renew(self, request: server.Request, f: dict[str, str]) -> Deferred:
        source = request.getClientAddress().host
        peer = request.channel.transport.getPeerCertificate()
        if peer is None:
            return fail(api.RequestError(
                "renewal needs the module's current certificate (TLS client certificate)", 401))
        d = self.db.run(self.enrollment.renew, peer.to_cryptography(), f["csr"], source)
        return d.addCallback(self._issued)

    def root(self) -> resource.Resource:
        root = resource.Resource()
        root.putChild(b"", StaticBytes(self.index, b"text/html; charset=utf-8"))
        root.putChild(b"ca.pem", StaticBytes(self.ca_pem, b"application/x-pem-file"))
        api_root, apiv1 = resource.Resource(), resource.Resource()
        root.putChild(b"api", api_root)
        api_root.putChild(b"v1", apiv1)
        apiv1.putChild(b"info", StaticBytes(self.info, b"application/json"))
        enroll = resource.Resource()
        apiv1.putChild(b"enroll", enroll)
        enroll.putChild(b"supporter", JSONEndpoint(self.enroll_supporter, api.SUPPORTER_FIELDS))
        enroll.putChild(b"host", JSONEndpoint(self.enroll_host, api.HOST_FIELDS))
        apiv1.putChild(b"renew", JSONEndpoint(self.renew, api.RENEW_FIELDS))
        if self.module_tunnel is not None:  # modules over a WebSocket (server.ws_tunnel)
            apiv1.putChild(b"module-tunnel", self.module_tunnel)
        if self.relay_tunnel is not None:
            apiv1.putChild(b"relay-tunnel", self.relay_tunnel)
        if self.console is None:
            from .console import Console  # imports this module, hence here
            self.console = Console(self.db, self.enrollment.lockouts)
        root.putChild(b"console", self.console.resource())
        return root

    def site(self, max_body: int = MAX_BODY_BYTES,
             header_seconds: float = HEADER_SECONDS) -> server.Site:
        site = DeadlineSite(self.root())
        site.header_seconds = header_seconds
        site.requestFactory = bounded_request(max_body)
        site.displayTracebacks = False
        return site
