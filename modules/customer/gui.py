"""``hausmeister-customer gui``: one small window for a customer who is not technical.

Type the 8 digits, read the terms, say yes or no to each right in its own dialog; while the
screen is seen or controlled an always-on-top bar says so, with the emergency stop (also
Ctrl+F12 while the app has the focus).  The session itself is ``SessionRunner``: this window
only shows what it reports and passes on what the person does."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from PySide6.QtCore import QRegularExpression, Qt, Signal
from PySide6.QtGui import QKeySequence, QRegularExpressionValidator, QShortcut
from PySide6.QtWidgets import (
    QComboBox, QHBoxLayout, QLabel, QLineEdit, QMainWindow, QProgressBar, QPushButton,
    QTextBrowser, QVBoxLayout, QWidget,
)
from twisted.internet import defer

from ..common.session.consent import Chat, Event, Right, RightGranted, RightRevoked, Role
from ..common.link.folder import default_home
from ..common.qt.consent_dialogs import DialogConsentUI, end_sentence
from ..common.qt.file_offer_dialog import FileOfferDialog
from ..common.qt.error_text import error_sentence
from ..common.qt.file_reasons import file_reason
from ..common.qt.i18n import install_translation, t
from ..common.qt.recording_upload import UploadLine
from ..common.qt.viewer import RemoteScreenDelegate
from ..common.qt.window_picker import BUTTON_TEXT, WindowPicker, shared_sentence
from ..common.session import recorder
from ..common.session.file_transfer import CANCELLED_BY_CUSTOMER, DECLINED_BY_CUSTOMER
from ..common.session.session_runner import SessionDelegate
from .join import join, parse_adhoc_id, upload_cut_off_recording

CONFIG_NAME = "customer.toml"
DECLINED = DECLINED_BY_CUSTOMER                # what the supporter and the protocol read

RED_BUTTON = ("QPushButton { background: #c62828; color: white; font-weight: bold; "
              "border-radius: 6px; padding: 10px 18px; } "
              "QPushButton:disabled { background: #d9a3a3; }")


def find_server_config(explicit: str | None = None) -> str | None:
    """The customer.toml the download page offers: passed once, beside the app, or kept."""
    import sys
    kept = default_home("customer") / CONFIG_NAME
    if explicit:
        kept.parent.mkdir(parents=True, exist_ok=True)
        kept.write_bytes(Path(explicit).read_bytes())   # passed once: kept for next time
        return str(kept)
    for place in (Path(sys.argv[0]).resolve().parent / CONFIG_NAME, Path.cwd() / CONFIG_NAME,
                  kept):
        if place.is_file():
            return str(place)
    return None


class SharingBar(QWidget):
    """Always on top while the screen is seen or controlled: who, and the emergency stop."""

    def __init__(self, stop, toggle_pause=None, pick_window=None) -> None:
        super().__init__(None, Qt.Window | Qt.WindowStaysOnTopHint | Qt.FramelessWindowHint
                         | Qt.Tool)
        self.setObjectName("sharing-bar")
        self.setStyleSheet("#sharing-bar { background: #fff3cd; border: 2px solid #c62828; }")
        layout = QHBoxLayout(self)
        self.label = QLabel()
        font = self.label.font()
        font.setPointSizeF(font.pointSizeF() * 1.4)
        font.setBold(True)
        self.label.setFont(font)
        layout.addWidget(self.label, 1)
        self.stop_button = QPushButton(t("EMERGENCY STOP"))
        self.stop_button.setStyleSheet(RED_BUTTON)
        self.stop_button.clicked.connect(stop)
        self.pause_button = QPushButton(t("Pause screen"))
        if toggle_pause is not None:
            self.pause_button.clicked.connect(toggle_pause)
        self.share_button = QPushButton(t(BUTTON_TEXT))
        if pick_window is not None:
            self.share_button.clicked.connect(pick_window)
        layout.addWidget(self.share_button)
        layout.addWidget(self.pause_button)
        layout.addWidget(self.stop_button)
        self.resize(1100, 64)

    def show_text(self, text: str) -> None:
        self.label.setText(text)
        screen = self.screen().availableGeometry() if self.screen() else None
        if screen is not None:
            self.move(screen.center().x() - self.width() // 2, screen.top())
        self.show()
        self.raise_()


class CustomerWindow(QMainWindow, RemoteScreenDelegate, SessionDelegate):
    """The customer's window; ``connect_clicked`` starts a session on ``reactor``."""

    event_shown = Signal(str)

    def __init__(self, reactor, server: str | None, fingerprint: str | None,
                 language: str = "en", share_display: str | None = None,
                 receive_dir: str | None = None) -> None:
        QMainWindow.__init__(self)
        self.reactor = reactor
        self.server, self.fingerprint = server, fingerprint
        self.language = language
        self.share_display = share_display if share_display is not None else os.environ.get("DISPLAY")
        self.receive_dir = receive_dir or str(Path.home() / "Downloads" / "Hausmeister")
        self.runner = None
        self.conn = None
        self.supporter = ""
        self.ui: DialogConsentUI | None = None
        self.end_text: str | None = None
        self.end_reason = None            # the last session's end, shown in the language chosen
        self.verification_code: str | None = None
        self.file_dialogs: dict[str, FileOfferDialog] = {}   # transfer id → its dialog
        self.picker: WindowPicker | None = None
        self.uploading: defer.Deferred | None = None
        self._close_after_upload = False
        self.bar = SharingBar(self.emergency_stop, self.toggle_pause, self.pick_window)
        self._build()
        QShortcut(QKeySequence("Ctrl+F12"), self, activated=self.emergency_stop,
                  context=Qt.ApplicationShortcut)
        self.hotkey = None
        if self.share_display:
            try:   # Ctrl+F12 on the whole X display, whichever window has the keyboard
                from ..common.qt.hotkey_x11 import GlobalHotkey
                self.hotkey = GlobalHotkey(self.share_display,
                                           lambda: reactor.callFromThread(self.emergency_stop))
            except Exception as exc:
                self.log.append(t("Error: {message}").format(message=f"Ctrl+F12: {exc}"))
        self.retranslate()

    # --- layout --------------------------------------------------------------------------------
    def _build(self) -> None:
        base = self.font()                 # big type for people who are not technical
        base.setPointSizeF(base.pointSizeF() * 1.15)
        self.setFont(base)
        central = QWidget()
        layout = QVBoxLayout(central)
        top = QHBoxLayout()
        self.title = QLabel()
        font = self.title.font()
        font.setPointSizeF(font.pointSizeF() * 1.6)
        font.setBold(True)
        self.title.setFont(font)
        top.addWidget(self.title, 1)
        self.language_box = QComboBox()
        self.language_box.addItem("English", "en")
        self.language_box.addItem("Deutsch", "de")
        self.language_box.setCurrentIndex(1 if self.language == "de" else 0)
        self.language_box.currentIndexChanged.connect(self._language_changed)
        top.addWidget(self.language_box)
        layout.addLayout(top)
        self.prompt = QLabel()
        self.prompt.setWordWrap(True)
        layout.addWidget(self.prompt)
        digits = QHBoxLayout()
        big = self.font()
        big.setPointSizeF(big.pointSizeF() * 2.2)
        self.first = QLineEdit()
        self.second = QLineEdit()
        for field in (self.first, self.second):
            field.setValidator(QRegularExpressionValidator(QRegularExpression(r"\d{0,4}")))
            field.setMaxLength(4)
            field.setFont(big)
            field.setAlignment(Qt.AlignCenter)
            field.setFixedWidth(150)
            digits.addWidget(field)
        self.first.textChanged.connect(lambda text: len(text) == 4 and self.second.setFocus())
        self.second.returnPressed.connect(self.connect_clicked)
        self.connect_button = QPushButton()
        self.connect_button.setFont(big)
        self.connect_button.clicked.connect(self.connect_clicked)
        digits.addWidget(self.connect_button)
        digits.addStretch(1)
        layout.addLayout(digits)
        self.status_label = QLabel()
        self.status_label.setWordWrap(True)
        status_font = self.status_label.font()
        status_font.setPointSizeF(status_font.pointSizeF() * 1.25)
        self.status_label.setFont(status_font)
        layout.addWidget(self.status_label)
        self.upload_label = UploadLine()    # the rest of a cut-off recording going up
        layout.addWidget(self.upload_label)
        self.code = QLabel()
        layout.addWidget(self.code)
        self.log = QTextBrowser()
        self.log.setMinimumHeight(160)
        layout.addWidget(self.log, 1)
        chat = QHBoxLayout()
        self.chat_field = QLineEdit()
        self.chat_field.returnPressed.connect(self.send_chat)
        self.chat_button = QPushButton()
        self.chat_button.clicked.connect(self.send_chat)
        chat.addWidget(self.chat_field, 1)
        chat.addWidget(self.chat_button)
        layout.addLayout(chat)
        self.progress = QProgressBar()
        self.progress.setVisible(False)
        layout.addWidget(self.progress)
        bottom = QHBoxLayout()
        self.stop_button = QPushButton()
        self.stop_button.setStyleSheet(RED_BUTTON)
        stop_font = self.stop_button.font()
        stop_font.setPointSizeF(stop_font.pointSizeF() * 1.4)
        self.stop_button.setFont(stop_font)
        self.stop_button.clicked.connect(self.emergency_stop)
        self.end_button = QPushButton()
        self.end_button.clicked.connect(self.end_session)
        bottom.addWidget(self.stop_button, 1)
        bottom.addWidget(self.end_button)
        layout.addLayout(bottom)
        self.setCentralWidget(central)
        self.resize(820, 660)
        self._in_session(False)

    def retranslate(self) -> None:
        self.setWindowTitle(t("Hausmeister Support"))
        self.title.setText(t("Get help from your supporter"))
        self.prompt.setText(t("Type the 8-digit ID your supporter read out to you:"))
        self.connect_button.setText(t("Connect"))
        self.chat_field.setPlaceholderText(t("Type a message"))
        self.chat_button.setText(t("Send"))
        self.stop_button.setText(t("Emergency stop (Ctrl+F12)"))
        self.end_button.setText(t("End session"))
        self.bar.stop_button.setText(t("EMERGENCY STOP"))
        self.bar.share_button.setText(t(BUTTON_TEXT))
        if not self.server:
            self.status_label.setText(t("No server is set up: place customer.toml from the download "
                                  "page beside the app."))
        if self.verification_code is not None:
            self._show_code()
        if self.end_reason is not None:
            self._show_end()
        self.upload_label.retranslate()
        self._update_bar()

    def _language_changed(self) -> None:
        from PySide6.QtWidgets import QApplication
        self.language = self.language_box.currentData()
        install_translation(QApplication.instance(), self.language)
        self.retranslate()

    def _in_session(self, active: bool) -> None:
        for widget in (self.first, self.second, self.connect_button):
            widget.setEnabled(not active and bool(self.server))
        for widget in (self.chat_field, self.chat_button, self.stop_button, self.end_button):
            widget.setEnabled(active)

    def show_line(self, text: str) -> None:
        self.log.append(text)
        self.event_shown.emit(text)

    # --- what the person does ------------------------------------------------------------------
    def connect_clicked(self) -> None:
        adhoc_id = f"{self.first.text()} {self.second.text()}"
        try:
            parse_adhoc_id(adhoc_id)
        except Exception:
            self.status_label.setText(t("The ID has 8 digits, like 1234 5678."))
            return
        self._in_session(True)
        self.end_reason = self.verification_code = None
        self.upload_label.show_state(None)
        self.status_label.setText(t("Connecting ..."))
        defer.ensureDeferred(self._session(adhoc_id)).addErrback(self._failed)

    async def _session(self, adhoc_id: str) -> None:
        from ..common.terminal.stream_cli import screen_offer
        from argparse import Namespace
        screen = screen_offer(Namespace(screen=self.share_display)) if self.share_display else None

        def make_ui(ticket, consent):
            self.supporter = ticket["supporter"]
            self.ui = DialogConsentUI(self, Role.CUSTOMER, Role.SUPPORTER, self.supporter,
                                      self._consent_event)
            return self.ui
        self.conn, self.runner = await join(
            self.reactor, self.server, self.fingerprint, adhoc_id, make_ui,
            delegate=self, pipe=False, screen=screen, receive_dir=self.receive_dir,
            ask_files=True)     # every file is the customer's decision, in its own dialog
        Path(self.receive_dir).mkdir(parents=True, exist_ok=True)
        self.status_label.setText(t("Connected with {supporter}.").format(supporter=self.supporter))
        try:
            await self.runner.run()
        finally:
            if self.conn.transport is not None:   # None once the connection was lost
                self.conn.transport.loseConnection()
        if recorder.waiting_count():   # the connection was lost while the screen was recorded
            await self._upload_rest()

    async def _upload_rest(self) -> None:
        """Send what the recorder kept over a new connection (the session core does it, as
        for the CLI); the window says so and does not close before it is done (bounded)."""
        self.uploading = defer.ensureDeferred(upload_cut_off_recording(
            self.reactor, self.server, self.fingerprint, recorder.RESUME_WAIT_SECONDS))
        for widget in (self.first, self.second, self.connect_button):
            widget.setEnabled(False)     # no new session beside the upload of the last one
        self._show_upload("uploading")
        try:
            done = await self.uploading
        except Exception:
            done = False
        self.uploading = None
        self._in_session(False)
        self._show_upload("complete" if done else "incomplete")
        if self._close_after_upload:
            self.close()

    def _show_upload(self, state: str) -> None:
        self.upload_label.show_state(state)
        self.event_shown.emit(self.upload_label.text())

    def _failed(self, failure) -> None:
        self._in_session(False)
        self.bar.hide()
        if self.end_text is None:
            self.status_label.setText(error_sentence(failure))

    def emergency_stop(self) -> None:
        if self.runner is not None and not self.runner.done.called:
            self.runner.emergency_stop()

    def end_session(self) -> None:
        if self.runner is not None and not self.runner.done.called:
            self.runner.end_session()

    def toggle_pause(self) -> None:
        if self.runner is not None and not self.runner.done.called:
            self.runner.toggle_pause()

    def pick_window(self) -> WindowPicker | None:
        """The whole screen or one window: the picker lists, the session core narrows."""
        if self.runner is None or self.runner.done.called or not self.runner.consent.is_presenter:
            return None
        if self.picker is not None:
            self.picker.close()
        self.picker = WindowPicker(self.bar, self.runner, self.supporter or t("the supporter"))
        self.picker.shared.connect(lambda info: self.show_line(shared_sentence(info)))
        self.picker.show()
        self.picker.raise_()
        return self.picker

    def send_chat(self) -> None:
        text = self.chat_field.text().strip()
        if text and self.runner is not None and self.runner.chat(text):
            self.chat_field.clear()

    # --- what the session reports --------------------------------------------------------------
    def _consent_event(self, event: Event, sentence: str | None) -> None:
        if sentence:
            self.show_line(sentence)
        if isinstance(event, (RightGranted, RightRevoked)) or not isinstance(event, Chat):
            self._update_bar()

    def _update_bar(self) -> None:
        runner = self.runner
        if runner is None or runner.done.called or runner.consent.ended or \
                not runner.consent.is_presenter:
            self.bar.hide()
            return
        granted = runner.consent.granted
        who = self.supporter or t("the supporter")
        self.bar.pause_button.setText(t("Resume screen") if runner.consent.paused
                                      else t("Pause screen"))
        if runner.consent.paused and Right.VIEW in granted:
            self.bar.show_text(t("Screen paused: {who} sees the last picture").format(who=who))
        elif Right.CONTROL in granted:
            self.bar.show_text(t("{who} is controlling your screen").format(who=who))
        elif Right.VIEW in granted:
            self.bar.show_text(t("{who} is viewing your screen").format(who=who))
        else:
            self.bar.hide()

    def status(self, text: str) -> None:  # noqa: F811 - SessionDelegate.status
        pass  # the window shows events as sentences; the CLI's status lines are not for it

    def secured(self, verification_code: str, peer: str | None) -> None:
        self.verification_code = verification_code
        self._show_code()

    def _show_code(self) -> None:
        code = self.verification_code
        self.code.setText(t("Verification code: {code} (compare it with the other side by "
                            "phone)").format(code=code))

    def file_offer(self, offer) -> None:
        """The supporter offers a file: its own dialog asks (accept, decline, where)."""
        dialog = FileOfferDialog(self, self.supporter or t("the supporter"), offer,
                                 self.receive_dir)
        runner = self.runner
        dialog.accepted_into.connect(lambda folder: runner.accept_file(offer.id, folder))
        dialog.declined.connect(lambda: runner.reject_file(offer.id, DECLINED))
        dialog.cancelled.connect(lambda: runner.cancel_file(offer.id, CANCELLED_BY_CUSTOMER))
        self.file_dialogs[offer.id] = dialog
        dialog.show()
        dialog.raise_()

    def file_event(self, event) -> None:
        from ..common.session.file_transfer import (
            FileCompleted, FileFailed, FileProgress, FileRejected,
        )
        incoming = self.runner is not None and self.runner.files is not None and \
            event.direction == self.runner.files.incoming_direction
        dialog = self.file_dialogs.get(event.id)
        if dialog is not None:
            dialog.file_event(event)
        if isinstance(event, FileProgress) and event.size:
            self.progress.setVisible(True)
            self.progress.setFormat(f"{event.name}: %p %")
            self.progress.setValue(100 * event.transferred // event.size)
        elif isinstance(event, FileCompleted):
            self.progress.setValue(100)
            self.show_line(t("File {name} received.").format(name=event.name) if incoming
                           else t("File {name} sent.").format(name=event.name))
        elif isinstance(event, FileRejected) and incoming and event.reason == DECLINED:
            self.show_line(t("You declined the file {name}.").format(name=event.name))
        elif isinstance(event, (FileFailed, FileRejected)):
            self.show_line(t("The file {name} was not transferred: {reason}").format(
                name=event.name, reason=file_reason(event.reason)))

    def _screen_runner(self):
        return self.runner

    def _screen_title(self) -> str:
        return t("Screen of {who}").format(who=self.supporter or t("the supporter"))

    def _paused_text(self) -> str:
        return t("Paused by {who}: the last picture stays until the screen is resumed.").format(
            who=self.supporter or t("the supporter"))

    def ended(self, reason) -> None:
        self.end_text = reason.text()
        self.remote_screen_closed()
        self.bar.hide()
        if self.picker is not None:
            self.picker.close()
        self.end_reason = reason
        self._show_end()
        self._in_session(False)

    def _show_end(self) -> None:
        reason = self.end_reason
        self.status_label.setText(t("Session ended: {reason}").format(
            reason=end_sentence(reason, Role.CUSTOMER, self.ui.names if self.ui else None)))

    def closeEvent(self, event) -> None:  # noqa: N802
        self.emergency_stop()
        if self.uploading is not None:   # closes itself once the recording is up (or given up)
            self._close_after_upload = True
            event.ignore()
            return
        if self.hotkey is not None:
            self.hotkey.close()
        for dialog in self.file_dialogs.values():
            dialog.close()
        if self.picker is not None:
            self.picker.close()
        self.bar.close()
        super().closeEvent(event)


def run(args) -> int:
    from ..common.errors import ModuleError
    from ..common.link.enrollment import read_server_config
    from ..common.qt.app import run_app
    from ..common.qt.i18n import system_language
    path = find_server_config(getattr(args, "server_config", None))
    server = fingerprint = None
    if args.server and args.ca_fingerprint:
        server, fingerprint = args.server, args.ca_fingerprint
    elif path:
        try:
            server, fingerprint = read_server_config(path)
        except Exception as exc:
            raise ModuleError(str(exc))
    windows: list[Any] = []

    def main(app, reactor):
        window = CustomerWindow(reactor, server, fingerprint,
                                language=args.language or system_language(),
                                share_display=args.screen)
        windows.append(window)
        window.show()
    return run_app("hausmeister-customer", args.language, main)
