"""The VNC source (``modules.common.screen.capture_vnc``) against RFB servers on 127.0.0.1:0.

The well-behaved local server is our own ``RFBServer`` (``listen_vnc``) over a fixed picture, with
an injector that records what reaches it; the misbehaving ones are raw protocols writing bytes.
What is checked: loopback only, the input filter (control), the release of held keys on
disconnect, the clipboard both ways in UTF-8, and one clear reason for a wrong password or a broken server, before and after the
first frame.
"""

from __future__ import annotations

import struct

import ipaddress
import os

import numpy as np
import pytest
import pytest_twisted
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import defer
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import deferLater

from modules.common.screen.capture_vnc import (LOCAL_ENCODINGS, VncAddress, VncInjector, VncSource, VncSourceError,
                                               parse_vnc_url, read_password_file, vnc_screen_offer)
from modules.common.screen.capture_x11 import Capture, DamageTracker
from modules.common.screen.rfb_server import Rect, as_rgb
from modules.common.screen.rfb_twisted import listen_vnc

from .fixtures_x11 import require, stop_process, xvfb  # noqa: F401 - fixture


@pytest.mark.parametrize("url, address", [
    ("vnc://127.0.0.1:5900", VncAddress("127.0.0.1", 5900)),
    ("vnc://127.0.0.1", VncAddress("127.0.0.1", 5900)),
    ("VNC://127.1.2.3:5901", VncAddress("127.1.2.3", 5901)),
    ("vnc://localhost:5902", VncAddress("127.0.0.1", 5902)),
    ("vnc://[::1]:5903", VncAddress("::1", 5903)),
])
def test_loopback_addresses_are_accepted(url, address):
    assert parse_vnc_url(url) == address


@pytest.mark.parametrize("url, why", [
    ("vnc://192.0.2.7:5900", "must run on this machine"),
    ("vnc://10.0.0.1", "must run on this machine"),
    ("vnc://vnc.example.lan:5900", "must run on this machine"),   # never resolved
    ("vnc://[2001:db8::1]:5900", "must run on this machine"),
    ("vnc://user:pw@127.0.0.1:5900", "--screen-password-file"),
    ("vnc://127.0.0.1:5900/x", "not a VNC address"),
    ("vnc://127.0.0.1:99999", "not a VNC address"),
])
def test_other_addresses_are_refused_in_one_line(url, why):
    with pytest.raises(VncSourceError) as caught:
        parse_vnc_url(url)
    message = str(caught.value)
    assert why in message and "\n" not in message and message.startswith("--screen vnc://")
    assert "pw@" not in message   # a password typed into the address is not echoed


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.text(max_size=60),
                 st.builds(lambda host, port: f"vnc://{host}:{port}",
                           st.one_of(st.ip_addresses().map(
                               lambda a: f"[{a}]" if a.version == 6 else str(a)),
                               st.text(max_size=20)),
                           st.integers(-5, 70000))))
def test_any_text_is_a_loopback_address_or_one_refusal(text):
    """Whatever is typed after --screen: a loopback address, or one line (never a resolve, never
    another exception)."""
    try:
        address = parse_vnc_url(text)
    except VncSourceError as exc:
        assert str(exc).isprintable() and str(exc).startswith("--screen ")
        return
    assert ipaddress.ip_address(address.host).is_loopback and 0 <= address.port <= 65535


def test_password_file_and_options_a_vnc_source_lacks(tmp_path):
    good = tmp_path / "pw"
    good.write_text("s3cret!x\nsecond line is not the password\n")
    assert read_password_file(good) == "s3cret!x"
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(VncSourceError, match="first line is empty"):
        read_password_file(tmp_path / "empty")
    with pytest.raises(VncSourceError, match="No such file"):
        read_password_file(tmp_path / "missing")
    with pytest.raises(VncSourceError, match="--window does not apply"):
        vnc_screen_offer("vnc://127.0.0.1:5900", window="term")
    with pytest.raises(VncSourceError, match="--hide-background does not apply"):
        vnc_screen_offer("vnc://127.0.0.1:5900", hide_background=True)


# --- a real local RFB server: ours, over a fixed picture ------------------------------------------
class Picture:
    """A capture source with a fixed picture (what the local server shows)."""
    paused = False
    hide_background = False

    def __init__(self, w: int = 320, h: int = 200) -> None:
        rng = np.random.default_rng(5)
        self.frame = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)

    def size(self):
        return self.frame.shape[1], self.frame.shape[0]

    def capture(self, tracker=None):
        damage, moves = (tracker or DamageTracker(False)).update(self.frame)
        return Capture(self.frame, damage, moves, None)


class Received:
    """The local server's injector: records what reaches the local desktop."""

    def __init__(self) -> None:
        self.events: list[tuple] = []

    def key(self, down, keysym):
        self.events.append(("key", down, keysym))

    def pointer(self, mask, x, y):
        self.events.append(("pointer", mask, x, y))

    def release_all(self):
        pass


async def until(check, what: str, timeout: float = 10.0):
    from twisted.internet import reactor
    for _ in range(int(timeout / 0.02)):
        if check():
            return
        await deferLater(reactor, 0.02, lambda: None)
    raise AssertionError(f"timed out waiting for {what}")


def off_reactor(fn, *args):
    from twisted.internet import threads
    return threads.deferToThread(fn, *args)


@pytest_twisted.ensureDeferred
async def test_frames_arrive_and_input_passes_only_while_control_is_granted():
    from twisted.internet import reactor
    picture, received, clipboard_in = Picture(), Received(), []
    port = listen_vnc(reactor, "127.0.0.1:0", picture, received, on_cut_text=clipboard_in.append)
    source = VncSource(VncAddress("127.0.0.1", port.getHost().port))
    try:
        with pytest.raises(VncSourceError, match="not connected"):
            source.size()
        assert not source.connected
        await source.connect()
        assert source.connected and source.size() == (320, 200)
        # the encodings the local server is asked for are the module's own, whatever a viewer
        # asks of the module's server
        assert port.factory.connections[-1].rfb.encodings == list(LOCAL_ENCODINGS)
        first = await off_reactor(source.capture)
        assert first.frame.shape == (200, 320, 4)                # BGRX, as X11 captures are
        assert np.array_equal(as_rgb(first.frame), picture.frame) and first.damage
        again = await off_reactor(source.capture)
        assert again.damage == [] and again.moves == []     # nothing new: no comparison even
        # the damage is what the local server updated, not a comparison of frames
        tracker = DamageTracker()
        assert (await off_reactor(source.capture, tracker)).damage == [Rect(0, 0, 320, 200)]
        changed = picture.frame.copy()
        changed[50:60, 70:90] = 0
        picture.frame = changed
        for _ in range(500):
            update = await off_reactor(source.capture, tracker)
            if update.damage:
                break
            await deferLater(reactor, 0.02, lambda: None)
        assert update.damage == [Rect(64, 0, 64, 64)] and np.array_equal(as_rgb(update.frame), changed)
        # the local server's clipboard, both ways, in UTF-8 (its Extended Clipboard)
        port.factory.connections[-1].send_cut_text("Grüße aus 東京")
        await until(lambda: source.clipboard.get() == "Grüße aus 東京", "the server's clipboard")
        await off_reactor(source.clipboard.set, "zurück nach 大阪")
        await until(lambda: clipboard_in == ["zurück nach 大阪"], "our clipboard at the server")
        assert source.clipboard.get() == "zurück nach 大阪"   # an echo would not be news
        control = {"granted": False}
        injector = VncInjector(source, lambda: control["granted"])
        assert await off_reactor(injector.key, True, 0x61) is False
        assert await off_reactor(injector.pointer, 1, 10, 10) is False
        control["granted"] = True
        assert await off_reactor(injector.key, True, 0x62) is True      # 'b' held down
        assert await off_reactor(injector.pointer, 1, 5000, 7) is True  # clipped to the screen
        await until(lambda: len(received.events) == 2, "the granted events")
        assert received.events == [("key", True, 0x62), ("pointer", 1, 319, 7)]
        # control withdrawn: the next event is refused and what the viewer held is released
        control["granted"] = False
        assert await off_reactor(injector.key, False, 0x62) is False
        await until(lambda: len(received.events) == 4, "the releases")
        assert received.events[2:] == [("key", False, 0x62), ("pointer", 0, 319, 7)]
        # held again, then the screen stops: released before the connection closes
        control["granted"] = True
        await off_reactor(injector.key, True, 0xFF0D)
        await until(lambda: len(received.events) == 5, "Return held")
        source.disconnect()
        assert not source.connected
        await until(lambda: not port.factory.connections[-1].transport.connected,
                    "the local server sees the close")
        assert received.events[5:] == [("key", False, 0xFF0D)]
        still = source.capture()   # a capture that was under way gets the last frame, still
        assert still.damage == [] and np.array_equal(still.frame, first.frame)
        with pytest.raises(VncSourceError, match="not connected"):
            source.capture(DamageTracker())
        # a screen that stops while the source connects: cancelled, not an error
        connecting = source.connect()
        source.disconnect()
        with pytest.raises(defer.CancelledError):
            await connecting
        # a later screen (the next session) connects again
        await source.connect()
        assert source.connections == 2
        source.disconnect()
    finally:
        source.disconnect()
        await port.stopListening()


class Scripted(Protocol):
    """A broken local server: writes ``script`` (a list of byte strings, each after the client's
    next message), then nothing."""

    def __init__(self, script: list[bytes]) -> None:
        self.script = list(script)

    def connectionMade(self) -> None:
        self.transport.write(self.script.pop(0))

    def dataReceived(self, data: bytes) -> None:
        if self.script:
            self.transport.write(self.script.pop(0))


def server_init(w: int, h: int) -> bytes:
    return struct.pack(">HH", w, h) + bytes(16) + struct.pack(">I", 4) + b"test"


async def reason_for(script: list[bytes], password: str | None = None) -> str:
    from twisted.internet import reactor
    port = reactor.listenTCP(0, Factory.forProtocol(lambda: Scripted(script)),
                             interface="127.0.0.1")
    source = VncSource(VncAddress("127.0.0.1", port.getHost().port), password,
                       connect_seconds=5)
    try:
        with pytest.raises(VncSourceError) as caught:
            await source.connect()
        assert not source.connected
        return str(caught.value)
    finally:
        source.disconnect()
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_a_broken_or_refusing_local_server_gives_one_clear_reason():
    where = "the local VNC server vnc://127.0.0.1:"
    # wrong password: VNC authentication, the server says no (RFB 3.8 gives a reason)
    reason = await reason_for([b"RFB 003.008\n", b"\x01\x02", bytes(16),
                               struct.pack(">II", 1, 21) + b"Authentication failed"],
                              password="wrong")
    assert where in reason and "refused the password" in reason
    assert "Authentication failed" in reason and "--screen-password-file" in reason
    # a security type this module does not speak (VeNCrypt only)
    reason = await reason_for([b"RFB 003.008\n\x01\x13"])
    assert "asks for a security type this module does not speak" in reason
    # not RFB at all
    reason = await reason_for([b"HTTP/1.1 400 \r\n\r\n"])
    assert "broke the RFB protocol: not an RFB server" in reason
    # a desktop that is absurd, and a message type that does not exist
    reason = await reason_for([b"RFB 003.008\n\x01\x01", struct.pack(">I", 0),
                               server_init(0, 0)])
    assert "broke the RFB protocol" in reason and "0x0" in reason
    reason = await reason_for([b"RFB 003.008\n\x01\x01", struct.pack(">I", 0),
                               server_init(64, 64) + b"\x63"])
    assert "broke the RFB protocol: unknown server message type 99" in reason
    for line in (reason,):
        assert "\n" not in line
    # nothing listens there
    from twisted.internet import reactor
    port = reactor.listenTCP(0, Factory.forProtocol(Protocol), interface="127.0.0.1")
    free = port.getHost().port
    await port.stopListening()
    source = VncSource(VncAddress("127.0.0.1", free))
    with pytest.raises(VncSourceError, match="is not running .connection refused."):
        await source.connect()


@pytest_twisted.ensureDeferred
async def test_a_server_that_breaks_after_the_first_frame_is_reported_once():
    from twisted.internet import reactor
    raw = struct.pack(">BxH", 0, 1) + struct.pack(">HHHHi", 0, 0, 2, 2, 0) + bytes(16)
    script = [b"RFB 003.008\n\x01\x01", struct.pack(">I", 0), server_init(2, 2),
              raw, b"\x00\x00\x00\x01" + struct.pack(">HHHHi", 9, 9, 9, 9, 0)]  # outside 2x2
    port = reactor.listenTCP(0, Factory.forProtocol(lambda: Scripted(script)),
                             interface="127.0.0.1")
    source = VncSource(VncAddress("127.0.0.1", port.getHost().port))
    lost: list[str] = []
    source.on_lost = lost.append
    try:
        await source.connect()
        await until(lambda: lost, "the report of the broken stream")
        assert len(lost) == 1 and "broke the RFB protocol: rect 9,9 9x9 is outside" in lost[0]
        assert not source.connected
    finally:
        source.disconnect()
        await port.stopListening()


def test_extended_clipboard_provide_is_a_flushed_unfinished_zlib_stream():
    """LibVNCServer (x11vnc 0.9.16) drops a client whose provide ends its zlib stream
    (Z_STREAM_END is an "inflation error" there); TigerVNC only flushes.  Found through the
    VNC source: each provide is a fresh stream, sync-flushed, and still reads back."""
    import zlib

    from protocol import rfb_ext_clipboard as ext
    wire = ext.provide(ext.CLIENT, "grün 東京")
    body = wire[8 + 4:]                                  # header, then the flags
    inflater = zlib.decompressobj()
    data = inflater.decompress(body)
    assert not inflater.eof and body.endswith(b"\x00\x00\xff\xff")   # flushed, not finished
    assert ext.decode_text(data[4:]) == "grün 東京"
    assert ext.parse(wire[8:]).text == "grün 東京"
    assert ext.provide(ext.CLIENT, "grün 東京") == wire  # no state carried between messages


def test_screen_options_that_do_not_fit_are_one_line_and_exit_2(tmp_path):
    from argparse import Namespace

    from modules.common.terminal.stream_cli import screen_offer
    from modules.common.terminal.cli import ModuleError
    password = tmp_path / "pw"
    password.write_text("secret\n")
    for args, why in (
            (Namespace(screen=":0", screen_password_file=str(password)), "applies to a VNC server"),
            (Namespace(screen=None, screen_password_file=str(password)), "needs --screen vnc://"),
            (Namespace(screen=None, screen_owner="root"), "--screen-owner needs --screen vnc://"),
            (Namespace(screen="vnc://127.0.0.1", screen_owner="no-such-user-here"),
             "no such user"),
            (Namespace(screen="vnc://192.0.2.1", screen_password_file=None), "on this machine"),
            (Namespace(screen="vnc://127.0.0.1:5999", screen_password_file=str(tmp_path / "no")),
             "No such file")):
        with pytest.raises(ModuleError) as caught:
            screen_offer(args)
        assert why in str(caught.value) and caught.value.exit_code == 2
    source, make_injector = screen_offer(Namespace(screen="vnc://127.0.0.1:5999",
                                                   screen_password_file=str(password)))
    assert isinstance(source, VncSource) and source.password == "secret"
    assert not source.connected   # nothing is connected before a session shows the screen
    assert isinstance(make_injector(lambda: False), VncInjector)


def tigervnc_password_file(path, password: str) -> None:
    """TigerVNC's (and vncpasswd's) password file: the password, 8 bytes, DES-encrypted with the
    well-known fixed key (obfuscation, not protection)."""
    from cryptography.hazmat.decrepit.ciphers.algorithms import TripleDES
    from cryptography.hazmat.primitives.ciphers import Cipher, modes
    key = bytes.fromhex("e84ad660c4721ae0")
    enc = Cipher(TripleDES(key * 3), modes.ECB()).encryptor()
    path.write_bytes(enc.update(password.encode()[:8].ljust(8, b"\0")) + enc.finalize())


@pytest_twisted.ensureDeferred
async def test_tigervnc_x0vncserver_with_a_password(xvfb, tmp_path):  # noqa: F811
    """TigerVNC's x0vncserver (VncAuth; its default VeNCrypt is not spoken): the picture is the
    display's, and keys typed through the source run a command in an xterm."""
    import mss
    from twisted.internet import reactor

    from .fixtures_server import free_port
    from .fixtures_wayland import listening
    from .test_e2e_screen import focus
    term = xvfb.xterm("x0-term", geometry="80x24+0+0", bg="darkgreen")
    focus(xvfb.name, term.window)
    password = tmp_path / "passwd"
    tigervnc_password_file(password, "s3cret!x")
    port = free_port()
    server = xvfb.spawn([require("x0vncserver"), "-display", xvfb.name, "-rfbport", str(port),
                         "-localhost", "-SecurityTypes", "VncAuth", "-PasswordFile",
                         str(password)])
    await until(lambda: listening(port) or server.poll() is not None, "x0vncserver listening")
    assert server.poll() is None, "x0vncserver exited at start"
    source = VncSource(VncAddress("127.0.0.1", port), "s3cret!x")
    try:
        await source.connect()
        assert source.size() == (1024, 768)
        await until(lambda: np.abs(as_rgb(source.capture().frame).astype(np.int16) - grab(mss, xvfb.name))
                    .mean() < 1.0, "the source's picture to match the display")
        marker = tmp_path / "typed-through-x0vncserver"
        injector = VncInjector(source, lambda: True)
        for char in f"touch {marker}\n":
            keysym = 0xFF0D if char == "\n" else ord(char)
            shifted = char == "_"       # a viewer holds Shift itself; x0vncserver adds none
            if shifted:
                await off_reactor(injector.key, True, 0xFFE1)
            await off_reactor(injector.key, True, keysym)
            await off_reactor(injector.key, False, keysym)
            if shifted:
                await off_reactor(injector.key, False, 0xFFE1)
        await until(marker.exists, "the typed command's file")
    finally:
        source.disconnect()
    wrong = VncSource(VncAddress("127.0.0.1", port), "guessed", reactor=reactor)
    with pytest.raises(VncSourceError, match="refused the password"):
        await wrong.connect()


def grab(mss, display: str) -> np.ndarray:
    with mss.MSS(display=display) as sct:
        return np.asarray(sct.grab(sct.monitors[0]))[..., 2::-1].astype(np.int16)


def test_host_screen_setting_round_trip_and_refusals(tmp_path):
    """``hausmeister-host screen`` keeps the source and the password file's path (never the
    password); ``run`` takes it when no --screen is given."""
    from argparse import Namespace

    from modules.common.link.folder import ModuleFolder, ModuleFolderError
    from modules.remote_host import settings
    from modules.remote_host.cli import with_saved_screen
    folder = ModuleFolder(tmp_path)
    assert settings.load_screen(folder) == settings.ScreenSetting()
    saved = settings.ScreenSetting("vnc://127.0.0.1:5901", "/etc/vnc-pw", "alice")
    settings.save_screen(folder, saved)
    assert settings.load_screen(folder) == saved
    args = with_saved_screen(Namespace(screen=None, screen_password_file=None,
                                       screen_owner=None), folder)
    assert (args.screen, args.screen_password_file, args.screen_owner) == (
        "vnc://127.0.0.1:5901", "/etc/vnc-pw", "alice")
    given = with_saved_screen(Namespace(screen=":0", screen_password_file=None), folder)
    assert (given.screen, given.screen_password_file) == (":0", None)   # --screen wins, alone
    with pytest.raises(ModuleFolderError, match="must run on this machine"):
        settings.save_screen(folder, settings.ScreenSetting("vnc://198.51.100.4"))
    with pytest.raises(ModuleFolderError, match="applies only to a VNC source"):
        settings.save_screen(folder, settings.ScreenSetting(":0", "/etc/vnc-pw"))
    settings.screen_path(folder).write_text('{"source": ":0", "oops": 1}')
    with pytest.raises(ModuleFolderError, match="broken"):
        settings.load_screen(folder)
    settings.screen_path(folder).write_text('{"source": 5}')
    with pytest.raises(ModuleFolderError, match="is not text"):
        settings.load_screen(folder)


@pytest_twisted.ensureDeferred
async def test_a_listener_of_another_user_is_refused_before_anything_is_sent(tmp_path):
    """A loopback port is anyone's: a VNC "server" another user started there (while the real
    one is down) would get the supporter's keys.  Refused, unless it is the named owner's."""
    import subprocess

    from modules.common.screen.capture_vnc import listener_uids
    from .fixtures_server import free_port
    from .fixtures_wayland import listening
    if os.getuid() != 0:
        pytest.skip("starting a listener as another user needs root (the test machine is)")
    port = free_port()
    impostor = subprocess.Popen(   # the system's python: the venv may not be nobody's to run
        ["/usr/bin/python3", "-c", "import socket, time; s = socket.socket(); "
         f"s.bind(('127.0.0.1', {port})); s.listen(); time.sleep(60)"],
        user=65534, group=65534, extra_groups=[], cwd="/")
    try:
        await until(lambda: listening(port), "the impostor listening")
        address = VncAddress("127.0.0.1", port)
        assert listener_uids(address) == {65534}
        with pytest.raises(VncSourceError) as caught:
            await VncSource(address).connect()
        message = str(caught.value)
        assert "is run by nobody (uid 65534), not by root:" in message
        assert "add --screen-owner nobody" in message and "nothing was sent" in message
        # named as the owner, it is connected to (and then fails as the non-server it is)
        with pytest.raises(VncSourceError) as caught:
            await VncSource(address, owner="nobody", connect_seconds=1).connect()
        assert "is run by" not in str(caught.value)
    finally:
        stop_process(impostor)
