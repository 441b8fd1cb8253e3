"""Run inside a network namespace with the *installed* venv's python: start the installed server,
fetch its console over TLS, enroll a host and check a customer with the installed modules, then
print one JSON line with what was seen.  Only 127.0.0.1 is used (the namespace has nothing else).

    python installed_probe.py PREFIX CONFIG DATA_DIR WORK_DIR
"""

from __future__ import annotations

import json
import os
import signal
import ssl
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from server.state import read_state


def interfaces() -> list[str]:
    """This network namespace's interfaces (/proc/self/net is per namespace, /sys is not)."""
    lines = Path("/proc/self/net/dev").read_text().splitlines()[2:]
    return sorted(line.split(":")[0].strip() for line in lines)


def main() -> int:
    prefix, config, data_dir, work = (Path(a) for a in sys.argv[1:5])
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
        host_home = work / "host-home"
        enroll = run(str(bin_dir / "hausmeister-host"), "enroll", "--server", info["https_url"],
                     "--ca-fingerprint", info["ca_fingerprint"], "--token", token, "--name",
                     "netns-pc", home=str(host_home))
        result["host_enroll"] = enroll.returncode
        result["host_enroll_out"] = (enroll.stdout + enroll.stderr)[-400:]
        status = run(str(bin_dir / "hausmeister-host"), "status", home=str(host_home))
        result["host_status"] = status.returncode
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


if __name__ == "__main__":
    sys.exit(main())
