"""How many 180 kb/s sessions one relay process carries with p99 added latency <= 5 ms.

    python bench/sessions_180kbps.py [--steps 250,500,1000,...] [--chunk 1024] [--duplex]

Set-up, all on 127.0.0.1:

* one relay process, ``hausmeister-server run --role relay`` (Twisted's epoll reactor, as in
  production), pinned to CPU 0 with ``taskset -c 0`` so its figure is "per core";
* this script is the load generator, pinned to CPU 1: stdlib ``ssl`` sockets, non-blocking, one
  ``epoll`` loop, no framework — cheaper per chunk than the relay, so the relay saturates first
  (its own CPU use is printed so you can check);
* each session pair is two TLS connections to the relay (no client certificate, as an ad-hoc
  customer) that each say ``OpenRelayLeg`` with a relay token and then carry raw bytes.  The
  tokens are minted here with ``RelayTokens`` and the relay's own secret file: the broker is
  bypassed (its set-up cost is what ``bench/adhoc_setup.py`` measures);
* each session streams 180 kb/s = 22,500 bytes/s in ``--chunk``-byte chunks (default 1 KiB, i.e.
  ~22 chunks/s) from the peer leg to the supporter leg (one direction: a screen going to the
  supporter; ``--duplex`` sends 180 kb/s each way), with the sessions' phases spread evenly;
* every chunk carries its send time and flow id; the receive side checks the id (no bytes of
  another session) and takes ``receive time - send time``;
* the same number of chunks per second also runs over ``--probes`` direct TLS connections
  (load generator to itself, no relay) in the same loop at the same time: their latency is what
  the load generator and the kernel add by themselves.  "Added" latency = relay percentile minus
  direct percentile.

``--trace FILE`` (e.g. ``bench/traces/office_1080p.csv``, recorded with ``bench/screen_trace.py``)
replaces the fixed chunks by a real screen session: every relay flow replays the trace's RFB
writes — their sizes as the session channel puts them on the leg (a 4-byte mux frame header per
16 KiB piece, 21 bytes per sealed record of at most 64 KiB) and their timing — looping, each flow
from another offset so the sessions' bursts do not line up.  The trace's own mean rate is what
each session carries (printed), unless ``--trace-rate-kbps`` stretches or compresses its time
axis to another mean rate.  Each chunk then starts with its length.

N goes up in ``--steps``; each step adds pairs, warms up, then measures ``--window`` seconds.  It
stops when p99 added latency exceeds ``--max-p99-ms`` (5 ms), the relay's CPU is saturated,
the relay no longer delivers the offered rate, or the load generator itself runs out of CPU.
The answer is the largest N that met p99 <= 5 ms at the full rate.  Target: >= 3,000 per core.
Never fails on timing; exits 1 only if something is broken (misrouted bytes, refused legs).
"""

from __future__ import annotations

import argparse
import heapq
import os
import resource
import select
import socket
import ssl
import struct
import sys
import time
import uuid
from array import array
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # noqa: E402
    BenchServer, client_context, cpu_busy_ticks, cpu_seconds, loadavg, TICK, machine_line, pin_self, print_table,
    raise_nofile, rss_kib, stop_process, summary_ms, taskset_prefix, workdir,
)
from protocol.framing import BoxDecoder, encode_box  # noqa: E402
from server.relay.tokens import RelayTokens, load_or_create_secret  # noqa: E402

HEADER = struct.Struct("<dI")  # send time (perf_counter), flow id
RATE_BITS = 180_000


class Flow:
    """One direction of one pair: ``tx`` writes chunks, ``rx`` reads them."""

    __slots__ = ("fid", "kind", "tx", "rx", "buf", "pending", "received")

    def __init__(self, fid: int, kind: str, tx: ssl.SSLSocket, rx: ssl.SSLSocket,
                 early: bytes = b"") -> None:
        self.fid = fid
        self.kind = kind  # "relay" or "direct"
        self.tx = tx
        self.rx = rx
        self.buf = bytearray(early)
        self.pending: bytes | None = None
        self.received = 0


class BrokenBench(RuntimeError):
    pass


class _Closed:
    """Stands in for a leg the relay closed: every send fails quietly."""

    def send(self, data: bytes) -> int:
        raise BlockingIOError

    def close(self) -> None:
        pass


# --- set-up -------------------------------------------------------------------------------------

def _read_box(sock: ssl.SSLSocket, timeout: float = 30) -> tuple[dict, bytes]:
    decoder = BoxDecoder()
    sock.settimeout(timeout)
    while True:
        data = sock.recv(65536)
        if not data:
            raise BrokenBench("the relay closed the leg before answering OpenRelayLeg")
        decoder.feed(data)
        box = decoder.next_box()
        if box is not None:
            decoder.pause()
            return box, decoder.take_unparsed()


def open_leg(ctx: ssl.SSLContext, port: int, token: str) -> tuple[ssl.SSLSocket, bytes]:
    raw = socket.create_connection(("127.0.0.1", port), timeout=30)
    raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock = ctx.wrap_socket(raw, server_hostname="127.0.0.1")
    sock.sendall(encode_box({b"_command": b"OpenRelayLeg", b"_ask": b"1",
                             b"relay_token": token.encode()}))
    box, early = _read_box(sock)
    if b"_answer" not in box:
        raise BrokenBench(f"relay refused the leg: {box.get(b'_error_description', box)!r}")
    sock.setblocking(False)
    return sock, early


def open_pair(ctx: ssl.SSLContext, port: int, tokens: RelayTokens) -> tuple:
    session_id = str(uuid.uuid4())
    supporter, early_s = open_leg(ctx, port, tokens.issue(session_id, "supporter"))
    peer, early_p = open_leg(ctx, port, tokens.issue(session_id, "peer"))
    return supporter, early_s, peer, early_p


class DirectServer:
    """A TLS listener inside the load generator, for the direct (no relay) probe connections."""

    def __init__(self, cert_dir: Path) -> None:
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ctx.load_cert_chain(cert_dir / "server.crt", cert_dir / "server.key")
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(256)
        self.port = self.listener.getsockname()[1]

    def pair(self, client_ctx: ssl.SSLContext) -> tuple[ssl.SSLSocket, ssl.SSLSocket]:
        raw = socket.create_connection(("127.0.0.1", self.port), timeout=30)
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        accepted, _ = self.listener.accept()
        accepted.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        server_side = self.ctx.wrap_socket(accepted, server_side=True,
                                           do_handshake_on_connect=False)
        client_side = client_ctx.wrap_socket(raw, server_hostname="127.0.0.1",
                                             do_handshake_on_connect=False)
        for s in (server_side, client_side):
            s.setblocking(False)
        pending = {server_side, client_side}
        deadline = time.monotonic() + 30
        while pending and time.monotonic() < deadline:
            for s in list(pending):
                try:
                    s.do_handshake()
                    pending.discard(s)
                except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                    pass
            if pending:
                select.select(list(pending), [], [], 0.01)
        if pending:
            raise BrokenBench("direct TLS handshake did not finish")
        return client_side, server_side

    def close(self) -> None:
        self.listener.close()


# --- the streaming loop -------------------------------------------------------------------------

class Streamer:
    def __init__(self, chunk: int, rate_bits: int) -> None:
        self.chunk = chunk
        self.period = chunk * 8 / rate_bits  # seconds between two chunks of one flow
        self.pad = bytes(chunk - HEADER.size)
        self.flows: list[Flow] = []
        self.by_fd: dict[int, Flow] = {}
        self.ep = select.epoll()
        self.misrouted = 0
        self.closed_by_peer = 0
        self.blocked_sends = 0

    def add(self, flow: Flow) -> None:
        self.flows.append(flow)
        self.by_fd[flow.rx.fileno()] = flow
        self.ep.register(flow.rx.fileno(), select.EPOLLIN)

    def send_failed(self, flow: Flow) -> None:
        """The relay closed a leg we send on: counted as broken (reported, exit 1)."""
        self.closed_by_peer += 1
        flow.pending = None
        if flow in self.flows:
            flow.tx = _Closed()

    def _receive(self, flow: Flow, lat: dict[str, array], window_start: float) -> None:
        rx = flow.rx
        buf = flow.buf
        # One read per readiness event (epoll is level-triggered: what is left in the socket
        # wakes us again), more only while TLS holds decrypted bytes: no failing read per event.
        while True:
            try:
                data = rx.recv(262144)
            except (ssl.SSLWantReadError, ssl.SSLWantWriteError, BlockingIOError):
                return
            except (ssl.SSLError, OSError):
                data = b""
            if not data:
                self.closed_by_peer += 1
                self.ep.unregister(rx.fileno())
                del self.by_fd[rx.fileno()]
                return
            now = time.perf_counter()
            buf += data
            chunk = self.chunk
            n = len(buf) // chunk
            if n:
                samples = lat[flow.kind]
                fid = flow.fid
                unpack = HEADER.unpack_from
                for i in range(n):
                    sent, got = unpack(buf, i * chunk)
                    if got != fid:
                        self.misrouted += 1
                    elif sent >= window_start:
                        samples.append(now - sent)
                del buf[:n * chunk]
                flow.received += n
            if not rx.pending():
                return

    def _send(self, flow: Flow) -> None:
        data = flow.pending
        if data is None:
            data = HEADER.pack(time.perf_counter(), flow.fid) + self.pad
        try:
            flow.tx.send(data)
            flow.pending = None
        except (ssl.SSLWantWriteError, ssl.SSLWantReadError, BlockingIOError):
            flow.pending = data  # retried (same bytes) in this flow's next slot
            self.blocked_sends += 1
        except (ssl.SSLError, OSError):
            self.send_failed(flow)

    def run(self, seconds: float, window_start: float, send: bool = True) -> dict:
        """Stream for ``seconds``; latencies of chunks sent after ``window_start`` are kept."""
        lat = {"relay": array("d"), "direct": array("d")}
        flows = self.flows
        count = len(flows)
        period = self.period
        t0 = time.perf_counter()
        t_end = t0 + seconds
        idx, cycle = 0, 0
        next_due = t0
        max_lag = 0.0
        by_fd = self.by_fd
        poll = self.ep.poll
        receive = self._receive
        sent = 0
        while True:
            now = time.perf_counter()
            if now >= t_end:
                break
            if send and count:
                lag = now - next_due
                if lag > max_lag:
                    max_lag = lag
                while next_due <= now:
                    self._send(flows[idx])
                    sent += 1
                    idx += 1
                    if idx == count:
                        idx = 0
                        cycle += 1
                    next_due = t0 + (cycle + idx / count) * period
                wait = max(0.0, min(next_due, t_end) - time.perf_counter())
            else:
                wait = max(0.0, t_end - now)
            for fd, _ev in poll(min(wait, 0.05)):
                flow = by_fd.get(fd)
                if flow is not None:
                    receive(flow, lat, window_start)
        return {"lat": lat, "sent": sent, "max_lag": max_lag}



# --- replaying a recorded screen session --------------------------------------------------------

TRACE_HEADER = struct.Struct("<IdI")  # chunk length, send time, flow id
MUX_PIECE, MUX_FRAME, RECORD_PAYLOAD, RECORD_OVERHEAD = 16384, 4, 65519, 21


def wire_chunks(write_bytes: int) -> list[int]:
    """What one RFB write becomes on a relay leg: sealed records of mux frames (sizes)."""
    pieces = -(-write_bytes // MUX_PIECE)
    payload = write_bytes + MUX_FRAME * pieces
    out = []
    while payload > 0:
        part = min(payload, RECORD_PAYLOAD)
        out.append(max(part + RECORD_OVERHEAD, TRACE_HEADER.size))
        payload -= part
    return out


def load_trace(path: Path, rate_kbps: float | None) -> tuple[list[tuple[float, int]], float]:
    """[(seconds since start, wire bytes)], duration in seconds — time-scaled if asked."""
    events: list[tuple[float, int]] = []
    duration = 0.0
    for line in path.read_text().splitlines():
        line = line.strip()
        if line.startswith("# duration_s="):
            duration = float(line.split("=", 1)[1])
        if not line or line.startswith("#") or line.startswith("ms,"):
            continue
        ms, n = line.split(",")
        for size in wire_chunks(int(n)):
            events.append((float(ms) / 1000, size))
    if not events:
        raise SystemExit(f"{path}: no writes in the trace")
    duration = max(duration, events[-1][0] + 0.001)
    if rate_kbps:
        scale = sum(n for _, n in events) * 8 / duration / (rate_kbps * 1000)
        events = [(t * scale, n) for t, n in events]
        duration *= scale
    return events, duration


class TraceStreamer(Streamer):
    """Every flow replays the trace, looping, from its own offset."""

    def __init__(self, events: list[tuple[float, int]], duration: float) -> None:
        super().__init__(TRACE_HEADER.size, 8)
        self.events = events
        self.duration = duration
        self.mean_chunk = sum(n for _, n in events) / len(events)
        self.period = duration / len(events)  # mean seconds between two chunks of one flow
        self.pads = {}
        self.heap: list[tuple[float, int, int]] = []  # (due, flow index, event index)
        self.t0 = time.perf_counter()
        self.sent_bytes = {"relay": 0, "direct": 0}
        self.received_bytes = {"relay": 0, "direct": 0}
        self.loops: dict[int, list[float]] = {}  # flow index -> [start time of its current loop]

    def add(self, flow: Flow) -> None:
        super().add(flow)
        index = len(self.flows) - 1
        # spread the flows' offsets over the trace (golden ratio: no two flows line up)
        offset = ((index * 0.6180339887) % 1.0) * self.duration
        events, start = self.events, 0
        while start < len(events) and events[start][0] < offset:
            start += 1
        if start == len(events):
            start = 0
        # on the clock of the schedules: they resume where the last sending run stopped
        now = getattr(self, "stopped_at", None) or time.perf_counter()
        loop_t0 = now - (events[start][0] if start else 0.0)
        self.loops[index] = [loop_t0]
        heapq.heappush(self.heap, (loop_t0 + events[start][0], index, start))

    def _chunk(self, size: int, fid: int) -> bytes:
        pad = self.pads.get(size)
        if pad is None:
            pad = self.pads[size] = bytes(size - TRACE_HEADER.size)
        return TRACE_HEADER.pack(size, time.perf_counter(), fid) + pad

    def _receive(self, flow: Flow, lat: dict[str, array], window_start: float) -> None:
        rx = flow.rx
        buf = flow.buf
        while True:
            try:
                data = rx.recv(262144)
            except (ssl.SSLWantReadError, ssl.SSLWantWriteError, BlockingIOError):
                return
            except (ssl.SSLError, OSError):
                data = b""
            if not data:
                self.closed_by_peer += 1
                self.ep.unregister(rx.fileno())
                del self.by_fd[rx.fileno()]
                return
            now = time.perf_counter()
            buf += data
            pos, end = 0, len(buf)
            unpack = TRACE_HEADER.unpack_from
            samples = lat[flow.kind]
            while end - pos >= TRACE_HEADER.size:
                size, sent, got = unpack(buf, pos)
                if size < TRACE_HEADER.size or end - pos < size:
                    break
                if got != flow.fid:
                    self.misrouted += 1
                elif sent >= window_start:
                    samples.append(now - sent)
                    self.received_bytes[flow.kind] += size
                pos += size
                flow.received += 1
            if pos:
                del buf[:pos]
            if not rx.pending():
                return

    def run(self, seconds: float, window_start: float, send: bool = True) -> dict:
        lat = {"relay": array("d"), "direct": array("d")}
        if send:
            self._resume_schedules()
        flows, events, heap = self.flows, self.events, self.heap
        n_events = len(events)
        t_end = time.perf_counter() + seconds
        by_fd, poll, receive = self.by_fd, self.ep.poll, self._receive
        loops = self.loops
        sent = 0
        max_lag = 0.0
        pop, push = heapq.heappop, heapq.heappush
        while True:
            now = time.perf_counter()
            if now >= t_end:
                break
            if send and heap:
                while heap and heap[0][0] <= now:
                    due, index, ev = pop(heap)
                    lag = now - due
                    if lag > max_lag:
                        max_lag = lag
                    flow = flows[index]
                    size = events[ev][1]
                    data = flow.pending if flow.pending is not None else self._chunk(size, flow.fid)
                    try:
                        flow.tx.send(data)
                        flow.pending = None
                        if due >= window_start:
                            self.sent_bytes[flow.kind] += size
                    except (ssl.SSLWantWriteError, ssl.SSLWantReadError, BlockingIOError):
                        flow.pending = data
                        self.blocked_sends += 1
                    except (ssl.SSLError, OSError):
                        self.send_failed(flow)
                        continue  # this flow sends no more
                    sent += 1
                    ev += 1
                    state = loops[index]
                    if ev == n_events:
                        ev = 0
                        state[0] += self.duration
                    push(heap, (state[0] + events[ev][0], index, ev))
                wait = max(0.0, min(heap[0][0] if heap else t_end, t_end) - time.perf_counter())
            else:
                # not sending: shift every schedule so nothing is due in a burst afterwards
                wait = max(0.0, t_end - now)
            for fd, _ev in poll(min(wait, 0.05)):
                flow = by_fd.get(fd)
                if flow is not None:
                    receive(flow, lat, window_start)
        if send:
            self.stopped_at = time.perf_counter()
        return {"lat": lat, "sent": sent, "max_lag": max_lag}

    def _resume_schedules(self) -> None:
        """Time spent outside ``run`` (opening pairs) and in runs that did not send does not
        count: every flow's schedule moves on by that much, so no step starts with a burst."""
        stopped = getattr(self, "stopped_at", None)
        if stopped is None:
            return
        shift = time.perf_counter() - stopped
        self.heap = [(due + shift, i, ev) for due, i, ev in self.heap]
        heapq.heapify(self.heap)
        for state in self.loops.values():
            state[0] += shift

def rusage_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


# --- main ---------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    p.add_argument("--steps", default="250,500,750,1000,1500,2000,3000,4000",
                   help="session pair counts to try, in order (default: %(default)s)")
    p.add_argument("--chunk", type=int, default=1024,
                   help="bytes per chunk (default 1024: ~22 chunks/s per flow at 180 kb/s)")
    p.add_argument("--rate-kbps", type=float, default=180.0,
                   help="kilobits per second per flow (default 180)")
    p.add_argument("--trace", type=Path, metavar="CSV",
                   help="replay a recorded screen session (bench/screen_trace.py) instead of "
                        "fixed chunks, e.g. bench/traces/office_1080p.csv")
    p.add_argument("--trace-rate-kbps", type=float, default=None,
                   help="with --trace: scale the trace's time axis to this mean rate per flow "
                        "(default: the rate recorded)")
    p.add_argument("--duplex", action="store_true",
                   help="stream the rate in both directions of each session (default: peer -> "
                        "supporter only)")
    p.add_argument("--warmup", type=float, default=3.0, help="seconds before each window (3)")
    p.add_argument("--window", type=float, default=10.0, help="measured seconds per step (10)")
    p.add_argument("--probes", type=int, default=64,
                   help="direct (no relay) TLS flows measured alongside, same rate (64)")
    p.add_argument("--max-p99-ms", type=float, default=5.0, help="p99 added latency limit (5)")
    p.add_argument("--relay-cpus", default="0",
                   help="CPU(s) for the relay process (taskset -c; default 0; '' = no pinning)")
    p.add_argument("--loadgen-cpus", default="1",
                   help="CPU(s) for this load generator (default 1; '' = no pinning)")
    p.add_argument("--retries", type=int, default=2,
                   help="measure a step again (up to this many times) when other processes used "
                        "more than --max-foreign %% of the relay's or the load generator's core "
                        "during the window (default 2)")
    p.add_argument("--max-foreign", type=float, default=10.0,
                   help="%% of a core other processes may use during a window (default 10)")
    p.add_argument("--setup-threads", type=int, default=8,
                   help="threads opening relay legs in parallel (8)")
    p.add_argument("--keep-going", action="store_true",
                   help="measure every step even after p99 or delivery failed (CPU per chunk "
                        "on a machine too loaded for latency); still stops at saturation")
    p.add_argument("--keep", action="store_true", help="keep the temporary folder (logs)")
    args = p.parse_args(argv)

    steps = [int(s) for s in args.steps.split(",") if s.strip()]
    if args.chunk < HEADER.size + 1:
        p.error(f"--chunk must be at least {HEADER.size + 1}")
    rate_bits = int(args.rate_kbps * 1000)
    directions = 2 if args.duplex else 1
    need_fds = max(steps) * 2 + args.probes * 2 * directions + 200
    limit = raise_nofile(need_fds)
    if limit < need_fds:
        print(f"note: RLIMIT_NOFILE is {limit}, {need_fds} wanted: steps above "
              f"{(limit - 200) // 2 - args.probes * directions} pairs will fail")

    print(machine_line())
    relay_pin = taskset_prefix(args.relay_cpus)
    loadgen_pinned = pin_self(args.loadgen_cpus) if os.cpu_count() and os.cpu_count() > 1 else False
    print(f"relay pinned: {'taskset -c ' + args.relay_cpus if relay_pin else 'no'}; "
          f"load generator pinned: {'CPU ' + args.loadgen_cpus if loadgen_pinned else 'no'}")
    per_flow = rate_bits / 8
    trace = None
    if args.trace:
        if not args.trace.is_file():
            p.error(f"--trace {args.trace}: no such file (record one with bench/screen_trace.py)")
        trace = load_trace(args.trace, args.trace_rate_kbps)
        events, duration = trace
        trace_bytes = sum(n for _, n in events)
        per_flow = trace_bytes / duration
        args.rate_kbps = per_flow * 8 / 1000
        args.chunk = round(trace_bytes / len(events))
        sizes = sorted(n for _, n in events)
        print(f"each session replays {args.trace.name}: {len(events)} chunks in {duration:.1f} s "
              f"(looped), mean {args.rate_kbps:.1f} kb/s = {per_flow:,.0f} B/s "
              f"{'each way' if args.duplex else 'peer -> supporter'}, "
              f"{len(events) / duration:.1f} chunks/s per flow, chunk bytes median "
              f"{sizes[len(sizes) // 2]}, p90 {sizes[int(len(sizes) * 0.9)]}, max {sizes[-1]}; "
              f"window {args.window:g} s after {args.warmup:g} s warm-up; {args.probes} direct "
              "probe flows (same trace)")
    else:
        print(f"each session: {args.rate_kbps:g} kb/s = {per_flow:,.0f} B/s "
              f"{'each way' if args.duplex else 'peer -> supporter'}, {args.chunk}-byte chunks "
              f"({per_flow / args.chunk:.1f} chunks/s per flow); window {args.window:g} s after "
              f"{args.warmup:g} s warm-up; {args.probes} direct probe flows")
    args.chunks_per_flow = per_flow / args.chunk

    results: list[dict] = []
    broken = False
    with workdir(args.keep, "hausmeister-bench-sessions-") as w:
        srv = BenchServer.create(w)
        config = srv.config()
        secret = load_or_create_secret(config.relay.secret_file)
        tokens = RelayTokens(secret, ttl=config.relay.pair_timeout_seconds)
        relay, port = srv.start_relay(args.relay_cpus or None, nofile=need_fds)
        print(f"relay process pid {relay.pid} on 127.0.0.1:{port}, affinity "
              f"{sorted(os.sched_getaffinity(relay.pid))}")
        ctx = client_context(srv.ca_pem)
        streamer = TraceStreamer(*trace) if trace else Streamer(args.chunk, rate_bits)
        relay_core = single_cpu(os.sched_getaffinity(relay.pid))
        gen_core = single_cpu(os.sched_getaffinity(0))
        direct = DirectServer(config.server.cert_dir)
        legs: list[ssl.SSLSocket] = []
        fid = 0
        try:
            for _ in range(args.probes):
                for _d in range(directions):
                    a, b = direct.pair(ctx)
                    legs += [a, b]
                    streamer.add(Flow(fid, "direct", a, b))
                    fid += 1
            pairs = 0
            pool = ThreadPoolExecutor(args.setup_threads)
            for target in steps:
                # quiet the running flows, then open the new pairs
                streamer.run(0.3, float("inf"), send=False)
                started = time.monotonic()
                new = target - pairs
                try:
                    opened = list(pool.map(lambda _: open_pair(ctx, port, tokens), range(new)))
                except (OSError, BrokenBench) as exc:
                    print(f"could not open {new} more pairs at N={target}: {exc}")
                    broken = isinstance(exc, BrokenBench)
                    break
                for supporter, early_s, peer, early_p in opened:
                    legs += [supporter, peer]
                    streamer.add(Flow(fid, "relay", peer, supporter, early_s))
                    fid += 1
                    if args.duplex:
                        streamer.add(Flow(fid, "relay", supporter, peer, early_p))
                        fid += 1
                pairs = target
                setup_s = time.monotonic() - started
                # warm up, then the window (again if other processes took the cores)
                streamer.run(args.warmup, float("inf"))
                for attempt in range(args.retries + 1):
                    row = measure(streamer, relay.pid, args, pairs, directions, relay_core,
                                  gen_core)
                    row["setup_s"] = setup_s
                    print_table([row], COLUMNS, header=not results)
                    results.append(row)
                    if row["foreign"] <= args.max_foreign:
                        break
                    row["disturbed"] = True
                    print(f"  (other processes used {row['foreign']:.0f} % of a core we measure "
                          "on: measuring again)" if attempt < args.retries else
                          "  (still disturbed: keeping this figure)")
                if streamer.misrouted or streamer.closed_by_peer:
                    print(f"BROKEN: {streamer.misrouted} chunks of another flow, "
                          f"{streamer.closed_by_peer} legs closed by the relay")
                    broken = True
                    break
                why = stop_reason(row, args.max_p99_ms)
                if why and args.keep_going and not why.startswith(("the relay process is",
                                                                   "the load generator")):
                    print(f"going on (--keep-going): {why}")
                elif why:
                    print(f"stopping: {why}")
                    break
            pool.shutdown()
        finally:
            for s in legs:
                try:
                    s.close()
                except OSError:
                    pass
            direct.close()
            stop_process(relay)

    report(results, args, directions)
    return 1 if broken else 0


def single_cpu(cpus: set[int]) -> int | None:
    return next(iter(cpus)) if len(cpus) == 1 else None


def measure(streamer: Streamer, relay_pid: int, args, pairs: int, directions: int,
            relay_core: int | None, gen_core: int | None) -> dict:
    relay_cpu0, gen_cpu0, busy0 = cpu_seconds(relay_pid), rusage_cpu(), cpu_busy_ticks()
    received0 = sum(f.received for f in streamer.flows if f.kind == "relay")
    t0 = time.monotonic()
    out = streamer.run(args.window, time.perf_counter())
    wall = time.monotonic() - t0
    busy1 = cpu_busy_ticks()
    relay_cpu_s = cpu_seconds(relay_pid) - relay_cpu0
    gen_cpu_s = rusage_cpu() - gen_cpu0
    foreign = 0.0
    for core, own in ((relay_core, relay_cpu_s), (gen_core, gen_cpu_s)):
        if core is not None:  # what else ran on that core
            foreign = max(foreign, ((busy1[core] - busy0[core]) / TICK - own) / wall * 100)
    received = sum(f.received for f in streamer.flows if f.kind == "relay") - received0
    offered = pairs * directions * wall / streamer.period
    r = summary_ms(out["lat"]["relay"])
    d = summary_ms(out["lat"]["direct"])
    return {"N": pairs, "relay_cpu": relay_cpu_s / wall * 100, "gen_cpu": gen_cpu_s / wall * 100,
            "us_chunk": relay_cpu_s / max(1, received) * 1e6, "foreign": foreign,
            "gen_us": gen_cpu_s / max(1, out["sent"]) * 1e6,
            "delivered": 100 * received / offered, "MBps": received * args.chunk / wall / 1e6,
            "r50": r["p50"], "r99": r["p99"], "rmax": r["max"], "d50": d["p50"], "d99": d["p99"],
            "add50": max(0.0, r["p50"] - d["p50"]), "add99": max(0.0, r["p99"] - d["p99"]),
            "lag": out["max_lag"] * 1e3, "relay_rss": rss_kib(relay_pid) / 1024,
            "load": loadavg().split()[0]}


COLUMNS = [("N", "pairs", "d"), ("setup_s", "setup s", ".1f"),
           ("relay_cpu", "relay CPU%", ".0f"), ("us_chunk", "us/chunk", ".1f"),
           ("gen_cpu", "loadgen CPU%", ".0f"), ("gen_us", "gen us/chunk", ".1f"),
           ("foreign", "others%", ".0f"),
           ("delivered", "delivered%", ".1f"), ("MBps", "MB/s", ".1f"),
           ("r50", "relay p50 ms", ".2f"), ("r99", "relay p99", ".2f"), ("rmax", "max", ".1f"),
           ("d50", "direct p50", ".2f"), ("d99", "direct p99", ".2f"),
           ("add99", "added p99", ".2f"), ("lag", "send lag ms", ".1f"),
           ("relay_rss", "relay MiB", ".0f"), ("load", "load1", "s")]


def stop_reason(row: dict, max_p99: float) -> str:
    why = ""
    if row["add99"] > max_p99:
        why = f"p99 added latency {row['add99']:.2f} ms > {max_p99:g} ms"
    elif row["delivered"] < 97:
        why = f"the relay delivered only {row['delivered']:.1f} % of the offered chunks"
    if why and row.get("disturbed"):
        return (why + f" -- but other processes used {row['foreign']:.0f} % of a measured core "
                "in every attempt, so this is not (only) the relay's limit: rerun when the "
                "machine is quieter")
    if why:
        return why
    if row["relay_cpu"] >= 95:
        return f"the relay process is saturated ({row['relay_cpu']:.0f} % of a core)"
    if row["gen_cpu"] >= 90:
        return (f"the load generator is near saturation ({row['gen_cpu']:.0f} % of a core): "
                "figures beyond this would measure it, not the relay")
    return ""


def report(results: list[dict], args, directions: int) -> None:
    print()
    if not results:
        print("no step completed")
        return
    kept = list({r["N"]: r for r in results}.values())  # per N, the last attempt
    ok = [r for r in kept if r["add99"] <= args.max_p99_ms and r["delivered"] >= 97]
    best = max(ok, key=lambda r: r["N"]) if ok else None
    target = 3000
    mode = "each way" if args.duplex else "one way"
    if args.trace:
        mode += f", replaying {args.trace.name}"
    last = kept[-1]
    chunks_per_session = directions * args.chunks_per_flow
    busiest = max(kept, key=lambda r: r["relay_cpu"])
    if busiest["relay_cpu"] > 20:
        cap = 1e6 / (busiest["us_chunk"] * chunks_per_session)
        print(f"relay CPU per relayed chunk: {busiest['us_chunk']:.1f} us at N={busiest['N']} "
              f"-> one core is used up at about {cap:,.0f} sessions of {chunks_per_session:.0f} "
              f"chunks/s ({args.chunk}-byte chunks)")
    if best is None:
        print(f"RESULT: no step met p99 added latency <= {args.max_p99_ms:g} ms; "
              f"limit: {stop_reason(last, args.max_p99_ms)}")
        print(f"target >= {target} sessions at 180 kb/s per core: NOT MET")
        return
    print(f"RESULT: largest N with p99 added latency <= {args.max_p99_ms:g} ms at the full rate: "
          f"{best['N']} sessions x {args.rate_kbps:g} kb/s {mode} ({args.chunk}-byte chunks) "
          f"through one relay process on one core; relay CPU {best['relay_cpu']:.0f} %, "
          f"p99 added {best['add99']:.2f} ms (relay p99 {best['r99']:.2f} ms, direct "
          f"{best['d99']:.2f} ms)" + (" [window disturbed by other processes]"
                                      if best.get("disturbed") else ""))
    limited = stop_reason(last, args.max_p99_ms) or "the largest step asked for was reached"
    print(f"stopped at N={last['N']}: {limited}")
    print(f"target >= {target} sessions at 180 kb/s per core: {best['N']} = "
          f"{best['N'] / target:.2f}x target -> {'MET' if best['N'] >= target else 'NOT MET'}")


if __name__ == "__main__":
    sys.exit(main())
