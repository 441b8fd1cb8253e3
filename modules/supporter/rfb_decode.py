"""The RFB decoders now live in ``protocol.rfb_decode``; this name stays for existing imports."""

from protocol.rfb_decode import *  # noqa: F401,F403
from protocol.rfb_decode import DecodeError, gradient, zrle_tile  # noqa: F401
