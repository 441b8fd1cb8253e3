"""JSON for messages from the other party: a repeated key or NaN/Infinity is an error, not a guess.

``json.loads`` would keep the last of two equal keys and accept NaN; a peer could then make the
two sides read one message differently.
"""

from __future__ import annotations

import json
from typing import Any


def loads(text: str, error: type[Exception]) -> Any:
    """Parse ``text``; raises ``error`` for a repeated key or a non-JSON constant, and
    ``ValueError`` (``json.JSONDecodeError``) / ``RecursionError`` for text that is not JSON."""

    def no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        result: dict[str, Any] = {}
        for key, value in pairs:
            if key in result:
                raise error(f"key {key[:40]!r} appears twice in a control message")
            result[key] = value
        return result

    def no_constants(name: str) -> Any:
        raise error(f"{name} is not JSON")

    return json.loads(text, object_pairs_hook=no_duplicates, parse_constant=no_constants)
