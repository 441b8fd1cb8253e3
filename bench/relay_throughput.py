"""Throughput of the relay plane against haproxy, measured in one run on 127.0.0.1.

    python bench/relay_throughput.py [--bytes 1GiB] [--seconds 20] [--skip-variants]

What is compared (every hop TLS, TLS 1.3 with AES-256-GCM, all on 127.0.0.1):

* the Hausmeister relay, as a separate relay process (``run_relay``, what ``hausmeister-server
  run --role relay`` runs): sender --TLS--> relay --TLS--> receiver.  Both legs are clients of
  the relay, as the modules are;
* haproxy (Debian package, ``nbthread 1``) doing the same work: it terminates TLS from the sender
  and re-encrypts to the receiver (``server ... ssl``), so it too decrypts and encrypts every
  byte once.  haproxy terminating TLS to a plain TCP receiver (half the crypto) is shown for
  reference;
* one relay process per core (2 processes, 2 streams) against haproxy with ``nbthread 2``.

The driver (sender and receiver threads, stdlib ``ssl``, 1 MiB writes) runs on the same machine,
so on a small machine it competes with the proxy for CPU; the CPU seconds the proxy process
itself spent are printed too (MB per proxy CPU second is independent of that).  MB = 10^6 bytes.
Every stream is bounded in bytes (``--bytes``) and time (``--seconds``); the script prints
figures and never fails on them.  It installs nothing: without haproxy it says how to get it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from protocol.framing import BoxDecoder, encode_box  # noqa: E402

MIB = 1024 * 1024
PAYLOAD = memoryview(os.urandom(MIB))
TICK = os.sysconf("SC_CLK_TCK")


def parse_size(text: str) -> int:
    units = {"k": 1024, "m": MIB, "g": 1024 * MIB}
    t = text.strip().lower().removesuffix("ib").removesuffix("b")
    if t and t[-1] in units:
        return int(float(t[:-1]) * units[t[-1]])
    return int(t)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pin(pid: int, cpus: set[int] | None) -> None:
    """Keep a proxy (or the driver) on its own cores, so the two do not take turns on one."""
    if cpus:
        for task in os.listdir(f"/proc/{pid}/task"):  # every thread, e.g. haproxy's
            try:
                os.sched_setaffinity(int(task), cpus)
            except OSError:
                pass


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK  # utime + stime


# --- one stream: a sender thread and a receiver thread ----------------------------------------

@dataclass
class Stream:
    send: ssl.SSLSocket
    recv: socket.socket
    limit: int
    seconds: float
    already: int = 0  # bytes the receiver got together with the relay's answer
    sent: int = 0
    received: int = 0
    start: float = 0.0
    last: float = 0.0
    error: str = ""

    def run_sender(self) -> None:
        deadline = self.start + self.seconds
        try:
            while self.sent < self.limit and time.monotonic() < deadline:
                n = min(MIB, self.limit - self.sent)
                self.send.sendall(PAYLOAD[:n])
                self.sent += n
        except OSError as exc:
            self.error = f"sender: {exc}"
        finally:
            # close_notify, then wait for the proxy's: a plain close() with the server's session
            # tickets still unread sends a RST, and haproxy then drops what it still holds.
            try:
                self.send.unwrap()
            except (ssl.SSLError, OSError):
                pass
            self.send.close()

    def run_receiver(self) -> None:
        buf = bytearray(MIB)
        got = self.already
        try:
            while True:
                n = self.recv.recv_into(buf)
                if not n:
                    break
                got += n
                self.last = time.monotonic()
        except (ssl.SSLError, OSError) as exc:  # an EOF without close_notify, a timeout
            if not isinstance(exc, (ssl.SSLEOFError, ssl.SSLZeroReturnError, ConnectionResetError)):
                self.error = self.error or f"receiver: {exc}"
        finally:
            self.received = got
            self.recv.close()

    @property
    def seconds_taken(self) -> float:
        return max(self.last - self.start, 1e-9)


def run_streams(streams: list[Stream], pids: list[int]) -> dict:
    cipher = streams[0].send.cipher()
    threads = []
    cpu0 = sum(cpu_seconds(p) for p in pids)
    start = time.monotonic()
    for s in streams:
        s.start = s.last = start
        threads += [threading.Thread(target=s.run_receiver), threading.Thread(target=s.run_sender)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    cpu = sum(cpu_seconds(p) for p in pids) - cpu0
    total = sum(s.received for s in streams)
    took = max(s.last for s in streams) - start
    errors = [s.error for s in streams if s.error]
    errors += [f"stream {i}: sent {s.sent}, received {s.received}"
               for i, s in enumerate(streams) if s.sent != s.received]
    return {"bytes": total, "seconds": took, "mb_s": total / max(took, 1e-9) / 1e6,
            "proxy_cpu": cpu, "mb_per_cpu_s": total / max(cpu, 1e-9) / 1e6, "errors": errors,
            "cipher": f"{cipher[1]} {cipher[0]}" if cipher else ""}


# --- TLS material and a throwaway data folder -------------------------------------------------

class Setup:
    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.data = folder / "data"
        self.config = folder / "hausmeister.toml"
        self.config.write_text(f"""
[server]
data_dir = "{self.data}"

[listen]
https_port = 0
module_port = 0

[database]
url = "sqlite:///{folder / 'hausmeister.sqlite3'}"

[relay]
port = 0
idle_timeout_seconds = 120

[logging]
level = "warn"
""")
        result = subprocess.run([sys.executable, "-m", "server.cli", "-c", str(self.config), "init"],
                                cwd=ROOT, capture_output=True, text=True, timeout=120)
        if result.returncode != 0:
            raise SystemExit(f"hausmeister-server init failed:\n{result.stderr}")
        certs = self.data / "certs"
        self.ca = certs / "ca.crt"
        self.cert, self.key = certs / "server.crt", certs / "server.key"
        self.pem = folder / "haproxy.pem"  # haproxy wants key and chain in one file
        self.pem.write_bytes(self.cert.read_bytes() + self.key.read_bytes())
        self.client = ssl.create_default_context(cafile=str(self.ca))
        self.server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.server.load_cert_chain(str(self.cert), str(self.key))
        from server.relay.tokens import RelayTokens, load_or_create_secret
        self.tokens = RelayTokens(load_or_create_secret(self.data / "relay.secret"), ttl=600)

    def connect(self, port: int) -> ssl.SSLSocket:
        sock = socket.create_connection(("127.0.0.1", port), timeout=60)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return self.client.wrap_socket(sock, server_hostname="127.0.0.1")


# --- the Hausmeister relay --------------------------------------------------------------------

class RelayProcess:
    def __init__(self, setup: Setup, reactor: str, aggregation: bool,
                 cpus: set[int] | None = None, leg_buffer: int | None = None,
                 splice: bool = True) -> None:
        self.setup = setup
        self.log = open(setup.folder / f"relay-{reactor}-{uuid.uuid4().hex[:6]}.log", "wb")
        self.proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--serve-relay", str(setup.config),
             "--reactor", reactor, "--aggregation", "on" if aggregation else "off"]
            + ([] if leg_buffer is None else ["--leg-buffer", str(leg_buffer)])
            + ([] if splice else ["--record-splice", "off"]),
            cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT)
        state = setup.data / f"relay-{self.proc.pid}.json"
        deadline = time.monotonic() + 30
        while not state.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise SystemExit(f"the relay process did not start; see {self.log.name}")
            time.sleep(0.02)
        self.port = json.loads(state.read_text())["ports"][0]
        pin(self.proc.pid, cpus)

    def leg(self, token: str) -> tuple[ssl.SSLSocket, int]:
        sock = self.setup.connect(self.port)
        sock.sendall(encode_box({b"_command": b"OpenRelayLeg", b"_ask": b"1",
                                 b"relay_token": token.encode()}))
        decoder = BoxDecoder()
        box = None
        while box is None:
            data = sock.recv(65536)
            if not data:
                raise RuntimeError("the relay closed the leg")
            decoder.feed(data)
            box = decoder.next_box()
        decoder.pause()
        if b"_error" in box:
            raise RuntimeError(box[b"_error_description"].decode())
        return sock, len(decoder.take_unparsed())

    def stream(self, limit: int, seconds: float) -> Stream:
        sid = str(uuid.uuid4())
        sender, _ = self.leg(self.setup.tokens.issue(sid, "supporter"))
        receiver, already = self.leg(self.setup.tokens.issue(sid, "peer"))
        return Stream(sender, receiver, limit, seconds, already)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def serve_relay(config_path: str, reactor_name: str, aggregation: bool,
                leg_buffer: int | None, splice: bool = True) -> int:
    """The relay process the benchmark starts: ``run --role relay`` with a chosen reactor."""
    if reactor_name == "epoll":
        from twisted.internet import epollreactor
        epollreactor.install()
    else:
        from twisted.internet import asyncioreactor
        asyncioreactor.install()
    from twisted.internet import reactor

    from server import cli  # noqa: F401 - installs the egress guard first, as the CLI does
    from protocol.runtime import start_logging
    from server.config import load
    from server.relay.listener import run_relay
    config = load(config_path)
    start_logging("warn", "json")
    options = {"tls_write_aggregation": aggregation, "record_splice": splice}
    if leg_buffer is not None:
        options["leg_buffer_bytes"] = leg_buffer
    return run_relay(config, reactor, [0], **options)


# --- haproxy ----------------------------------------------------------------------------------

class Sink:
    """The receiving end behind haproxy: a TLS (or plain TCP) server on 127.0.0.1."""

    def __init__(self, setup: Setup, use_tls: bool) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.context = setup.server if use_tls else None

    def accept(self) -> socket.socket:
        self.listener.settimeout(30)
        sock, _ = self.listener.accept()
        sock.settimeout(60)
        return self.context.wrap_socket(sock, server_side=True) if self.context else sock

    def close(self) -> None:
        self.listener.close()


class HAProxy:
    def __init__(self, setup: Setup, threads: int, sink: Sink, backend_tls: bool,
                 cpus: set[int] | None = None, bufsize: int | None = None) -> None:
        self.port = free_port()
        backend = (f"ssl verify required ca-file {setup.ca} verifyhost localhost sni str(localhost)"
                   if backend_tls else "")
        cfg = setup.folder / f"haproxy-{threads}-{self.port}.cfg"
        cfg.write_text(f"""
global
    nbthread {threads}
    {f"tune.bufsize {bufsize}" if bufsize else ""}
    log stderr format raw local0 err
defaults
    mode tcp
    log global
    timeout connect 5s
    timeout client 60s
    timeout server 60s
frontend tls_in
    bind 127.0.0.1:{self.port} ssl crt {setup.pem}
    default_backend sink
backend sink
    server s1 127.0.0.1:{sink.port} {backend}
""")
        check = subprocess.run(["haproxy", "-c", "-f", str(cfg)], capture_output=True, text=True)
        if check.returncode != 0:
            raise SystemExit(f"haproxy rejected the config:\n{check.stdout}{check.stderr}")
        self.log = open(setup.folder / f"haproxy-{self.port}.log", "wb")
        self.proc = subprocess.Popen(["haproxy", "-db", "-f", str(cfg)], stdout=self.log,
                                     stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                break
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"haproxy did not start; see {self.log.name}")
                time.sleep(0.02)
        pin(self.proc.pid, cpus)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def haproxy_run(setup: Setup, threads: int, streams: int, limit: int, seconds: float,
                backend_tls: bool = True, bufsize: int | None = None) -> dict:
    sink = Sink(setup, backend_tls)
    proxy = HAProxy(setup, threads, sink, backend_tls, proxy_cpus(threads), bufsize)
    try:
        made = []
        for _ in range(streams):
            sender = setup.connect(proxy.port)
            sender.sendall(PAYLOAD[:1])  # a probe byte: the pipe to the sink is up (not counted)
            receiver = sink.accept()
            first = receiver.recv(1)
            assert first == bytes(PAYLOAD[:1])
            made.append(Stream(sender, receiver, limit, seconds))
        with driver_off(proxy_cpus(threads)):
            return run_streams(made, [proxy.proc.pid])
    finally:
        proxy.stop()
        sink.close()


def relay_run(setup: Setup, processes: int, streams: int, limit: int, seconds: float,
              reactor: str = "epoll", aggregation: bool = False,
              leg_buffer: int | None = None, splice: bool = True) -> dict:
    cpus = proxy_cpus(processes)
    relays = [RelayProcess(setup, reactor, aggregation,
                           {sorted(cpus)[i % len(cpus)]} if cpus else None, leg_buffer, splice)
              for i in range(processes)]
    try:
        made = [relays[i % processes].stream(limit, seconds) for i in range(streams)]
        with driver_off(cpus):
            return run_streams(made, [r.proc.pid for r in relays])
    finally:
        for r in relays:
            r.stop()


PINNING = True


def proxy_cpus(cores: int) -> set[int] | None:
    """The cores a proxy using ``cores`` cores gets: the first ones, if the driver keeps one."""
    available = sorted(os.sched_getaffinity(0))
    if not PINNING or len(available) < cores + 2:
        return None  # the driver needs two cores of its own to keep up: else share them all
    return set(available[:cores])


@contextlib.contextmanager
def driver_off(cpus: set[int] | None):
    """Run the driver's threads (created inside) on the cores the proxy does not have."""
    before = os.sched_getaffinity(0)
    if cpus:
        os.sched_setaffinity(0, before - cpus)
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


# --- report -----------------------------------------------------------------------------------

class Report:
    """Runs each configuration ``repeat`` times and prints the median run (by MB/s)."""

    def __init__(self, repeat: int) -> None:
        self.repeat = repeat

    def measure(self, label: str, run, reference: dict | None = None) -> dict | None:
        if run is None:
            print(f"  {label:50} (not measured)")
            return None
        results = sorted((run() for _ in range(self.repeat)), key=lambda r: r["mb_s"])
        median = results[len(results) // 2]
        spread = (f"{results[0]['mb_s']:4.0f}-{results[-1]['mb_s']:<4.0f}" if len(results) > 1
                  else " " * 9)
        cpu = sorted(r["mb_per_cpu_s"] for r in results)[len(results) // 2]
        ratio = per_cpu = ""
        if reference:
            ratio = f"{median['mb_s'] / reference['mb_s']:.2f}x"
            per_cpu = f"{cpu / reference['mb_per_cpu_s']:.2f}x"
        print(f"  {label:50} {median['mb_s']:5.0f} MB/s ({spread}) {ratio:>6}   "
              f"{cpu:5.0f} MB/CPU s {per_cpu:>6}   [{median['bytes'] / 1e6:.0f} MB, "
              f"{median['seconds']:.2f} s]")
        for error in sorted({e for r in results for e in r["errors"]}):
            print(f"      ! {error}")
        median = dict(median, mb_per_cpu_s=cpu)
        return median


def verdict(what: str, ours: dict, theirs: dict, target: float) -> None:
    value, per_cpu = ours["mb_s"] / theirs["mb_s"], ours["mb_per_cpu_s"] / theirs["mb_per_cpu_s"]
    print(f"  {what}: {per_cpu:.2f}x per proxy CPU second (target >= {target:.1f}x: "
          f"{'met' if per_cpu >= target else 'NOT met'}), {value:.2f}x by wall clock")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bytes", default="1GiB", help="bytes per single stream (default 1GiB; "
                   "multi-stream runs split this across their streams)")
    p.add_argument("--seconds", type=float, default=20.0, help="time cap per run (default 20)")
    p.add_argument("--repeat", type=int, default=3, help="runs per configuration; the median "
                   "is shown with the range (default 3)")
    p.add_argument("--skip-variants", action="store_true",
                   help="only the production settings, no reactor/buffer/aggregation variants")
    p.add_argument("--no-pinning", action="store_true",
                   help="never keep proxies and driver on separate cores (they are kept apart "
                   "only where the driver can have two cores of its own)")
    p.add_argument("--serve-relay", metavar="CONFIG", help=argparse.SUPPRESS)
    p.add_argument("--reactor", default="epoll", choices=["asyncio", "epoll"], help=argparse.SUPPRESS)
    p.add_argument("--aggregation", default="off", choices=["on", "off"], help=argparse.SUPPRESS)
    p.add_argument("--leg-buffer", type=int, help=argparse.SUPPRESS)
    p.add_argument("--record-splice", default="on", choices=["on", "off"], help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.serve_relay:
        return serve_relay(args.serve_relay, args.reactor, args.aggregation == "on", args.leg_buffer,
                           args.record_splice == "on")

    global PINNING
    PINNING = not args.no_pinning
    limit, seconds = parse_size(args.bytes), args.seconds
    have_haproxy = shutil.which("haproxy") is not None
    if not have_haproxy:
        print("haproxy is not installed: `apt-get install haproxy` to compare against it "
              "(measuring the relay alone).\n")
    import OpenSSL
    import twisted
    report = Report(max(1, args.repeat))
    folder = Path(tempfile.mkdtemp(prefix="hausmeister-bench-"))
    try:
        setup = Setup(folder)
        version = (subprocess.run(["haproxy", "-v"], capture_output=True, text=True).stdout
                   .split("\n")[0].split(" - ")[0] if have_haproxy else "haproxy: missing")
        print(f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}; Python "
              f"{sys.version.split()[0]}; Twisted {twisted.__version__}; pyOpenSSL "
              f"{OpenSSL.__version__} ({OpenSSL.SSL.OpenSSL_version(0).decode()}); {version}")
        print(f"one stream = {limit / MIB:.0f} MiB or {seconds:g} s, whichever comes first; "
              f"median of {report.repeat} runs (range); ratios against the haproxy line above; "
              "127.0.0.1 only\n")
        ha = (lambda *a, **k: (lambda: haproxy_run(setup, *a, **k))) if have_haproxy else (
            lambda *a, **k: None)

        def relay(*a, **k):
            return lambda: relay_run(setup, *a, **k)

        print("Single stream (one relay process / haproxy nbthread 1):")
        ha1 = report.measure("haproxy, TLS -> TLS (re-encrypts, as the relay)",
                             ha(1, 1, limit, seconds))
        report.measure("haproxy, TLS -> plain TCP (half the crypto)",
                       ha(1, 1, limit, seconds, backend_tls=False))
        if not args.skip_variants:
            report.measure("haproxy, TLS -> TLS, tune.bufsize 256 KiB",
                           ha(1, 1, limit, seconds, bufsize=256 * 1024), ha1)
        ours = report.measure("relay process (run --role relay: epoll)", relay(1, 1, limit, seconds), ha1)
        report.measure("relay process, Twisted's TLS path (no record splice)",
                       relay(1, 1, limit, seconds, splice=False), ha1)
        if not args.skip_variants:
            report.measure("relay process, asyncio reactor", relay(1, 1, limit, seconds, "asyncio"), ha1)
            report.measure("relay process, Twisted's 64 KiB leg buffers",
                           relay(1, 1, limit, seconds, leg_buffer=64 * 1024), ha1)
            report.measure("relay process, Twisted's TLS write aggregation",
                           relay(1, 1, limit, seconds, aggregation=True), ha1)
            report.measure("relay process, asyncio + 64 KiB + aggregation",
                           relay(1, 1, limit, seconds, "asyncio", True, 64 * 1024), ha1)

        print("\nTwo streams at once:")
        ha2 = report.measure("haproxy nbthread 2, TLS -> TLS", ha(2, 2, limit // 2, seconds))
        ours2 = report.measure("2 relay processes (one per core)", relay(2, 2, limit // 2, seconds), ha2)
        report.measure("2 relay processes, Twisted's TLS path (no record splice)",
                       relay(2, 2, limit // 2, seconds, splice=False), ha2)
        if not args.skip_variants:
            report.measure("1 relay process, 2 streams", relay(1, 2, limit // 2, seconds), ha2)

        if have_haproxy:
            print("\nTargets (issue 14: >= 1.0x in both; issue 3 asked >= 0.5x of nbthread 1):")
            verdict("one relay process vs haproxy nbthread 1", ours, ha1, 1.0)
            verdict("one relay process per core vs haproxy nbthread 2", ours2, ha2, 1.0)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
