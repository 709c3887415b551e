"""Storage roots: a URI (``/abs/path``, ``file:///abs/path``, ``s3://bucket/prefix``) to a
pyarrow ``FileSystem`` plus a base path, and a few helpers over ``(fs, path)`` pairs.

S3-compatible stores (MinIO, Ceph, AWS, moto) are reached path-style through
``pyarrow.fs.S3FileSystem(endpoint_override=...)``. Credentials and the endpoint come from
``S3Settings`` (``S3Settings.from_env()`` reads ``GREENMIM_S3_ENDPOINT_URL``,
``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_REGION``); nothing is hard-coded.

Paths are pyarrow paths: ``bucket/prefix/...`` on S3, ``/abs/...`` locally, always with ``/``.
Writes are atomic where the store allows it: an S3 object appears only once its upload
(single or multipart) completes; a local file is written beside its destination and renamed.

Transient S3 errors (refused connections, timeouts, 5xx, throttling) are retried with
exponential backoff by every client made here: pyarrow's (``AwsDefaultS3RetryStrategy``: 50 ms,
doubling, ``max_attempts`` tries; the default 12 rides out about 100 s of outage) and boto3's
(``standard`` retry mode, jittered backoff capped at 20 s). The pyarrow filesystem keeps its
retry settings when pickled (Ray ships it to the train controller and workers, which write the
run snapshot, checkpoints, metrics and logs through it).
"""

from __future__ import annotations

import functools
import hashlib
import os
import posixpath
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlparse

import pyarrow.fs as pafs

_CHUNK = 8 << 20


@dataclass(frozen=True)
class S3Settings:
    """How to reach an S3-compatible store. ``endpoint_url=None`` means AWS itself."""

    endpoint_url: str | None = None
    region: str | None = None
    access_key: str | None = None
    secret_key: str | None = field(default=None, repr=False)
    max_attempts: int = 12  # tries per request, first one included; 12 ~ 100 s of outage

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> S3Settings:
        env = os.environ if env is None else env
        return cls(
            endpoint_url=env.get("GREENMIM_S3_ENDPOINT_URL") or None,
            region=env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or None,
            access_key=env.get("AWS_ACCESS_KEY_ID") or None,
            secret_key=env.get("AWS_SECRET_ACCESS_KEY") or None,
            max_attempts=int(env.get("GREENMIM_S3_MAX_ATTEMPTS") or cls.max_attempts),
        )

    def to_env(self) -> dict[str, str]:
        """The environment variables that ``from_env`` reads back (for Ray runtime envs)."""
        pairs = {
            "GREENMIM_S3_ENDPOINT_URL": self.endpoint_url,
            "AWS_REGION": self.region,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "GREENMIM_S3_MAX_ATTEMPTS": str(self.max_attempts),
        }
        return {k: v for k, v in pairs.items() if v}

    def filesystem(self) -> pafs.S3FileSystem:
        """A pyarrow S3 filesystem that retries with backoff (and keeps doing so once pickled)."""
        return RetryingS3FileSystem(self)

    def filesystem_kwargs(self) -> dict[str, object]:
        kwargs: dict[str, object] = {"region": self.region or "us-east-1"}
        if self.access_key or self.secret_key:
            kwargs.update(access_key=self.access_key, secret_key=self.secret_key)
        if self.endpoint_url:
            url = urlparse(self.endpoint_url)
            if url.scheme not in ("http", "https") or not url.netloc:
                raise ValueError(
                    f"GREENMIM_S3_ENDPOINT_URL must look like http(s)://host:port, got {self.endpoint_url!r}"
                )
            # an endpoint override means path-style addressing (force_virtual_addressing=False)
            kwargs.update(endpoint_override=url.netloc, scheme=url.scheme)
        return kwargs

    def boto3_client(self, endpoint_url: str | None = None):  # -> botocore S3 client
        """A boto3 S3 client: SigV4, path-style (MinIO, Ceph, moto). ``endpoint_url`` overrides
        the endpoint, e.g. the public one that presigned URLs must name. Cached per settings
        and endpoint (clients are thread-safe; creating one costs ~0.1 s)."""
        return _cached_client(self, endpoint_url or self.endpoint_url)


class RetryingS3FileSystem(pafs.S3FileSystem):
    """``pyarrow.fs.S3FileSystem`` with ``settings.max_attempts`` tries per request.

    pyarrow's own pickling drops the retry strategy (it falls back to 3 quick tries), so this
    pickles as its settings and is rebuilt from them wherever Ray unpickles it."""

    def __init__(self, settings: S3Settings):
        retry = pafs.AwsDefaultS3RetryStrategy(max_attempts=max(1, settings.max_attempts))
        super().__init__(retry_strategy=retry, **settings.filesystem_kwargs())
        self.settings = settings

    def __reduce__(self):
        return RetryingS3FileSystem, (self.settings,)


@dataclass(frozen=True)
class StorageRoot:
    """A parsed storage root: ``fs`` and the ``base`` path on it; ``uri`` as given."""

    uri: str
    fs: pafs.FileSystem
    base: str
    scheme: str  # "file" or "s3"

    def path(self, *parts: str) -> str:
        """``base/part/...`` as a path on ``fs``; parts may not climb out of the root."""
        for p in parts:
            if not p or p.startswith("/") or ".." in p.split("/"):
                raise ValueError(f"bad path component {p!r}")
        return posixpath.join(self.base, *parts)

    def job_prefix(self, tenant: str, job_id: str) -> str:
        """Where a job's artifacts live: ``{base}/{tenant}/{job_id}``."""
        for what, value in (("tenant", tenant), ("job_id", job_id)):
            if not value or "/" in value or value in (".", ".."):
                raise ValueError(f"{what} {value!r} must be a non-empty name without '/'")
        return self.path(tenant, job_id)

    def to_uri(self, path: str) -> str:
        return f"s3://{path}" if self.scheme == "s3" else path


def open_root(uri: str, s3: S3Settings | None = None) -> StorageRoot:
    """Parse a storage root URI. ``s3`` defaults to ``S3Settings.from_env()`` for ``s3://`` roots."""
    if uri.startswith("s3://"):
        base = uri.removeprefix("s3://").strip("/")
        if not base:
            raise ValueError(f"storage root {uri!r} needs a bucket: s3://bucket[/prefix]")
        return StorageRoot(uri, (s3 or S3Settings.from_env()).filesystem(), base, "s3")
    path = uri.removeprefix("file://") if uri.startswith("file://") else uri
    if not path.startswith("/"):
        raise ValueError(
            f"storage root {uri!r} must be an absolute path, file:///path or s3://bucket/prefix"
        )
    return StorageRoot(uri, pafs.LocalFileSystem(), posixpath.normpath(path), "file")


def split_uri(uri: str, s3: S3Settings | None = None) -> tuple[pafs.FileSystem, str]:
    """Any file or folder URI (path, file://, s3://) -> ``(fs, path)``."""
    root = open_root(uri, s3)
    return root.fs, root.base


def is_local(fs: pafs.FileSystem) -> bool:
    return fs.type_name == "local"


def write_bytes(fs: pafs.FileSystem, path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old content, nothing, or all of it."""
    if is_local(fs):
        parent = posixpath.dirname(path)
        fs.create_dir(parent, recursive=True)
        tmp = posixpath.join(parent, f".{posixpath.basename(path)}.{uuid.uuid4().hex}.tmp")
        with fs.open_output_stream(tmp) as f:
            f.write(data)
        os.replace(tmp, path)
        return
    with fs.open_output_stream(path) as f:
        f.write(data)


def upload_file(
    fs: pafs.FileSystem, local_path: str, path: str, s3: S3Settings | None = None
) -> tuple[int, str]:
    """Copy a local file to ``path`` (atomic as in ``write_bytes``); returns (size, sha256).

    On S3, with ``s3`` settings given, the upload is boto3's parallel multipart transfer
    (about 1.6x pyarrow's stream on a loopback S3 server, see bench/bench_workers.py) and the
    digest is a separate local read; otherwise the digest is computed while streaming."""
    if s3 is not None and fs.type_name == "s3":
        return _upload_boto3(s3, local_path, path)
    tmp = path
    if is_local(fs):
        fs.create_dir(posixpath.dirname(path), recursive=True)
        tmp = posixpath.join(
            posixpath.dirname(path), f".{posixpath.basename(path)}.{uuid.uuid4().hex}.tmp"
        )
    digest, size = hashlib.sha256(), 0
    with open(local_path, "rb") as src, fs.open_output_stream(tmp) as dst:
        while chunk := src.read(_CHUNK):
            digest.update(chunk)
            size += len(chunk)
            dst.write(chunk)
    if tmp != path:
        os.replace(tmp, path)
    return size, digest.hexdigest()


@functools.lru_cache(maxsize=8)
def _cached_client(s3: S3Settings, endpoint_url: str | None):
    import boto3
    from botocore.config import Config

    return boto3.client(
        "s3",
        endpoint_url=endpoint_url,
        region_name=s3.region or "us-east-1",
        aws_access_key_id=s3.access_key,
        aws_secret_access_key=s3.secret_key,
        config=Config(
            signature_version="s3v4",
            s3={"addressing_style": "path"},
            retries={"mode": "standard", "total_max_attempts": max(1, s3.max_attempts)},
            connect_timeout=10,
            read_timeout=60,
        ),
    )


def sha256_stream(fs: pafs.FileSystem, path: str) -> tuple[int, str]:
    """(size, sha256) of a file on ``fs``, read in chunks."""
    with fs.open_input_stream(path) as f:
        return _digest(f)


def sha256_file(path: str | os.PathLike[str]) -> tuple[int, str]:
    """(size, sha256) of a local file, read in chunks."""
    with open(path, "rb") as f:
        return _digest(f)


def _digest(f: Any) -> tuple[int, str]:
    h, size = hashlib.sha256(), 0
    while chunk := f.read(_CHUNK):
        h.update(chunk)
        size += len(chunk)
    return size, h.hexdigest()


def _upload_boto3(s3: S3Settings, local_path: str, path: str) -> tuple[int, str]:
    from boto3.s3.transfer import TransferConfig

    size, digest = sha256_file(local_path)
    bucket, key = path.split("/", 1)
    config = TransferConfig(
        multipart_threshold=_CHUNK, multipart_chunksize=_CHUNK, max_concurrency=10
    )
    s3.boto3_client().upload_file(local_path, bucket, key, Config=config)
    return size, digest


def read_bytes(fs: pafs.FileSystem, path: str) -> bytes:
    with fs.open_input_stream(path) as f:
        return f.read()


def exists(fs: pafs.FileSystem, path: str) -> bool:
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def list_files(fs: pafs.FileSystem, path: str, recursive: bool = False) -> list[pafs.FileInfo]:
    """Entries under ``path`` (files and folders), sorted by path; empty if ``path`` is missing."""
    infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True, recursive=recursive))
    return sorted(infos, key=lambda i: i.path)


def delete_file(fs: pafs.FileSystem, path: str, missing_ok: bool = True) -> None:
    try:
        fs.delete_file(path)
    except FileNotFoundError:
        if not missing_ok:
            raise


def delete_dir(fs: pafs.FileSystem, path: str) -> None:
    if exists(fs, path):
        fs.delete_dir(path)
