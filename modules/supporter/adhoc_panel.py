"""The ad-hoc tab's waiting page: the ID on offer, large, and what became of the one before.

It only shows the ``AdhocOffer``'s events: a new ID large with until when it is valid; while the
connection is away the old ID struck through and greyed and a red line saying the app
reconnects; then the new ID with a line saying why it changed, so the supporter tells the
customer the new one.  Every sentence is whole, through the translation (``t``)."""

from __future__ import annotations

from PySide6.QtCore import QDateTime, Qt
from PySide6.QtWidgets import QLabel, QVBoxLayout, QWidget

from ..common.qt.error_text import error_sentence
from ..common.qt.i18n import locale, t
from .adhoc_offer import CustomerJoined, IdOffered, IdReplaced, Offline, ReplaceReason

#: the colours of the ID's states (the red is the app's warning red)
LIVE_STYLE = ""
STALE_STYLE = "color: #9e9e9e;"
WARNING_STYLE = "color: #b00020; font-weight: bold;"
CHANGED_STYLE = "color: #0d47a1; font-weight: bold;"


class AdhocPanel(QWidget):
    """``adhoc_event(event)`` is the offer's delegate; ``tab`` is the session tab it sits in
    (its title and chat log say the changes too)."""

    def __init__(self, tab, tabs) -> None:
        super().__init__()
        self.tab = tab
        self.tabs = tabs
        self.offline = False
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
                text = t("The connection to the server was lost, so a new ID was drawn. Tell "
                         "your customer the new ID: {id}").format(id=event.adhoc_id)
            else:
                text = t("The ID {old} expired unused, so a new ID was drawn. Tell your "
                         "customer the new ID: {id}").format(old=event.old_id, id=event.adhoc_id)
            self._say(text, CHANGED_STYLE)
            self.tab.chat_log.append(text)
        elif isinstance(event, CustomerJoined):
            self.tab.chat_log.append(t("Customer joined from {address}.").format(
                address=event.peer_address))

    def _show_id(self, adhoc_id: str, expires_in: float) -> None:
        self.offline = False
        self.id_label.setText(adhoc_id)
        self._strike(False)
        self.prompt.setText(t("Tell your customer this ID:"))
        until = locale().toString(QDateTime.currentDateTime().addSecs(int(expires_in)).time(),
                                  "HH:mm")
        self.valid_label.setText(t("Valid until {time}; if nobody uses it by then, a new ID is "
                                   "drawn by itself.").format(time=until))
        self.valid_label.show()
        self._say("", LIVE_STYLE)
        self.tabs.setTabText(self.tabs.indexOf(self.tab), adhoc_id)

    def _show_offline(self, event: Offline) -> None:
        self._strike(True)
        self.prompt.setText(t("This ID is no longer valid:"))
        self.valid_label.hide()
        text = t("The connection to the server was lost. Reconnecting to draw a new ID ...")
        if isinstance(event.why, BaseException):     # an attempt failed: why, in words
            text = t("{sentence} ({detail})").format(sentence=text,
                                                      detail=error_sentence(event.why))
        self._say(text, WARNING_STYLE)
        if not self.offline:          # the history gets the outage once, not every attempt
            self.tab.chat_log.append(text)
        self.offline = True

    def _say(self, text: str, style: str) -> None:
        self.state_label.setText(text)
        self.state_label.setStyleSheet(style)
        self.state_label.setVisible(bool(text))    # no gap under the ID when all is well

    def _strike(self, stale: bool) -> None:
        font = self.id_label.font()
        font.setStrikeOut(stale)
        self.id_label.setFont(font)
        self.id_label.setStyleSheet(STALE_STYLE if stale else LIVE_STYLE)
