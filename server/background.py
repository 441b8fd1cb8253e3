"""The server's periodic background work besides presence and mail delivery.

Each module named here offers ``service(app) -> twisted Service | None`` (None: nothing to do
with this configuration); ``HausmeisterServer`` starts them all.
"""

from __future__ import annotations

from typing import Any

from . import alerts, protocol_delivery, retention, settings_store
from .directory import sync as directory_sync


def services(app: Any) -> list:
    found = []
    for module in (settings_store, alerts, protocol_delivery, retention, directory_sync):
        service = module.service(app)
        if service is not None:
            found.append(service)
    return found
