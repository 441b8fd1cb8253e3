"""What the end-to-end session channel costs: throughput and added latency against the raw stream.

    python bench/channel_throughput.py [--mib 256] [--pings 2000] [--skip-relay]

Measured in one run, on this machine:

1. the sans-I/O object alone: ``seal`` and ``receive`` (open) in MB per CPU second for 64 KiB,
   16 KiB and 1 KiB records, fed to the receiver in unaligned 64 KiB reads as a socket would
   deliver them, next to bare AES-256-GCM on the same sizes (what the framing and Python around
   it add), and the handshake (SPAKE2 + HKDF + ECDSA signature and certificate check; argon2id
   apart) — CPU time of this process, so that other work on the machine does not count;
2. a stream and a ping-pong between two processes (sender and receiver each on their own
   process, as the two modules are), once over a direct loopback TCP connection and once
   through a real relay process (``hausmeister-server run --role relay``: TLS on both legs):
   raw bytes against the same bytes in channel records, same run, same connection kind.
   Throughput is payload bytes over the time from the first write to the last payload byte read
   (wall clock), and payload MB per CPU second of the sending and of the receiving process (the
   steadier figure on a shared machine); the added latency per record is half the difference
   of the median round trips (64-byte messages, echoed).  Raw and channel runs take turns,
   ``--rounds`` times; medians are printed.

MB = 10^6 bytes.  Figures are printed, never judged: nothing here fails on timing.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import socket
import ssl
import statistics
import sys
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from cryptography.hazmat.primitives.ciphers.aead import AESGCM  # noqa: E402

from modules.common.session.channel import (MAX_PAYLOAD, Credentials, SessionChannel,  # noqa: E402
                                    adhoc_password)
from modules.common.session.channel_events import Closed, Failed, KeyConfirmed, Record  # noqa: E402
from protocol.framing import BoxDecoder, encode_box  # noqa: E402
from protocol.identity import Identity, make_csr  # noqa: E402
from server import pki  # noqa: E402 - the benchmark makes its own certificates

MIB = 1024 * 1024
CODE = adhoc_password("1234 5678")
PING = b"p" * 64
READY = b"R"


# --- certificates and channel pairs ---------------------------------------------------------------

class Material:
    def __init__(self) -> None:
        ca_key, self.ca = pki.create_ca("Bench CA")
        key = pki.new_key()
        cert = pki.sign_module_csr(ca_key, self.ca, make_csr(key),
                                   Identity("supporter", "bench"), 30)
        self.supporter = Credentials(cert, key)

    def channel(self, role: str, session_id: str) -> SessionChannel:
        if role == "supporter":
            return SessionChannel("supporter", CODE, session_id, credentials=self.supporter)
        return SessionChannel("peer", CODE, session_id, ca_certificate=self.ca)


def confirmed_pair(m: Material) -> tuple[SessionChannel, SessionChannel]:
    sid = str(uuid.uuid4())
    s, p = m.channel("supporter", sid), m.channel("peer", sid)
    hello_s, hello_p = s.start(), p.start()
    p.receive(hello_s)
    s.receive(hello_p + p.data_to_send())
    events = p.receive(s.data_to_send())
    assert s.confirmed and p.confirmed and isinstance(events[0], KeyConfirmed), events
    return s, p


# --- 1. the sans-I/O object -----------------------------------------------------------------------

def bench_sans_io(m: Material, mib: int) -> list[dict]:
    rows = []
    for size in (MAX_PAYLOAD, 16 * 1024, 1024):
        s, p = confirmed_pair(m)
        payload = os.urandom(size)
        batch = max(1, MIB // size)
        total = max(batch, (mib * MIB) // size)
        seal_t = open_t = 0.0
        delivered = 0
        for _ in range(total // batch):
            t0 = time.process_time()
            frames = [s.seal(payload) for _ in range(batch)]
            t1 = time.process_time()
            stream = b"".join(frames)
            t2 = time.process_time()
            for at in range(0, len(stream), 65536):  # what a socket read hands over
                for event in p.receive(stream[at:at + 65536]):
                    delivered += len(event.payload)
            open_t += time.process_time() - t2
            seal_t += t1 - t0
        assert delivered == (total // batch) * batch * size
        # bare AES-256-GCM on the same sizes: the floor the channel sits on
        aead, nonce, ad = AESGCM(os.urandom(32)), bytes(12), b"x"
        n = min(total, max(200, (64 * MIB) // size))
        t0 = time.process_time()
        for _ in range(n):
            aead.decrypt(nonce, aead.encrypt(nonce, payload, ad), ad)
        bare = time.process_time() - t0
        rows.append({"size": size, "seal": delivered / seal_t / 1e6,
                     "open": delivered / open_t / 1e6,
                     "both": delivered / (seal_t + open_t) / 1e6,
                     "bare": n * size / bare / 1e6,
                     "us_record": (seal_t + open_t) / (delivered / size) * 1e6})
    return rows


def bench_handshake(m: Material, rounds: int = 20) -> float:
    t0 = time.process_time()
    for _ in range(rounds):
        confirmed_pair(m)
    return (time.process_time() - t0) / rounds


def bench_small_record(m: Material, rounds: int = 20000) -> float:
    s, p = confirmed_pair(m)
    t0 = time.process_time()
    for _ in range(rounds):
        p.receive(s.seal(PING))
    return (time.process_time() - t0) / rounds


# --- 2. two processes over a connection -----------------------------------------------------------

class Direct:
    """A direct loopback TCP connection: the supporter connects, the peer accepts."""

    name = "direct TCP"

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))

    def session(self) -> dict:
        return {"sid": str(uuid.uuid4())}

    def open(self, side: str, session: dict) -> tuple[socket.socket, bytes]:
        if side == "supporter":
            sock = socket.create_connection(self.listener.getsockname())
        else:
            sock, _ = self.listener.accept()
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.settimeout(60)  # a stuck run ends with an error instead of hanging
        return sock, b""

    def stop(self) -> None:
        self.listener.close()


class ThroughRelay:
    """A relay process of a throwaway server: each side opens a TLS leg with its token."""

    name = "relay (TLS legs)"

    def __init__(self, folder: Path) -> None:
        from _common import BenchServer
        from server.relay.tokens import RelayTokens, load_or_create_secret
        self.server = BenchServer.create(folder)
        self.proc, self.port = self.server.start_relay()
        config = self.server.config()
        self.tokens = RelayTokens(load_or_create_secret(config.relay.secret_file), ttl=600)
        self.context = ssl.create_default_context(cadata=self.server.ca_pem.decode())

    def session(self) -> dict:
        sid = str(uuid.uuid4())
        return {"sid": sid} | {side: self.tokens.issue(sid, side) for side in ("supporter", "peer")}

    def open(self, side: str, session: dict) -> tuple[ssl.SSLSocket, bytes]:
        raw = socket.create_connection(("127.0.0.1", self.port), timeout=60)
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock = self.context.wrap_socket(raw, server_hostname="127.0.0.1")
        sock.sendall(encode_box({b"_command": b"OpenRelayLeg", b"_ask": b"1",
                                 b"relay_token": session[side].encode()}))
        decoder, box = BoxDecoder(), None
        while box is None:
            data = sock.recv(65536)
            if not data:
                raise RuntimeError("the relay closed the leg")
            decoder.feed(data)
            box = decoder.next_box()
        decoder.pause()
        if b"_error" in box:
            raise RuntimeError(box.get(b"_error_description", b"?").decode())
        return sock, decoder.take_unparsed()

    def stop(self) -> None:
        from _common import stop_process
        stop_process(self.proc)


def shut(sock: socket.socket) -> None:
    try:
        if isinstance(sock, ssl.SSLSocket):
            sock.unwrap()  # close_notify both ways: a bare close may reset what is in flight
        else:
            sock.shutdown(socket.SHUT_WR)
            while sock.recv(65536):
                pass
    except (OSError, ssl.SSLError):
        pass
    sock.close()


class ChannelEnd:
    """A channel over a blocking socket (what the benchmark's processes drive)."""

    def __init__(self, sock: socket.socket, channel: SessionChannel, early: bytes) -> None:
        self.sock, self.channel, self.pending = sock, channel, early
        self.records: list[bytes] = []
        self.closed = False
        sock.sendall(channel.start())

    def pump(self) -> None:
        """Read once (or use what came with the relay's answer) and handle the events."""
        data, self.pending = (self.pending, b"") if self.pending else (self.sock.recv(262144), b"")
        events = self.channel.receive(data) if data else self.channel.eof()
        out = self.channel.data_to_send()
        if out:
            self.sock.sendall(out)
        for event in events:
            if isinstance(event, Record):
                self.records.append(event.payload)
            elif isinstance(event, Closed):
                self.closed = True
            elif isinstance(event, Failed):
                raise RuntimeError(f"channel failed: {event.reason}")

    def confirm(self) -> None:
        while not self.channel.confirmed:
            self.pump()


def peer_main(transport, session: dict, material: Material, use_channel: bool, kind: str,
              report) -> None:
    """The receiving process: counts a stream, or echoes pings."""
    sock, early = transport.open("peer", session)
    if use_channel:
        end = ChannelEnd(sock, material.channel("peer", session["sid"]), early)
        end.confirm()
        got, last, cpu0 = 0, time.monotonic(), time.process_time()
        while True:  # records may have come with the key confirmation: handle them first
            for payload in end.records:
                if kind == "echo":
                    sock.sendall(end.channel.seal(payload))
                got += len(payload)
                last = time.monotonic()
            end.records.clear()
            if end.closed:
                break
            end.pump()
        sock.sendall(end.channel.close())
    else:
        sock.sendall(READY)  # the relay refuses a leg that sends much before its partner is there
        got, last, buf = len(early), time.monotonic(), bytearray(262144)
        cpu0 = time.process_time()
        if kind == "echo" and early:
            sock.sendall(early)
        while True:
            n = sock.recv_into(buf)
            if not n:
                break
            if kind == "echo":
                sock.sendall(buf[:n])
            got += n
            last = time.monotonic()
    report.send((got, last, time.process_time() - cpu0))
    shut(sock)


def run_pair(transport, material: Material, use_channel: bool, kind: str, total: int,
             pings: int) -> dict:
    session = transport.session()
    here, there = multiprocessing.Pipe()
    peer = multiprocessing.get_context("fork").Process(
        target=peer_main, args=(transport, session, material, use_channel, kind, there))
    peer.start()
    there.close()  # so that a peer that dies shows as EOF here
    sock, early = transport.open("supporter", session)
    result: dict = {}
    if use_channel:
        end = ChannelEnd(sock, material.channel("supporter", session["sid"]), early)
        end.confirm()
    else:
        while not early:  # wait for the peer's READY byte
            early = sock.recv(1)
        assert early == READY, early
    if kind == "stream":
        chunk = os.urandom(MAX_PAYLOAD)
        per_write = 16  # ~1 MiB per sendall, as for the raw stream
        start, sent, cpu0 = time.monotonic(), 0, time.process_time()
        while sent < total:
            if use_channel:
                sock.sendall(b"".join(end.channel.seal(chunk) for _ in range(per_write)))
                sent += per_write * len(chunk)
            else:
                sock.sendall(chunk * per_write)
                sent += per_write * len(chunk)
        if use_channel:
            sock.sendall(end.channel.close())
            while not end.closed:
                end.pump()
        else:
            shut(sock)
        send_cpu = time.process_time() - cpu0
        got, last, recv_cpu = here.recv()
        result = {"bytes": got, "mb_s": got / max(last - start, 1e-9) / 1e6, "sent": sent,
                  "send_mb_cpu": sent / max(send_cpu, 1e-9) / 1e6,
                  "recv_mb_cpu": got / max(recv_cpu, 1e-9) / 1e6}
    else:
        rtts = []
        for _ in range(pings):
            t0 = time.perf_counter()
            if use_channel:
                sock.sendall(end.channel.seal(PING))
                while not end.records:
                    end.pump()
                end.records.clear()
            else:
                sock.sendall(PING)
                need = len(PING)
                while need > 0:
                    need -= len(sock.recv(65536))
            rtts.append(time.perf_counter() - t0)
        if use_channel:
            sock.sendall(end.channel.close())
            while not end.closed:
                end.pump()
        else:
            shut(sock)
        here.recv()
        rtts.sort()
        result = {"rtt_p50_us": statistics.median(rtts) * 1e6,
                  "rtt_p99_us": rtts[int(len(rtts) * 0.99)] * 1e6}
    if use_channel:
        shut(sock)
    peer.join(60)
    return result


def bench_connection(transport, material: Material, total: int, pings: int,
                     rounds: int) -> dict:
    """Raw and channel in turns (so that a busy moment of the machine hits both), ``rounds``
    times; the median of each figure."""
    runs: dict[str, list[dict]] = {"raw": [], "channel": []}
    for n in range(rounds):
        order = (False, True) if n % 2 == 0 else (True, False)
        for use_channel in order:
            res = run_pair(transport, material, use_channel, "stream", total, pings)
            res |= run_pair(transport, material, use_channel, "echo", total, pings)
            runs["channel" if use_channel else "raw"].append(res)
    out = {}
    for label, results in runs.items():
        out[label] = {key: statistics.median(r[key] for r in results) for key in results[0]}
        out[label]["mb_s_all"] = [r["mb_s"] for r in results]
        out[label]["complete"] = all(r["bytes"] == r["sent"] for r in results)
    return out


# --- report ---------------------------------------------------------------------------------------

def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mib", type=int, default=256, help="MiB per stream (default 256)")
    ap.add_argument("--pings", type=int, default=2000, help="round trips per latency run")
    ap.add_argument("--rounds", type=int, default=3, help="raw/channel runs, in turns (median)")
    ap.add_argument("--skip-relay", action="store_true", help="direct TCP only")
    args = ap.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _common import machine_line, workdir

    print(machine_line())
    material = Material()
    print(f"\n1. sans-I/O SessionChannel ({args.mib} MiB per size; payload MB per CPU second)")
    print(f"   handshake (SPAKE2 + HKDF + ECDSA sign/verify + certificate check, both sides): "
          f"{bench_handshake(material) * 1e3:.1f} ms CPU")
    print(f"   64-byte record, seal + open: {bench_small_record(material) * 1e6:.1f} µs CPU")
    print(f"   {'record':>8} {'seal':>8} {'open':>8} {'seal+open':>10} {'bare GCM':>9} "
          f"{'µs/record':>10}")
    for row in bench_sans_io(material, args.mib):
        print(f"   {row['size']:>8} {row['seal']:>8.0f} {row['open']:>8.0f} {row['both']:>10.0f} "
              f"{row['bare']:>9.0f} {row['us_record']:>10.1f}")

    total = args.mib * MIB
    transports = [Direct]
    if not args.skip_relay:
        transports.append(ThroughRelay)
    print(f"\n2. two processes, {args.mib} MiB stream, {args.pings} pings of {len(PING)} bytes, "
          f"median of {args.rounds} rounds")
    with workdir(prefix="hausmeister-channel-bench-") as folder:
        for make in transports:
            transport = make(folder) if make is ThroughRelay else make()
            try:
                r = bench_connection(transport, material, total, args.pings, args.rounds)
            finally:
                transport.stop()
            raw, ch = r["raw"], r["channel"]
            added = (ch["rtt_p50_us"] - raw["rtt_p50_us"]) / 2
            print(f"   {transport.name}:")
            print(f"     throughput raw {raw['mb_s']:7.0f} MB/s   channel {ch['mb_s']:7.0f} MB/s   "
                  f"ratio {ch['mb_s'] / raw['mb_s']:.2f}   (each round: raw "
                  f"{', '.join(f'{x:.0f}' for x in raw['mb_s_all'])}; channel "
                  f"{', '.join(f'{x:.0f}' for x in ch['mb_s_all'])})")
            for end, key in (("sender", "send_mb_cpu"), ("receiver", "recv_mb_cpu")):
                print(f"     {end:>8} MB per CPU s: raw {raw[key]:6.0f}   channel {ch[key]:6.0f}"
                      f"   ratio {ch[key] / raw[key]:.2f}")
            print(f"     round trip p50 raw {raw['rtt_p50_us']:6.0f} µs   channel "
                  f"{ch['rtt_p50_us']:6.0f} µs   (p99 {raw['rtt_p99_us']:.0f} / "
                  f"{ch['rtt_p99_us']:.0f} µs)   added latency per record ≈ {added:.0f} µs")
            for label, res in r.items():
                if not res["complete"]:
                    print(f"     !! {label}: not every byte sent arrived")
    return 0


if __name__ == "__main__":
    sys.exit(main())
