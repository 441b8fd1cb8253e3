"""The enrollment API over HTTPS: paths and the JSON each side sends.

Both sides validate with the same functions, so a malformed request is refused with the same
one-line reason the module would have shown before sending it.
"""

from __future__ import annotations

from typing import Any

CA_PATH = "/ca.pem"
INFO_PATH = "/api/v1/info"
ENROLL_SUPPORTER_PATH = "/api/v1/enroll/supporter"
ENROLL_HOST_PATH = "/api/v1/enroll/host"
RENEW_PATH = "/api/v1/renew"

MAX_REQUEST_BYTES = 64 * 1024

SUPPORTER_FIELDS = ("user", "password", "csr")
HOST_FIELDS = ("token", "name", "csr")
RENEW_FIELDS = ("csr",)


class RequestError(ValueError):
    """A request the server refuses; ``status`` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


def validate(body: Any, fields: tuple[str, ...]) -> dict[str, str]:
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    missing = [f for f in fields if f not in body]
    if missing:
        raise RequestError("the request is missing " + ", ".join(missing))
    extra = sorted(set(body) - set(fields))
    if extra:
        raise RequestError("the request has unknown fields " + ", ".join(extra))
    for name in fields:
        value = body[name]
        if not isinstance(value, str) or not value:
            raise RequestError(f"the request field {name} must be a non-empty string")
        if len(value) > 16 * 1024:
            raise RequestError(f"the request field {name} is too long")
    return {name: body[name] for name in fields}


def issued_response(certificate_pem: str, ca_pem: str, identity: str, tenant: str | None,
                    module_host: str, module_port: int, renew_before_days: int,
                    host_id: str | None = None) -> dict[str, Any]:
    return {"certificate": certificate_pem, "ca": ca_pem, "identity": identity, "tenant": tenant,
            "module_host": module_host, "module_port": module_port,
            "renew_before_days": renew_before_days, "host_id": host_id}
