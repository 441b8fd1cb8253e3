"""Enrollment and renewal from the module's side, over HTTPS with the server's CA pinned.

The CA is fetched once without trust, accepted only if its SHA-256 fingerprint equals the one the
operator gave (command line or downloaded server config), and from then on is the only trust
anchor.  The key pair is generated here and only the CSR leaves the machine.
"""

from __future__ import annotations

import json
import os
import ssl
import stat
import tomllib
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from protocol import enrollment as api
from protocol.identity import (
    Identity, IdentityError, fingerprint, identity_of, make_csr, normalise_fingerprint,
)

from modules.common.link import proxy
from modules.common.link.folder import ModuleFolder


class EnrollmentFailed(RuntimeError):
    """One line for the user: what went wrong and what to do."""


class ServerUnreachable(EnrollmentFailed):
    """The server's web port could not be reached (network, proxy, server down): nothing to
    fix in the module, so the apps say it in plain words."""


class WrongServer(EnrollmentFailed):
    """The server's CA is not the pinned one: another server or an interception."""


class ServerConfigUnusable(EnrollmentFailed):
    """A ``--server-config`` file that cannot be used; a usage error, so the CLI exits 2."""

    exit_code = 2


MAX_SERVER_CONFIG_BYTES = 64 * 1024  # the console's file is a few hundred bytes


def read_server_config(path: str) -> tuple[str, str]:
    """A downloaded server config (TOML or JSON) with ``server`` and ``ca_fingerprint``.

    Every way the file can be unusable (missing, a folder, unreadable, not UTF-8, too large,
    neither JSON nor TOML, wrong keys) is one line naming the file, the problem and the fix."""
    fix = "download it again from the server's console (Download page) and pass it with --server-config"
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # a FIFO must not block us
    except OSError as exc:
        raise ServerConfigUnusable(f"server config {path} cannot be read: "
                                   f"{(exc.strerror or str(exc)).lower()}; {fix}")
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        what = "a folder" if stat.S_ISDIR(mode) else "not a regular file"
        raise ServerConfigUnusable(f"server config {path} cannot be read: it is {what}; {fix}")
    with os.fdopen(fd, "rb") as file:
        data = file.read(MAX_SERVER_CONFIG_BYTES + 1)
    if len(data) > MAX_SERVER_CONFIG_BYTES:
        raise ServerConfigUnusable(f"server config {path} is larger than "
                                   f"{MAX_SERVER_CONFIG_BYTES // 1024} KiB, so it is not one; {fix}")
    try:
        text = data.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as exc:
        raise ServerConfigUnusable(f"server config {path} is not UTF-8 text (byte "
                                   f"{data[exc.start]:#04x} at offset {exc.start}); {fix}")
    try:
        data = json.loads(text) if text.lstrip().startswith("{") else tomllib.loads(text)
    except (ValueError, RecursionError) as exc:  # TOMLDecodeError is a ValueError
        reason = " ".join(str(exc).split())[:120]
        raise ServerConfigUnusable(f"server config {path} is neither JSON nor TOML ({reason}); {fix}")
    if (not isinstance(data, dict) or not isinstance(data.get("server"), str)
            or not isinstance(data.get("ca_fingerprint"), str)):
        raise ServerConfigUnusable(f"server config {path} needs the keys server and "
                                   f"ca_fingerprint as text; {fix}")
    return data["server"], data["ca_fingerprint"]


def _base_url(server: str) -> str:
    parts = urlsplit(server if "://" in server else f"https://{server}")
    if parts.scheme != "https" or not parts.hostname:
        raise EnrollmentFailed(f"--server {server!r} must be an https:// URL such as https://hausmeister.example:8443")
    return f"https://{parts.netloc}"


def fetch_pinned_ca(server: str, expected_fingerprint: str, timeout: float = 15) -> x509.Certificate:
    try:
        expected = normalise_fingerprint(expected_fingerprint)
    except IdentityError as exc:
        raise EnrollmentFailed(f"--ca-fingerprint: {exc}")
    blind = ssl.create_default_context()
    blind.check_hostname = False
    blind.verify_mode = ssl.CERT_NONE  # only to read the CA; it is trusted solely by fingerprint
    pem = _request(_base_url(server) + api.CA_PATH, None, blind, timeout)
    try:
        ca = x509.load_pem_x509_certificate(pem)
    except ValueError:
        raise EnrollmentFailed(f"{server} did not send a CA certificate at {api.CA_PATH}")
    got = fingerprint(ca)
    if got != expected:
        raise WrongServer(f"the server's CA fingerprint is {got}, not the expected {expected}: "
                               "wrong server or an interception; nothing was sent")
    return ca


def trusting(ca: x509.Certificate, folder: ModuleFolder | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cadata=ca.public_bytes(serialization.Encoding.PEM).decode())
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if folder is not None:
        ctx.load_cert_chain(folder.cert_path, folder.key_path)
    return ctx


def _request(url: str, body: dict[str, Any] | None, ctx: ssl.SSLContext, timeout: float) -> bytes:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method="POST" if body is not None else "GET",
                                 headers={"Content-Type": "application/json"})
    parts = urlsplit(url)
    through = proxy.proxy_for(parts.hostname or "")
    # an explicit handler either way: the environment was already read by proxy_for (no_proxy)
    opener = urllib.request.build_opener(
        urllib.request.ProxyHandler({"https": through.url()} if through else {}),
        urllib.request.HTTPSHandler(context=ctx))
    try:
        with opener.open(req, timeout=timeout) as resp:
            return resp.read()
    except urllib.error.HTTPError as exc:
        try:
            message = json.loads(exc.read())["error"]
        except (ValueError, KeyError, TypeError):
            message = f"HTTP {exc.code} {exc.reason}"
        raise EnrollmentFailed(f"the server refused: {message}")
    except urllib.error.URLError as exc:
        reason = exc.reason
        if isinstance(reason, ssl.SSLCertVerificationError):
            raise EnrollmentFailed(f"the server's certificate does not verify against the pinned CA: "
                                   f"{reason.verify_message}")
        if through is not None and "Tunnel connection failed" in str(reason):
            status = str(reason).split("Tunnel connection failed:", 1)[1].strip()
            raise EnrollmentFailed(f"the proxy {through.shown} refused CONNECT to "
                                   f"{parts.hostname}:{parts.port or 443}: {status}")
        if through is not None:
            raise ServerUnreachable(f"cannot reach {url} through the proxy {through.shown}: {reason}")
        raise ServerUnreachable(f"cannot reach {url}: {reason}")
    except (OSError, ssl.SSLError) as exc:
        raise ServerUnreachable(f"cannot reach {url}: {exc}")


def _new_key_and_csr(identity: Identity | None):
    key = ec.generate_private_key(ec.SECP256R1())
    csr = make_csr(key, identity).public_bytes(serialization.Encoding.PEM).decode()
    return key, csr


def _store(folder: ModuleFolder, key, answer: dict[str, Any], server: str,
           ca: x509.Certificate) -> Identity:
    try:
        cert = x509.load_pem_x509_certificate(answer["certificate"].encode())
        identity = identity_of(cert)
    except (KeyError, ValueError, IdentityError) as exc:
        raise EnrollmentFailed(f"the server answered with no usable certificate: {exc}")
    fmt = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    if cert.public_key().public_bytes(*fmt) != key.public_key().public_bytes(*fmt):
        raise EnrollmentFailed("the server's certificate is not for the key this module generated")
    try:
        cert.verify_directly_issued_by(ca)
    except Exception:
        raise EnrollmentFailed("the server's certificate is not signed by the pinned CA")
    settings = {"server": server, "ca_fingerprint": fingerprint(ca), "identity": identity.uri,
                "tenant": answer.get("tenant"), "module_host": answer["module_host"],
                "module_port": answer["module_port"],
                "renew_before_days": answer.get("renew_before_days", 30),
                "host_id": answer.get("host_id")}
    folder.save(key, answer["certificate"].encode(), ca.public_bytes(serialization.Encoding.PEM),
                settings)
    return identity


def enroll_supporter(folder: ModuleFolder, server: str, ca_fingerprint: str, user: str,
                     password: str, timeout: float = 15) -> Identity:
    ca = fetch_pinned_ca(server, ca_fingerprint, timeout)
    key, csr = _new_key_and_csr(Identity("supporter", user) if _valid_user(user) else None)
    answer = json.loads(_request(_base_url(server) + api.ENROLL_SUPPORTER_PATH,
                                 {"user": user, "password": password, "csr": csr},
                                 trusting(ca), timeout))
    return _store(folder, key, answer, _base_url(server), ca)


def _valid_user(user: str) -> bool:
    try:
        Identity("supporter", user)
        return True
    except IdentityError:
        return False


def enroll_host(folder: ModuleFolder, server: str, ca_fingerprint: str, token: str, name: str,
                timeout: float = 15) -> Identity:
    ca = fetch_pinned_ca(server, ca_fingerprint, timeout)
    key, csr = _new_key_and_csr(None)  # the server assigns the host id
    answer = json.loads(_request(_base_url(server) + api.ENROLL_HOST_PATH,
                                 {"token": token, "name": name, "csr": csr}, trusting(ca), timeout))
    return _store(folder, key, answer, _base_url(server), ca)


def renew(folder: ModuleFolder, timeout: float = 15) -> Identity:
    """New key, new certificate, same identity; authenticated by the current certificate."""
    settings = folder.settings()
    ca = folder.ca_certificate()
    identity = folder.identity()
    key, csr = _new_key_and_csr(identity)
    answer = json.loads(_request(settings["server"] + api.RENEW_PATH, {"csr": csr},
                                 trusting(ca, folder), timeout))
    renewed = _store(folder, key, answer, settings["server"], ca)
    if renewed != identity:
        raise EnrollmentFailed(f"renewal changed the identity from {identity} to {renewed}")
    return renewed


def server_info(server: str, ca: x509.Certificate, timeout: float = 15) -> dict[str, Any]:
    """The server's public facts (module host and port, CA fingerprint), over pinned TLS."""
    try:
        return json.loads(_request(_base_url(server) + api.INFO_PATH, None, trusting(ca), timeout))
    except ValueError:
        raise EnrollmentFailed(f"{server} answered {api.INFO_PATH} with something that is not JSON")
