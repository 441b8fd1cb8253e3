"""The web console under ``/console/``: server-rendered pages for a tenant's admins and auditors
(supporters: the own account only).

``core`` holds the rules every page keeps (CSRF, login, roles, CSP, escaping, off-reactor DB);
each ``pages_*`` module holds one area and registers its routes.
"""

from .core import Console, Ctx, PageError, route
from .sessions import ConsoleSession, ConsoleSessions

__all__ = ["Console", "ConsoleSession", "ConsoleSessions", "Ctx", "PageError", "route"]
