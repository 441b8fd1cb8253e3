"""The offline help pages, and turning outside URLs in free text into links to the warning page.

Help and FAQ come from ``offline_pages/help/<topic>.html`` (English) and
``offline_pages/help/de/<topic>.html`` (German): fragments written for this server, shown inside
``console/help.html``; nothing is fetched from anywhere else.  Free text an
operator or a module supplies (support terms...) goes through :func:`link_outside_urls`, which
escapes it and points every http(s) address at ``/console/leave`` - never at the address itself.
Help is public: customers are sent here from the download page.
"""

from __future__ import annotations

import re

from markupsafe import Markup, escape

from .. import i18n
from ..i18n import N_, Text
from ..web import OFFLINE_PAGES
from .core import Ctx, PageError, leave_url, route

#: topic slug -> title, in reading order; the fragment is offline_pages/help/[<lang>/]<slug>.html
TOPICS = {
    "getting-started": N_("Getting started"),
    "adhoc-customers": N_("Ad-hoc sessions for customers"),
    "unattended-hosts": N_("Unattended hosts"),
    "consent-and-rights": N_("Consent and rights"),
    "session-protocols": N_("Session protocols"),
    "air-gap": N_("The air gap"),
    "troubleshooting": N_("Troubleshooting"),
}

_URL = re.compile(r"https?://[^\s<>\"'`]+", re.IGNORECASE)
_TRAILING = ".,;:!?)]}'\""


def link_outside_urls(text: str | None) -> Markup:
    """``text`` escaped, with each http(s) URL a link to the local warning page for it.

    Trailing punctuation stays text ("see https://x.example/a." links ``.../a``).
    """
    text = text or ""
    out, last = [], 0
    for m in _URL.finditer(text):
        url = m.group(0)
        while url and url[-1] in _TRAILING and not _balanced_paren(url):
            url = url[:-1]
        if len(url) <= len("https://"):
            continue
        out.append(escape(text[last:m.start()]))
        out.append(Markup('<a class="outside" href="{}">{}</a>').format(leave_url(url), url))
        last = m.start() + len(url)
    out.append(escape(text[last:]))
    return Markup("").join(out)


def _balanced_paren(url: str) -> bool:
    """A closing parenthesis that closes one in the URL (a wiki-style address) is part of it."""
    return url.endswith(")") and url.count("(") >= url.count(")")


def help_fragment(topic: str, lang: str = i18n.DEFAULT) -> str:
    return f"help/{topic}.html" if lang == i18n.DEFAULT else f"help/{lang}/{topic}.html"


def _topics(ctx: Ctx) -> dict[str, str]:
    return {slug: ctx._(title) for slug, title in TOPICS.items()}


@route("GET", "help", login=False)
def help_index(ctx: Ctx) -> bytes:
    return ctx.page("help.html", topics=_topics(ctx), topic=None, title=Text("Help and FAQ"),
                    notice=ctx.take_notice())


@route("GET", "help/{topic}", login=False)
def help_topic(ctx: Ctx) -> bytes:
    topic = ctx.params["topic"]
    fragment = help_fragment(topic, ctx.lang)
    if topic not in TOPICS or not (OFFLINE_PAGES / fragment).is_file():
        raise PageError(404, Text("there is no help page '%(topic)s'; see the list of topics",
                                  topic=topic))
    return ctx.page("help.html", topics=_topics(ctx), topic=topic, title=ctx._(TOPICS[topic]),
                    fragment=fragment, base_url=ctx.console.base_url())
