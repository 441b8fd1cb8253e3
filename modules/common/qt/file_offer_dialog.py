"""One incoming file as a dialog: who sends what and how big, where it will be saved (the
person may pick another folder), Accept / Decline, then the progress with Cancel, then where it
was saved or why not.

The dialog only shows the session core's file events (``file_event``) and passes on what the person
decides (the signals ``accepted_into``, ``declined``, ``cancelled``); the window wires those to
``SessionRunner.accept_file`` / ``reject_file`` / ``cancel_file``.  No file logic lives here."""

from __future__ import annotations

from PySide6.QtCore import QLocale, Qt, Signal
from PySide6.QtWidgets import (
    QDialog, QFileDialog, QHBoxLayout, QLabel, QProgressBar, QPushButton, QVBoxLayout, QWidget,
)

from modules.common.session.file_transfer import (
    FileCompleted, FileFailed, FileProgress, FileRejected,
)
from .file_reasons import file_reason
from .i18n import locale, t


class FileOfferDialog(QDialog):
    accepted_into = Signal(str)     # the folder the person chose
    declined = Signal()
    cancelled = Signal()
    progressed = Signal(int)        # percent

    def __init__(self, parent: QWidget | None, sender: str, offer, folder: str) -> None:
        super().__init__(parent)
        self.offer = offer
        self.folder = folder
        self.outcome: str | None = None      # "saved", "failed" once over
        self.setWindowTitle(t("Incoming file"))
        self.setWindowFlag(Qt.WindowStaysOnTopHint, True)
        self.setMinimumWidth(560)
        layout = QVBoxLayout(self)
        self.facts = dict(who=sender, name=offer.name, size=locale().formattedDataSize(
            offer.size, 1, QLocale.DataSizeSIFormat))
        self.question = QLabel(t("{who} wants to send you the file {name} ({size}). Accept it?")
                               .format(**self.facts))
        self.question.setWordWrap(True)
        font = self.question.font()
        font.setPointSizeF(font.pointSizeF() * 1.3)
        self.question.setFont(font)
        layout.addWidget(self.question)
        where = QHBoxLayout()
        self.folder_label = QLabel()
        self.folder_label.setWordWrap(True)
        self.folder_label.setTextInteractionFlags(Qt.TextSelectableByMouse)
        where.addWidget(self.folder_label, 1)
        self.folder_button = QPushButton(t("Change folder ..."))
        self.folder_button.clicked.connect(self._choose_folder)
        where.addWidget(self.folder_button, 0, Qt.AlignTop)
        layout.addLayout(where)
        self.progress = QProgressBar()
        self.progress.setRange(0, 100)
        self.progress.setVisible(False)
        layout.addWidget(self.progress)
        self.result = QLabel()
        self.result.setWordWrap(True)
        self.result.setTextInteractionFlags(Qt.TextSelectableByMouse)
        self.result.setVisible(False)
        layout.addWidget(self.result)
        buttons = QHBoxLayout()
        buttons.addStretch(1)
        self.accept_button = QPushButton(t("Accept"))
        self.decline_button = QPushButton(t("Decline"))
        self.cancel_button = QPushButton(t("Cancel"))
        self.close_button = QPushButton(t("Close"))
        for button in (self.accept_button, self.decline_button, self.cancel_button,
                       self.close_button):
            buttons.addWidget(button)
        layout.addLayout(buttons)
        self.accept_button.clicked.connect(self._accept_clicked)
        self.decline_button.clicked.connect(self._decline_clicked)
        self.cancel_button.clicked.connect(self.cancelled.emit)
        self.close_button.clicked.connect(self.close)
        self.cancel_button.setVisible(False)
        self.close_button.setVisible(False)
        self.accept_button.setDefault(True)
        self.set_folder(folder)

    # --- what the person does ------------------------------------------------------------------
    def set_folder(self, folder: str) -> None:
        self.folder = folder
        self.folder_label.setText(t("Save in: {folder}").format(folder=folder))

    def _choose_folder(self) -> None:
        dialog = QFileDialog(self, t("Change folder ..."), self.folder)
        dialog.setFileMode(QFileDialog.Directory)
        dialog.setOption(QFileDialog.ShowDirsOnly, True)
        dialog.fileSelected.connect(self.set_folder)
        dialog.open()

    def _accept_clicked(self) -> None:
        self.question.setText(t("{name} ({size}) from {who}").format(**self.facts))
        self.accept_button.setVisible(False)
        self.decline_button.setVisible(False)
        self.folder_button.setVisible(False)
        self.progress.setVisible(True)
        self.cancel_button.setVisible(True)
        self.accepted_into.emit(self.folder)

    def _decline_clicked(self) -> None:
        self.declined.emit()

    def reject(self) -> None:  # noqa: D401 - Esc or the window's close button
        """Esc: decline a question, cancel a transfer under way, close a finished one."""
        if self.outcome is not None:
            super().reject()
        elif self.cancel_button.isVisible():
            self.cancelled.emit()
        else:
            self.declined.emit()

    # --- what the session reports --------------------------------------------------------------
    def file_event(self, event) -> None:
        """The session core's event for this file (progress, completed, rejected, failed)."""
        if isinstance(event, FileProgress) and event.size:
            percent = 100 * event.transferred // event.size
            self.progress.setValue(percent)
            self.progressed.emit(percent)
        elif isinstance(event, FileCompleted):
            self.progress.setValue(100)
            self._over("saved", t("Saved as {path}").format(path=str(event.path)))
        elif isinstance(event, FileRejected):
            self._over("declined", t("The file was not received: {reason}").format(
                reason=file_reason(event.reason)))
        elif isinstance(event, FileFailed):
            self._over("failed", t("The file was not received: {reason}").format(
                reason=file_reason(event.reason)))

    def _over(self, outcome: str, text: str) -> None:
        self.outcome = outcome
        self.question.setText(t("{name} ({size}) from {who}").format(**self.facts))
        self.progress.setVisible(outcome == "saved")
        for button in (self.accept_button, self.decline_button, self.folder_button,
                       self.cancel_button):
            button.setVisible(False)
        self.folder_label.setVisible(False)
        self.result.setText(text)
        self.result.setVisible(True)
        self.close_button.setVisible(True)
        self.close_button.setDefault(True)
