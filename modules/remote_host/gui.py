"""``hausmeister-host gui``: the host's status window for the person sitting at it.

Online state and server, the current session with the supporter's name and rights, an
emergency-stop button, the policy (editable only by the host's administrator) and the host
password.  The service is ``HostService`` (the same as ``host run``); the window only shows it."""

from __future__ import annotations

import math
import os
from typing import Any
from urllib.parse import urlsplit

from PySide6.QtCore import Qt
from twisted.internet import defer
from PySide6.QtGui import QKeySequence, QShortcut
from PySide6.QtWidgets import (
    QComboBox, QFormLayout, QGroupBox, QHBoxLayout, QInputDialog, QLabel, QLineEdit,
    QMainWindow, QPushButton, QTextBrowser, QVBoxLayout, QWidget,
)

from ..common.session.consent import Event, Right, Role
from ..common.qt.consent_dialogs import DialogConsentUI, capital, end_sentence
from ..common.qt.i18n import install_translation, t
from ..common.qt.recording_upload import UploadLine
from ..common.qt.viewer import RemoteScreenDelegate
from ..common.qt.window_picker import BUTTON_TEXT, WindowPicker, shared_sentence
from ..common.session import recorder
from ..common.session.session_runner import SessionDelegate
from . import settings
from .service import HostService

#: the online line's colour: a state seen at a glance, not only read (text stays dark enough
#: to read on the window's grey)
ONLINE_STYLE = "color: #1b5e20"
OFFLINE_STYLE = "color: #a33d00"

RED_BUTTON = ("QPushButton { background: #c62828; color: white; font-weight: bold; "
              "border-radius: 6px; padding: 10px 18px; } "
              "QPushButton:disabled { background: #d9a3a3; }")


def server_name(url: str) -> str:
    """The server as the person at the host knows it (``host:port``): the enrollment URL's
    ``https://`` made the line long, and Qt broke the German one inside the URL."""
    return urlsplit(url).netloc or url


def is_administrator() -> bool:
    """The policy is the machine's: only its administrator (root) changes it here."""
    return hasattr(os, "geteuid") and os.geteuid() == 0


class HostWindow(QMainWindow, RemoteScreenDelegate, SessionDelegate):
    def __init__(self, reactor, folder, screen: Any = None, language: str = "en",
                 admin: bool | None = None) -> None:
        QMainWindow.__init__(self)
        self.reactor = reactor
        self.folder = folder
        self.language = language
        self.admin = is_administrator() if admin is None else admin
        self.service = HostService(reactor, folder, make_ui=self._make_ui,
                                   make_delegate=lambda offer: self, screen=screen,
                                   on_change=self.refresh, tell=self._tell)
        self.ui: DialogConsentUI | None = None
        self.last_end: str | None = None
        self.verification_code: str | None = None   # shown in the language chosen
        self.picker: WindowPicker | None = None
        self.uploading: defer.Deferred | None = None   # the rest of a cut-off recording
        self._close_after_upload = False
        self.late_upload: defer.Deferred | None = None  # follows a rest that came up late
        self._unwatch = recorder.watch_waiting(self._recording_waits)
        self._build()
        QShortcut(QKeySequence("Ctrl+F12"), self, activated=self.emergency_stop,
                  context=Qt.ApplicationShortcut)
        self.retranslate()

    # --- layout --------------------------------------------------------------------------------
    def _build(self) -> None:
        central = QWidget()
        layout = QVBoxLayout(central)
        self.online_label = QLabel()
        big = self.online_label.font()
        big.setPointSizeF(big.pointSizeF() * 1.4)
        big.setBold(True)
        self.online_label.setFont(big)
        # a long server name (and the longer German sentence) wraps instead of being cut off
        self.online_label.setWordWrap(True)
        layout.addWidget(self.online_label)
        self.session_label = QLabel()
        self.session_label.setFont(big)
        layout.addWidget(self.session_label)
        self.rights_label = QLabel()
        layout.addWidget(self.rights_label)
        self.code_label = QLabel()
        layout.addWidget(self.code_label)
        self.upload_label = UploadLine()
        layout.addWidget(self.upload_label)
        self.stop_button = QPushButton()
        self.stop_button.setStyleSheet(RED_BUTTON)
        self.stop_button.clicked.connect(self.emergency_stop)
        layout.addWidget(self.stop_button)
        self.pause_button = QPushButton()
        self.pause_button.clicked.connect(self.toggle_pause)
        layout.addWidget(self.pause_button)
        self.share_button = QPushButton()
        self.share_button.clicked.connect(self.pick_window)
        layout.addWidget(self.share_button)
        self.policy_box = QGroupBox()
        form = QFormLayout(self.policy_box)
        self.policy_fields: dict[str, QComboBox] = {}
        self.policy_names: dict[str, QLabel] = {}
        for right in settings.RIGHTS:
            box = QComboBox()
            for value in settings.CHOICES:
                box.addItem(value, value)
            box.currentIndexChanged.connect(self._policy_changed)
            label = QLabel()
            self.policy_fields[right] = box
            self.policy_names[right] = label
            form.addRow(label, box)
        self.supporters_label = QLabel()
        self.supporters_label.setWordWrap(True)
        form.addRow(self.supporters_label)
        self.admin_note = QLabel()
        self.admin_note.setWordWrap(True)
        form.addRow(self.admin_note)
        layout.addWidget(self.policy_box)
        buttons = QHBoxLayout()
        self.password_button = QPushButton()
        self.password_button.clicked.connect(self.set_password)
        buttons.addWidget(self.password_button)
        buttons.addStretch(1)
        self.language_box = QComboBox()
        self.language_box.addItem("English", "en")
        self.language_box.addItem("Deutsch", "de")
        self.language_box.setCurrentIndex(1 if self.language == "de" else 0)
        self.language_box.currentIndexChanged.connect(self._language_changed)
        buttons.addWidget(self.language_box)
        layout.addLayout(buttons)
        self.log = QTextBrowser()
        self.log.setMinimumHeight(120)
        layout.addWidget(self.log, 1)
        self.setCentralWidget(central)
        self.resize(640, 620)

    def retranslate(self) -> None:
        self.setWindowTitle(t("Hausmeister host"))
        self.stop_button.setText(t("Emergency stop (Ctrl+F12)"))
        self.share_button.setText(t(BUTTON_TEXT))
        self.policy_box.setTitle(t("Policy"))
        for right, label in self.policy_names.items():
            label.setText(capital(t(right)))
            box = self.policy_fields[right]
            for index in range(box.count()):
                box.setItemText(index, t(box.itemData(index)))
        self.password_button.setText(t("Set host password ..."))
        self.admin_note.setText("" if self.admin else t(
            "The policy can be changed only by this host's administrator."))
        self.upload_label.retranslate()
        self.refresh()

    def _language_changed(self) -> None:
        from PySide6.QtWidgets import QApplication
        self.language = self.language_box.currentData()
        install_translation(QApplication.instance(), self.language)
        self.retranslate()

    # --- state ---------------------------------------------------------------------------------
    def start(self):
        return self.service.start()

    def refresh(self) -> None:
        service = self.service
        server = server_name(service.server)
        self.online_label.setText(
            t("Online at {server}").format(server=server) if service.online
            # (a no-break space: "…" never wraps onto a line of its own)
            else t("Offline, reconnecting to {server}\u00a0…").format(server=server))
        self.online_label.setStyleSheet(ONLINE_STYLE if service.online else OFFLINE_STYLE)
        runner, offer = service.runner, service.offer
        if offer is not None:
            self.session_label.setText(t("Session with {supporter}").format(
                supporter=offer["supporter"]))
        else:
            self.session_label.setText(t("No session"))
        granted = sorted(runner.consent.granted, key=lambda r: list(Right).index(r)) \
            if runner is not None and not runner.consent.ended else []
        self.rights_label.setText(t("Rights: {rights}").format(
            rights=", ".join(t(r.value) for r in granted) if granted else t("none")))
        self.stop_button.setEnabled(runner is not None and not runner.done.called)
        showing = runner is not None and not runner.done.called and runner.consent.is_presenter
        self.pause_button.setEnabled(showing and runner.consent.terms_accepted)
        self.share_button.setEnabled(showing and runner.consent.terms_accepted)
        self.pause_button.setText(t("Resume screen") if showing and runner.consent.paused
                                  else t("Pause screen"))
        if offer is None:
            self.verification_code = None
        self.code_label.setText(t("Verification code: {code}").format(
            code=self.verification_code) if self.verification_code else "")
        policy = service.policy
        for right, box in self.policy_fields.items():
            box.blockSignals(True)
            box.setCurrentIndex(settings.CHOICES.index(getattr(policy, right)))
            box.setEnabled(self.admin)
            box.blockSignals(False)
        self.supporters_label.setText(t("Supporters: {names}").format(
            names=", ".join(policy.supporters) if policy.supporters
            else t("any supporter the server lets through")))
        self.password_button.setEnabled(self.admin)

    def _policy_changed(self) -> None:
        if not self.admin:
            return
        policy = self.service.policy
        for right, box in self.policy_fields.items():
            setattr(policy, right, box.currentData())
        settings.save_policy(self.folder, policy)

    def _make_ui(self):
        supporter = (self.service.offer or {}).get("supporter", "")
        self.ui = DialogConsentUI(self, Role.HOST, Role.SUPPORTER, supporter, self._consent_event)
        return self.ui

    def _consent_event(self, event: Event, sentence: str | None) -> None:
        if sentence:
            self.log.append(sentence)
        self.refresh()

    def _tell(self, text: str) -> None:
        pass  # the service's lines are for the terminal; the window shows its own sentences

    # --- what the person does ------------------------------------------------------------------
    def emergency_stop(self) -> None:
        runner = self.service.runner
        if runner is not None and not runner.done.called:
            runner.emergency_stop()

    def toggle_pause(self) -> None:
        runner = self.service.runner
        if runner is not None and not runner.done.called:
            runner.toggle_pause()

    def pick_window(self) -> WindowPicker | None:
        """The whole screen or one window: the picker lists, the session core narrows."""
        runner = self.service.runner
        if runner is None or runner.done.called or not runner.consent.is_presenter:
            return None
        if self.picker is not None:
            self.picker.close()
        self.picker = WindowPicker(self, runner, self._supporter())
        self.picker.shared.connect(lambda info: self.log.append(shared_sentence(info)))
        self.picker.show()
        return self.picker

    def set_password(self, password: str | None = None) -> bool:
        from ..common.session.channel import new_host_secret
        if not self.admin:
            return False
        if password is None:
            password, ok = QInputDialog.getText(self, t("Set host password ..."),
                                                t("New session password (at least 8 characters):"),
                                                QLineEdit.Password)
            if not ok:
                return False
        if len(password) < 8:
            self.log.append(t("The session password is too short: use at least 8 characters."))
            return False
        salt, secret = new_host_secret(password)
        settings.save_secret(self.folder, salt, secret)
        self.service.reload_secret()
        self.log.append(t("Session password set."))
        return True

    # --- SessionDelegate -------------------------------------------------------------------------
    def secured(self, verification_code: str, peer: str | None) -> None:
        self.verification_code = verification_code
        self.refresh()

    def sharing(self, active: bool) -> None:
        self.refresh()

    def _screen_runner(self):
        return self.service.runner

    def _supporter(self) -> str:
        return (self.service.offer or {}).get("supporter") or t("the supporter")

    def _screen_title(self) -> str:
        return t("Screen of {who}").format(who=self._supporter())

    def _paused_text(self) -> str:
        return t("Paused by {who}: the last picture stays until the screen is resumed.").format(
            who=self._supporter())

    def ended(self, reason) -> None:
        self.last_end = reason.text()
        self.remote_screen_closed()
        if self.picker is not None:
            self.picker.close()
        self.log.append(t("Session ended: {reason}").format(
            reason=end_sentence(reason, Role.HOST, self.ui.names if self.ui else None)))
        self.reactor.callLater(0, self.refresh)

    def _recording_waits(self) -> None:
        """The connection was lost while the screen was recorded: the presence resumes the
        upload once it is back (session core); the window says so and does not close (or go
        offline) before it is done, at most ``RESUME_WAIT_SECONDS``."""
        if self.uploading is not None:
            return
        self._stop_following()
        self.uploading = defer.Deferred()   # first: a close asked from here on waits for it
        self.upload_label.show_state("uploading")
        self.uploading.addCallback(self._rest_waited)
        defer.ensureDeferred(recorder.all_resumed(self.reactor, recorder.RESUME_WAIT_SECONDS)
                             ).chainDeferred(self.uploading)   # may fire at once

    def _rest_waited(self, done: bool) -> None:
        self.upload_label.show_state("complete" if done else "incomplete")
        self.uploading = None
        if self._close_after_upload:
            self.close()
        elif not done and recorder.waiting_count():
            self.late_upload = defer.ensureDeferred(self._follow_late_upload())
            self.late_upload.addErrback(lambda f: f.trap(defer.CancelledError))

    async def _follow_late_upload(self) -> None:
        """The bounded wait ran out but the host stays online: the presence still resumes the
        upload whenever the server is back, and the line then says what became of it (the line
        no longer claims a failure after the rest did go up)."""
        done = await recorder.all_resumed(self.reactor, math.inf)
        self.late_upload = None
        self.upload_label.show_state("complete" if done else "incomplete")

    def _stop_following(self) -> None:
        if self.late_upload is not None:
            self.late_upload.cancel()
            self.late_upload = None

    def closeEvent(self, event) -> None:  # noqa: N802
        if self.uploading is not None:   # closes itself once the recording is up (or given up)
            self._close_after_upload = True
            event.ignore()
            return
        self._stop_following()
        self._unwatch()
        self.service.stop()
        super().closeEvent(event)


def run(args) -> int:
    from ..common.terminal.cli import folder_of
    from ..common.qt.app import run_app
    from ..common.qt.i18n import system_language
    from ..common.terminal.stream_cli import screen_offer
    folder = folder_of(args, "host")
    folder.require_enrolled("host")
    from .cli import with_saved_screen
    with_saved_screen(args, folder)
    if args.screen is None:
        args.screen = os.environ.get("DISPLAY")
    screen = screen_offer(args)
    windows: list[Any] = []

    def main(app, reactor):
        window = HostWindow(reactor, folder, screen=screen,
                            language=args.language or system_language())
        windows.append(window)
        window.show()
        window.start().addErrback(lambda f: window.log.append(
            t("Error: {message}").format(message=f.getErrorMessage())))
    return run_app("hausmeister-host", args.language, main)
