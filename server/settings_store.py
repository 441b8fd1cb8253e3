"""Server-wide settings an operator admin changes in the console, stored in the ``settings`` table.

Each setting has a key, a type and a default that comes from the config file; a stored value
(JSON, with who changed it and when) overrides the default until it is changed again.  Only
settings that widen nothing belong here: the SMTP relay and the S3 endpoint stay in the config
file, because they open outbound destinations in the egress allow-list.

Everything here blocks (database): call it through ``Database.run`` on the reactor thread.
``service(app)`` loads the stored values at start and applies those that live in memory (the
ad-hoc support terms live in the broker).
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass
from typing import Any, Callable

from sqlalchemy import select
from sqlalchemy.orm import Session
from twisted.application.service import Service

from protocol.runtime import Logger

from .db.models import Setting

log = Logger(namespace="hausmeister.settings")

GRAVATAR = "gravatar"
SUPPORT_TERMS = "support_terms"
RETENTION_DAYS = "retention_days"

MAX_TERMS = 4000
MAX_RETENTION_DAYS = 36500


class SettingError(ValueError):
    """A value the setting cannot take, worded as one line for the console."""


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("on", "true", "1", "yes"):
        return True
    if isinstance(value, str) and value.strip().lower() in ("off", "false", "0", "no", ""):
        return False
    raise SettingError(f"Gravatar: expected on or off, got {value!r}")


def _terms(value: Any) -> str:
    if not isinstance(value, str):
        raise SettingError("support terms: expected text")
    text = value.replace("\r\n", "\n").strip()
    if not text:
        raise SettingError("support terms: the text must not be empty (customers accept it "
                           "before every ad-hoc session)")
    if len(text) > MAX_TERMS:
        raise SettingError(f"support terms: at most {MAX_TERMS} characters, got {len(text)}")
    if "\0" in text:
        raise SettingError("support terms: the text must not contain a NUL character")
    return text


def _days(value: Any) -> int:
    if isinstance(value, str):
        text = value.strip()
        if not (text.isascii() and text.isdigit()):
            raise SettingError(f"retention: expected a whole number of days from 0 to "
                               f"{MAX_RETENTION_DAYS} (0 = keep forever), got {value!r}")
        value = int(text)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_RETENTION_DAYS:
        raise SettingError(f"retention: expected a whole number of days from 0 to "
                           f"{MAX_RETENTION_DAYS} (0 = keep forever), got {value!r}")
    return value


@dataclass(frozen=True)
class Spec:
    key: str
    check: Callable[[Any], Any]
    default: Callable[[Any], Any]   # config -> default value


SPECS: dict[str, Spec] = {
    GRAVATAR: Spec(GRAVATAR, _bool, lambda c: c.avatars.gravatar),
    SUPPORT_TERMS: Spec(SUPPORT_TERMS, _terms, lambda c: c.adhoc.terms),
    RETENTION_DAYS: Spec(RETENTION_DAYS, _days, lambda c: c.retention.protocol_days),
}


def _spec(key: str) -> Spec:
    try:
        return SPECS[key]
    except KeyError:
        raise SettingError(f"unknown setting {key!r}: known are {', '.join(SPECS)}") from None


def validate(key: str, value: Any) -> Any:
    """The cleaned value, or SettingError saying what is allowed."""
    return _spec(key).check(value)


def get(session: Session, config: Any, key: str) -> Any:
    """The stored value, or the config file's default (a stored value that no longer validates
    is logged and ignored)."""
    spec = _spec(key)
    row = session.get(Setting, key)
    if row is not None:
        try:
            return spec.check(json.loads(row.value))
        except (ValueError, SettingError) as exc:
            log.warn("stored setting {key} is not valid ({error}); using the config file's value",
                     key=key, error=str(exc))
    return spec.default(config)


def all_settings(session: Session, config: Any) -> dict[str, Any]:
    return {key: get(session, config, key) for key in SPECS}


def changes(session: Session) -> dict[str, dict[str, Any]]:
    """Who changed each stored setting, and when (for the settings page)."""
    rows = session.scalars(select(Setting).where(Setting.key.in_(list(SPECS))))
    return {r.key: {"by": r.changed_by, "at": r.changed_at} for r in rows}


def put(session: Session, key: str, value: Any, actor: str, now: Callable[[], dt.datetime] = utcnow) -> Any:
    """Validate and store a value (inside the caller's transaction); returns the cleaned value."""
    clean = validate(key, value)
    row = session.get(Setting, key)
    if row is None:
        row = Setting(key=key, value="", changed_by=actor, changed_at=now())
        session.add(row)
    row.value = json.dumps(clean)
    row.changed_by = actor[:100]
    row.changed_at = now()
    session.flush()
    return clean


class StoredSettings(Service):
    """At start: applies the stored support terms to the broker (the others are read when used)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    def startService(self) -> None:
        super().startService()
        d = self.app.db.run(all_settings, self.app.config)
        d.addCallback(self.apply)
        d.addErrback(lambda f: log.failure("could not load the stored settings; using the "
                                           "config file's values", f))

    def apply(self, values: dict[str, Any]) -> None:
        broker = getattr(self.app, "broker", None)
        if broker is not None:
            broker.terms = values[SUPPORT_TERMS]
        console = getattr(self.app, "console", None)
        if console is not None:
            from .console.pages_avatars import remember_gravatar
            remember_gravatar(console, values[GRAVATAR])
        log.info("settings: gravatar={gravatar}, retention {days} days, support terms "
                 "{chars} characters", gravatar=values[GRAVATAR], days=values[RETENTION_DAYS],
                 chars=len(values[SUPPORT_TERMS]))


def service(app: Any) -> Service:
    return StoredSettings(app)
