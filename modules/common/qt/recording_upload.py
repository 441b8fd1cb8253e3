"""The one line an app shows while the rest of a session recording goes up after a lost
connection (issue 12 §3).  The session core does the upload; this only says where it stands,
in the language the window shows."""

from __future__ import annotations

from PySide6.QtCore import Signal
from PySide6.QtWidgets import QLabel

from .i18n import t

# by upload state: what the person reads (English source strings, translated through ``t``)
UPLOAD_LINES = {
    "uploading": "Uploading the rest of the session recording …",
    "complete": "The session recording is complete on the server.",
    "incomplete": "The rest of the session recording could not be uploaded.",
}


class UploadLine(QLabel):
    """Hidden until there is something to say; ``retranslate`` after a language change.
    ``state_shown`` tells who watches (a test) the moment a state is shown."""

    state_shown = Signal(str)

    def __init__(self) -> None:
        super().__init__()
        self.state: str | None = None
        self.setWordWrap(True)
        self.setVisible(False)

    def show_state(self, state: str | None) -> None:
        self.state = state
        self.retranslate()
        if state is not None:
            self.state_shown.emit(state)

    def retranslate(self) -> None:
        self.setText(t(UPLOAD_LINES[self.state]) if self.state else "")
        self.setVisible(self.state is not None)
