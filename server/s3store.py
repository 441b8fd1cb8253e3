"""The S3-compatible object store in the operator's network (``[s3]`` in the config file).

One boto3 client per ``S3Store``: the configured endpoint, path-style addressing (most in-house
stores have no wildcard DNS), the region and keys, the operator's CA bundle (or the system trust
store), and short timeouts with one retry so a dead endpoint answers the console in seconds.

Every method blocks (network): on the reactor thread call them through
``protocol.runtime.run_blocking``.  Failures become ``S3Error`` with one line an operator can act
on (endpoint down, wrong keys, missing bucket...).
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from typing import Any

CONNECT_TIMEOUT = 3.0
READ_TIMEOUT = 3.0
TEST_KEY_PREFIX = "hausmeister-test/"

#: S3 error codes → what the operator should check
EXPLAIN = {
    "NoSuchBucket": "the bucket does not exist on the endpoint: create it or fix s3.bucket",
    "InvalidAccessKeyId": "the access key is not known to the endpoint: fix s3.access_key",
    "SignatureDoesNotMatch": "the secret key is wrong: fix s3.secret_key",
    "AccessDenied": "the keys have no access to this bucket: fix the bucket policy or the keys",
    "InvalidBucketName": "the bucket name is not valid: fix s3.bucket",
    "NoSuchKey": "the object does not exist",
    "404": "the bucket does not exist on the endpoint (or is not visible with these keys): "
           "create it or fix s3.bucket",
    "403": "the endpoint refused the keys (wrong access key, secret key or bucket policy)",
    "400": "the endpoint refused the request (wrong region or a malformed request)",
}


class S3Error(RuntimeError):
    """An S3 operation failed; ``code`` is the S3 error code or the kind of network failure."""

    def __init__(self, message: str, code: str = "") -> None:
        super().__init__(message)
        self.code = code


def describe(exc: BaseException, endpoint: str) -> S3Error:
    """One line for any boto3/botocore failure."""
    from botocore import exceptions as bx
    if isinstance(exc, bx.ClientError):
        error = exc.response.get("Error", {})
        code = str(error.get("Code") or exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", ""))
        hint = EXPLAIN.get(code, error.get("Message") or "the endpoint refused the request")
        return S3Error(f"S3 error {code}: {hint}", code)
    if isinstance(exc, (bx.EndpointConnectionError, bx.ConnectionClosedError)):
        return S3Error(f"the S3 endpoint {endpoint} cannot be reached (nothing answers there, or "
                       "the connection was refused): check s3.endpoint_url and that the store is "
                       "running", "EndpointConnectionError")
    if isinstance(exc, (bx.ConnectTimeoutError, bx.ReadTimeoutError)):
        return S3Error(f"the S3 endpoint {endpoint} did not answer within {CONNECT_TIMEOUT:g} s",
                       "Timeout")
    if isinstance(exc, bx.SSLError):
        return S3Error(f"TLS to the S3 endpoint {endpoint} failed (is s3.ca_bundle the CA that "
                       "signed its certificate?)", "SSLError")
    if isinstance(exc, bx.NoCredentialsError):
        return S3Error("no S3 keys configured: set s3.access_key and s3.secret_key", "NoCredentials")
    if isinstance(exc, bx.BotoCoreError):
        return S3Error(f"S3 request to {endpoint} failed: {exc}", type(exc).__name__)
    return S3Error(f"S3 request to {endpoint} failed: {type(exc).__name__}: {exc}",
                   type(exc).__name__)


@dataclass
class CheckReport:
    """What the settings page's "test" button did, step by step."""

    steps: list[str] = field(default_factory=list)
    ok: bool = False
    error: str = ""


class S3Store:
    def __init__(self, s3: Any) -> None:
        """``s3``: the config's ``S3Section``."""
        self.config = s3
        self._client = None

    @property
    def endpoint(self) -> str:
        return self.config.endpoint_url

    @property
    def bucket(self) -> str:
        return self.config.bucket

    def client(self):
        if self._client is None:
            import boto3
            from botocore.config import Config as BotoConfig
            c = self.config
            self._client = boto3.session.Session().client(
                "s3", endpoint_url=c.endpoint_url, region_name=c.region or "us-east-1",
                aws_access_key_id=c.access_key or None, aws_secret_access_key=c.secret_key or None,
                verify=c.ca_bundle or True,
                config=BotoConfig(s3={"addressing_style": "path"}, connect_timeout=CONNECT_TIMEOUT,
                                  read_timeout=READ_TIMEOUT, retries={"max_attempts": 1,
                                                                      "mode": "standard"},
                                  signature_version="s3v4"))
        return self._client

    def _call(self, method: str, **kwargs: Any) -> Any:
        try:
            return getattr(self.client(), method)(Bucket=self.bucket, **kwargs)
        except Exception as exc:  # every failure becomes one line for the operator
            raise describe(exc, self.endpoint) from exc

    def put(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> None:
        self._call("put_object", Key=key, Body=data, ContentType=content_type)

    def get(self, key: str) -> bytes:
        response = self._call("get_object", Key=key)
        try:
            return response["Body"].read()
        except Exception as exc:
            raise describe(exc, self.endpoint) from exc

    def delete(self, key: str) -> None:
        self._call("delete_object", Key=key)

    def test(self) -> CheckReport:
        """head_bucket, then put, get and delete a small object; stops at the first failure."""
        report = CheckReport()
        key = TEST_KEY_PREFIX + secrets.token_hex(8)
        body = b"hausmeister s3 test " + secrets.token_bytes(16).hex().encode()
        try:
            self._call("head_bucket")
            report.steps.append(f"bucket {self.bucket} exists")
            self.put(key, body, "text/plain")
            report.steps.append(f"wrote {key} ({len(body)} bytes)")
            if self.get(key) != body:
                raise S3Error("the object read back differs from the one written", "Mismatch")
            report.steps.append(f"read {key} back, same bytes")
            self.delete(key)
            report.steps.append(f"deleted {key}")
            report.ok = True
        except S3Error as exc:
            report.error = str(exc)
        return report


__all__ = ["S3Store", "S3Error", "CheckReport", "describe"]
