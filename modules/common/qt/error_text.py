"""The sentence an app shows for a failed set-up, in the window's language.

The session core and the server link raise ``ModuleError``s with one English sentence (what the
CLI prints).  For the failures a person meets most — a wrong password or ID, an ID that does not
exist, a lock-out, a host that is offline, a server that cannot be reached or is not the
expected one — the apps show a translated sentence instead, found by
the error's type or its cause (``raise ModuleError(...) from exc``); anything else keeps the
English detail behind a translated "Error:".
"""

from __future__ import annotations

from twisted.internet import defer, error as net_error

from protocol import control

from ..errors import NotConnected
from ..link.enrollment import ServerUnreachable, WrongServer
from ..link.failures import explain

from ..session.channel_events import FailureKind
from ..session.channel_twisted import ChannelFailure
from .i18n import t

# by error type: the English source sentence (translated through ``t``)
SENTENCES: dict[type, str] = {
    control.UnknownNameplate: "There is no session with this ID. Check the eight digits with "
                              "your supporter and try again.",
    control.LockedOut: "Too many wrong attempts. Wait a few minutes, then try again.",
    control.HostOffline: "This computer is offline right now. Try again once it is online.",
    control.UnknownHost: "The server does not know this computer (any more).",
    control.NotRecordable: "The server cannot record sessions right now, so none starts. "
                           "Try again later or tell your administrator.",
    NotConnected: "Not connected to the server right now; the list reconnects by itself. Try "
                  "again in a moment.",
    WrongServer: "This is not the expected support server (its identity does not match). Do "
                 "not continue, and tell your supporter.",
}
UNREACHABLE = ("The support server cannot be reached. Check this computer's network connection "
               "and try again in a moment.")
#: the web port or the module port could not be reached, or did not answer in time
UNREACHABLE_TYPES = (ServerUnreachable, net_error.ConnectError, net_error.TimeoutError,
                     defer.TimeoutError)
WRONG_SECRET = ("The password or ID does not match, so the session was not started. Check it "
                "and try again.")


def _causes(exc: BaseException | None):
    seen = 0
    while exc is not None and seen < 8:     # bounded: a cause chain cannot loop us
        yield exc
        exc = exc.__cause__ or exc.__context__
        seen += 1


def error_sentence(failure_or_exc) -> str:
    """What the window says for a failure (a Twisted ``Failure`` or an exception)."""
    exc = getattr(failure_or_exc, "value", failure_or_exc)
    for cause in _causes(exc):
        if isinstance(cause, ChannelFailure) and cause.failed.kind == FailureKind.KEY_CONFIRMATION:
            return t(WRONG_SECRET)
        for kind, sentence in SENTENCES.items():
            if isinstance(cause, kind):
                return t(sentence)
        if isinstance(cause, UNREACHABLE_TYPES):
            return t(UNREACHABLE)
    # anything else keeps its English sentence; a bare Twisted or TLS error is said as the CLI
    # says it (what happened and what to do), not as a library's message
    if type(exc).__module__.split(".")[0] in ("twisted", "OpenSSL"):
        exc = explain(exc)
    return t("Error: {message}").format(message=str(exc) or type(exc).__name__)
