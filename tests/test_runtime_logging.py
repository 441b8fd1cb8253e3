"""protocol.runtime.start_logging: the server's log keeps Twisted's lines that say something (the
web access log, warnings) and drops AMP's per-connection "connection established/lost" info
lines, which were about half of every ad-hoc set-up's lines; at level debug they stay.  Each case
runs in a fresh interpreter (logging is started once per process)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PROBE = """
import sys
from twisted.logger import Logger
from protocol.runtime import start_logging
start_logging(sys.argv[1], "json", sys.stdout)
amp = Logger(namespace="twisted.protocols.amp")
amp.info("{cls} connection established (HOST:{host} PEER:{peer})", cls="X", host="h", peer="p")
amp.warn("amp warning stays")
Logger(namespace="twisted.python.log").info("127.0.0.1 - - GET /enroll 200")
Logger(namespace="server.module_port").info("module connected: anonymous from 127.0.0.1")
# protocol.runtime.Logger: a debug line above level debug is not even published
import json
from twisted.logger import globalLogPublisher
from protocol.runtime import Logger as RuntimeLogger
published = []
globalLogPublisher.addObserver(lambda event: published.append(event.get("log_format")))
RuntimeLogger(namespace="server.module_port").debug("a debug line")
print(json.dumps({"msg": f"debug events published: {published.count('a debug line')}"}))
"""


def logged(level: str) -> list[str]:
    out = subprocess.run([sys.executable, "-c", PROBE, level], cwd=ROOT, capture_output=True,
                         text=True, timeout=60, check=True).stdout
    return [json.loads(line)["msg"] for line in out.splitlines()]


@pytest.mark.parametrize("level", ["info", "debug"])
def test_amp_connection_lines_only_at_debug(level):
    messages = logged(level)
    debug = ["a debug line"] if level == "debug" else []
    assert messages[-4 - len(debug):] == [
        "amp warning stays", "127.0.0.1 - - GET /enroll 200",
        "module connected: anonymous from 127.0.0.1", *debug,
        f"debug events published: {len(debug)}"]
    chatter = [m for m in messages if "connection established" in m]
    assert chatter == ([] if level == "info" else ["X connection established (HOST:h PEER:p)"])
