"""Why a file was not transferred, said in the window's language.

The session core makes every reason from one of ``file_transfer.REASON_TEMPLATES`` and keeps it
in English (the peer and the session protocol read it).  Here a reason is matched against those
templates and said again through ``t()`` with its parts: the peer's own reason inside "cancelled
by the other side: ..." in turn, the operating system's message inside "cannot write the file:
..." when it is one of ``OS_PROBLEMS``.  A reason no template matches (a newer peer's) is shown
as it came.
"""

from __future__ import annotations

import re

from ..session.file_transfer import REASON_TEMPLATES
from .i18n import t

#: the operating system's messages (``strerror``) a reason most often carries
OS_PROBLEMS = ("No space left on device", "Permission denied", "Read-only file system",
               "Disk quota exceeded", "No such file or directory", "File too large",
               "Input/output error")

#: a peer's reason inside a reason is translated this deep at most
MAX_DEPTH = 3


def _pattern(template: str) -> re.Pattern:
    parts = re.split(r"(\{\w+\})", template)
    return re.compile("".join(f"(?P<{part[1:-1]}>.+)" if part.startswith("{") else re.escape(part)
                              for part in parts if part))


_PATTERNS = [(template, _pattern(template)) for template in REASON_TEMPLATES]


def file_reason(reason: str, depth: int = 0) -> str:
    """``reason`` (a ``FileFailed``/``FileRejected`` reason) in the installed language."""
    for template, pattern in _PATTERNS:
        match = pattern.fullmatch(reason)
        if match is None:
            continue
        fields = {name: (file_reason(value, depth + 1) if depth < MAX_DEPTH else value)
                  if name in ("reason", "problem") else value
                  for name, value in match.groupdict().items()}
        return t(template).format(**fields)
    return t(reason) if reason in OS_PROBLEMS else reason
