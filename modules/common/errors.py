"""The one error a module reports to its user: one sentence naming the problem and the fix.

It lives outside every front-end because the session core and the server link raise it too; the
CLI prints it as ``<prog>: error: <message>`` (exit 1), the apps show it in their window.
"""


class ModuleError(Exception):
    """A failure the user can act on; ``str(error)`` is the sentence to show."""


class NotConnected(ModuleError):
    """The control connection is down and being re-established (the supporter's host list):
    a session cannot start this moment, but will in a few seconds without anything to fix."""
