"""File transfer engine: two ``FileTransfers`` back to back through two real ``SessionMux``es
(no sockets), so pieces cut across records are reassembled as in a session."""

from __future__ import annotations

import hashlib
import json
import os
import struct
import tempfile
from collections import namedtuple
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from modules.common.session.consent import Role
from modules.common.session.file_transfer import (
    CHUNK_HEADER_BYTES, MAX_CHUNK_DATA, MAX_MESSAGE, TO_PEER, TO_SUPPORTER, FileAccepted,
    FileCompleted, FileFailed, FileOffered, FileProgress, FileRejected, FileSent,
    FileTransferError, FileTransfers, Outcome, name_problem, prepare, protocol_events)
from modules.common.session.mux import Channel, SessionMux

Usage = namedtuple("Usage", "total used free")
PLENTY = lambda path: Usage(10**12, 0, 10**12)  # noqa: E731
FAST = settings(max_examples=30, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture])


class Side:
    """One party: its engine, its mux, what it reported."""

    def __init__(self, ft: FileTransfers) -> None:
        self.ft = ft
        self.mux = SessionMux()
        self.events: list = []
        self.chunk_bytes = 0

    def apply(self, outcome: Outcome | None) -> Outcome | None:
        if outcome is None:
            return None
        for message in outcome.messages:
            if message[0] == 0x02:
                self.chunk_bytes += len(message) - CHUNK_HEADER_BYTES
            self.mux.send(Channel.FILE, message)
        self.events += outcome.events
        return outcome

    def of(self, cls) -> list:
        return [e for e in self.events if isinstance(e, cls)]

    def kinds(self) -> list[str]:
        return [line["kind"] for line in protocol_events(self.events)]


def pump(a: Side, b: Side, *, record: int = 16 * 1024, tamper=None, steps: int = 100_000,
         stop=None) -> None:
    """Move everything both ways until both are idle.  ``tamper(message) -> message`` edits
    what ``a`` sends; ``stop(a, b)`` ends the pump early when true."""
    for _ in range(steps):
        moved = False
        for side in (a, b):
            # keep about two chunks queued, as the session runner should: a cancel or a
            # screen update never waits behind a megabyte of file data
            while side.mux.pending(Channel.FILE) < 2 * MAX_MESSAGE:
                if side.apply(side.ft.next_chunk(MAX_MESSAGE)) is None:
                    break
                moved = True
        for src, dst in ((a, b), (b, a)):
            rec = src.mux.next_record(record)
            if rec is None:
                continue
            moved = True
            for item in dst.mux.receive(rec):
                dst.apply(dst.ft.receive(item.payload, item.end))
        if tamper is not None:
            _tamper_queue(a, tamper)
        if not moved or (stop is not None and stop(a, b)):
            return
    raise AssertionError("the pump did not settle")


def _tamper_queue(side: Side, tamper) -> None:
    queue = side.mux._queues[Channel.FILE]
    for i, (piece, end) in enumerate(queue):
        edited = tamper(bytes(piece))
        if edited != bytes(piece):
            queue[i] = (memoryview(edited), end)


def make_pair(root: Path, *, supporter_kw=None, peer_kw=None) -> tuple[Side, Side]:
    (root / "supporter_in").mkdir()
    (root / "peer_in").mkdir()
    (root / "outbox").mkdir()
    counter = iter(range(1, 10**6))
    kw = dict(allowed=lambda attempt: True, free_space=PLENTY, auto_accept=True)
    sup = FileTransfers(root / "supporter_in", role=Role.SUPPORTER,
                        new_id=lambda: next(counter).to_bytes(16, "big"),
                        **{**kw, **(supporter_kw or {})})
    peer = FileTransfers(root / "peer_in", role=Role.HOST,
                         new_id=lambda: (10**9 + next(counter)).to_bytes(16, "big"),
                         **{**kw, **(peer_kw or {})})
    return Side(sup), Side(peer)


def write(root: Path, name: str, data: bytes) -> Path:
    path = root / "outbox" / name
    path.write_bytes(data)
    return path


def listing(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


# --- round trips ----------------------------------------------------------------------------------

def test_files_both_ways_at_once_interleaved(tmp_path):
    sup, peer = make_pair(tmp_path)
    a_data = os.urandom(200_000)
    b_data = os.urandom(150_001)
    sup.apply(sup.ft.offer(write(tmp_path, "to_peer.bin", a_data)))
    peer.apply(peer.ft.offer(prepare(write(tmp_path, "to_supporter.bin", b_data))))
    # both directions are in flight at the same time: stop once both receivers have progress
    pump(sup, peer, record=5000,
         stop=lambda s, p: s.of(FileProgress) and p.of(FileProgress)
         and any(e.direction == TO_SUPPORTER for e in s.of(FileProgress))
         and any(e.direction == TO_PEER for e in p.of(FileProgress)))
    assert not sup.of(FileCompleted) and not peer.of(FileCompleted)   # both still under way
    pump(sup, peer, record=5000)

    assert (tmp_path / "peer_in" / "to_peer.bin").read_bytes() == a_data
    assert (tmp_path / "supporter_in" / "to_supporter.bin").read_bytes() == b_data
    assert listing(tmp_path / "peer_in") == ["to_peer.bin"]        # no .part left
    assert listing(tmp_path / "supporter_in") == ["to_supporter.bin"]

    done = {(e.direction, e.name) for e in sup.of(FileCompleted)}
    assert done == {(TO_PEER, "to_peer.bin"), (TO_SUPPORTER, "to_supporter.bin")}
    assert {(e.direction, e.name) for e in peer.of(FileCompleted)} == done
    sent = sup.of(FileSent)
    assert [e.name for e in sent] == ["to_peer.bin"] and sent[0].direction == TO_PEER

    lines = [line for line in protocol_events(sup.events) if line["detail"]["name"] == "to_peer.bin"]
    assert [line["kind"] for line in lines] == ["file_offered", "file_accepted", "file_sent",
                                                "file_completed"]
    assert all(line["detail"]["direction"] == TO_PEER for line in lines)
    assert lines[0]["detail"]["sha256"] == hashlib.sha256(a_data).hexdigest()
    assert lines[0]["detail"]["size"] == len(a_data)
    received = [line for line in protocol_events(sup.events)
                if line["detail"]["name"] == "to_supporter.bin"]
    assert [line["kind"] for line in received] == ["file_offered", "file_accepted",
                                                   "file_completed"]
    assert received[-1]["detail"]["saved_as"] == "to_supporter.bin"
    json.dumps(protocol_events(sup.events + peer.events))  # fit for the session protocol


@FAST
@given(data=st.binary(max_size=70_000), record=st.integers(min_value=5, max_value=20_000),
       chunk=st.integers(min_value=CHUNK_HEADER_BYTES + 1, max_value=MAX_MESSAGE + 100))
def test_any_size_any_record_and_chunk_size(data, record, chunk):
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        sup, peer = make_pair(root)
        sup.apply(sup.ft.offer(write(root, "f.dat", data)))
        # the sender is asked with a small budget: chunks never exceed it
        pump(sup, peer, record=record, stop=lambda s, p: s.ft.sending())
        while (out := sup.ft.next_chunk(chunk)) is not None:
            assert all(len(m) <= min(chunk, MAX_MESSAGE) for m in out.messages)
            sup.apply(out)
            pump(sup, peer, record=record)
        pump(sup, peer, record=record)
        assert (root / "peer_in" / "f.dat").read_bytes() == data
        assert peer.of(FileCompleted)[0].path == root.resolve() / "peer_in" / "f.dat"
        assert sup.of(FileCompleted)[0].sha256 == hashlib.sha256(data).hexdigest()
        assert sup.chunk_bytes == len(data)


def test_several_transfers_queue_in_order(tmp_path):
    sup, peer = make_pair(tmp_path)
    blobs = {f"f{i}.bin": os.urandom(40_000 + i) for i in range(3)}
    for name, data in blobs.items():
        sup.apply(sup.ft.offer(write(tmp_path, name, data)))
    pump(sup, peer, record=3000)
    for name, data in blobs.items():
        assert (tmp_path / "peer_in" / name).read_bytes() == data
    # one at a time: each finishes before the next one's first chunk
    order = [e.name for e in peer.events if isinstance(e, (FileProgress, FileCompleted))]
    firsts = [order.index(name) for name in blobs]
    lasts = [len(order) - 1 - order[::-1].index(name) for name in blobs]
    assert lasts[0] < firsts[1] and lasts[1] < firsts[2]


def test_empty_file(tmp_path):
    sup, peer = make_pair(tmp_path)
    sup.apply(sup.ft.offer(write(tmp_path, "empty", b"")))
    pump(sup, peer)
    assert (tmp_path / "peer_in" / "empty").read_bytes() == b""
    assert len(sup.of(FileCompleted)) == 1


def test_manual_accept_and_reject(tmp_path):
    sup, peer = make_pair(tmp_path, peer_kw={"auto_accept": False})
    sup.apply(sup.ft.offer(write(tmp_path, "one.txt", b"first")))
    sup.apply(sup.ft.offer(write(tmp_path, "two.txt", b"second")))
    pump(sup, peer)
    offers = peer.ft.pending_offers()
    assert [o.name for o in offers] == ["one.txt", "two.txt"]
    assert listing(tmp_path / "peer_in") == []          # nothing written before accept
    peer.apply(peer.ft.accept(offers[0].id))
    peer.apply(peer.ft.reject(offers[1].id, "not\nwanted"))
    pump(sup, peer)
    assert listing(tmp_path / "peer_in") == ["one.txt"]
    rejected = sup.of(FileRejected)
    assert [(r.name, r.reason) for r in rejected] == [("two.txt", "not wanted")]
    assert "file_rejected" in peer.kinds() and "file_rejected" in sup.kinds()
    with pytest.raises(ValueError):
        peer.ft.accept(offers[1].id)


def test_accept_into_a_folder_the_person_chose(tmp_path):
    """The customer app's dialog: this file goes to another folder than the usual one; the
    partial file lives there too (so storing it is a rename in one file system)."""
    sup, peer = make_pair(tmp_path, peer_kw={"auto_accept": False})
    chosen = tmp_path / "chosen"
    chosen.mkdir()
    data = os.urandom(100_000)
    sup.apply(sup.ft.offer(write(tmp_path, "report.pdf", data)))
    pump(sup, peer)
    offer = peer.ft.pending_offers()[0]
    peer.apply(peer.ft.accept(offer.id, chosen))
    pump(sup, peer, stop=lambda s, p: p.of(FileProgress))
    assert [n for n in listing(chosen) if n.endswith(".part")] and not listing(tmp_path / "peer_in")
    pump(sup, peer)
    assert (chosen / "report.pdf").read_bytes() == data
    assert listing(tmp_path / "peer_in") == [] and listing(chosen) == ["report.pdf"]
    assert peer.of(FileCompleted)[0].path == chosen / "report.pdf"
    assert len(sup.of(FileCompleted)) == 1


# --- names ----------------------------------------------------------------------------------------

BAD_NAMES = ["../x", "../../etc/passwd", "/etc/passwd", "/", "", ".", "..", "a/b", "a\\b",
             "..\\x", "C:\\x", "x\x00y", "x\ny", "x\ty", "\x1b[31m", "a\u202eexe.txt",
             "zero\u200bwidth", "CON", "con", "nul.txt", "Com1.log", "LPT9", "aux .txt",
             "trailing.", "trailing ", " leading", "a:b", "a?b", "a*b", 'a"b', "a<b", "a|b",
             "x" * 201, "\udc80"]


def offer_message(tid: str, name, size: int, sha: str) -> bytes:
    return b"\x01" + json.dumps({"type": "offer", "id": tid, "name": name, "size": size,
                                 "sha256": sha}).encode("utf-8", "surrogatepass")


def receiver(root: Path, **kw) -> FileTransfers:
    inbox = root / "inbox"
    inbox.mkdir(exist_ok=True)
    args = dict(role=Role.HOST, allowed=lambda attempt: True, free_space=PLENTY,
                auto_accept=True)
    return FileTransfers(inbox, **{**args, **kw})


def chunk_message(tid: str, offset: int, data: bytes) -> bytes:
    return struct.pack("!B16sQ", 2, bytes.fromhex(tid), offset) + data


@pytest.mark.parametrize("name", BAD_NAMES)
def test_unsafe_names_are_refused_before_writing(tmp_path, name):
    assert name_problem(name) is not None
    ft = receiver(tmp_path)
    out = ft.receive(offer_message("ab" * 16, name, 3, hashlib.sha256(b"abc").hexdigest()))
    assert [type(e) for e in out.events] == [FileOffered, FileRejected]
    reply = json.loads(out.messages[0][1:])
    assert reply["type"] == "reject" and reply["id"] == "ab" * 16 and reply["reason"]
    assert listing(tmp_path) == ["inbox"] and listing(tmp_path / "inbox") == []
    # the rejected name is logged escaped, never raw
    assert out.events[1].name == ascii(name)[:200] and out.events[1].name.isprintable()
    # and chunks that follow the refusal are dropped without writing
    assert ft.receive(chunk_message("ab" * 16, 0, b"abc")) == Outcome()
    assert listing(tmp_path / "inbox") == []


@pytest.mark.parametrize("name", ["CON", "a\nb", "nul.txt", "why?", "trailing."])
def test_sender_refuses_to_offer_names_the_receiver_would_refuse(tmp_path, name):
    (tmp_path / name).write_bytes(b"x")
    with pytest.raises(ValueError, match="cannot be sent"):
        prepare(tmp_path / name)


def test_sender_offers_the_base_name_only(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "f.txt").write_bytes(b"x")
    assert prepare(tmp_path / "sub" / ".." / "sub" / "f.txt").name == "f.txt"
    with pytest.raises(ValueError, match="not a regular file"):
        prepare(tmp_path / "sub")


@settings(max_examples=200, deadline=None)
@given(name=st.text(min_size=0, max_size=60))
def test_any_unicode_name_stays_inside_download_dir(name):
    data = b"payload"
    sha = hashlib.sha256(data).hexdigest()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        ft = receiver(root)
        tid = "cd" * 16
        try:
            out = ft.receive(offer_message(tid, name, len(data), sha))
        except FileTransferError:
            # only a name that is not valid Unicode (lone surrogate) may fail the JSON decoding
            assert any(0xD800 <= ord(c) <= 0xDFFF for c in name)
            return
        if isinstance(out.events[-1], FileRejected):
            assert name_problem(name) is not None
            assert listing(root / "inbox") == []
        else:
            assert name_problem(name) is None
            ft.receive(chunk_message(tid, 0, data))
            done = ft.receive(b'\x01{"type":"done","id":"' + tid.encode() + b'"}')
            completed = done.events[-1]
            assert isinstance(completed, FileCompleted)
            assert completed.path.parent == (root / "inbox").resolve()
            assert completed.path.resolve().parent == (root / "inbox").resolve()
            assert completed.path.read_bytes() == data
            assert listing(root / "inbox") == [completed.path.name]
        assert listing(root) == ["inbox"]   # nothing beside the download dir


def test_safe_names_are_kept_as_given(tmp_path):
    for name in ["résumé.pdf", ".bashrc", "a b.txt", "日本語.txt", "con-fig.txt", "x" * 200,
                 "👩\u200d💻.png"]:
        assert name_problem(name) is None, name


def test_existing_files_are_never_overwritten(tmp_path):
    sup, peer = make_pair(tmp_path)
    (tmp_path / "peer_in" / "a.tar.gz").write_bytes(b"precious")
    (tmp_path / "peer_in" / "link").symlink_to(tmp_path / "outbox" / "target")
    for content in (b"one", b"two"):
        sup.apply(sup.ft.offer(write(tmp_path, "a.tar.gz", content)))
        pump(sup, peer)
    sup.apply(sup.ft.offer(write(tmp_path, "link", b"through")))
    pump(sup, peer)
    inbox = tmp_path / "peer_in"
    assert (inbox / "a.tar.gz").read_bytes() == b"precious"
    assert (inbox / "a (1).tar.gz").read_bytes() == b"one"
    assert (inbox / "a (2).tar.gz").read_bytes() == b"two"
    assert (inbox / "link (1)").read_bytes() == b"through"
    assert not (tmp_path / "outbox" / "target").exists()   # the symlink was not followed
    assert [e.path.name for e in peer.of(FileCompleted)] == ["a (1).tar.gz", "a (2).tar.gz",
                                                             "link (1)"]


# --- integrity, space, rights ---------------------------------------------------------------------

def test_hash_mismatch_discards_the_file_and_is_reported_on_both_sides(tmp_path):
    sup, peer = make_pair(tmp_path)
    data = os.urandom(50_000)
    sup.apply(sup.ft.offer(write(tmp_path, "flip.bin", data)))
    flipped = []

    def flip(message: bytes) -> bytes:
        if message[0] == 2 and not flipped:
            flipped.append(True)
            return message[:-1] + bytes([message[-1] ^ 0x01])
        return message

    pump(sup, peer, tamper=flip)
    assert flipped
    assert listing(tmp_path / "peer_in") == []                   # no file, no .part
    [failed] = peer.of(FileFailed)
    assert failed.reason == "SHA-256 mismatch" and not failed.resumable
    [sender_failed] = sup.of(FileFailed)
    assert "SHA-256 mismatch" in sender_failed.reason
    assert not peer.of(FileCompleted) and not sup.of(FileCompleted)
    assert peer.kinds()[-1] == "file_failed" and sup.kinds()[-1] == "file_failed"


def test_larger_than_free_space_is_refused_before_writing(tmp_path):
    sup, peer = make_pair(tmp_path, peer_kw={"free_space": lambda p: Usage(10**6, 0, 1000)})
    sup.apply(sup.ft.offer(write(tmp_path, "big.bin", b"x" * 1001)))
    sup.apply(sup.ft.offer(write(tmp_path, "fits.bin", b"y" * 1000)))
    pump(sup, peer)
    [rejected] = sup.of(FileRejected)
    assert rejected.name == "big.bin" and "free space" in rejected.reason
    assert listing(tmp_path / "peer_in") == ["fits.bin"]


def test_free_space_counts_transfers_under_way_and_is_checked_again_at_accept(tmp_path):
    free = [1500]
    ft = receiver(tmp_path, auto_accept=False, free_space=lambda p: Usage(10**6, 0, free[0]))
    sha = hashlib.sha256(b"z" * 1000).hexdigest()
    ft.receive(offer_message("01" * 16, "a", 1000, sha))
    ft.receive(offer_message("02" * 16, "b", 1000, sha))
    ft.accept("01" * 16)                      # 1000 of 1500 reserved
    out = ft.accept("02" * 16)
    assert isinstance(out.events[-1], FileRejected) and "free space" in out.events[-1].reason
    assert json.loads(out.messages[0][1:])["type"] == "reject"
    ft.receive(offer_message("03" * 16, "c", 400, sha))
    free[0] = 100                             # the disk filled up meanwhile
    out = ft.accept("03" * 16)
    assert isinstance(out.events[-1], FileRejected)
    assert listing(tmp_path / "inbox") == [".hausmeister-" + "01" * 16 + ".part"]


def test_without_the_files_right_offers_are_refused_and_nothing_is_written(tmp_path):
    attempts = []
    sup, peer = make_pair(tmp_path, peer_kw={
        "allowed": lambda attempt: attempts.append(attempt) or False})
    sup.apply(sup.ft.offer(write(tmp_path, "secret.bin", b"data")))
    pump(sup, peer)
    assert attempts == ["file offer"]
    assert listing(tmp_path / "peer_in") == []
    [rejected] = sup.of(FileRejected)
    assert "right" in rejected.reason
    assert peer.kinds() == ["file_offered", "file_rejected"]


def test_revoking_the_right_mid_transfer_cancels_and_discards(tmp_path):
    granted = [True]
    sup, peer = make_pair(tmp_path, peer_kw={"allowed": lambda attempt: granted[0]})
    sup.apply(sup.ft.offer(write(tmp_path, "big.bin", os.urandom(200_000))))
    pump(sup, peer, record=4000, stop=lambda s, p: len(p.of(FileProgress)) >= 2)
    granted[0] = False
    pump(sup, peer, record=4000)
    assert listing(tmp_path / "peer_in") == []
    assert "right" in peer.of(FileFailed)[0].reason and not peer.of(FileFailed)[0].resumable
    assert "right" in sup.of(FileFailed)[0].reason
    assert not sup.ft.sending()


# --- resume ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("canceller", ["sender", "receiver"])
def test_resume_after_cancel_sends_only_the_rest(tmp_path, canceller):
    sup, peer = make_pair(tmp_path, peer_kw={"auto_accept": False})
    data = os.urandom(300_000)
    path = write(tmp_path, "resume.bin", data)
    sup.apply(sup.ft.offer(path))
    pump(sup, peer)
    first = peer.ft.pending_offers()[0]
    assert first.resume_offset == 0
    peer.apply(peer.ft.accept(first.id))
    pump(sup, peer, record=8000, stop=lambda s, p: len(p.of(FileProgress)) >= 5)
    side = sup if canceller == "sender" else peer
    side.apply(side.ft.cancel(first.id, "connection is slow"))
    pump(sup, peer)
    kept = peer.of(FileProgress)[-1].transferred
    assert 0 < kept < len(data)
    assert peer.of(FileFailed)[-1].resumable and sup.of(FileFailed)[-1].resumable
    assert not (tmp_path / "peer_in" / "resume.bin").exists()

    sent_before = sup.chunk_bytes
    sup.apply(sup.ft.offer(prepare(path)))
    pump(sup, peer)
    second = peer.ft.pending_offers()[0]
    assert second.id != first.id and second.resume_offset == kept
    peer.apply(peer.ft.accept(second.id))
    pump(sup, peer)
    assert [e.offset for e in sup.of(FileAccepted)] == [0, kept]
    assert sup.chunk_bytes - sent_before == len(data) - kept
    assert (tmp_path / "peer_in" / "resume.bin").read_bytes() == data
    assert listing(tmp_path / "peer_in") == ["resume.bin"]
    assert sup.kinds()[-1] == "file_completed"


def cancelled_midway(tmp_path: Path, data: bytes) -> tuple[Side, Side, Path, str, int]:
    sup, peer = make_pair(tmp_path)
    path = write(tmp_path, "r.bin", data)
    sup.apply(sup.ft.offer(path))
    pump(sup, peer, record=6000, stop=lambda s, p: len(p.of(FileProgress)) >= 2)
    first_id = sup.of(FileOffered)[0].id
    sup.apply(sup.ft.cancel(first_id))
    pump(sup, peer)
    kept = peer.of(FileProgress)[-1].transferred
    assert 0 < kept < len(data)
    return sup, peer, path, first_id, kept


def test_resume_checks_the_whole_hash(tmp_path):
    data = bytearray(os.urandom(100_000))
    sup, peer, path, _, kept = cancelled_midway(tmp_path, bytes(data))
    offered = prepare(path)        # the hash of the original...
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))  # ...but the tail sent on resume comes from a changed file
    sup.apply(sup.ft.offer(offered))
    pump(sup, peer)
    assert sup.of(FileAccepted)[-1].offset == kept
    assert peer.of(FileFailed)[-1].reason == "SHA-256 mismatch"
    assert "SHA-256 mismatch" in sup.of(FileFailed)[-1].reason
    assert listing(tmp_path / "peer_in") == []


def test_a_partial_file_touched_since_the_cancel_is_not_resumed(tmp_path):
    data = os.urandom(100_000)
    sup, peer, path, first_id, kept = cancelled_midway(tmp_path, data)
    part = tmp_path / "peer_in" / f".hausmeister-{first_id}.part"
    corrupted = bytearray(part.read_bytes())
    corrupted[0] ^= 0xFF
    part.write_bytes(bytes(corrupted))
    os.utime(part, ns=(1, 1))   # same inode and size: the changed mtime gives it away (a
                                # write in the same clock tick as ours would not be seen)
    sup.apply(sup.ft.offer(path))
    pump(sup, peer)
    assert peer.of(FileOffered)[-1].resume_offset == kept   # announced from memory...
    assert sup.of(FileAccepted)[-1].offset == 0             # ...but started afresh at accept
    assert (tmp_path / "peer_in" / "r.bin").read_bytes() == data
    assert listing(tmp_path / "peer_in") == ["r.bin"]


def test_close_deletes_partial_files(tmp_path):
    sup, peer = make_pair(tmp_path)
    sup.apply(sup.ft.offer(write(tmp_path, "a.bin", os.urandom(100_000))))
    sup.apply(sup.ft.offer(write(tmp_path, "b.bin", os.urandom(100_000))))
    pump(sup, peer, record=6000, stop=lambda s, p: len(p.of(FileProgress)) >= 2)
    sup.apply(sup.ft.cancel(sup.of(FileOffered)[0].id))  # a.bin kept for a resume
    pump(sup, peer, record=6000, stop=lambda s, p: len(p.of(FileProgress)) >= 4)
    assert len(listing(tmp_path / "peer_in")) == 2
    out = peer.ft.close("session ended")
    assert out.messages == []
    assert [(e.name, e.reason, e.resumable) for e in out.events] == [
        ("b.bin", "session ended", False)]
    assert listing(tmp_path / "peer_in") == []
    assert [e.name for e in sup.ft.close().events] == ["b.bin"]
    assert peer.ft.receive(b"anything") == Outcome()
    with pytest.raises(ValueError):
        sup.ft.offer(write(tmp_path, "c.bin", b"c"))


# --- bad input ------------------------------------------------------------------------------------

def accepted_receiver(root: Path, size: int = 100) -> tuple[FileTransfers, str]:
    ft = receiver(root)
    tid = "ef" * 16
    ft.receive(offer_message(tid, "x.bin", size, hashlib.sha256(b"\0" * size).hexdigest()))
    return ft, tid


def part_files(root: Path) -> list[str]:
    return [n for n in listing(root / "inbox") if n.endswith(".part")]


def test_chunk_for_an_unknown_id_is_fatal(tmp_path):
    ft, _ = accepted_receiver(tmp_path)
    with pytest.raises(FileTransferError) as err:
        ft.receive(chunk_message("00" * 16, 0, b"\0"))
    assert err.value.fatal and "unknown" in err.value.reason


@pytest.mark.parametrize("offset,data,why", [(5, b"\0", "offset"), (0, b"\0" * 101, "more bytes")])
def test_out_of_order_or_too_long_chunk_cancels_that_transfer(tmp_path, offset, data, why):
    ft, tid = accepted_receiver(tmp_path)
    ft.receive(chunk_message(tid, 0, b"\0" * 0 + b"\0"))       # one good byte first
    with pytest.raises(FileTransferError) as err:
        ft.receive(chunk_message(tid, offset if offset else 1, data))
    assert not err.value.fatal and err.value.transfer_id == tid and why in err.value.reason
    cancel = json.loads(err.value.outcome.messages[0][1:])
    assert cancel["type"] == "cancel" and cancel["id"] == tid
    assert isinstance(err.value.outcome.events[0], FileFailed)
    assert part_files(tmp_path) == []
    # the rest of a cancelled transfer is dropped silently
    assert ft.receive(chunk_message(tid, 2, b"\0")) == Outcome()


def test_done_before_all_bytes_and_chunk_before_accept(tmp_path):
    ft, tid = accepted_receiver(tmp_path)
    with pytest.raises(FileTransferError) as err:
        ft.receive(b'\x01{"type":"done","id":"' + tid.encode() + b'"}')
    assert not err.value.fatal and "done after 0 of 100" in err.value.reason
    manual = receiver(tmp_path, auto_accept=False)
    manual.receive(offer_message("12" * 16, "y", 1, "00" * 32))
    with pytest.raises(FileTransferError) as err:
        manual.receive(chunk_message("12" * 16, 0, b"\0"))
    assert not err.value.fatal and "accepted" in err.value.reason


def test_sender_side_bad_answers(tmp_path):
    sup, peer = make_pair(tmp_path)
    out = sup.ft.offer(write(tmp_path, "s.bin", b"abc"))
    tid = out.events[0].id
    with pytest.raises(FileTransferError) as err:
        sup.ft.receive(b'\x01' + json.dumps({"type": "accept", "id": tid, "offset": 4}).encode())
    assert not err.value.fatal and "beyond" in err.value.reason
    assert json.loads(err.value.outcome.messages[0][1:])["type"] == "cancel"
    with pytest.raises(FileTransferError) as err:
        sup.ft.receive(b'\x01' + json.dumps({"type": "done", "id": "99" * 16}).encode())
    assert err.value.fatal
    tid2 = sup.ft.offer(write(tmp_path, "t.bin", b"abc")).events[0].id
    with pytest.raises(FileTransferError) as err:
        sup.ft.receive(b'\x01' + json.dumps({"type": "done", "id": tid2}).encode())
    assert not err.value.fatal and "offered" in err.value.reason


@pytest.mark.parametrize("message", [
    b"", b"\x00", b"\x03abc", b"\x02" + b"\0" * 24, b"\x02" + b"\0" * 25,
    b"\x01", b"\x01not json", b"\x01[]", b'\x01{"type":"offer"}', b"\x01\xff\xfe",
    b'\x01{"type":"accept","id":"' + b"a" * 32 + b'","offset":-1}',
    b'\x01{"type":"accept","id":"' + b"a" * 32 + b'","offset":true}',
    b'\x01{"type":"accept","id":"' + b"A" * 32 + b'","offset":0}',
    b'\x01{"type":"accept","id":"' + b"a" * 32 + b'","offset":0,"x":1}',
    b'\x01{"type":"done","id":"' + b"a" * 32 + b'","id":"' + b"a" * 32 + b'"}',
    b'\x01{"type":"cancel","id":"' + b"a" * 32 + b'","reason":"a\\u0000b"}',
    b'\x01{"type":"offer","id":"' + b"a" * 32 + b'","name":"x","size":NaN,"sha256":"' + b"0" * 64 + b'"}',
    b"\x01" + b"[" * 5000,
])
def test_malformed_messages_are_fatal(tmp_path, message):
    ft = receiver(tmp_path)
    with pytest.raises(FileTransferError) as err:
        ft.receive(message)
    assert err.value.fatal and err.value.reason


def test_oversized_message_is_refused_while_reassembling(tmp_path):
    ft = receiver(tmp_path)
    ft.receive(b"\x02" + b"\0" * 10_000, end=False)
    with pytest.raises(FileTransferError) as err:
        ft.receive(b"\0" * (MAX_MESSAGE - 10_000), end=False)
    assert err.value.fatal and "longer" in err.value.reason


@settings(max_examples=300, deadline=None)
@given(pieces=st.lists(st.tuples(st.binary(max_size=300), st.booleans()), max_size=8))
def test_arbitrary_bytes_raise_only_file_transfer_error(pieces):
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        ft = receiver(root)
        for data, end in pieces:
            try:
                ft.receive(data, end)
            except FileTransferError as exc:
                assert exc.reason
        assert set(listing(root)) == {"inbox"}


@settings(max_examples=150, deadline=None)
@given(msg=st.fixed_dictionaries({
    "type": st.sampled_from(["offer", "accept", "reject", "done", "cancel", "x"]),
    "id": st.one_of(st.just("ab" * 16), st.text(max_size=40)),
}, optional={"name": st.text(max_size=20), "size": st.integers(-5, 2**70),
             "offset": st.one_of(st.integers(-5, 2**70), st.floats(), st.booleans()),
             "sha256": st.text(alphabet="0123456789abcdefG", min_size=63, max_size=65),
             "reason": st.text(max_size=250)}))
def test_json_shaped_garbage_never_escapes_as_another_error(msg):
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        ft = receiver(root)
        try:
            ft.receive(b"\x01" + json.dumps(msg).encode("utf-8", "surrogatepass"))
        except FileTransferError:
            pass
        assert part_files(root) == [] or msg["type"] == "offer"


def test_chunk_limits_are_one_mux_piece():
    assert CHUNK_HEADER_BYTES + MAX_CHUNK_DATA == MAX_MESSAGE == 16 * 1024
