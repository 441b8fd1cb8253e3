"""Imports every page module so that their routes register (see ``core.route``)."""

from . import (  # noqa: F401
    auth, pages_account, pages_audit, pages_avatars, pages_certs, pages_download, pages_help,
    pages_hosts, pages_language, pages_links, pages_recordings, pages_sessions, pages_settings,
    pages_tokens, pages_users,
)
