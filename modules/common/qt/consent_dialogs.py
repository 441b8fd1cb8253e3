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

from modules.common.session.consent import (
    Chat, Comment, DirectionChanged, DirectionDenied, EmergencyStopped, Event, IConsentUI, Right,
    RightDenied, RightGranted, RightRevoked, Role, SessionEnded, TermsAccepted,
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
                                                          reason=event.reason)
    if mine and isinstance(event, RightRevoked):
        return t("You took back {right}: {reason}").format(right=t(event.right.value),
                                                           reason=event.reason)
    if mine and isinstance(event, TermsAccepted):
        return t("You accepted the support terms.")
    if isinstance(event, RightGranted):
        return t("{who} granted {right}.").format(who=who(event.by), right=t(event.right.value))
    if isinstance(event, RightDenied):
        return t("{who} refused {right}: {reason}").format(
            who=who(event.by), right=t(event.right.value), reason=event.reason)
    if isinstance(event, RightRevoked):
        return t("{who} took back {right}: {reason}").format(
            who=who(event.by), right=t(event.right.value), reason=event.reason)
    if isinstance(event, EmergencyStopped):
        return t("Emergency stop by {who}.").format(who=role_name(event.by, me, names))
    if isinstance(event, DirectionChanged):
        return t("{who} now shows the screen.").format(who=who(event.presenter))
    if isinstance(event, DirectionDenied):
        return t("{who} refused {right}: {reason}").format(
            who=who(event.by), right=t("view"), reason=event.reason)
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
