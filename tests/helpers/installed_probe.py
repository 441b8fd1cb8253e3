"""Run inside a network namespace with the *installed* venv's python: start the installed server,
fetch its console over TLS, enroll a host and check a customer with the installed modules, then
print one JSON line with what was seen.  Only 127.0.0.1 is used (the namespace has nothing else).

    python installed_probe.py PREFIX CONFIG DATA_DIR WORK_DIR BUNDLE

The host is installed from BUNDLE with the installer's ``--role host`` (its own prefix), the
supporter enrolls with the installed ``hausmeister-supporter``, and a session runs between them.
"""

from __future__ import annotations

import json
import os
import signal
import ssl
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

from server.state import read_state


def interfaces() -> list[str]:
    """This network namespace's interfaces (/proc/self/net is per namespace, /sys is not)."""
    lines = Path("/proc/self/net/dev").read_text().splitlines()[2:]
    return sorted(line.split(":")[0].strip() for line in lines)


class Piped:
    """A module process whose stdout bytes and stderr lines are collected by threads."""

    def __init__(self, cmd: list[str], env: dict) -> None:
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, env=env)
        self.out, self.err = bytearray(), []
        threading.Thread(target=self._pump_out, daemon=True).start()
        threading.Thread(target=self._pump_err, daemon=True).start()

    def _pump_out(self) -> None:
        while chunk := self.proc.stdout.read1(65536):
            self.out += chunk

    def _pump_err(self) -> None:
        for line in self.proc.stderr:
            self.err.append(line.decode(errors="replace"))

    def wait_for(self, test, timeout: float = 60) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if test(self):
                return True
            time.sleep(0.05)
        return False

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def main() -> int:
    prefix, config, data_dir, work, bundle = (Path(a) for a in sys.argv[1:6])
    bin_dir = prefix / "current" / "venv" / "bin"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PIP_", "PYTHON"))}
    log = open(work / "installed-server.log", "ab")
    server = subprocess.Popen([str(bin_dir / "hausmeister-server"), "--config", str(config), "run"],
                              stdout=log, stderr=subprocess.STDOUT, env=env)
    result: dict = {}
    try:
        deadline = time.monotonic() + 60
        info = None
        while info is None and time.monotonic() < deadline and server.poll() is None:
            info = read_state(data_dir, server.pid)
            time.sleep(0.1)
        if info is None:
            result["error"] = f"server did not start (exit {server.poll()})"
            return 0
        result["https_url"] = info["https_url"]
        context = ssl.create_default_context(cafile=str(data_dir / "certs" / "ca.crt"))
        with urllib.request.urlopen(info["https_url"] + "/console/download", context=context,
                                    timeout=20) as response:
            result["console_status"] = response.status
            result["console_has_fingerprint"] = info["ca_fingerprint"] in response.read().decode()

        def run(*cmd: str, home: str = "") -> subprocess.CompletedProcess:
            return subprocess.run(cmd, capture_output=True, text=True, timeout=60,
                                  env={**env, "HAUSMEISTER_HOME": home} if home else env)

        token = run(str(bin_dir / "hausmeister-server"), "--config", str(config), "token",
                    "create", "-q").stdout.strip()
        host_home, host_prefix = work / "host-home", work / "host-opt"
        enroll = run("/usr/bin/python3", "-I", "-B", str(bundle / "install.py"), "--role", "host",
                     "--prefix", str(host_prefix), "--host-home", str(host_home),
                     "--systemd-dir", str(work / "host-units"), "--user", "",
                     "--server", info["https_url"], "--ca-fingerprint", info["ca_fingerprint"],
                     "--host-token", token, "--host-name", "netns-pc", "--no-compile")
        result["host_enroll"] = enroll.returncode
        result["host_enroll_out"] = (enroll.stdout + enroll.stderr)[-600:]
        host_bin = host_prefix / "current" / "venv" / "bin" / "hausmeister-host"
        status = run(str(host_bin), "status", home=str(host_home))
        result["host_status"] = status.returncode
        password = work / "host-password"
        password.write_text("netns-host-password\n")
        subprocess.run([str(host_bin), "set-password", "--password-stdin"],
                       input="netns-host-password\n", text=True, capture_output=True,
                       env={**env, "HAUSMEISTER_HOME": str(host_home)}, timeout=60)
        subprocess.run([str(bin_dir / "hausmeister-server"), "--config", str(config), "user",
                        "add", "sam", "--role", "supporter", "--password-stdin"],
                       input="sam-password-123\n", text=True, capture_output=True, env=env,
                       timeout=60)
        sam = subprocess.run([str(bin_dir / "hausmeister-supporter"), "enroll", "--server",
                              info["https_url"], "--ca-fingerprint", info["ca_fingerprint"],
                              "--user", "sam", "--password-stdin", "--home", str(work / "sam")],
                             input="sam-password-123\n", text=True, capture_output=True,
                             env=env, timeout=60)
        result["supporter_enroll"] = sam.returncode
        result["supporter_enroll_out"] = (sam.stdout + sam.stderr)[-400:]
        result["session"] = session(host_bin, host_home, bin_dir, work, password, env)
        check = run(str(bin_dir / "hausmeister-customer"), "check", "--server", info["https_url"],
                    "--ca-fingerprint", info["ca_fingerprint"])
        result["customer_check"] = check.returncode
        result["customer_check_out"] = (check.stdout + check.stderr)[-400:]
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        result["interfaces"] = interfaces()
        print(json.dumps(result), flush=True)
    return 0


def session(host_bin: Path, host_home: Path, bin_dir: Path, work: Path, password: Path,
            env: dict) -> str:
    """One unattended session between the installed modules: bytes each way."""
    host = Piped([str(host_bin), "run", "--pipe"], {**env, "HAUSMEISTER_HOME": str(host_home)})
    supporter = None
    try:
        if not host.wait_for(lambda p: any("waiting for supporters" in l for l in p.err)):
            return "host never came online: " + "".join(host.err)[-400:]
        supporter = Piped([str(bin_dir / "hausmeister-supporter"), "connect", "netns-pc",
                           "--pipe", "--answers", "/dev/null", "--password-file", str(password),
                           "--home", str(work / "sam")], env)
        if not supporter.wait_for(lambda p: any("granted control" in l for l in p.err)):
            return "no control granted: " + "".join(supporter.err)[-400:]
        host.proc.stdin.write(b"screen bytes from the host")
        host.proc.stdin.flush()
        if not supporter.wait_for(lambda p: b"screen bytes from the host" in p.out):
            return "supporter got nothing: " + "".join(supporter.err)[-400:]
        supporter.proc.stdin.write(b"keys from the supporter")
        supporter.proc.stdin.flush()
        if not host.wait_for(lambda p: b"keys from the supporter" in p.out):
            return "host got nothing: " + "".join(host.err)[-400:]
        supporter.proc.stdin.close()
        supporter.proc.wait(timeout=30)
        return "ok" if supporter.proc.returncode == 0 else f"supporter exit {supporter.proc.returncode}"
    finally:
        for module in (supporter, host):
            if module is not None:
                module.stop()


if __name__ == "__main__":
    sys.exit(main())
