"""The relay plane: pairs the two legs of a session and splices their bytes (never stores them).

``tokens``   single-use relay tokens (HMAC, stateless, shared secret)
``core``     ``Relay``: pairing, splicing with back-pressure, timeouts, byte counts
``listener`` the TLS port of a separate relay process (``run --role relay``) and ``RelayService``
"""

from .errors import InvalidToken, RelayRefusedError

__all__ = ["InvalidToken", "RelayRefusedError"]
