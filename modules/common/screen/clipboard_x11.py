"""The X11 clipboard (CLIPBOARD selection) through Debian's ``xclip``: read and set text.

Blocking calls (a subprocess each): run them through ``protocol.runtime.run_blocking``.
Setting leaves an ``xclip`` process serving the selection until another owner takes over, which
is how X clipboards work without a long-lived window of our own.
"""

from __future__ import annotations

import os
import shutil
import subprocess

MAX_CLIPBOARD_CHARS = 256 * 1024


class ClipboardError(RuntimeError):
    pass


class XClipboard:
    def __init__(self, display: str) -> None:
        self.xclip = shutil.which("xclip")
        if self.xclip is None:
            raise ClipboardError("xclip is not installed (apt-get install xclip): "
                                 "no clipboard sharing")
        self.env = {**os.environ, "DISPLAY": display}

    def get(self) -> str:
        result = subprocess.run([self.xclip, "-selection", "clipboard", "-o"], env=self.env,
                                capture_output=True, timeout=5)
        if result.returncode != 0:
            return ""  # nobody owns the clipboard, or it holds no text
        return result.stdout[:MAX_CLIPBOARD_CHARS].decode("utf-8", "replace")

    def set(self, text: str) -> None:
        subprocess.run([self.xclip, "-selection", "clipboard", "-i"], env=self.env,
                       input=text[:MAX_CLIPBOARD_CHARS].encode("utf-8"), timeout=5,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
