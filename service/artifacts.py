"""Reading a job's artifacts (``workers.artifacts`` layout) for the API: checkpoints, metrics,
logs, and downloads (a presigned URL on S3, a byte stream on local storage).

Besides the training checkpoints under ``checkpoints/<name>/`` the listing has one entry named
``final``: the exported ``model.safetensors`` + ``config.json`` that load into timm. Every
entry names a *primary* file (what a download returns by default) and its sha256, so a client
can verify exactly what it downloaded.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pyarrow.fs as pafs

from service.core.errors import NotFound
from service.domain.ports import CheckpointFile, CheckpointInfo, Redirect, Stream
from workers import artifacts as wa
from workers.storage import S3Settings, StorageRoot, exists, list_files, open_root, read_bytes

log = logging.getLogger(__name__)

FINAL = "final"
_PRIMARY = (wa.MODEL, "state.pt")
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


def _parse_time(value: str | None) -> datetime | None:
    if not value:
        return None
    try:
        dt = datetime.fromisoformat(value)
    except ValueError:
        return None
    return dt if dt.tzinfo else dt.replace(tzinfo=UTC)


class StorageArtifacts:
    def __init__(
        self,
        root_uri: str,
        s3: S3Settings | None = None,
        presign_ttl_s: int = 300,
        public_endpoint_url: str | None = None,
    ) -> None:
        self.s3 = s3 or S3Settings.from_env()
        self.root: StorageRoot = open_root(root_uri, self.s3)
        self.presign_ttl_s = presign_ttl_s
        self.public_endpoint_url = public_endpoint_url
        self._boto = None
        self._hash_cache: dict[tuple[str, int, Any], str] = {}
        self._lock = threading.Lock()

    # -- locations --------------------------------------------------------------------------

    def prefix(self, tenant: str, job_id: str) -> str:
        return self.root.job_prefix(tenant, job_id)

    def tenant_uri(self, tenant: str) -> str:
        return self.root.to_uri(self.root.path(tenant)) + "/"

    def root_uri(self) -> str:
        return self.root.to_uri(self.root.base) + "/"

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
        out = []
        for ck in wa.list_checkpoints(fs, prefix):
            try:
                manifest = json.loads(read_bytes(fs, f"{ck.path}/{wa.MANIFEST}"))
            except (FileNotFoundError, OSError, ValueError):
                continue  # pruned (keep_last) since it was listed
            files = [
                CheckpointFile(f["path"], int(f["size"]), str(f["sha256"]))
                for f in manifest["files"]
            ]
            out.append(self._entry(ck.name, ck.epoch, ck.step, _parse_time(ck.created), files))
        final = self._final(fs, prefix)
        if final is not None:
            out.append(final)
        return out

    @staticmethod
    def _entry(
        name: str,
        epoch: int | None,
        step: int | None,
        created: datetime | None,
        files: list[CheckpointFile],
    ) -> CheckpointInfo:
        by_path = {f.path: f for f in files}
        primary = next((by_path[p] for p in _PRIMARY if p in by_path), None)
        if primary is None:
            primary = max(files, key=lambda f: f.size)
        return CheckpointInfo(
            name=name,
            epoch=epoch,
            step=step,
            size=sum(f.size for f in files),
            sha256=primary.sha256,
            created=created,
            primary=primary.path,
            files=files,
        )

    def _final(self, fs: pafs.FileSystem, prefix: str) -> CheckpointInfo | None:
        if not wa.has_model(fs, prefix):
            return None
        files = []
        created = None
        for name in (wa.MODEL, wa.MODEL_CONFIG):
            info = fs.get_file_info(f"{prefix}/{name}")
            files.append(CheckpointFile(name, int(info.size or 0), self._sha256(fs, info)))
            if info.mtime is not None:
                created = info.mtime if info.mtime.tzinfo else info.mtime.replace(tzinfo=UTC)
        epoch = step = None
        result = self._maybe_json(fs, f"{prefix}/{wa.RESULT}")
        if isinstance(result, dict):
            epoch, step = result.get("epoch"), result.get("step")
        return self._entry(FINAL, epoch, step, created, files)

    def _sha256(self, fs: pafs.FileSystem, info: pafs.FileInfo) -> str:
        """sha256 of an exported file; cached by (path, size, mtime) since exports are immutable."""
        key = (info.path, int(info.size or 0), info.mtime)
        with self._lock:
            if key in self._hash_cache:
                return self._hash_cache[key]
        h = hashlib.sha256()
        with fs.open_input_stream(info.path) as f:
            while chunk := f.read(8 * _CHUNK):
                h.update(chunk)
        digest = h.hexdigest()
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
        rel = file or entry.primary
        meta = next((f for f in entry.files if f.path == rel), None)
        if meta is None:
            raise NotFound(
                f"checkpoint {name!r} has no file {rel!r}; its files: {', '.join(f.path for f in entry.files)}"
            )
        prefix = self.prefix(tenant, job_id)
        path = f"{prefix}/{rel}" if name == FINAL else f"{prefix}/{wa.CHECKPOINTS}/{name}/{rel}"
        filename = f"{job_id}-{name}-{rel.rsplit('/', 1)[-1]}"
        if self.root.scheme == "s3":
            bucket, key = path.split("/", 1)
            url = self._presigner().generate_presigned_url(
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

    def _presigner(self) -> Any:
        """boto3 S3 client for presigning: SigV4, path-style (MinIO, Ceph, moto), the public endpoint."""
        if self._boto is None:
            import boto3
            from botocore.config import Config

            s3 = self.s3
            self._boto = boto3.client(
                "s3",
                endpoint_url=self.public_endpoint_url or s3.endpoint_url,
                region_name=s3.region or "us-east-1",
                aws_access_key_id=s3.access_key,
                aws_secret_access_key=s3.secret_key,
                config=Config(signature_version="s3v4", s3={"addressing_style": "path"}),
            )
        return self._boto

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
        fs, prefix = self.root.fs, self.prefix(tenant, job_id)
        logs = [i for i in list_files(fs, f"{prefix}/{wa.LOGS}") if i.path.endswith(".log")]
        if not logs:
            return None
        parts = []
        for info in logs:
            try:
                parts.append(read_bytes(fs, info.path).decode(errors="replace"))
            except FileNotFoundError:
                continue
        return "".join(parts)

    def read_result(self, tenant: str, job_id: str) -> dict[str, Any] | None:
        result = self._maybe_json(self.root.fs, f"{self.prefix(tenant, job_id)}/{wa.RESULT}")
        return result if isinstance(result, dict) else None

    @staticmethod
    def _maybe_json(fs: pafs.FileSystem, path: str) -> Any:
        try:
            return json.loads(read_bytes(fs, path)) if exists(fs, path) else None
        except (FileNotFoundError, ValueError):
            return None
