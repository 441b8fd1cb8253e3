"""JSON for messages from the other party: a repeated key or NaN/Infinity is an error, not a guess.

``json.loads`` would keep the last of two equal keys and accept NaN; a peer could then make the
two sides read one message differently.
"""

from __future__ import annotations

import json
from typing import Any


def loads(text: str, error: type[Exception]) -> Any:
    """Parse ``text``; every way it can fail raises ``error``: a repeated key, a non-JSON
    constant, text that is not JSON, nesting too deep, an integer too long to convert."""

    def no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        result: dict[str, Any] = {}
        for key, value in pairs:
            if key in result:
                raise error(f"key {key[:40]!r} appears twice in a control message")
            result[key] = value
        return result

    def no_constants(name: str) -> Any:
        raise error(f"{name} is not JSON")

    try:
        return json.loads(text, object_pairs_hook=no_duplicates, parse_constant=no_constants)
    except error:
        raise
    except (ValueError, RecursionError) as exc:  # JSONDecodeError; int digits over the limit
        raise error(f"control message is not UTF-8 JSON: {str(exc)[:120]}") from None
