"""The language switch: English or German for this browser, remembered with the account.

Before logging in the choice lives in the console session (and carries over into the login);
a logged-in user's choice is also stored in ``users.language``, so the next login, the
invitation and reset mails and the session protocols and alerts come in that language.
Without a choice the browser's ``Accept-Language`` decides (``Ctx.lang``).
"""

from __future__ import annotations

from sqlalchemy import update

from .. import i18n
from ..db.models import User
from ..i18n import Text
from .core import EVERYONE, Ctx, PageError, route


def _remember(session, user_id: int, lang: str) -> None:
    session.execute(update(User).where(User.id == user_id).values(language=lang))


def back_to(path: str) -> str:
    """Where the switch returns to: a console page of this server, nothing else."""
    if path.startswith("/console") and not path.startswith("//") and "\\" not in path \
            and len(path) <= 1000 and path.isprintable():
        return path
    return "/console/"


@route("POST", "language", login=False, roles=EVERYONE)
def switch_language(ctx: Ctx):
    lang = i18n.known(ctx.field("lang", 10))
    if lang is None:
        raise PageError(400, Text("choose one of these languages: %(languages)s",
                                  languages=", ".join(i18n.NAMES.values())))
    ctx.session.language = lang
    back = back_to(ctx.field("back", 1000))
    if ctx.session.logged_in and ctx.session.user_id is not None:
        d = ctx.console.sessions.save_language(ctx.session)
        d.addCallback(lambda _: ctx.run(_remember, ctx.session.user_id, lang))
        return d.addCallback(lambda _: ctx.redirect(back))
    return ctx.redirect(back)
