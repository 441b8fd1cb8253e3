"""The ad-hoc tab's waiting page: the ID on offer, large, and what became of the one before.

It only shows the ``AdhocOffer``'s events: a new ID large with until when it is valid; while the
connection is away the old ID struck through and greyed and a red line saying the app
reconnects; then the new ID with a line saying why it changed, so the supporter tells the
customer the new one.  Every sentence is whole, through the translation (``t``), and made
again when the window's language changes (``retranslate``)."""

from __future__ import annotations

from typing import Callable

from PySide6.QtCore import QDateTime, Qt, QTime
from PySide6.QtWidgets import QLabel, QVBoxLayout, QWidget

from ..common.qt.error_text import error_sentence
from ..common.qt.i18n import locale, t
from .adhoc_offer import CustomerJoined, IdOffered, IdReplaced, Offline, ReplaceReason

#: the colours of the ID's states (the red is the app's warning red)
LIVE_STYLE = ""
STALE_STYLE = "color: #9e9e9e;"
WARNING_STYLE = "color: #b00020; font-weight: bold;"
CHANGED_STYLE = "color: #0d47a1; font-weight: bold;"


def whole(adhoc_id: str) -> str:
    """An ID inside a sentence, never wrapped between its two halves (a supporter reading
    "1234" at a line's end and "5678" on the next may read out only half)."""
    return adhoc_id.replace(" ", "\u00a0")


class AdhocPanel(QWidget):
    """``adhoc_event(event)`` is the offer's delegate; ``tab`` is the session tab it sits in
    (its title and chat log say the changes too)."""

    def __init__(self, tab, tabs) -> None:
        super().__init__()
        self.tab = tab
        self.tabs = tabs
        self.offline = False
        self._until: QTime | None = None          # until when the ID on offer is valid
        self._state: Callable[[], str] | None = None   # the state line's sentence
        layout = QVBoxLayout(self)
        layout.addStretch(1)
        self.prompt = QLabel(t("Tell your customer this ID:"))
        self.id_label = QLabel()
        font = self.id_label.font()
        font.setPointSizeF(font.pointSizeF() * 3)
        font.setBold(True)
        self.id_label.setFont(font)
        self.state_label = QLabel()       # what happened to the ID: lost, reconnecting, changed
        self.valid_label = QLabel()       # until when the ID on offer is valid
        for label in (self.prompt, self.id_label, self.state_label, self.valid_label):
            label.setAlignment(Qt.AlignCenter)
            label.setWordWrap(label is not self.id_label)
            layout.addWidget(label)
        layout.addStretch(1)

    @property
    def adhoc_id(self) -> str:
        return self.id_label.text()

    def adhoc_event(self, event) -> None:
        if isinstance(event, IdOffered):
            self._show_id(event.adhoc_id, event.expires_in)
            self.tab.chat_log.append(t("Waiting for the customer ..."))
        elif isinstance(event, Offline):
            self._show_offline(event)
        elif isinstance(event, IdReplaced):
            self._show_id(event.adhoc_id, event.expires_in)
            if event.reason is ReplaceReason.CONNECTION_LOST:
                def say() -> str:
                    return t("The connection to the server was lost, so a new ID was drawn. "
                             "Tell your customer the new ID: {id}").format(
                        id=whole(event.adhoc_id))
            elif event.old_valid_for:
                def say() -> str:
                    return t("The ID {old} is about to expire unused, so a new ID was drawn. "
                             "Tell your customer the new ID: {id} (a customer who already has "
                             "{old} can still use it for {seconds} s)").format(
                        old=whole(event.old_id), id=whole(event.adhoc_id),
                        seconds=int(event.old_valid_for))
            else:
                def say() -> str:
                    return t("The ID {old} expired unused, so a new ID was drawn. Tell your "
                             "customer the new ID: {id}").format(old=whole(event.old_id),
                                                                  id=whole(event.adhoc_id))
            self._say(say, CHANGED_STYLE)
            self.tab.chat_log.append(say())
        elif isinstance(event, CustomerJoined):
            self.tab.chat_log.append(t("Customer joined from {address}.").format(
                address=event.peer_address))

    def _show_id(self, adhoc_id: str, expires_in: float) -> None:
        self.offline = False
        self.id_label.setText(adhoc_id)
        self._strike(False)
        self._until = QDateTime.currentDateTime().addSecs(int(expires_in)).time()
        self._say(None, LIVE_STYLE)
        self.tabs.setTabText(self.tabs.indexOf(self.tab), adhoc_id)

    def _show_offline(self, event: Offline) -> None:
        self._strike(True)
        self._until = None

        def say() -> str:
            text = t("The connection to the server was lost. Reconnecting to draw a new ID ...")
            if isinstance(event.why, BaseException):     # an attempt failed: why, in words
                text = t("{sentence} ({detail})").format(sentence=text,
                                                          detail=error_sentence(event.why))
            return text
        was_offline, self.offline = self.offline, True
        self._say(say, WARNING_STYLE)
        if not was_offline:           # the history gets the outage once, not every attempt
            self.tab.chat_log.append(say())

    def retranslate(self) -> None:
        """Say the panel's state (again) in the installed language."""
        self.prompt.setText(t("This ID is no longer valid:") if self.offline
                            else t("Tell your customer this ID:"))
        if self._until is not None:
            self.valid_label.setText(t("Valid until {time}; if nobody uses it by then, a new ID "
                                       "is drawn by itself.").format(
                time=locale().toString(self._until, "HH:mm")))
        self.valid_label.setVisible(self._until is not None)
        text = self._state() if self._state is not None else ""
        self.state_label.setText(text)
        self.state_label.setVisible(bool(text))    # no gap under the ID when all is well

    def _say(self, make: "Callable[[], str] | None", style: str) -> None:
        self._state = make
        self.state_label.setStyleSheet(style)
        self.retranslate()

    def _strike(self, stale: bool) -> None:
        font = self.id_label.font()
        font.setStrikeOut(stale)
        self.id_label.setFont(font)
        self.id_label.setStyleSheet(STALE_STYLE if stale else LIVE_STYLE)
