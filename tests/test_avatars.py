"""Avatars: initials, upload checks with Pillow, storage on disk and in a real moto S3 server on
127.0.0.1, and the S3 store's clear errors (missing bucket, endpoint down)."""

from __future__ import annotations

import io
import json
import logging
import socket
import urllib.request
from dataclasses import dataclass

import pytest
from PIL import Image

from server import avatars
from server.config import S3Section
from server.s3store import S3Error, S3Store

BUCKET = "hm-avatars"


@dataclass
class MotoS3:
    endpoint: str
    port: int
    server: object = None
    stopped: bool = False

    def stop(self) -> None:
        """Stop the S3 server (an endpoint that is down); the fixture does it at the end."""
        if not self.stopped:
            self.stopped = True
            self.server.stop()

    def client(self):
        import boto3
        from botocore.config import Config
        return boto3.session.Session().client(
            "s3", endpoint_url=self.endpoint, region_name="us-east-1", aws_access_key_id="testing",
            aws_secret_access_key="testing", config=Config(s3={"addressing_style": "path"}))

    def section(self, bucket: str = BUCKET, endpoint: str | None = None) -> S3Section:
        return S3Section(enabled=True, endpoint_url=endpoint or self.endpoint, bucket=bucket,
                         region="us-east-1", access_key="testing", secret_key="testing", ca_bundle="")


@pytest.fixture
def moto_s3(monkeypatch):
    """A real moto S3 server on 127.0.0.1 (own port) with the bucket ``hm-avatars``."""
    from moto.server import ThreadedMotoServer
    for name, value in {"AWS_CONFIG_FILE": "/dev/null", "AWS_SHARED_CREDENTIALS_FILE": "/dev/null"}.items():
        monkeypatch.setenv(name, value)
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    moto = MotoS3(f"http://{host}:{port}", port, server)
    # moto keeps its buckets per process, across server objects: start from nothing.
    urllib.request.urlopen(urllib.request.Request(f"{moto.endpoint}/moto-api/reset", method="POST"),
                           timeout=10).close()
    moto.client().create_bucket(Bucket=BUCKET)
    try:
        yield moto
    finally:
        moto.stop()


def dead_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]   # closed again: nothing listens there


def picture(fmt: str = "PNG", size=(300, 200), color=(200, 30, 30)) -> bytes:
    out = io.BytesIO()
    img = Image.new("RGB", size, color)
    kwargs = {}
    if fmt == "JPEG":
        exif = Image.Exif()
        exif[0x010F] = "SecretCam"      # Make: must not survive the re-encoding
        kwargs["exif"] = exif
    img.save(out, fmt, **kwargs)
    return out.getvalue()


def test_initials_and_color_are_local_and_deterministic():
    assert avatars.initials("anna.berg") == "AB"
    assert avatars.initials("admin") == "AD"
    assert avatars.initials("---") == "?"
    assert avatars.color("anna.berg") == avatars.color("anna.berg")
    assert avatars.color("anna.berg") != avatars.color("bob")
    svg = avatars.initials_svg("<b>&x")
    assert b"<b>" not in svg and b">BX</text>" in svg
    assert b"href" not in svg and b"<image" not in svg   # nothing a browser would fetch


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "GIF", "WEBP"])
def test_real_pictures_are_re_encoded_as_128_png(fmt):
    png = avatars.clean_upload(picture(fmt), 512)
    with Image.open(io.BytesIO(png)) as img:
        assert img.format == "PNG" and img.size == (128, 128)
        assert not img.getexif() and "exif" not in img.info
    assert b"SecretCam" not in png


@pytest.mark.parametrize("data, message", [
    (b"", "no file"),
    (b"%PDF-1.4 not a picture at all" * 10, "not a picture"),
    (b"<svg xmlns='http://www.w3.org/2000/svg'><script>alert(1)</script></svg>", "not a picture"),
    (picture("PNG")[:120], "damaged or incomplete"),
    (picture("BMP"), "BMP picture is not taken"),
])
def test_non_pictures_truncated_and_other_formats_are_refused(data, message):
    with pytest.raises(avatars.AvatarError, match=message):
        avatars.clean_upload(data, 512)


def test_too_large_and_too_many_pixels_are_refused():
    noisy = io.BytesIO()
    Image.effect_noise((700, 700), 100).convert("RGB").save(noisy, "PNG")
    with pytest.raises(avatars.AvatarError, match="at most 1 KiB"):
        avatars.clean_upload(noisy.getvalue(), 1)
    huge = io.BytesIO()
    Image.new("1", (5000, 5000)).save(huge, "PNG")   # small file, big bitmap
    with pytest.raises(avatars.AvatarError, match="4096"):
        avatars.clean_upload(huge.getvalue(), 512)


def test_local_store_round_trip_and_key_checks(tmp_path):
    store = avatars.AvatarStore(tmp_path / "avatars")
    key = store.save(7, b"png-bytes")
    assert key == "file:avatars/7.png"
    assert store.load(key) == b"png-bytes"
    with pytest.raises(avatars.AvatarError):
        store.load("file:avatars/../../etc/passwd")
    store.delete(key)
    assert not (tmp_path / "avatars" / "7.png").exists()


def test_s3_store_round_trip_in_moto(moto_s3, tmp_path):
    store = avatars.AvatarStore(tmp_path, S3Store(moto_s3.section()))
    key = store.save(3, b"\x89PNG fake")
    assert key == "s3:avatars/3.png"
    body = moto_s3.client().get_object(Bucket=BUCKET, Key="avatars/3.png")
    assert body["Body"].read() == b"\x89PNG fake" and body["ContentType"] == "image/png"
    assert store.load(key) == b"\x89PNG fake"
    store.delete(key)
    assert moto_s3.client().list_objects_v2(Bucket=BUCKET).get("KeyCount") == 0


def test_s3_check_passes_and_explains_failures(moto_s3):
    report = S3Store(moto_s3.section()).test()
    assert report.ok, report.error
    assert len(report.steps) == 4
    assert moto_s3.client().list_objects_v2(Bucket=BUCKET).get("KeyCount") == 0  # cleaned up

    missing = S3Store(moto_s3.section(bucket="no-such-bucket")).test()
    assert not missing.ok and "does not exist" in missing.error and "s3.bucket" in missing.error

    down = S3Store(moto_s3.section(endpoint=f"http://127.0.0.1:{dead_port()}")).test()
    assert not down.ok and "cannot be reached" in down.error
    with pytest.raises(S3Error) as caught:
        S3Store(moto_s3.section(endpoint=f"http://127.0.0.1:{dead_port()}")).get("avatars/1.png")
    assert caught.value.code == "EndpointConnectionError"


def moto_auth(moto, count: str) -> None:
    """Turn moto's key checking on ("0") or off ("inf") (a process-wide moto setting)."""
    urllib.request.urlopen(urllib.request.Request(f"{moto.endpoint}/moto-api/reset-auth",
                                                  data=count.encode(), method="POST",
                                                  headers={"Content-Type": "text/plain"}),
                           timeout=10).close()


def test_s3_check_explains_wrong_keys(moto_s3):
    import boto3
    iam = boto3.session.Session().client("iam", endpoint_url=moto_s3.endpoint, region_name="us-east-1",
                                         aws_access_key_id="testing", aws_secret_access_key="testing")
    iam.create_user(UserName="hausmeister")
    iam.put_user_policy(UserName="hausmeister", PolicyName="s3", PolicyDocument=json.dumps({
        "Version": "2012-10-17",
        "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}))
    key = iam.create_access_key(UserName="hausmeister")["AccessKey"]
    moto_auth(moto_s3, "0")
    try:
        def section(access: str, secret: str) -> S3Section:
            return S3Section(enabled=True, endpoint_url=moto_s3.endpoint, bucket=BUCKET,
                             region="us-east-1", access_key=access, secret_key=secret, ca_bundle="")
        good = S3Store(section(key["AccessKeyId"], key["SecretAccessKey"])).test()
        assert good.ok, good.error
        with pytest.raises(S3Error) as unknown:
            S3Store(section("AKIAUNKNOWNKEY000000", "whatever")).get("avatars/1.png")
        assert unknown.value.code == "InvalidAccessKeyId" and "fix s3.access_key" in str(unknown.value)
        with pytest.raises(S3Error) as wrong:
            S3Store(section(key["AccessKeyId"], "wrong-secret")).get("avatars/1.png")
        assert wrong.value.code == "SignatureDoesNotMatch" and "fix s3.secret_key" in str(wrong.value)
        # head_bucket has no body: the status alone still gives a clear line
        report = S3Store(section(key["AccessKeyId"], "wrong-secret")).test()
        assert not report.ok and "refused the keys" in report.error
    finally:
        moto_auth(moto_s3, "inf")
