"""Languages of the console and the mails: the gettext catalogues, choosing a language, and
dates, numbers and sizes written the way the reader's locale writes them.

English is the source language (the msgids); ``server/locale/<lang>/LC_MESSAGES/messages.po``
holds a translation, compiled to ``messages.mo`` beside it (``make translations`` extracts and
compiles with Babel; both files are committed and shipped as package data).  Texts are whole
sentences with named placeholders (``%(name)s``), never glued from pieces, so a translator can
reorder them.

``Text`` (and ``Plural``) is a message that is translated later, when the reader's language is
known: errors raised deep in database work, notices kept in a console session until the next
page.  Not here: which language a request or a user wants (the console decides that from the
account, the session and ``Accept-Language``; see ``negotiate``).
"""

from __future__ import annotations

import datetime as dt
import gettext as _gettext
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from babel import Locale
from babel.dates import format_date, format_datetime
from babel.numbers import format_decimal
from babel.support import Translations

LOCALE_DIR = Path(__file__).resolve().parent / "locale"
LANGUAGES = ("en", "de")
DEFAULT = "en"
#: each language named in itself, for the switch (a reader who does not know the current
#: language still finds their own)
NAMES = {"en": "English", "de": "Deutsch"}


def known(lang: str | None) -> str | None:
    """``lang`` if it is one of ours (``de-AT`` counts as ``de``), else None."""
    if not lang:
        return None
    primary = lang.strip().replace("_", "-").split("-")[0].lower()
    return primary if primary in LANGUAGES else None


def negotiate(accept_language: str | None) -> str:
    """The best of our languages for an ``Accept-Language`` header (RFC 9110 q-values)."""
    choices = []
    for position, part in enumerate((accept_language or "")[:1000].split(",")):
        tag, _, params = part.strip().partition(";")
        q = 1.0
        for param in params.split(";"):
            name, _, value = param.strip().partition("=")
            if name.strip().lower() == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = 0.0
        lang = DEFAULT if tag.strip() == "*" else known(tag)
        if lang and q > 0:
            choices.append((-q, position, lang))
    return min(choices)[2] if choices else DEFAULT


@lru_cache(maxsize=None)
def translations(lang: str) -> _gettext.NullTranslations:
    """The compiled catalogue of ``lang``; English (the msgids) needs none."""
    if lang == DEFAULT:
        return _gettext.NullTranslations()
    found = Translations.load(str(LOCALE_DIR), [lang], "messages")
    if not isinstance(found, Translations):
        raise RuntimeError(f"no compiled catalogue for {lang!r} in {LOCALE_DIR}: "
                           "run `make translations`")
    return found


@dataclass(frozen=True)
class Texts:
    """Everything language-dependent for one reader: messages, dates, numbers, sizes."""

    lang: str
    _t: Any = field(repr=False, compare=False, default=None)

    @property
    def catalogue(self) -> _gettext.NullTranslations:
        return self._t or translations(self.lang)

    def gettext(self, message: str, **values: Any) -> str:
        text = self.catalogue.gettext(message)
        return text % values if values else text

    def ngettext(self, singular: str, plural: str, n: int, **values: Any) -> str:
        values.setdefault("num", self.number(n))
        return self.catalogue.ngettext(singular, plural, n) % values

    def say(self, message: Any) -> Any:
        """A ``Text``/``Plural`` in this language; anything else as it is."""
        if isinstance(message, (Text, Plural)):
            return message.in_(self)
        return message

    def date_time(self, value: dt.datetime | None) -> str:
        """Date and time in UTC, as the locale writes them (the console shows UTC throughout)."""
        if not value:
            return ""
        if value.tzinfo is None:
            value = value.replace(tzinfo=dt.timezone.utc)
        return self.gettext("%(datetime)s UTC", datetime=format_datetime(
            value, "medium", tzinfo=dt.timezone.utc, locale=self.lang))

    def date(self, value: dt.date | None) -> str:
        return format_date(value, "medium", locale=self.lang) if value else ""

    def number(self, value: float | int, digits: int = 0) -> str:
        if digits:
            return format_decimal(value, "#,##0." + "0" * digits, locale=self.lang)
        return format_decimal(value, "#,##0", locale=self.lang)

    def size(self, size: int) -> str:
        """Bytes as people read them: '512 bytes', '1.5 MiB' (German: '1,5 MiB')."""
        if size < 1024:
            return self.ngettext("%(num)s byte", "%(num)s bytes", size)
        value = float(size)
        for unit in ("KiB", "MiB", "GiB", "TiB"):
            value /= 1024
            if value < 1024 or unit == "TiB":
                return f"{self.number(value, 1)}\u00a0{unit}"
        raise AssertionError("unreachable")

    def duration(self, seconds: float) -> str:
        """A duration as people say it: '1 hour', '7 days', '90 seconds'."""
        seconds = int(seconds)
        if seconds >= 86400 and seconds % 86400 == 0:
            return self.ngettext("%(num)s day", "%(num)s days", seconds // 86400)
        if seconds >= 3600 and seconds % 3600 == 0:
            return self.ngettext("%(num)s hour", "%(num)s hours", seconds // 3600)
        if seconds >= 60 and seconds % 60 == 0:
            return self.ngettext("%(num)s minute", "%(num)s minutes", seconds // 60)
        return self.ngettext("%(num)s second", "%(num)s seconds", seconds)

    @property
    def locale_name(self) -> str:
        return Locale.parse(self.lang).get_display_name(self.lang)


@lru_cache(maxsize=None)
def texts(lang: str | None) -> Texts:
    lang = known(lang) or DEFAULT
    return Texts(lang, translations(lang))


@dataclass(frozen=True)
class Text:
    """A message translated when shown: ``Text("no user %(name)s", name=n)``.

    ``str()`` gives the English text (logs, exceptions that reach no reader).
    """

    message: str
    values: dict[str, Any] = field(default_factory=dict)

    def __init__(self, message: str, **values: Any) -> None:
        object.__setattr__(self, "message", message)
        object.__setattr__(self, "values", values)

    def in_(self, texts_: Texts) -> str:
        values = {k: texts_.say(v) for k, v in self.values.items()}
        return texts_.gettext(self.message, **values)

    def __str__(self) -> str:
        return self.in_(texts(DEFAULT))


@dataclass(frozen=True)
class Plural:
    """A message with a count, translated when shown (``%(num)s`` is the count)."""

    singular: str
    plural: str
    n: int
    values: dict[str, Any] = field(default_factory=dict)

    def __init__(self, singular: str, plural: str, n: int, **values: Any) -> None:
        object.__setattr__(self, "singular", singular)
        object.__setattr__(self, "plural", plural)
        object.__setattr__(self, "n", n)
        object.__setattr__(self, "values", values)

    def in_(self, texts_: Texts) -> str:
        values = {k: texts_.say(v) for k, v in self.values.items()}
        return texts_.ngettext(self.singular, self.plural, self.n, **values)

    def __str__(self) -> str:
        return self.in_(texts(DEFAULT))


def N_(message: str) -> str:
    """Marks a message for extraction; it is translated where it is shown."""
    return message
