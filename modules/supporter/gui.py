"""``hausmeister-supporter gui``: the supporter's host list and live viewer.

The first start asks for the server, shows the CA fingerprint for comparison and enrolls;
afterwards the certificate renews itself when due.  The main window lists the hosts (search,
group filter, online first); double-click or Enter on a host asks for its password and opens
the session in a tab: the remote screen drawn as RFB updates arrive, keyboard and mouse while
control is granted, clipboard both ways, rights, direction, files (button or drag and drop)
with progress, chat, protocol comments, the verification code, a timer and the end.  Every
session is a ``SessionRunner``; these widgets only show it and pass on commands."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

from PySide6.QtCore import QSortFilterProxyModel, Qt, QTimer
from PySide6.QtGui import QAction, QStandardItem, QStandardItemModel
from PySide6.QtWidgets import (
    QApplication, QCheckBox, QComboBox, QDialog, QDialogButtonBox, QFileDialog, QFormLayout,
    QHBoxLayout, QInputDialog, QLabel, QLineEdit, QMainWindow, QMenu, QProgressBar, QPushButton,
    QSplitter, QTableView, QTabWidget, QTextBrowser, QToolBar, QToolButton, QVBoxLayout, QWidget,
)
from twisted.internet import defer

from protocol.runtime import run_blocking

from ..common.link import enrollment
from ..common.errors import NotConnected
from ..common.link.connection import address_of, greeted
from ..common.session.consent import (
    Event, Right, RightDenied, RightRevoked, Role,
)
from ..common.link.folder import ModuleFolder
from ..common.qt.consent_dialogs import DialogConsentUI, end_sentence
from ..common.qt.error_text import error_sentence
from ..common.qt.file_reasons import file_reason
from ..common.qt.i18n import install_translation, t
from ..common.qt.viewer import REMOTE_KEY_COMBOS, FramebufferWidget, scrollable
from ..common.qt.window_picker import WindowPicker, shared_sentence
from ..common.session.file_transfer import CANCELLED_BY_SUPPORTER
from ..common.session.session_runner import SessionDelegate
from .host_directory import HostDirectory
from .adhoc_offer import AdhocOffer
from .adhoc_panel import AdhocPanel
from .sessions import connect_host

KIND = "supporter"
HOST_ID = Qt.UserRole + 1
SORT_KEY = Qt.UserRole + 2


class EnrollDialog(QDialog):
    """First start: the server, its CA fingerprint (shown to compare), user and password."""

    def __init__(self, parent=None, server: str = "", fingerprint: str = "") -> None:
        super().__init__(parent)
        self.setWindowTitle(t("Enroll this supporter module"))
        form = QFormLayout(self)
        self.server = QLineEdit(server)
        self.fingerprint = QLineEdit(fingerprint)
        self.fingerprint.setMinimumWidth(520)
        self.user = QLineEdit()
        self.password = QLineEdit()
        self.password.setEchoMode(QLineEdit.Password)
        form.addRow(t("Server address"), self.server)
        form.addRow(QLabel(t("CA fingerprint (compare it with what your administrator gave you)")))
        form.addRow(self.fingerprint)
        form.addRow(t("User name"), self.user)
        form.addRow(t("Password"), self.password)
        self.message = QLabel()
        self.message.setWordWrap(True)
        self.message.setStyleSheet("color: #b00020")
        form.addRow(self.message)
        buttons = QDialogButtonBox()
        self.enroll_button = buttons.addButton(t("Enroll"), QDialogButtonBox.ActionRole)
        buttons.addButton(t("Cancel"), QDialogButtonBox.RejectRole)
        buttons.rejected.connect(self.reject)
        form.addRow(buttons)


class SessionTab(QWidget, SessionDelegate):
    """One session: viewer, toolbar, chat, comments, files, rights, code and timer."""

    def __init__(self, window: "SupporterWindow", title: str, peer: Role, peer_name: str) -> None:
        QWidget.__init__(self)
        self.window = window
        self.title = title
        self.runner = None
        self.task: defer.Deferred | None = None
        self.peer_name = peer_name
        self.viewer: FramebufferWidget | None = None
        #: when the session started (``attach``); None while the tab waits for it (an ad-hoc ID
        #: on offer, a host being asked): the timer shows only the session's own time
        self.started: float | None = None
        self.end_text: str | None = None
        self.picker: WindowPicker | None = None
        self.ui = DialogConsentUI(self, Role.SUPPORTER, peer, peer_name, self._consent_event)
        self.receive_dir = window.receive_dir
        #: (setter, English source) of every fixed text, set again on a language switch
        self._fixed: list[tuple[Any, str]] = []
        #: the notice's sentence, made again on a language switch (None: no notice)
        self._notice_text: Callable[[], str] | None = None
        self._code: str | None = None            # the verification code, once secured
        self._paused = False                     # the peer paused its screen
        self.setAcceptDrops(True)
        layout = QVBoxLayout(self)
        self.toolbar = QToolBar()
        self.actions: dict[str, QAction] = {}
        for key, text, slot in (
                ("view", "Request view", lambda: self._request("view")),
                ("control", "Request control", lambda: self._request("control")),
                ("files", "Request files", lambda: self._request("files")),
                ("direction", "Show my screen", self._show_my_screen),
                ("pause", "Pause screen", self._toggle_pause),
                ("window", "Share: whole screen / one window ...", self.pick_window),
                ("send", "Send file ...", self._choose_file),
                ("inbox", "Folder for received files ...", self._choose_inbox),
                ("end", "End session", self.end_session)):
            action = QAction(self)
            self._fix(action.setText, text)
            action.triggered.connect(slot)
            if key != "end":
                self.toolbar.addAction(action)
            self.actions[key] = action
        # keys the local desktop would grab (Ctrl+Alt+Del, Alt+Tab, ...), as real key events
        self.keys_menu = QMenu(self)
        self._fix(self.keys_menu.setTitle, "Send keys")
        self.key_actions: dict[str, QAction] = {}
        for label, keysyms in REMOTE_KEY_COMBOS:
            action = self.keys_menu.addAction("")
            self._fix(action.setText, label)
            action.triggered.connect(lambda _checked=False, keys=keysyms: self.send_keys(keys))
            self.key_actions[label] = action
        self.keys_button = QToolButton()
        self._fix(self.keys_button.setText, "Send keys")
        self.keys_button.setMenu(self.keys_menu)
        self.keys_button.setPopupMode(QToolButton.InstantPopup)
        self._fix(self.keys_button.setToolTip, "Keys your own desktop would keep, sent to the "
                  "remote screen (only while you have control)")
        self.toolbar.addWidget(self.keys_button)
        layout.addWidget(self.toolbar)
        header = QHBoxLayout()
        header.setSpacing(28)
        self.code_label = QLabel()
        self.timer_label = QLabel()
        self.rights_label = QLabel()
        for label in (self.code_label, self.rights_label, self.timer_label):
            header.addWidget(label)
        header.addStretch(1)
        self.fit = QCheckBox()
        self._fix(self.fit.setText, "Fit to window")
        self.fit.setChecked(True)
        self.fit.toggled.connect(self._fit_changed)
        header.addWidget(self.fit)
        end_button = QToolButton()
        end_button.setDefaultAction(self.actions["end"])
        end_button.setStyleSheet("QToolButton { background: #c62828; color: white; "
                                 "font-weight: bold; padding: 4px 12px; border-radius: 4px; } "
                                 "QToolButton:disabled { background: #d9a3a3; }")
        header.addWidget(end_button)
        layout.addLayout(header)
        self.notice = QLabel()
        self.notice.setWordWrap(True)
        self.notice.setStyleSheet("color: #b00020; font-weight: bold")
        layout.addWidget(self.notice)
        split = QSplitter()
        self.screen_area = QWidget()
        self.screen_layout = QVBoxLayout(self.screen_area)
        self.screen_layout.setContentsMargins(0, 0, 0, 0)
        self.waiting = QLabel()
        self._fix(self.waiting.setText, "Connecting ...")
        self.waiting.setAlignment(Qt.AlignCenter)
        self.screen_layout.addWidget(self.waiting)
        split.addWidget(self.screen_area)
        side = QWidget()
        side_layout = QVBoxLayout(side)
        chat_title = QLabel()
        self._fix(chat_title.setText, "Chat")
        side_layout.addWidget(chat_title)
        self.chat_log = QTextBrowser()
        side_layout.addWidget(self.chat_log, 1)
        self.chat_field = QLineEdit()
        self._fix(self.chat_field.setPlaceholderText, "Type a message")
        self.chat_field.returnPressed.connect(self._chat)
        side_layout.addWidget(self.chat_field)
        self.comment_field = QLineEdit()
        self._fix(self.comment_field.setPlaceholderText, "Comment for the protocol")
        self.comment_field.returnPressed.connect(self._comment)
        side_layout.addWidget(self.comment_field)
        transfer = QHBoxLayout()
        self.progress = QProgressBar()
        self.progress.setVisible(False)
        transfer.addWidget(self.progress, 1)
        self.cancel_transfer = QPushButton()
        self._fix(self.cancel_transfer.setText, "Cancel")
        self.cancel_transfer.setVisible(False)
        self.cancel_transfer.clicked.connect(self._cancel_transfer)
        transfer.addWidget(self.cancel_transfer)
        side_layout.addLayout(transfer)
        self.transfer_id: str | None = None     # the transfer the progress bar shows
        split.addWidget(side)
        split.setStretchFactor(0, 4)
        split.setStretchFactor(1, 1)
        split.setSizes([920, 340])      # the remote screen gets the room, not the chat
        layout.addWidget(split, 1)
        self.clock = QTimer(self)
        self.clock.timeout.connect(self._tick)
        self.clock.start(1000)
        self._tick()
        self._refresh()
        QApplication.clipboard().dataChanged.connect(self._local_clipboard)

    # --- language --------------------------------------------------------------------------------
    def _fix(self, setter, source: str) -> None:
        """Set a fixed text now, and again in the new language on a switch."""
        self._fixed.append((setter, source))
        setter(t(source))

    def _say(self, make: Callable[[], str]) -> None:
        """The notice line, made by ``make`` now and again on a language switch."""
        self._notice_text = make
        self.notice.setText(make())

    def retranslate(self) -> None:
        """The window's language changed: every text the tab shows now is said again in it
        (the chat history stays as it was written, like a transcript)."""
        for setter, source in self._fixed:
            setter(t(source))
        if self._notice_text is not None:
            self.notice.setText(self._notice_text())
        if self._code is not None:
            self.secured(self._code, None)
        if self._paused:
            self.screen_paused(True)
        adhoc_panel = getattr(self, "adhoc_panel", None)
        if adhoc_panel is not None:
            adhoc_panel.retranslate()
        self._tick()
        self._refresh()

    # --- state ---------------------------------------------------------------------------------
    def start(self, coroutine) -> None:
        """Run the tab's session set-up; closing the tab cancels it while it waits."""
        self.task = defer.ensureDeferred(coroutine)
        self.task.addErrback(self._failed)
        self._refresh()

    def _failed(self, failure) -> None:
        import shiboken6
        if not shiboken6.isValid(self.notice):
            return None        # the tab is gone already
        if failure.check(defer.CancelledError):
            self.end_text = "ended by the supporter"
            self._say(lambda: t("Session ended: {reason}").format(
                reason=t("You ended the session.")))
        else:
            self._say(lambda: error_sentence(failure))
        self.end_text = self.end_text or "the session could not be set up"   # the timer stops
        self.waiting.hide()                  # no "Connecting ..." under a failed set-up
        self._refresh()

    def attach(self, runner) -> None:
        self.runner = runner
        self.started = time.monotonic()
        self._tick()
        self._refresh()

    def _tick(self) -> None:
        self.timer_label.setVisible(self.started is not None)
        if self.end_text is None and self.started is not None:
            seconds = round(time.monotonic() - self.started)   # a coarse tick may come early
            self.timer_label.setText(t("Session {time}").format(
                time=f"{seconds // 60:02d}:{seconds % 60:02d}"))

    def _refresh(self) -> None:
        runner = self.runner
        live = (runner is not None and not runner.done.called and runner.driver is not None
                and self.end_text is None)
        held = runner.consent.granted if live and not runner.consent.is_presenter else frozenset()
        self.rights_label.setText(t("Rights: {rights}").format(
            rights=", ".join(t(r.value) for r in Right if r in held) or t("none")))
        for key in ("view", "control", "files"):
            self.actions[key].setEnabled(live and Right(key) not in held)
        for key in ("direction", "send"):
            self.actions[key].setEnabled(live)
        showing = live and runner.consent.is_presenter    # after a direction change
        self.actions["pause"].setEnabled(showing)
        self.actions["window"].setEnabled(showing)
        self.actions["pause"].setText(t("Resume screen") if showing and runner.consent.paused
                                      else t("Pause screen"))
        waiting = runner is None and self.task is not None and not self.task.called
        self.actions["end"].setEnabled(live or waiting)   # also: give up an unused ad-hoc ID
        control = live and Right.CONTROL in held and self.viewer is not None
        self.keys_button.setEnabled(control)
        for action in self.key_actions.values():
            action.setEnabled(control)
        self.chat_field.setEnabled(live)
        self.comment_field.setEnabled(live)

    def _consent_event(self, event: Event, sentence: str | None) -> None:
        if sentence:
            self.chat_log.append(sentence)
        if isinstance(event, (RightDenied, RightRevoked)) and sentence:
            self._say(lambda: sentence)     # shown in the window, not only in a log
        self._refresh()

    # --- commands ------------------------------------------------------------------------------
    def _request(self, right: str) -> None:
        if self.runner is not None:
            self.runner.request(right)

    def _show_my_screen(self) -> None:
        if self.runner is not None:
            self.runner.show_my_screen()

    def _toggle_pause(self) -> None:
        if self.runner is not None:
            self.runner.toggle_pause()

    def pick_window(self) -> WindowPicker | None:
        """The whole screen or one window: the picker lists, the session core narrows."""
        runner = self.runner
        if runner is None or runner.done.called or not runner.consent.is_presenter:
            return None
        if self.picker is not None:
            self.picker.close()
        self.picker = WindowPicker(self, runner, self.peer_name)
        self.picker.shared.connect(lambda info: self.chat_log.append(shared_sentence(info)))
        self.picker.show()
        return self.picker

    def _chat(self) -> None:
        text = self.chat_field.text().strip()
        if text and self.runner is not None and self.runner.chat(text):
            self.chat_field.clear()

    def _comment(self) -> None:
        text = self.comment_field.text().strip()
        if text and self.runner is not None and self.runner.comment(text):
            self.comment_field.clear()

    def send_file(self, path: str):
        if self.runner is not None:
            return self.runner.send_file(path)
        return None

    def _choose_file(self) -> None:
        dialog = QFileDialog(self, t("Send file ..."))
        dialog.setFileMode(QFileDialog.ExistingFiles)
        dialog.filesSelected.connect(lambda paths: [self.send_file(p) for p in paths])
        dialog.open()

    def _choose_inbox(self) -> None:
        dialog = QFileDialog(self, t("Folder for received files ..."), self.receive_dir)
        dialog.setFileMode(QFileDialog.Directory)
        dialog.fileSelected.connect(self.set_inbox)
        dialog.open()

    def set_inbox(self, folder: str) -> None:
        self.receive_dir = folder
        if self.runner is not None:
            self.runner.receive_files_into(folder)

    def dragEnterEvent(self, event) -> None:  # noqa: N802
        if event.mimeData().hasUrls():
            event.acceptProposedAction()

    def dropEvent(self, event) -> None:  # noqa: N802
        for url in event.mimeData().urls():
            if url.isLocalFile():
                self.send_file(url.toLocalFile())

    def send_keys(self, keysyms: tuple[int, ...]) -> None:
        """Press ``keysyms`` together on the remote screen and release them (the viewer and
        the session send nothing without control)."""
        if self.viewer is not None and self._control_held():
            self.viewer.send_keys(keysyms)

    def _fit_changed(self, fit: bool) -> None:
        if self.viewer is not None:
            self.viewer.set_fit(fit)

    def end_session(self) -> None:
        if self.runner is not None and not self.runner.done.called:
            self.runner.end_session()
        elif self.runner is None and self.task is not None and not self.task.called:
            self.task.cancel()      # still connecting, or an ad-hoc ID nobody used yet

    def _local_clipboard(self) -> None:
        text = QApplication.clipboard().text()
        if text and self.runner is not None and text != getattr(self, "_from_remote", None):
            self.runner.send_clipboard(text)   # only while control is held (the runner checks)

    def _control_held(self) -> bool:
        runner = self.runner
        return runner is not None and not runner.done.called and runner.consent.holds("control")

    # --- SessionDelegate -----------------------------------------------------------------------
    def secured(self, verification_code: str, peer: str | None) -> None:
        self._code = verification_code
        self.code_label.setText(t("Verification code: {code}").format(code=verification_code))
        self._refresh()

    def remote_screen(self, screen) -> None:
        self.viewer = FramebufferWidget(
            lambda: screen.protocol.pixels, self.runner.pointer, self.runner.key,
            self._control_held, lock=screen.protocol.framebuffer_lock)
        self.waiting.hide()
        self.viewer_area = scrollable(self.viewer)
        self.screen_layout.addWidget(self.viewer_area)
        self.viewer.set_fit(self.fit.isChecked())
        self.viewer.setFocus()
        self._refresh()

    def screen_updated(self, rects) -> None:
        if self.viewer is not None:
            self.viewer.screen_changed(rects)

    def screen_paused(self, paused: bool) -> None:
        self._paused = paused
        if self.viewer is not None and not self.runner.consent.is_presenter:
            who = self.peer_name
            self.viewer.set_paused(t("Paused by {who}: the last picture stays until the screen "
                                     "is resumed.").format(who=who) if paused else None)

    def remote_screen_closed(self) -> None:
        if self.viewer is not None:   # the direction changed: the new screen comes anew
            self.viewer_area.setParent(None)
            self.viewer_area.deleteLater()
            self.viewer = None
            self.waiting.show()

    def remote_clipboard(self, text: str) -> None:
        self._from_remote = text
        QApplication.clipboard().setText(text)

    def _cancel_transfer(self) -> None:
        if self.runner is not None and self.transfer_id is not None:
            self.runner.cancel_file(self.transfer_id, CANCELLED_BY_SUPPORTER)

    def file_event(self, event) -> None:
        from ..common.session.file_transfer import (
            FileCompleted, FileFailed, FileProgress, FileRejected,
        )
        if isinstance(event, FileProgress) and event.size:
            self.transfer_id = event.id
            self.progress.setVisible(True)
            self.cancel_transfer.setVisible(event.transferred < event.size)
            self.progress.setFormat(f"{event.name}: %p %")
            self.progress.setValue(100 * event.transferred // event.size)
        elif isinstance(event, FileCompleted):
            self.progress.setVisible(True)
            self.progress.setValue(100)
            self.chat_log.append(t("File {name} received.").format(name=event.name)
                                 if event.direction == self.runner.files.incoming_direction
                                 else t("File {name} sent.").format(name=event.name))
        elif isinstance(event, (FileFailed, FileRejected)):
            self._say(lambda: t("The file {name} was not transferred: {reason}").format(
                name=event.name, reason=file_reason(event.reason)))
        if isinstance(event, (FileCompleted, FileFailed, FileRejected)) and \
                event.id == self.transfer_id:
            self.cancel_transfer.setVisible(False)
            self.progress.setVisible(isinstance(event, FileCompleted))   # no stale "0 %"
            self.transfer_id = None

    def ended(self, reason) -> None:
        self.end_text = reason.text()
        if self.picker is not None:
            self.picker.close()
        self._say(lambda: t("Session ended: {reason}").format(
            reason=end_sentence(reason, Role.SUPPORTER, self.ui.names)))
        self._refresh()


class SupporterWindow(QMainWindow):
    def __init__(self, reactor, folder: ModuleFolder, language: str = "en") -> None:
        super().__init__()
        self.reactor = reactor
        self.folder = folder
        self.language = language
        self.directory: HostDirectory | None = None
        self.hosts: list[dict] = []
        #: while the host list reconnects: why (a sentence or an exception); None when online
        self.offline_why: Any = None
        self.sessions: list[SessionTab] = []
        self.receive_dir = str(Path.home() / "Downloads" / "Hausmeister")
        self.tabs = QTabWidget()
        self.tabs.setTabsClosable(True)
        self.tabs.tabCloseRequested.connect(self._close_tab)
        self.setCentralWidget(self.tabs)
        page = QWidget()
        layout = QVBoxLayout(page)
        bar = QHBoxLayout()
        self.search = QLineEdit()
        self.search.textChanged.connect(self._filter)
        self.group = QComboBox()
        self.group.currentIndexChanged.connect(self._filter)
        self.refresh_button = QPushButton()
        self.refresh_button.clicked.connect(self.refresh)
        self.adhoc_button = QPushButton()
        self.adhoc_button.clicked.connect(self.new_adhoc)
        self.language_box = QComboBox()
        self.language_box.addItem("English", "en")
        self.language_box.addItem("Deutsch", "de")
        self.language_box.setCurrentIndex(1 if language == "de" else 0)
        self.language_box.currentIndexChanged.connect(self._language_changed)
        for widget in (self.search, self.group, self.refresh_button, self.adhoc_button,
                       self.language_box):
            bar.addWidget(widget, 1 if widget is self.search else 0)
        layout.addLayout(bar)
        self.model = QStandardItemModel(0, 5)
        self.proxy = QSortFilterProxyModel()
        self.proxy.setSourceModel(self.model)
        self.proxy.setFilterCaseSensitivity(Qt.CaseInsensitive)
        self.proxy.setFilterKeyColumn(-1)
        self.proxy.setSortRole(SORT_KEY)
        self.table = QTableView()
        self.table.setModel(self.proxy)
        self.table.setEditTriggers(QTableView.NoEditTriggers)
        self.table.setSelectionBehavior(QTableView.SelectRows)
        self.table.setSelectionMode(QTableView.SingleSelection)
        self.table.verticalHeader().hide()
        header = self.table.horizontalHeader()
        header.setMinimumSectionSize(110)
        header.setSectionResizeMode(header.ResizeMode.ResizeToContents)
        header.setSectionResizeMode(1, header.ResizeMode.Stretch)
        self.table.activated.connect(self.open_host)   # double-click or Enter
        layout.addWidget(self.table, 1)
        self.status_label = QLabel()
        layout.addWidget(self.status_label)
        self.tabs.addTab(page, "")
        self.tabs.tabBar().setTabButton(0, self.tabs.tabBar().ButtonPosition.RightSide, None)
        self.resize(1280, 800)
        self.retranslate()

    def retranslate(self) -> None:
        self.setWindowTitle(t("Hausmeister Support"))
        self.search.setPlaceholderText(t("Search"))
        self.refresh_button.setText(t("Refresh"))
        self.adhoc_button.setText(t("New ad-hoc session"))
        self.tabs.setTabText(0, t("Hosts"))
        self.model.setHorizontalHeaderLabels([t("Status"), t("Name"), t("Group"), t("Last seen"),
                                              t("Address")])
        self._fill()
        import shiboken6
        for tab in self.sessions:        # the open session tabs too, not only the list
            if shiboken6.isValid(tab):
                tab.retranslate()

    def _language_changed(self) -> None:
        self.language = self.language_box.currentData()
        install_translation(QApplication.instance(), self.language)
        self.retranslate()

    # --- the server ----------------------------------------------------------------------------
    async def start(self) -> None:
        if self.folder.renewal_due():
            await run_blocking(enrollment.renew, self.folder)
        self.directory = HostDirectory(self.reactor, self._connection, self)
        await self.directory.start()

    @property
    def conn(self):
        """The current control connection (None while the host list reconnects)."""
        return self.directory.conn if self.directory is not None else None

    async def _connection(self):
        return await greeted(self.reactor, self.folder, KIND)

    def refresh(self) -> None:
        if self.directory is not None:
            defer.ensureDeferred(self.directory.refresh())

    # the host directory's delegate: the list as the server pushes it
    def hosts_listed(self, hosts: list[dict], changed: list[dict]) -> None:
        self.hosts = hosts
        self._fill()

    def host_changed(self, host: dict) -> None:
        self._fill()

    def connection_changed(self, state: str, why, retry_in: float) -> None:
        self.offline_why = None if state == "online" else why
        self._fill()

    @property
    def offline_text(self) -> str:
        """While the host list reconnects: the status line, in the window's language."""
        if self.offline_why is None:
            return ""
        server = address_of(self.folder)
        text = t("Offline, reconnecting to {server}\u00a0…").format(
            server=f"{server.host}:{server.port}")
        if isinstance(self.offline_why, BaseException):
            text += " " + error_sentence(self.offline_why)
        return text

    def _fill(self) -> None:
        self.model.removeRows(0, self.model.rowCount())
        groups = sorted({h["group"] for h in self.hosts if h["group"]})
        current = self.group.currentData()
        self.group.blockSignals(True)
        self.group.clear()
        self.group.addItem(t("All groups"), "")
        for group in groups:
            self.group.addItem(group, group)
        self.group.setCurrentIndex(max(0, self.group.findData(current or "")))
        self.group.blockSignals(False)
        for host in self.hosts:
            seen = host["last_seen"][:16].replace("T", " ") if host["last_seen"] else t("never")
            cells = [t("online") if host["online"] else t("offline"), host["name"],
                     host["group"], seen, host["address"]]
            row = [QStandardItem(text) for text in cells]
            for item in row:
                item.setData(host["host_id"], HOST_ID)
                item.setData(f"{0 if host['online'] else 1}{host['name'].lower()}", SORT_KEY)
            if host["online"] and self.offline_why is None:   # greyed like the rest when stale
                row[0].setForeground(Qt.darkGreen)
            self.model.appendRow(row)
        self.proxy.sort(0)
        self.table.resizeColumnsToContents()
        online = sum(1 for h in self.hosts if h["online"])
        offline_text = self.offline_text
        self.status_label.setText(offline_text or t("Hosts: {count}, online: {online}").format(
            count=len(self.hosts), online=online))
        # while offline the line must catch the eye and the list is greyed: it is not current
        self.status_label.setStyleSheet("color: #a40000; font-weight: bold;"
                                        if offline_text else "")
        self.table.setEnabled(not offline_text)
        self._filter()

    def _filter(self) -> None:
        self.proxy.setFilterFixedString(self.search.text())
        group = self.group.currentData() or ""
        for row in range(self.proxy.rowCount()):
            index = self.proxy.index(row, 2)
            self.table.setRowHidden(row, bool(group) and index.data() != group)

    # --- sessions ------------------------------------------------------------------------------
    def open_host(self, index) -> None:
        host_id = index.data(HOST_ID)
        name = self.proxy.index(index.row(), 1).data()
        dialog = QInputDialog(self)
        dialog.setWindowTitle(t("Session password of {host}").format(host=name))
        dialog.setLabelText(t("Session password of {host}").format(host=name))
        dialog.setTextEchoMode(QLineEdit.Password)
        dialog.setOkButtonText(t("Connect"))
        dialog.setCancelButtonText(t("Cancel"))
        dialog.textValueSelected.connect(lambda password: self.connect_host(host_id, name,
                                                                             password))
        self.password_dialog = dialog
        dialog.open()
        field = dialog.findChild(QLineEdit)
        if field is not None:                # room for a long password, not a 15-char box
            field.setMinimumWidth(380)
            dialog.adjustSize()

    def connect_host(self, host_id: str, name: str, password: str) -> SessionTab:
        tab = SessionTab(self, name, Role.HOST, name)
        self._add(tab)

        async def run():
            if self.conn is None:
                raise NotConnected("not connected to the server right now: the host list "
                                   "reconnects by itself; try again in a moment")
            runner = await connect_host(self.reactor, self.conn, self.folder, host_id, password,
                                        tab.ui, delegate=tab, pipe=False,
                                        screen=self.own_screen(),
                                        request_rights=("view", "control"),
                                        receive_dir=tab.receive_dir)
            tab.attach(runner)
            return await runner.run()
        tab.start(run())
        return tab

    def new_adhoc(self) -> SessionTab:
        """A tab with an 8-digit ID, large, kept on offer (a lost connection or an expired ID
        draws a new one, ``AdhocOffer``) until the customer joins; then the session."""
        tab = SessionTab(self, "ad-hoc", Role.CUSTOMER, t("the customer"))
        self._add(tab)
        panel = AdhocPanel(tab, self.tabs)
        tab.waiting.hide()
        tab.screen_layout.addWidget(panel)
        tab.adhoc_panel = panel
        tab.adhoc_label = panel.id_label
        # one control connection per ad-hoc ID; closing the tab cancels the wait (and the offer)
        tab.offer = AdhocOffer(self.reactor, self._connection, panel)

        async def run():
            await tab.offer.start()
            invitation, ticket = await tab.offer.joined
            try:
                runner = await invitation.session(self.reactor, self.folder, ticket, tab.ui,
                                                  delegate=tab, pipe=False,
                                                  screen=self.own_screen(),
                                                  request_rights=("view", "control"),
                                                  receive_dir=tab.receive_dir)
                tab.attach(runner)
                panel.hide()
                tab.waiting.show()
                return await runner.run()
            finally:
                invitation.conn.transport.loseConnection()
        tab.start(run())
        return tab

    def own_screen(self):
        """This desktop's display, for "Show my screen" (None where there is none)."""
        import os
        from argparse import Namespace

        from ..common.terminal.stream_cli import screen_offer
        display = os.environ.get("DISPLAY")
        if not display:
            return None
        try:
            return screen_offer(Namespace(screen=display, window=None, hide_background=False))
        except Exception:
            return None

    def _add(self, tab: SessionTab) -> None:
        self.sessions.append(tab)
        self.tabs.addTab(tab, tab.title)
        self.tabs.setCurrentWidget(tab)

    def _close_tab(self, index: int) -> None:
        tab = self.tabs.widget(index)
        if isinstance(tab, SessionTab):
            tab.end_session()
            self.tabs.removeTab(index)

    def closeEvent(self, event) -> None:  # noqa: N802
        for tab in self.sessions:
            tab.end_session()
        if self.directory is not None:
            self.directory.stop()
        super().closeEvent(event)


def run(args) -> int:
    from ..common.terminal.cli import folder_of
    from ..common.qt.app import run_app
    from ..common.qt.i18n import system_language
    folder = folder_of(args, KIND)
    language = args.language or system_language()
    windows: list[Any] = []

    def main(app, reactor):
        def open_main():
            window = SupporterWindow(reactor, folder, language)
            windows.append(window)
            window.show()
            defer.ensureDeferred(window.start()).addErrback(lambda f: window.status_label.setText(
                t("Error: {message}").format(message=f.getErrorMessage())))
        if folder.is_enrolled():
            open_main()
            return
        dialog = EnrollDialog(None, getattr(args, "server", "") or "",
                              getattr(args, "ca_fingerprint", "") or "")
        windows.append(dialog)

        def enroll():
            d = run_blocking(enrollment.enroll_supporter, folder, dialog.server.text().strip(),
                             dialog.fingerprint.text().strip(), dialog.user.text().strip(),
                             dialog.password.text())
            d.addCallbacks(lambda _: (dialog.done(1), open_main()),
                           lambda f: dialog.message.setText(f.getErrorMessage()))
        dialog.enroll_button.clicked.connect(enroll)
        dialog.show()
    return run_app("hausmeister-supporter", args.language, main)
