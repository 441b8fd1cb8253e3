"""Share the whole screen or one window: a list to pick from, nothing more.

The session core lists the windows (``runner.windows()``), narrows what the other side sees
and logs it (``runner.share_window()``); this dialog only shows the list and passes the choice
on.  The customer's sharing bar, the host window and the supporter's tab (while it shows its
screen) open it with the same button text."""

from __future__ import annotations

from PySide6.QtCore import Qt, Signal
from PySide6.QtWidgets import (
    QDialog, QHBoxLayout, QLabel, QListWidget, QListWidgetItem, QPushButton, QVBoxLayout,
)

from .i18n import t

BUTTON_TEXT = "Share: whole screen / one window ..."


def shared_sentence(info) -> str:
    """The line a window shows after a choice (``info``: the ``WindowInfo``, None = screen)."""
    if info is None:
        return t("You share the whole screen again.")
    return t("You share only the window {title}.").format(title=info.title)


class WindowPicker(QDialog):
    """Pick what the other side sees: the whole screen (first row) or one listed window."""

    shared = Signal(object)        # the WindowInfo now shared (None: the whole screen)

    def __init__(self, parent, runner, who: str) -> None:
        super().__init__(parent)
        self.runner = runner
        self.setWindowTitle(t(BUTTON_TEXT))
        layout = QVBoxLayout(self)
        self.prompt = QLabel(t("What may {who} see?").format(who=who))
        self.prompt.setWordWrap(True)
        font = self.prompt.font()
        font.setPointSizeF(font.pointSizeF() * 1.2)
        font.setBold(True)
        self.prompt.setFont(font)
        layout.addWidget(self.prompt)
        self.choices = QListWidget()
        self.choices.setStyleSheet("QListWidget::item { padding: 6px; }")
        self.choices.itemDoubleClicked.connect(lambda _item: self.share())
        layout.addWidget(self.choices, 1)
        self.message = QLabel()
        self.message.setWordWrap(True)
        self.message.setStyleSheet("color: #c62828;")
        layout.addWidget(self.message)
        buttons = QHBoxLayout()
        self.refresh_button = QPushButton(t("Refresh"))
        self.refresh_button.clicked.connect(self.refresh)
        buttons.addWidget(self.refresh_button)
        buttons.addStretch(1)
        self.share_button = QPushButton(t("Share"))
        self.share_button.setDefault(True)
        self.share_button.clicked.connect(self.share)
        self.cancel_button = QPushButton(t("Cancel"))
        self.cancel_button.clicked.connect(self.reject)
        buttons.addWidget(self.share_button)
        buttons.addWidget(self.cancel_button)
        layout.addLayout(buttons)
        self.resize(620, 420)
        self.refresh()

    def refresh(self) -> None:
        self.choices.clear()
        whole = QListWidgetItem(t("Whole screen"))
        whole.setData(Qt.UserRole, None)
        self.choices.addItem(whole)
        self.choices.setCurrentRow(0)
        self.message.clear()
        self.runner.windows().addCallbacks(self._listed, self._failed)

    def _listed(self, windows) -> None:
        for info in reversed(windows):            # topmost first: what the person sees on top
            item = QListWidgetItem(t("Window: {title} ({width} × {height})").format(
                title=info.title, width=info.rect.w, height=info.rect.h))
            item.setData(Qt.UserRole, info.id)
            self.choices.addItem(item)

    def select_title(self, title: str) -> bool:
        """Select the first listed window whose title contains ``title`` (for a keyboard-less
        caller such as a test); False when none is listed."""
        for row in range(1, self.choices.count()):
            if title in self.choices.item(row).text():
                self.choices.setCurrentRow(row)
                return True
        return False

    def share(self) -> None:
        item = self.choices.currentItem()
        if item is None:
            return
        self.share_button.setEnabled(False)
        self.runner.share_window(item.data(Qt.UserRole)).addCallbacks(self._chosen, self._failed)

    def _chosen(self, info) -> None:
        self.share_button.setEnabled(True)
        self.shared.emit(info)
        self.accept()

    def _failed(self, failure) -> None:
        self.share_button.setEnabled(True)
        self.message.setText(t("Error: {message}").format(message=failure.getErrorMessage()))
