"""The API's view of a job's artifacts, read only through ``workers.artifacts`` (the layout's
owner): checkpoints, metrics, logs, result, and downloads (a presigned URL on S3, a byte stream
on local storage).

Besides the training checkpoints the listing has one entry named ``final``: the exported
``model.safetensors`` + ``config.json`` that load into timm. Every entry names a *primary*
file (what a download returns by default) and its sha256, so a client can verify exactly what
it downloaded.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Iterator
from typing import Any

import pyarrow.fs as pafs

from service.server.domain.errors import NotFound
from service.server.domain.ports import PreviewInfo, Redirect, Stream
from workers import artifacts as wa
from workers.artifacts import CheckpointInfo
from workers.previews import list_preview_files
from workers.storage import S3Settings, StorageRoot, open_root, read_bytes, sha256_stream

log = logging.getLogger(__name__)

_CHUNK = 1 << 20


def _finite(value: Any) -> Any:
    """NaN and infinities (a diverged loss) become None: JSON has no such numbers."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


class StorageArtifacts:
    def __init__(
        self,
        root_uri: str,
        s3: S3Settings | None = None,
        presign_ttl_s: int = 300,
        public_endpoint_url: str | None = None,
    ) -> None:
        self.s3 = s3 or S3Settings()
        self.root: StorageRoot = open_root(root_uri, self.s3)
        self.presign_ttl_s = presign_ttl_s
        self.public_endpoint_url = public_endpoint_url
        self._hash_cache: dict[tuple[str, int, Any], str] = {}
        self._lock = threading.Lock()

    # -- locations --------------------------------------------------------------------------

    def prefix(self, tenant: str, job_id: str) -> str:
        return self.root.job_prefix(tenant, job_id)

    def ping(self) -> None:
        if self.root.scheme == "file":
            self.root.fs.create_dir(self.root.base, recursive=True)
        info = self.root.fs.get_file_info(self.root.base)
        if self.root.scheme == "file" and info.type != pafs.FileType.Directory:
            raise OSError(f"storage root {self.root.base} is not a directory")
        if self.root.scheme == "s3":
            bucket = self.root.base.split("/", 1)[0]
            if self.root.fs.get_file_info(bucket).type == pafs.FileType.NotFound:
                raise OSError(f"bucket {bucket!r} does not exist")

    # -- checkpoints --------------------------------------------------------------------------

    def list_checkpoints(self, tenant: str, job_id: str) -> list[CheckpointInfo]:
        fs, prefix = self.root.fs, self.prefix(tenant, job_id)
        out = wa.list_checkpoints(fs, prefix)
        final = wa.final_export(fs, prefix, self._sha256)
        return out + ([final] if final is not None else [])

    def _sha256(self, info: pafs.FileInfo) -> str:
        """sha256 of an exported file; cached by (path, size, mtime) since exports are immutable."""
        key = (info.path, int(info.size or 0), info.mtime)
        with self._lock:
            if key in self._hash_cache:
                return self._hash_cache[key]
        digest = sha256_stream(self.root.fs, info.path)[1]
        with self._lock:
            if len(self._hash_cache) > 4096:
                self._hash_cache.clear()
            self._hash_cache[key] = digest
        return digest

    def open_checkpoint_file(
        self, tenant: str, job_id: str, name: str, file: str | None
    ) -> Redirect | Stream:
        """The file ``file`` (default: the primary one) of checkpoint ``name``.

        Only names from the listing and files from its manifest are served, so a crafted name
        (``..``, slashes, encoded tricks) can only ever miss."""
        entry = next((c for c in self.list_checkpoints(tenant, job_id) if c.name == name), None)
        if entry is None:
            raise NotFound(f"job {job_id} has no complete checkpoint named {name!r}")
        meta = entry.file(file) if file else entry.primary
        if meta is None:
            raise NotFound(
                f"checkpoint {name!r} has no file {file!r}; its files: {', '.join(f.path for f in entry.files)}"
            )
        path = entry.location(meta.path)
        filename = f"{job_id}-{name}-{meta.path.rsplit('/', 1)[-1]}"
        if self.root.scheme == "s3":
            bucket, key = path.split("/", 1)
            url = self.s3.boto3_client(self.public_endpoint_url).generate_presigned_url(
                "get_object",
                Params={
                    "Bucket": bucket,
                    "Key": key,
                    "ResponseContentDisposition": f'attachment; filename="{filename}"',
                },
                ExpiresIn=self.presign_ttl_s,
            )
            return Redirect(url)
        return Stream(self._chunks(path), meta.size, filename, meta.sha256)

    def _chunks(self, path: str) -> Iterator[bytes]:
        with self.root.fs.open_input_stream(path) as f:
            while chunk := f.read(_CHUNK):
                yield chunk

    # -- metrics, logs, result ----------------------------------------------------------------

    def read_metrics(
        self, tenant: str, job_id: str, after_step: int | None, limit: int
    ) -> list[dict[str, Any]]:
        """Records after ``after_step``; cut at ``limit`` but never inside one step's records,
        so the last record's step is an exact cursor for the next page."""
        recs = [
            _finite(r)
            for r in wa.read_metrics(self.root.fs, self.prefix(tenant, job_id), after_step)
        ]
        if len(recs) <= limit:
            return recs
        cut = limit
        while cut < len(recs) and recs[cut]["step"] == recs[cut - 1]["step"]:
            cut += 1
        return recs[:cut]

    def read_logs(self, tenant: str, job_id: str) -> str | None:
        return wa.read_logs(self.root.fs, self.prefix(tenant, job_id))

    def read_result(self, tenant: str, job_id: str) -> dict[str, Any] | None:
        return wa.read_result(self.root.fs, self.prefix(tenant, job_id))

    # -- reconstruction previews ------------------------------------------------------------

    def _previews(self, tenant: str, job_id: str) -> dict[str, tuple[PreviewInfo, str]]:
        """name -> (info, path); names are flat (``epoch-0002-sample_00.png``)."""
        out = {}
        for epoch, info in list_preview_files(self.root.fs, self.prefix(tenant, job_id)):
            base = info.path.rsplit("/", 1)[-1]
            name = base if epoch is None else f"epoch-{epoch:04d}-{base}"
            out[name] = (PreviewInfo(name, epoch, int(info.size or 0)), info.path)
        return out

    def list_previews(self, tenant: str, job_id: str) -> list[PreviewInfo]:
        return [info for info, _ in self._previews(tenant, job_id).values()]

    def read_preview(self, tenant: str, job_id: str, name: str) -> bytes:
        """Only names from the listing are read, so a crafted name can only miss."""
        entry = self._previews(tenant, job_id).get(name)
        if entry is None:
            raise NotFound(f"job {job_id} has no preview named {name!r}")
        return read_bytes(self.root.fs, entry[1])
