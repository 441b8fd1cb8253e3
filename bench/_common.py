"""Shared helpers of the scale benchmarks (sessions_180kbps, idle_hosts, adhoc_setup).

A real server (or relay) process in a temporary folder on 127.0.0.1, started with the same
``python -m server.cli ... run`` the package's entry point runs; hosts enrolled in bulk by issuing
their certificates straight from the server's CA (the code the enrollment endpoint runs after it
has checked the token: ``pki.sign_module_csr`` + ``certificates.record`` + a ``Host`` row), so
20,000 hosts take seconds instead of 20,000 HTTPS round trips; and small measuring tools
(percentiles, process RSS and CPU time from /proc, the machine's load).

Nothing here fails on timing: the scripts print figures and compare them with the targets.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from server.state import read_state  # noqa: E402 - after the checkout is on the path

TICK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")
ADMIN_PASSWORD = "bench-admin-password-1"
SUPPORTER_PASSWORD = "bench-supporter-pass-2"


# --- small tools ----------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def raise_nofile(wanted: int) -> int:
    """Raise this process's RLIMIT_NOFILE soft limit towards ``wanted`` (the hard limit caps it;
    raising the hard limit needs CAP_SYS_RESOURCE).  Returns the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if target > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def nofile_limits() -> tuple[int, int]:
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def percentile(sorted_values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile of an already sorted sequence (nan if empty)."""
    if not sorted_values:
        return float("nan")
    k = max(0, min(len(sorted_values) - 1, int(round(p / 100.0 * len(sorted_values) + 0.5)) - 1))
    return sorted_values[k]


def summary_ms(values: Iterable[float]) -> dict[str, float]:
    """p50/p90/p99/max of values in seconds, as milliseconds."""
    s = sorted(values)
    return {"n": len(s), "p50": percentile(s, 50) * 1e3, "p90": percentile(s, 90) * 1e3,
            "p99": percentile(s, 99) * 1e3, "max": (s[-1] * 1e3) if s else float("nan")}


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads), in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def rss_kib(pid: int) -> int:
    """VmRSS of a process in KiB (from /proc/PID/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def cpu_busy_ticks() -> dict[int, int]:
    """Busy clock ticks per CPU since boot (user+nice+system+irq+softirq+steal, /proc/stat)."""
    out = {}
    for line in Path("/proc/stat").read_text().splitlines():
        parts = line.split()
        if parts[0].startswith("cpu") and parts[0] != "cpu":
            v = [int(x) for x in parts[1:9]]
            out[int(parts[0][3:])] = v[0] + v[1] + v[2] + v[5] + v[6] + v[7]
    return out


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def machine_line() -> str:
    """One line about the machine and how busy it is right now (other people's test runs)."""
    cpus = os.cpu_count() or 0
    return (f"machine: {cpus} CPUs, load average {loadavg()} (1/5/15 min), Python "
            f"{sys.version.split()[0]}, {ssl.OPENSSL_VERSION}")


def netstat_counters(names: Sequence[str] = ("ListenOverflows", "ListenDrops")) -> dict[str, int]:
    """TcpExt counters from /proc/net/netstat (e.g. SYNs dropped because an accept queue was full)."""
    lines = Path("/proc/net/netstat").read_text().splitlines()
    out: dict[str, int] = {}
    for head, vals in zip(lines[::2], lines[1::2]):
        if head.startswith("TcpExt:"):
            for k, v in zip(head.split()[1:], vals.split()[1:]):
                if k in names:
                    out[k] = int(v)
    return out


def taskset_prefix(cpus: str | None) -> list[str]:
    """``taskset -c CPUS`` if asked for, available and the CPUs exist; else nothing."""
    if not cpus or not shutil.which("taskset"):
        return []
    try:
        wanted = {int(c) for c in cpus.split(",")}
    except ValueError:
        return []
    if not wanted <= set(range(os.cpu_count() or 1)):
        return []
    return ["taskset", "-c", cpus]


def pin_self(cpus: str | None) -> bool:
    if not cpus:
        return False
    try:
        wanted = {int(c) for c in cpus.split(",")}
        if wanted <= os.sched_getaffinity(0):
            os.sched_setaffinity(0, wanted)
            return True
    except (ValueError, OSError):
        pass
    return False


# --- a server in a temporary folder -----------------------------------------------------------

def write_config(path: Path, data_dir: Path, https_port: int = 0, module_port: int = 0,
                 extra: str = "", database_url: str = "") -> Path:
    path.write_text(f"""
[server]
data_dir = "{data_dir}"

[listen]
interface = "127.0.0.1"
https_port = {https_port}
module_port = {module_port}

[database]
url = "{database_url}"

[logging]
format = "json"
{extra}
""")
    return path


def _nofile_preexec(wanted: int):
    def preexec() -> None:
        raise_nofile(wanted)
    return preexec


@dataclass
class BenchServer:
    """A Hausmeister server (or relay) process on 127.0.0.1 in ``workdir``."""

    workdir: Path
    config_path: Path
    data_dir: Path
    process: subprocess.Popen | None = None
    info: dict = field(default_factory=dict)
    log_path: Path | None = None
    started_at: float = 0.0

    @classmethod
    def create(cls, workdir: Path, fixed_ports: bool = False, extra: str = "",
               database_url: str = "") -> "BenchServer":
        data = workdir / "data"
        https, module = (free_port(), free_port()) if fixed_ports else (0, 0)
        cfg = write_config(workdir / "hausmeister.toml", data, https, module, extra, database_url)
        srv = cls(workdir, cfg, data)
        srv.cli("init", "--password-stdin", stdin=ADMIN_PASSWORD + "\n")
        return srv

    def cli(self, *args: str, stdin: str | None = None, timeout: float = 120) -> str:
        result = subprocess.run([sys.executable, "-m", "server.cli", "-c", str(self.config_path),
                                 *args], input=stdin, capture_output=True, text=True,
                                timeout=timeout, cwd=ROOT)
        if result.returncode != 0:
            raise RuntimeError(f"hausmeister-server {' '.join(args)} failed:\n{result.stderr}")
        return result.stdout

    def config(self):
        from server.config import load
        return load(self.config_path)

    @property
    def module_port(self) -> int:
        return self.info["module_port"]

    @property
    def https_url(self) -> str:
        return self.info["https_url"]

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def ca_pem(self) -> bytes:
        return self.config().server.cert_dir.joinpath("ca.crt").read_bytes()

    def start(self, cpus: str | None = None, nofile: int = 65536, log_level: str = "info",
              timeout: float = 60, prefix: Sequence[str] = ()) -> "BenchServer":
        """Run the server; ``prefix``: a command in front of it (e.g. valgrind)."""
        self.log_path = self.workdir / "server.log"
        log = open(self.log_path, "ab")
        self.process = subprocess.Popen(
            [*taskset_prefix(cpus), *prefix, sys.executable, "-m", "server.cli", "-c",
             str(self.config_path),
             "--log-level", log_level, "run"],
            stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, preexec_fn=_nofile_preexec(nofile))
        log.close()
        self.started_at = time.monotonic()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}:\n{self.log_tail()}")
            info = read_state(self.data_dir, self.process.pid)
            if info is not None:
                self.info = info
                return self
            time.sleep(0.02)
        raise RuntimeError(f"server did not start within {timeout} s:\n{self.log_tail()}")

    def start_relay(self, cpus: str | None = None, nofile: int = 65536, log_level: str = "info",
                    timeout: float = 60) -> tuple[subprocess.Popen, int]:
        """A separate relay process (``run --role relay --relay-port 0``): (process, port)."""
        log_path = self.workdir / "relay.log"
        log = open(log_path, "ab")
        proc = subprocess.Popen(
            [*taskset_prefix(cpus), sys.executable, "-m", "server.cli", "-c", str(self.config_path),
             "--log-level", log_level, "run", "--role", "relay", "--relay-port", "0"],
            stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, preexec_fn=_nofile_preexec(nofile))
        log.close()
        state = self.data_dir / f"relay-{proc.pid}.json"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"relay exited with {proc.returncode}:\n"
                                   f"{log_path.read_text(errors='replace')[-3000:]}")
            if state.exists():
                with contextlib.suppress(ValueError):
                    return proc, json.loads(state.read_text())["ports"][0]
            time.sleep(0.02)
        stop_process(proc)
        raise RuntimeError("relay did not start")

    def stop(self, timeout: float = 60) -> float:
        """SIGTERM and wait; returns how long the process took to exit."""
        started = time.monotonic()
        if self.process is not None:
            stop_process(self.process, timeout)
        self.process = None
        return time.monotonic() - started

    def log_tail(self, chars: int = 3000) -> str:
        if self.log_path and self.log_path.exists():
            return self.log_path.read_text(errors="replace")[-chars:]
        return ""

    def count_log(self, needle: str) -> int:
        if not self.log_path or not self.log_path.exists():
            return 0
        with open(self.log_path, "rb") as fh:
            return sum(1 for line in fh if needle.encode() in line)


def stop_process(proc: subprocess.Popen, timeout: float = 60) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def workdir(keep: bool = False, prefix: str = "hausmeister-bench-") -> Iterable[Path]:
    path = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield path
    finally:
        if keep:
            print(f"(kept {path})")
        else:
            shutil.rmtree(path, ignore_errors=True)


# --- a throwaway PostgreSQL (optional) ------------------------------------------------------------

class Postgres:
    """A PostgreSQL cluster of our own on 127.0.0.1 (the Debian server binaries), default
    durability settings (fsync on), in a temporary folder of its own (removed by ``stop``); as
    root it runs as the ``postgres`` user."""

    def __init__(self) -> None:
        import glob
        import pwd
        dirs = sorted(glob.glob("/usr/lib/postgresql/*/bin"))
        if not dirs:
            raise RuntimeError("PostgreSQL server binaries not found in /usr/lib/postgresql/*/bin: "
                               "apt-get install postgresql (or run without --postgres)")
        self.bindir = Path(dirs[-1])
        self.base = Path(tempfile.mkdtemp(prefix="hausmeister-bench-pg-"))
        self.owner: dict = {}
        if os.geteuid() == 0:
            pw = pwd.getpwnam("postgres")
            self.owner = {"user": pw.pw_uid, "group": pw.pw_gid, "extra_groups": []}
            os.chown(self.base, pw.pw_uid, pw.pw_gid)
        self.proc: subprocess.Popen | None = None
        self.port = 0

    def start(self, max_connections: int = 200) -> str:
        data = self.base / "data"
        result = subprocess.run([str(self.bindir / "initdb"), "-D", str(data), "-U", "postgres",
                                 "-A", "trust", "-E", "UTF8", "--no-locale"], capture_output=True,
                                text=True, cwd=self.base, **self.owner)
        if result.returncode != 0:
            raise RuntimeError(f"initdb failed:\n{result.stdout}\n{result.stderr}")
        self.port = free_port()
        log = open(self.base / "postgres.log", "ab")
        self.proc = subprocess.Popen(
            [str(self.bindir / "postgres"), "-D", str(data), "-p", str(self.port), "-k",
             str(self.base), "-c", "listen_addresses=127.0.0.1",
             "-c", f"max_connections={max_connections}"],
            stdout=log, stderr=subprocess.STDOUT, cwd=self.base, **self.owner)
        import psycopg
        deadline = time.monotonic() + 30
        while True:
            try:
                with psycopg.connect(host="127.0.0.1", port=self.port, user="postgres",
                                     dbname="postgres", autocommit=True) as conn:
                    conn.execute("CREATE DATABASE hausmeister")
                break
            except psycopg.OperationalError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise RuntimeError("PostgreSQL did not start")
                time.sleep(0.1)
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/hausmeister"

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.base, ignore_errors=True)


# --- modules enrolled in bulk ----------------------------------------------------------------------

@dataclass
class HostCred:
    host_id: str
    key_pem: bytes
    cert_pem: bytes


def _issue_batch(args: tuple[str, list[str], int]) -> list[tuple[str, bytes, bytes]]:
    """Worker: keys, CSRs and certificates for ``host_ids`` (the enrollment's signing path)."""
    cert_dir, host_ids, days = args
    from cryptography.hazmat.primitives import serialization
    from protocol.identity import Identity, make_csr
    from server import pki
    store = pki.CertStore(Path(cert_dir))
    ca_key, ca_cert = store.ca_key(), store.ca_cert()
    out = []
    for host_id in host_ids:
        key = pki.new_key()  # the module's key (a module makes it itself; only the CSR travels)
        csr = pki.parse_csr(make_csr(key, None).public_bytes(serialization.Encoding.PEM))
        cert = pki.sign_module_csr(ca_key, ca_cert, csr, Identity("host", host_id), days)
        out.append((host_id, pki.key_pem(key), pki.cert_pem(cert)))
    return out


def enroll_hosts(srv: BenchServer, count: int, group: str | None = "bench",
                 processes: int | None = None) -> list[HostCred]:
    """``count`` enrolled hosts: certificates from the server's CA, recorded, ``Host`` rows.

    The same steps as ``certificates.Enrollment.enroll_host`` after its token check (which costs
    one HTTPS round trip per host and is not what these benchmarks measure).
    """
    import multiprocessing

    from server import certificates, pki
    from server.accounts import add_group, get_or_create_tenant
    from server.db import Database
    from server.db.models import CertRole, Host
    from cryptography import x509

    config = srv.config()
    ids = [str(uuid.uuid4()) for _ in range(count)]
    procs = processes or max(1, min(os.cpu_count() or 1, 4))
    chunk = max(1, -(-count // (procs * 4)))
    batches = [(str(config.server.cert_dir), ids[i:i + chunk], config.certificates.module_days)
               for i in range(0, count, chunk)]
    issued: list[tuple[str, bytes, bytes]] = []
    if procs > 1 and count > 200:
        with multiprocessing.get_context("fork").Pool(procs) as pool:
            for part in pool.imap(_issue_batch, batches):
                issued.extend(part)
    else:
        for batch in batches:
            issued.extend(_issue_batch(batch))
    db = Database(config.database_url)
    try:
        with db.session() as session:
            tenant = get_or_create_tenant(session, "default")
            group_row = add_group(session, tenant, group) if group else None
            moment = pki.utcnow()
            for n, (host_id, _key, cert_pem) in enumerate(issued):
                cert = x509.load_pem_x509_certificate(cert_pem)
                certificates.record(session, cert, CertRole.host, f"hausmeister:host:{host_id}")
                session.add(Host(id=host_id, tenant_id=tenant.id,
                                 group_id=group_row.id if group_row else None,
                                 name=f"bench-{n:05d}", enrolled_at=moment,
                                 last_address="127.0.0.1", online=False))
    finally:
        db.dispose()
    return [HostCred(h, k, c) for h, k, c in issued]


def add_supporter(srv: BenchServer, name: str = "benchsupporter") -> None:
    srv.cli("user", "add", name, "--role", "supporter", "--password-stdin",
            stdin=SUPPORTER_PASSWORD + "\n")


def enroll_supporter_module(srv: BenchServer, home: Path, name: str = "benchsupporter") -> Path:
    """A supporter module folder, enrolled through the real CLI (HTTPS enrollment)."""
    result = subprocess.run(
        [sys.executable, "-m", "modules.supporter.cli", "enroll", "--server", srv.https_url,
         "--ca-fingerprint", srv.info["ca_fingerprint"], "--user", name, "--password-stdin",
         "--home", str(home)], input=SUPPORTER_PASSWORD + "\n", capture_output=True, text=True,
        timeout=120, cwd=ROOT)
    if result.returncode != 0:
        raise RuntimeError(f"supporter enrollment failed:\n{result.stderr}")
    return home


def db_scalar(srv: BenchServer, sql: str):
    """One value from the server's database, read on a connection of our own."""
    from sqlalchemy import create_engine, text
    engine = _engines.get(srv.config_path)
    if engine is None:
        engine = _engines[srv.config_path] = create_engine(srv.config().database_url)
    with engine.connect() as conn:
        return conn.execute(text(sql)).scalar()


_engines: dict[Path, object] = {}


# --- stdlib TLS client side ---------------------------------------------------------------------

def client_context(ca_pem: bytes, cert_pem: bytes | None = None, key_pem: bytes | None = None,
                   check_hostname: bool = True) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cadata=ca_pem.decode())
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.check_hostname = check_hostname
    if cert_pem is not None and key_pem is not None:
        with tempfile.NamedTemporaryFile("wb", suffix=".pem", delete=False) as fh:
            fh.write(key_pem + cert_pem)
        try:
            ctx.load_cert_chain(fh.name)
        finally:
            os.unlink(fh.name)
    return ctx


def print_table(rows: list[dict], columns: list[tuple[str, str, str]], header: bool = True) -> None:
    """columns: (key, header, format spec); fixed widths, so rows printed one by one line up."""
    widths = [max(len(h), 7) for _, h, _ in columns]
    if header:
        print("  ".join(h.rjust(w) for (_, h, _), w in zip(columns, widths)))
    for r in rows:
        cells = [format(r[k], f) if r.get(k) is not None else "-" for k, _, f in columns]
        print("  ".join(c.rjust(w) for c, w in zip(cells, widths)))
    sys.stdout.flush()
