"""Consent questions as dialogs: the apps' ``IConsentUI`` (the CLI's is consent_terminal.py).

Each question is its own non-modal dialog naming who asks; the answer fires the Deferred the
``ConsentDriver`` waits on, and a question the driver withdraws (timed out, moot) closes its
dialog.  ``notify`` hands every event to the window as a sentence (``describe_event``)."""

from __future__ import annotations

from typing import Callable

from PySide6.QtCore import Qt
from PySide6.QtWidgets import (
    QDialog, QDialogButtonBox, QLabel, QTextBrowser, QVBoxLayout, QWidget,
)
from twisted.internet.defer import Deferred
from zope.interface import implementer

from protocol.session_end import EndCause, EndReason

from modules.common.session.consent import (
    Chat, Comment, DirectionChanged, DirectionDenied, EmergencyStopped, Event, IConsentUI, Right,
    RightDenied, RightGranted, RightRevoked, Role, ScreenPaused, ScreenResumed, SessionEnded,
    TermsAccepted,
)
from .i18n import t

QUESTIONS = {
    Right.VIEW: "Allow {who} to see your screen?",
    Right.CONTROL: "Allow {who} to control your mouse and keyboard?",
    Right.FILES: "Allow {who} to transfer files to and from this computer?",
    None: "{who} asks you to show your screen instead. Show your screen?",
}


def role_name(role: Role, me: Role | None, names: dict[Role, str] | None = None) -> str:
    if role is me:
        return t("you")
    if names and role in names:
        return names[role]
    return t({Role.SUPPORTER: "the supporter", Role.CUSTOMER: "the customer",
              Role.HOST: "the host"}[role])


def capital(text: str) -> str:
    return text[:1].upper() + text[1:]


# How a session ended, as a whole sentence: one for this side's own doing (German conjugates
# "Sie haben" differently from "der Kunde hat") and one naming the other party.
END_SENTENCES: dict[EndCause, tuple[str, str]] = {
    EndCause.EMERGENCY_STOP: ("You pressed the emergency stop.",
                              "{who} pressed the emergency stop."),
    EndCause.ENDED: ("You ended the session.", "{who} ended the session."),
    EndCause.DECLINED: ("You declined the session.", "{who} declined the session."),
    EndCause.RIGHT_WITHDRAWN: ("You withdrew the right to view.",
                               "{who} withdrew the right to view."),
    EndCause.PAIR_TIMEOUT: ("You did not reach the relay in time.",
                            "{who} did not reach the relay in time."),
    EndCause.CONNECTION_LOST: ("The connection was lost ({who}).",
                               "The connection was lost ({who})."),
    EndCause.ERROR: ("Error in the session ({who}).", "Error in the session ({who})."),
    EndCause.KEY_FAILED: ("The keys did not match (wrong ID or password).",) * 2,
    EndCause.IDLE_TIMEOUT: ("Nothing happened for too long.",) * 2,
    EndCause.REVOKED: ("Access was revoked.",) * 2,
    EndCause.PROTOCOL_UNWRITABLE: ("The session protocol could not be written.",) * 2,
    EndCause.RECORDING_FAILED: ("The required recording could not be made.",) * 2,
    EndCause.SERVER_SHUTDOWN: ("The server shut down.",) * 2,
    EndCause.SERVER_CRASHED: ("The server stopped unexpectedly.",) * 2,
    EndCause.SERVER_LOST: ("The connection to the server was lost.",) * 2,
}
#: the consent core's reasons for a refused or withdrawn right (said through ``t()``)
REASONS = ("emergency stop", "revoked", "ended", "terms declined", "terms not accepted in time",
           "declined", "no answer in time", "terms not accepted", "host policy")


def end_sentence(reason: EndReason, me: Role | None,
                 names: dict[Role, str] | None = None) -> str:
    """The translated sentence for how the session ended (the details stay as reported)."""
    try:
        by: Role | None = Role(reason.by)
    except ValueError:
        by = None
    mine, other = END_SENTENCES[reason.cause]
    if by is None:
        who = t({"server": "the server", "relay": "the relay"}.get(reason.by, "the server"))
    else:
        who = role_name(by, me, names)
    sentence = t(mine if by is me and by is not None else other).format(who=who)
    sentence = capital(sentence)
    if reason.detail:
        return t("{sentence} ({detail})").format(sentence=sentence, detail=t(reason.detail))
    return sentence


def describe_event(event: Event, me: Role | None, names: dict[Role, str] | None = None) -> str | None:
    """One translated sentence about ``event`` for a window (None: nothing to show)."""
    def who(role: Role) -> str:
        name = role_name(role, me, names)
        return name if names and role in names and role is not me else capital(name)
    mine = getattr(event, "by", None) is me
    if mine and isinstance(event, RightGranted):
        return t("You granted {right}.").format(right=t(event.right.value))
    if mine and isinstance(event, RightDenied):
        return t("You refused {right}: {reason}").format(right=t(event.right.value),
                                                          reason=t(event.reason))
    if mine and isinstance(event, RightRevoked):
        return t("You took back {right}: {reason}").format(right=t(event.right.value),
                                                           reason=t(event.reason))
    if mine and isinstance(event, TermsAccepted):
        return t("You accepted the support terms.")
    if isinstance(event, RightGranted):
        return t("{who} granted {right}.").format(who=who(event.by), right=t(event.right.value))
    if isinstance(event, RightDenied):
        return t("{who} refused {right}: {reason}").format(
            who=who(event.by), right=t(event.right.value), reason=t(event.reason))
    if isinstance(event, RightRevoked):
        return t("{who} took back {right}: {reason}").format(
            who=who(event.by), right=t(event.right.value), reason=t(event.reason))
    if isinstance(event, EmergencyStopped):
        return end_sentence(EndReason(EndCause.EMERGENCY_STOP, event.by.value), me, names)
    if isinstance(event, DirectionChanged):
        return t("{who} now shows the screen.").format(who=who(event.presenter))
    if isinstance(event, ScreenPaused):
        return (t("You paused the screen: the other side sees the last picture.") if mine else
                t("{who} paused the screen.").format(who=who(event.by)))
    if isinstance(event, ScreenResumed):
        return (t("You resumed the screen.") if mine else
                t("{who} resumed the screen.").format(who=who(event.by)))
    if isinstance(event, DirectionDenied):
        return t("{who} refused {right}: {reason}").format(
            who=who(event.by), right=t("view"), reason=t(event.reason))
    if isinstance(event, Chat):
        if event.by is me:
            return t("You write: {text}").format(text=event.text)
        return t("{who} writes: {text}").format(who=who(event.by), text=event.text)
    if isinstance(event, TermsAccepted):
        return t("The customer accepted the support terms.")
    return None


class _Question(QDialog):
    def __init__(self, parent: QWidget | None, title: str, text: str, yes: str, no: str,
                 body: str | None = None) -> None:
        super().__init__(parent)
        self.setWindowTitle(title)
        self.setWindowFlag(Qt.WindowStaysOnTopHint, True)
        self.setMinimumWidth(520)
        layout = QVBoxLayout(self)
        label = QLabel(text)
        label.setWordWrap(True)
        font = label.font()
        font.setPointSizeF(font.pointSizeF() * 1.3)
        label.setFont(font)
        layout.addWidget(label)
        if body is not None:
            browser = QTextBrowser()
            browser.setPlainText(body)
            browser.setMinimumHeight(260)
            layout.addWidget(browser)
        buttons = QDialogButtonBox()
        self.yes_button = buttons.addButton(yes, QDialogButtonBox.AcceptRole)
        self.no_button = buttons.addButton(no, QDialogButtonBox.RejectRole)
        buttons.accepted.connect(self.accept)
        buttons.rejected.connect(self.reject)
        layout.addWidget(buttons)
        self.deferred: Deferred = Deferred(lambda _d: self._withdrawn())
        self.finished.connect(self._answered)

    def _answered(self, result: int) -> None:
        if not self.deferred.called:
            self.deferred.callback(result == QDialog.Accepted)

    def _withdrawn(self) -> None:
        self.finished.disconnect(self._answered)
        self.close()


@implementer(IConsentUI)
class DialogConsentUI:
    """``peer_name``: the other side as people know it (e.g. "alice"); ``on_event(event,
    sentence)`` shows what happened in the window."""

    def __init__(self, parent: QWidget | None, me: Role, peer: Role, peer_name: str,
                 on_event: Callable[[Event, str | None], None]) -> None:
        self.parent = parent
        self.me = me
        self.names = {peer: peer_name}
        self.peer = peer
        self.on_event = on_event
        self.open: list[_Question] = []

    def show_terms(self, text: str) -> Deferred:
        dialog = _Question(self.parent, t("Support terms"),
                           t("Please read the terms of this support session."),
                           t("Accept"), t("Decline"), body=text)
        return self._show(dialog)

    def ask(self, question: str, right: Right | None) -> Deferred:
        who = self.names.get(self.peer) or role_name(self.peer, self.me)
        dialog = _Question(self.parent, t("Question from {who}").format(who=who),
                           t(QUESTIONS[right]).format(who=who), t("Allow"), t("Refuse"))
        return self._show(dialog)

    def notify(self, event: Event) -> None:
        if isinstance(event, (Comment, SessionEnded)) and self.me is not Role.SUPPORTER:
            return
        self.on_event(event, describe_event(event, self.me, self.names))

    def _show(self, dialog: _Question) -> Deferred:
        self.open.append(dialog)
        dialog.deferred.addBoth(lambda r: (self.open.remove(dialog) if dialog in self.open
                                           else None, r)[1])
        dialog.open()
        return dialog.deferred
