"""Why talking to the server failed, as one sentence a person can act on.

Every front-end says it the same way: the CLIs print it (``<prog>: error: ...``), the supporter
app's host list shows it while it reconnects.
"""

from __future__ import annotations

from OpenSSL import SSL
from twisted.internet import defer as tdefer, error as net_error
from twisted.protocols import amp

from protocol import control

from modules.common.errors import ModuleError
from modules.common.link import enrollment, proxy
from modules.common.link.folder import ModuleFolderError


def explain(exc: BaseException) -> BaseException:
    """``exc`` as the ``ModuleError`` a person can act on (one sentence naming the problem and
    the fix); a ``ModuleError`` stays as it is."""
    if isinstance(exc, (ModuleError, enrollment.EnrollmentFailed, ModuleFolderError)):
        return exc
    if isinstance(exc, proxy.ProxyError):
        return ModuleError(str(exc))
    if isinstance(exc, net_error.ConnectionRefusedError):
        return ModuleError("the server's module port refused the connection: is the server running?")
    if isinstance(exc, (net_error.TimeoutError, net_error.TCPTimedOutError, tdefer.TimeoutError)):
        return ModuleError("the server's module port did not answer in time: the server may be "
                           "busy or unreachable; try again in a minute")
    if isinstance(exc, net_error.ConnectError):  # e.g. reset at once: the server sheds load
        why = str(exc).replace("An error occurred while connecting: ", "").rstrip(".")
        return ModuleError(f"could not connect to the server's module port ({why}): the server "
                           "may be busy or unreachable; try again in a minute")
    if isinstance(exc, SSL.Error):
        return ModuleError(f"TLS with the server failed ({exc}); the certificate may be revoked, "
                           "expired or from another CA: enroll again")
    if isinstance(exc, net_error.ConnectionLost) or isinstance(exc, net_error.ConnectionDone):
        # A refused certificate comes back as a TLS alert (SSL.Error above); a bare close is a
        # server that is busy (e.g. under a connection flood), restarting or going away.
        return ModuleError("the server closed the connection before it answered: it may be busy "
                           "or restarting; try again in a minute (a refused certificate would "
                           "be reported as a TLS error)")
    if isinstance(exc, control.ControlError):
        return ModuleError(str(exc))
    if isinstance(exc, amp.RemoteAmpError):
        return ModuleError(f"the server refused: {exc.description}")
    return ModuleError(f"internal error ({type(exc).__name__}: {exc}); please report it with "
                       "the steps that led here")
