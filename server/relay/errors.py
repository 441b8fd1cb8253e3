"""Why a relay leg was refused: one exception family, so a glue needs one ``except``."""

from __future__ import annotations


class RelayRefusedError(Exception):
    """A relay leg is refused; ``reason`` is one line fit for the log and for the module's user."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class InvalidToken(RelayRefusedError):
    """The relay token is malformed, carries a bad MAC, or has expired."""


__all__ = ["RelayRefusedError", "InvalidToken"]
