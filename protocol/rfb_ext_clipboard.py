"""RFB Extended Clipboard (pseudo-encoding 0xC0A1E5CE): clipboard text in UTF-8, both ways.

RFC 6143's cut-text messages carry Latin-1 only.  A client that puts ``EXTENDED_CLIPBOARD`` in
its SetEncodings tells the server it also understands the extended form: the same message types
(ServerCutText 3, ClientCutText 6) with a *negative* length, whose ``-length`` bytes start with a
u32 of flags (formats in bits 0-15, one action in bits 24-31)::

    caps     flags (with the actions it takes) + one u32 per format bit set: the largest size
             it takes unasked
    request  "send me these formats"             (no payload)
    peek     "tell me which formats you have"    (no payload)
    notify   "I have these formats now"          (no payload)
    provide  a zlib stream (one per message, flushed, not finished) of, per format bit set:
             u32 size, data

Only the text format is used here: UTF-8 with CRLF line ends and a terminating NUL (what
TigerVNC, the spec's reference, writes).  This module is sans-I/O and shared by both ends: our
RFB server and the viewer's client (``ClipboardPeer``).  It never raises anything but
``ExtClipboardError`` on bad input, and bounds what a provide may inflate to.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

EXTENDED_CLIPBOARD = -1063131698          # 0xC0A1E5CE as the signed s32 SetEncodings carries

TEXT = 1 << 0                             # UTF-8 text; rtf, html, dib, files are bits 1-4
FORMAT_MASK = 0xFFFF
CAPS, REQUEST, PEEK, NOTIFY, PROVIDE = (1 << 24, 1 << 25, 1 << 26, 1 << 27, 1 << 28)
ACTIONS = CAPS | REQUEST | PEEK | NOTIFY | PROVIDE
MAX_TEXT_BYTES = 1 << 20                  # the most clipboard text we send or accept (1 MiB)
MAX_MESSAGE_BYTES = MAX_TEXT_BYTES + 64 * 1024   # a provide's compressed size, bounded too

#: What both our ends announce: text, every action (so a peer may notify or provide).
OUR_CAPS_FLAGS = CAPS | REQUEST | PEEK | NOTIFY | PROVIDE | TEXT


class ExtClipboardError(ValueError):
    """An extended clipboard message is malformed; ``str()`` says how."""


@dataclass(frozen=True)
class ExtClipboard:
    """One parsed message: its ``action`` (one of the action bits), the ``formats`` bits, for
    caps the actions the peer takes and its size limits per format bit, for provide the text
    (None if not offered)."""

    action: int
    formats: int
    sizes: dict[int, int]
    text: str | None = None
    actions: int = 0


def _action_of(flags: int) -> int:
    actions = flags & ACTIONS
    if flags & 0x00FF0000 or flags & 0xE0000000:
        raise ExtClipboardError(f"reserved flag bits set in 0x{flags:08x}")
    if actions & CAPS:
        return CAPS      # caps list the other actions the sender takes
    if actions == 0 or actions & (actions - 1):
        raise ExtClipboardError(f"flags 0x{flags:08x} name {bin(actions).count('1')} actions, "
                                "not one")
    return actions


def parse(payload: bytes) -> ExtClipboard:
    """The ``-length`` bytes of a cut-text message with a negative length."""
    if len(payload) < 4:
        raise ExtClipboardError(f"extended clipboard message of {len(payload)} bytes has no flags")
    if len(payload) > MAX_MESSAGE_BYTES:
        raise ExtClipboardError(f"extended clipboard message of {len(payload)} bytes is too long")
    (flags,) = struct.unpack(">I", payload[:4])
    action = _action_of(flags)
    formats = flags & FORMAT_MASK
    rest = payload[4:]
    if action == CAPS:
        bits = [1 << i for i in range(16) if formats & (1 << i)]
        if len(rest) < 4 * len(bits):
            raise ExtClipboardError(f"caps name {len(bits)} formats but carry "
                                    f"{len(rest) // 4} sizes")
        sizes = dict(zip(bits, struct.unpack(f">{len(bits)}I", rest[:4 * len(bits)])))
        return ExtClipboard(CAPS, formats, sizes, actions=flags & ACTIONS & ~CAPS)
    if action != PROVIDE:
        return ExtClipboard(action, formats, {})   # request, peek, notify: flags only
    return ExtClipboard(PROVIDE, formats, {}, _provided_text(formats, rest))


def _provided_text(formats: int, compressed: bytes) -> str | None:
    limit = MAX_TEXT_BYTES + 4 * 16
    inflater = zlib.decompressobj()
    try:
        data = inflater.decompress(compressed, limit + 1)
    except zlib.error as exc:
        raise ExtClipboardError(f"provide data is not a zlib stream: {exc}") from None
    if len(data) > limit:
        raise ExtClipboardError(f"provide data inflates beyond {limit} bytes")
    pos, text = 0, None
    for bit in (1 << i for i in range(16)):
        if not formats & bit:
            continue
        if len(data) - pos < 4:
            raise ExtClipboardError("provide data ends before a format's size")
        (size,) = struct.unpack(">I", data[pos:pos + 4])
        pos += 4
        if size > len(data) - pos:
            raise ExtClipboardError(f"provide data holds {len(data) - pos} bytes, not the "
                                    f"{size} its size says")
        if bit == TEXT:
            text = decode_text(data[pos:pos + size])
        pos += size   # other formats are read past (we ask for text only)
    return text


def decode_text(data: bytes) -> str:
    """UTF-8 up to the terminating NUL, CRLF line ends as newlines."""
    data = data.split(b"\0", 1)[0]
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ExtClipboardError(f"clipboard text is not UTF-8: {exc.reason} at byte "
                                f"{exc.start}") from None
    return text.replace("\r\n", "\n")


def encode_text(text: str) -> bytes:
    """The wire form: UTF-8, CRLF line ends, a terminating NUL, cut to ``MAX_TEXT_BYTES``."""
    data = text.replace("\r\n", "\n").replace("\n", "\r\n").encode("utf-8", "replace")
    if len(data) >= MAX_TEXT_BYTES:
        data = data[:MAX_TEXT_BYTES - 1].decode("utf-8", "ignore").encode("utf-8")
    return data + b"\0"


def message(kind: int, flags: int, body: bytes = b"") -> bytes:
    """A whole cut-text message (``kind`` 3 from the server, 6 from the client)."""
    payload = struct.pack(">I", flags) + body
    return struct.pack(">B3xi", kind, -len(payload)) + payload


def caps(kind: int) -> bytes:
    return message(kind, OUR_CAPS_FLAGS, struct.pack(">I", MAX_TEXT_BYTES))


def provide(kind: int, text: str | None) -> bytes:
    """Provide ``text`` (None: say we have no text)."""
    if text is None:
        return message(kind, PROVIDE)
    data = encode_text(text)
    # A fresh zlib stream per message, flushed but not finished, as TigerVNC writes it:
    # LibVNCServer (x11vnc) treats the end of a stream (Z_STREAM_END) as an inflation error and
    # drops the connection.
    deflater = zlib.compressobj(6)
    body = deflater.compress(struct.pack(">I", len(data)) + data) + deflater.flush(zlib.Z_SYNC_FLUSH)
    return message(kind, PROVIDE | TEXT, body)


SERVER, CLIENT = 3, 6    # the cut-text message type each end sends


class ClipboardPeer:
    """One end's extended-clipboard state: what the peer announced and what we last offered.
    ``kind`` is the message type this end sends (3 server, 6 client).  ``handle`` answers a
    parsed message (bytes to send) and returns text the peer provided; ``send_text`` gives
    the bytes that put ``text`` on the peer's clipboard (None: the peer has no extended
    clipboard, use Latin-1)."""

    def __init__(self, kind: int) -> None:
        self.kind = kind
        self.peer_flags: int | None = None     # from the peer's caps
        self.offered: str | None = None        # our clipboard text, for a request

    @property
    def active(self) -> bool:
        return self.peer_flags is not None

    def handle(self, msg: ExtClipboard) -> tuple[bytes, str | None]:
        if msg.action == CAPS:
            self.peer_flags = msg.actions | msg.formats
            # the server announces first; a client answers with its own caps
            return (caps(self.kind) if self.kind == CLIENT else b""), None
        if msg.action == REQUEST:
            return (provide(self.kind, self.offered) if msg.formats & TEXT else b""), None
        if msg.action == PEEK:
            return message(self.kind, NOTIFY | (TEXT if self.offered is not None else 0)), None
        if msg.action == NOTIFY:
            return (message(self.kind, REQUEST | TEXT) if msg.formats & TEXT else b""), None
        return b"", msg.text   # PROVIDE

    def send_text(self, text: str) -> bytes | None:
        self.offered = text
        if self.peer_flags is None or not self.peer_flags & TEXT:
            return None
        if self.peer_flags & PROVIDE:
            return provide(self.kind, text)
        if self.peer_flags & NOTIFY:
            return message(self.kind, NOTIFY | TEXT)   # it asks with a request
        return None

