"""The RFB client's Twisted adapter now lives in ``modules.common.screen.rfb_client_twisted``
(the presenter's VNC source uses it too); this name stays for existing imports."""

from modules.common.screen.rfb_client_twisted import RFBClientProtocol  # noqa: F401
