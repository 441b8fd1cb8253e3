"""Where recording bytes go: the operator's recordings folder or an S3 bucket.

Both write through a local file while the upload runs (the folder: the file itself; S3: a spool
file under ``data_dir/recording-spool``), so a chunk is on disk, fsynced, before it is
acknowledged and an upload survives a server restart.  S3 gets the finished file as a multipart
upload (8 MiB parts) when the recording is finalised.  Every method blocks: call it through
``protocol.runtime.run_blocking``.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import os
from pathlib import Path
from typing import Iterator

from ..session_protocol import tenant_folder

PART = 8 << 20


class StorageFailed(RuntimeError):
    """A write or read of recording storage failed; the message is one line for the operator."""


def location_of(tenant: str, session_id: str, party: str, started: dt.datetime) -> str:
    return f"{tenant_folder(tenant)}/{started:%Y}/{started:%m}/{session_id}-{party}.hmrec"


def _why(exc: OSError) -> str:
    return exc.strerror or str(exc)


class FolderStorage:
    kind = "folder"

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def local_path(self, location: str) -> Path:
        path = (self.root / location).resolve()
        if self.root.resolve() not in path.parents:
            raise StorageFailed(f"recording location {location!r} is outside the folder")
        return path

    def size(self, location: str) -> int:
        try:
            return self.local_path(location).stat().st_size
        except FileNotFoundError:
            return 0

    def append(self, location: str, offset: int, data: bytes) -> None:
        """Write ``data`` at ``offset`` (the current end) and fsync."""
        path = self.local_path(location)
        try:
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o750)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o640)
            try:
                os.ftruncate(fd, offset)  # a torn earlier write never stays in the middle
                os.pwrite(fd, data, offset)
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as exc:
            raise StorageFailed(f"recordings folder {self.root}: {_why(exc)}") from None

    def truncate(self, location: str, size: int) -> None:
        try:
            os.truncate(self.local_path(location), size)
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise StorageFailed(f"recordings folder {self.root}: {_why(exc)}") from None

    def finish(self, location: str) -> tuple[str, int]:
        """(SHA-256, size) of the stored file."""
        digest, size = hashlib.sha256(), 0
        for chunk in self.read(location):
            digest.update(chunk)
            size += len(chunk)
        return digest.hexdigest(), size

    def read(self, location: str, chunk: int = 1 << 20) -> Iterator[bytes]:
        try:
            f = open(self.local_path(location), "rb")
        except OSError as exc:
            raise StorageFailed(f"recording {location}: {_why(exc)}") from None
        with f:
            while True:
                data = f.read(chunk)
                if not data:
                    return
                yield data

    def delete(self, location: str) -> None:
        try:
            self.local_path(location).unlink()
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise StorageFailed(f"recording {location}: {_why(exc)}") from None

    def probe(self) -> str | None:
        from ..storage_health import probe
        return probe(self.root)


class S3Storage(FolderStorage):
    """Spool locally while uploading; the finished file goes to the bucket in parts."""

    kind = "s3"
    PREFIX = "recordings/"

    def __init__(self, store, spool: Path) -> None:
        super().__init__(spool)
        self.store = store

    def finish(self, location: str) -> tuple[str, int]:
        from ..s3store import describe
        path = self.local_path(location)
        digest, size = hashlib.sha256(), 0
        client, bucket, key = self.store.client(), self.store.bucket, self.PREFIX + location
        try:
            upload = client.create_multipart_upload(Bucket=bucket, Key=key,
                                                    ContentType="application/octet-stream")
            parts = []
            with open(path, "rb") as f:
                number = 1
                while True:
                    data = f.read(PART)
                    if not data and number > 1:
                        break
                    digest.update(data)
                    size += len(data)
                    answer = client.upload_part(Bucket=bucket, Key=key, PartNumber=number,
                                                UploadId=upload["UploadId"], Body=data)
                    parts.append({"PartNumber": number, "ETag": answer["ETag"]})
                    number += 1
                    if len(data) < PART:
                        break
            client.complete_multipart_upload(Bucket=bucket, Key=key, UploadId=upload["UploadId"],
                                             MultipartUpload={"Parts": parts})
        except OSError as exc:
            raise StorageFailed(f"recording spool {path}: {_why(exc)}") from None
        except Exception as exc:
            raise StorageFailed(str(describe(exc, self.store.endpoint))) from None
        path.unlink()
        return digest.hexdigest(), size

    def size(self, location: str) -> int:
        return super().size(location)

    def read(self, location: str, chunk: int = 1 << 20) -> Iterator[bytes]:
        if self.local_path(location).exists():  # still uploading
            yield from super().read(location, chunk)
            return
        from ..s3store import describe
        try:
            body = self.store.client().get_object(Bucket=self.store.bucket,
                                                  Key=self.PREFIX + location)["Body"]
            yield from body.iter_chunks(chunk)
        except Exception as exc:
            raise StorageFailed(str(describe(exc, self.store.endpoint))) from None

    def delete(self, location: str) -> None:
        super().delete(location)
        from ..s3store import describe
        try:
            self.store.client().delete_object(Bucket=self.store.bucket, Key=self.PREFIX + location)
        except Exception as exc:
            raise StorageFailed(str(describe(exc, self.store.endpoint))) from None

    def probe(self) -> str | None:
        problem = super().probe()
        if problem:
            return problem
        report = self.store.test()
        return None if report.ok else f"S3 bucket for recordings: {report.error}"


def spool_of(config) -> Path:
    """Where an S3 upload waits until it ends: with several nodes in the shared recordings folder
    (its recorder may resume at another node, which reads what is there), else in the data
    folder."""
    if config.cluster.enabled:
        return config.server.recording_dir / ".s3-spool"
    return config.server.data_dir / "recording-spool"


def storage_for(config) -> FolderStorage:
    if config.recording.storage == "s3":
        from ..s3store import S3Store
        return S3Storage(S3Store(config.s3), spool_of(config))
    return FolderStorage(config.server.recording_dir)


def storage_named(config, kind: str) -> FolderStorage:
    """The storage a recording row names (it may differ from today's configured one)."""
    if kind == "s3":
        from ..s3store import S3Store
        return S3Storage(S3Store(config.s3), spool_of(config))
    return FolderStorage(config.server.recording_dir)
