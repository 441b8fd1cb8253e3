"""``server.json`` in the data folder: what a running server listens on, for tools and tests.

The server writes it atomically once it listens; readers match the pid, so a file left by an
earlier run is never taken for the current one.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

STATE_FILE = "server.json"


def write_state(data_dir: Path, state: dict[str, Any]) -> None:
    path = Path(data_dir) / STATE_FILE
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=1))
    os.replace(tmp, path)


def read_state(data_dir: Path, pid: int | None = None) -> dict[str, Any] | None:
    """The state the server with ``pid`` wrote, or None (not written yet, or by another run)."""
    try:
        state = json.loads((Path(data_dir) / STATE_FILE).read_text())
    except (OSError, ValueError):
        return None
    if pid is not None and state.get("pid") != pid:
        return None
    return state
