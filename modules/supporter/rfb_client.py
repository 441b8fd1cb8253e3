"""The RFB client now lives in ``protocol.rfb_client`` (the server's recording export decodes the
same stream); this name stays for the supporter's code and tools that import it from here."""

from protocol.rfb_client import *  # noqa: F401,F403
from protocol.rfb_client import Event, ScreenLimit, RFBClient, RFBClientError  # noqa: F401
