"""The offline help pages, and turning outside URLs in free text into links to the warning page.

Help and FAQ come from ``offline_pages/help/<topic>.html`` (fragments written for this server,
shown inside ``console/help.html``): nothing is fetched from anywhere else.  Free text an
operator or a module supplies (support terms...) goes through :func:`link_outside_urls`, which
escapes it and points every http(s) address at ``/console/leave`` - never at the address itself.
Help is public: customers are sent here from the download page.
"""

from __future__ import annotations

import re

from markupsafe import Markup, escape

from ..web import OFFLINE_PAGES
from .core import Ctx, PageError, leave_url, route

#: topic slug -> title, in reading order; the fragment is offline_pages/help/<slug>.html
TOPICS = {
    "getting-started": "Getting started",
    "adhoc-customers": "Ad-hoc sessions for customers",
    "unattended-hosts": "Unattended hosts",
    "consent-and-rights": "Consent and rights",
    "session-protocols": "Session protocols",
    "air-gap": "The air gap",
    "troubleshooting": "Troubleshooting",
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
        out.append(Markup('<a class="outside" href="{}" title="leaves this network: {}">{}</a>')
                   .format(leave_url(url), url, url))
        last = m.start() + len(url)
    out.append(escape(text[last:]))
    return Markup("").join(out)


def _balanced_paren(url: str) -> bool:
    """A closing parenthesis that closes one in the URL (a wiki-style address) is part of it."""
    return url.endswith(")") and url.count("(") >= url.count(")")


def help_fragment(topic: str) -> str:
    return f"help/{topic}.html"


@route("GET", "help", login=False)
def help_index(ctx: Ctx) -> bytes:
    return ctx.page("help.html", topics=TOPICS, topic=None, title="Help and FAQ",
                    notice=ctx.take_notice())


@route("GET", "help/{topic}", login=False)
def help_topic(ctx: Ctx) -> bytes:
    topic = ctx.params["topic"]
    if topic not in TOPICS or not (OFFLINE_PAGES / help_fragment(topic)).is_file():
        raise PageError(404, f"there is no help page {topic!r}; see the list of topics")
    return ctx.page("help.html", topics=TOPICS, topic=topic, title=TOPICS[topic],
                    fragment=help_fragment(topic), base_url=ctx.console.base_url())
