"""What an unattended host keeps in its module folder besides key and certificate.

- ``host_secret.json`` (0600): the salt and ``argon2id(password, salt)`` — never the password.
  The supporter derives the same value from the typed password and the salt the host sends;
  that value is the SPAKE2 password, so neither the server nor the relay can test guesses.
- ``policy.json``: what this host allows without a person present (view, control, files: allow,
  deny or ask the logged-in user) and, optionally, which supporters may connect at all.
- ``screen.json``: which screen ``run`` and ``gui`` share when no ``--screen`` is given: an X
  display (``:0``) or a VNC server on this machine (``vnc://127.0.0.1:5900``) with the path of its
  password file (the path only: the password stays in that file, readable by whom the operator
  chose) and the user whose VNC server it is.
"""

from __future__ import annotations

import base64
import json
from dataclasses import asdict, dataclass, field

from protocol.files import write_private, write_public

from ..common.link.folder import ModuleFolder, ModuleFolderError

CHOICES = ("allow", "deny", "ask")
RIGHTS = ("view", "control", "files")


@dataclass
class HostPolicy:
    view: str = "allow"
    control: str = "allow"
    files: str = "deny"
    supporters: list[str] = field(default_factory=list)  # empty: every supporter the server admits

    def validate(self) -> "HostPolicy":
        for right in RIGHTS:
            if getattr(self, right) not in CHOICES:
                raise ModuleFolderError(f"policy {right} = {getattr(self, right)!r} is not one of "
                                        + ", ".join(CHOICES))
        return self

    def admits(self, supporter_name: str) -> bool:
        return not self.supporters or supporter_name in self.supporters

    def as_dict(self) -> dict:
        return asdict(self)


def policy_path(folder: ModuleFolder):
    return folder.path / "policy.json"


def secret_path(folder: ModuleFolder):
    return folder.path / "host_secret.json"


def load_policy(folder: ModuleFolder) -> HostPolicy:
    path = policy_path(folder)
    if not path.exists():
        return HostPolicy()
    try:
        data = json.loads(path.read_text())
        return HostPolicy(**data).validate()
    except (ValueError, TypeError) as exc:
        raise ModuleFolderError(f"host policy {path} is broken ({exc}): set it again with "
                                "`hausmeister-host policy`")


def save_policy(folder: ModuleFolder, policy: HostPolicy) -> None:
    write_public(policy_path(folder), json.dumps(policy.validate().as_dict(), indent=1).encode())


def save_secret(folder: ModuleFolder, salt: bytes, secret: bytes) -> None:
    data = {"salt": base64.b64encode(salt).decode(), "secret": base64.b64encode(secret).decode()}
    write_private(secret_path(folder), json.dumps(data).encode())


def load_secret(folder: ModuleFolder) -> tuple[bytes, bytes]:
    path = secret_path(folder)
    if not path.exists():
        raise ModuleFolderError("this host has no session password yet: set one with "
                                "`hausmeister-host set-password`")
    try:
        data = json.loads(path.read_text())
        return base64.b64decode(data["salt"]), base64.b64decode(data["secret"])
    except (ValueError, KeyError, TypeError) as exc:
        raise ModuleFolderError(f"{path} is broken ({exc}): set the password again")


@dataclass
class ScreenSetting:
    source: str | None = None           # ":0" or "vnc://127.0.0.1:5900"; None: not configured
    password_file: str | None = None    # for a VNC source that asks for a password
    owner: str | None = None            # the user whose VNC server it is (the host runs as root)

    def validate(self) -> "ScreenSetting":
        from ..common.screen.capture_vnc import VncSourceError, is_vnc_url, parse_vnc_url
        for name in ("source", "password_file", "owner"):
            if not isinstance(getattr(self, name), (str, type(None))):
                raise ModuleFolderError(f"screen {name} = {getattr(self, name)!r} is not text")
        if (self.password_file or self.owner) and not is_vnc_url(self.source):
            raise ModuleFolderError("a screen password file or owner applies only to a VNC "
                                    "source (vnc://127.0.0.1:5900)")
        if is_vnc_url(self.source):
            try:
                parse_vnc_url(self.source)
            except VncSourceError as exc:
                raise ModuleFolderError(str(exc)) from None
        return self


def screen_path(folder: ModuleFolder):
    return folder.path / "screen.json"


def load_screen(folder: ModuleFolder) -> ScreenSetting:
    path = screen_path(folder)
    if not path.exists():
        return ScreenSetting()
    try:
        data = json.loads(path.read_text())
        return ScreenSetting(**data).validate()
    except (ValueError, TypeError) as exc:
        raise ModuleFolderError(f"host screen setting {path} is broken ({exc}): set it again "
                                "with `hausmeister-host screen`")


def save_screen(folder: ModuleFolder, setting: ScreenSetting) -> None:
    write_public(screen_path(folder), json.dumps(asdict(setting.validate()), indent=1).encode())
