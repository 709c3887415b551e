"""The artifact layout of a job and the pure functions that read it.

Under ``{storage root}/{tenant}/{job_id}/`` (the *job prefix*)::

    spec.json                    the validated JobSpec (written before training starts)
    result.json                  outcome, written last: status, error type/message, epoch, step
    checkpoints/<name>/          full training state (state.pt) + manifest.json, written LAST
    checkpoints/*.json, .*       Ray Train's own run state (not checkpoints; ignore)
    model.safetensors            final weights, timm key layout
    config.json                  timm-hub style: architecture, num_classes, model_args, ...
    metrics/A-S-F-L.jsonl        metric records, attempt A, chunk S, steps F..L (see below)
    metrics/attempt-A-from-S     empty marker: attempt A resumed after step S
    previews/*.png               pretrain: original | masked input | reconstruction
    previews/epoch-E/*.png       the same after epoch E (workers/previews.py)
    logs/*.log                   rank-0 worker log of each attempt

**Checkpoints.** A checkpoint folder counts only once its ``manifest.json`` exists and every
file it lists is present with the recorded size; ``verify_checkpoint`` also checks sha256.
The manifest is uploaded after all other files, so a listed checkpoint is complete.

**Metrics.** Rank 0 appends records to a buffer and writes it as a new object every few
seconds (objects cannot be appended to), so records are readable while the job runs and
survive anything but the store. Each record has ``type`` (``step``, ``epoch`` or ``event``),
``step`` (optimiser steps done), ``epoch``, ``time`` (unix seconds) and its values. After a
failure, training restarts from the last checkpoint at step S as a new *attempt*; records of
earlier attempts past S are superseded, and ``read_metrics`` drops them, so the series it
returns never shows a step twice.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any

import pyarrow.fs as pafs

from .storage import exists, list_files, read_bytes, sha256_stream, write_bytes

logger = logging.getLogger(__name__)

SPEC = "spec.json"
RESULT = "result.json"
CHECKPOINTS = "checkpoints"
MANIFEST = "manifest.json"
MODEL = "model.safetensors"
MODEL_CONFIG = "config.json"
METRICS = "metrics"
PREVIEWS = "previews"
LOGS = "logs"

FINAL = "final"  # the listing's name for the exported weights
PRIMARY_FILES = (MODEL, "state.pt")  # what a download returns by default, in this order
MANIFEST_FORMAT = 1
_CHUNK_RE = re.compile(r"^(\d{4})-(\d{6})-(\d{10})-(\d{10})\.jsonl$")
_ATTEMPT_RE = re.compile(r"^attempt-(\d{4})-from-(\d{10})$")


class CheckpointError(ValueError):
    """A checkpoint is missing, incomplete, or does not match its manifest."""


def _name(path: str) -> str:
    return path.rstrip("/").rsplit("/", 1)[-1]


def utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


# ----------------------------------------------------------------------------- checkpoints


@dataclass(frozen=True)
class CheckpointFile:
    """One file of a checkpoint, relative to its folder (or to the job prefix for ``final``)."""

    path: str
    size: int
    sha256: str


@dataclass(frozen=True)
class CheckpointInfo:
    """One complete checkpoint and its files.

    ``digest`` is the sha256 of the file list (``path size sha256`` lines), so equal digests
    mean equal contents; ``primary`` is the file a download returns by default (the weights or
    the training state), and ``sha256`` is that file's digest: what a client checks after
    downloading it. ``path`` is the checkpoint's folder on the store (the job prefix for
    ``final``); ``epoch``/``step`` are None for an export whose job recorded none."""

    name: str
    epoch: int | None
    step: int | None
    created: str | None
    path: str
    files: tuple[CheckpointFile, ...]
    digest: str

    @property
    def size(self) -> int:
        return sum(f.size for f in self.files)

    @property
    def primary(self) -> CheckpointFile:
        by_path = {f.path: f for f in self.files}
        named = next((by_path[p] for p in PRIMARY_FILES if p in by_path), None)
        return named or max(self.files, key=lambda f: f.size)

    @property
    def sha256(self) -> str:
        return self.primary.sha256

    def file(self, rel: str) -> CheckpointFile | None:
        return next((f for f in self.files if f.path == rel), None)

    def location(self, rel: str) -> str:
        """Where file ``rel`` of this checkpoint lies on the store."""
        return f"{self.path}/{rel}"


def checkpoint_digest(files: list[dict[str, Any]]) -> str:
    lines = "".join(
        f"{f['path']} {f['size']} {f['sha256']}\n" for f in sorted(files, key=lambda f: f["path"])
    )
    return hashlib.sha256(lines.encode()).hexdigest()


def make_manifest(name: str, epoch: int, step: int, files: list[dict[str, Any]]) -> dict[str, Any]:
    """The manifest of checkpoint ``name``; ``files`` are ``{"path", "size", "sha256"}`` dicts."""
    files = sorted(files, key=lambda f: f["path"])
    return {
        "format": MANIFEST_FORMAT,
        "name": name,
        "epoch": epoch,
        "step": step,
        "created": utc_now(),
        "files": files,
        "size": sum(f["size"] for f in files),
        "sha256": checkpoint_digest(files),
    }


def _info(manifest: dict[str, Any], path: str) -> CheckpointInfo:
    return CheckpointInfo(
        name=_name(path),
        epoch=int(manifest["epoch"]),
        step=int(manifest["step"]),
        created=str(manifest["created"]),
        path=path,
        files=tuple(
            CheckpointFile(str(f["path"]), int(f["size"]), str(f["sha256"]))
            for f in manifest["files"]
        ),
        digest=str(manifest["sha256"]),
    )


def list_checkpoints(fs: pafs.FileSystem, job_prefix: str) -> list[CheckpointInfo]:
    """Complete checkpoints of a job, oldest first (by step). One listing plus one small read
    per checkpoint; sizes are checked against the listing, hashes are not (see ``verify_checkpoint``)."""
    root = f"{job_prefix}/{CHECKPOINTS}"
    sizes: dict[str, dict[str, int]] = {}
    for info in list_files(fs, root, recursive=True):
        if info.type != pafs.FileType.File:
            continue
        rel = info.path[len(root) + 1 :]
        if "/" in rel:
            ckpt, inner = rel.split("/", 1)
            sizes.setdefault(ckpt, {})[inner] = info.size
    found = []
    for ckpt, files in sizes.items():
        if MANIFEST not in files:
            continue
        path = f"{root}/{ckpt}"
        try:
            manifest = json.loads(read_bytes(fs, f"{path}/{MANIFEST}"))
            complete = all(files.get(f["path"]) == f["size"] for f in manifest["files"])
            info = _info(manifest, path)
        except (FileNotFoundError, OSError, ValueError, KeyError, TypeError) as e:
            # deleted between listing and reading, or a torn manifest: not a checkpoint
            logger.debug("skipping checkpoint %s: %s", path, e)
            continue
        if complete:
            found.append(info)
    return sorted(found, key=lambda c: (c.step or 0, c.created or "", c.name))


def latest_checkpoint(fs: pafs.FileSystem, job_prefix: str) -> CheckpointInfo | None:
    ckpts = list_checkpoints(fs, job_prefix)
    return ckpts[-1] if ckpts else None


def final_export(
    fs: pafs.FileSystem, job_prefix: str, hasher: Callable[[pafs.FileInfo], str] | None = None
) -> CheckpointInfo | None:
    """The exported timm weights (``model.safetensors`` + ``config.json``) as a checkpoint named
    ``final``, or None before the export. ``hasher`` digests one file (default: read it);
    exports are immutable, so a caller may cache by (path, size, mtime)."""
    infos = [fs.get_file_info(f"{job_prefix}/{name}") for name in (MODEL, MODEL_CONFIG)]
    if any(i.type != pafs.FileType.File for i in infos):
        return None
    digest = hasher or (lambda info: sha256_stream(fs, info.path)[1])
    files = tuple(CheckpointFile(_name(i.path), int(i.size or 0), digest(i)) for i in infos)
    mtime = infos[0].mtime
    created = None if mtime is None else (mtime if mtime.tzinfo else mtime.replace(tzinfo=UTC))
    result = read_result(fs, job_prefix) or {}
    epoch, step = result.get("epoch"), result.get("step")
    return CheckpointInfo(
        name=FINAL,
        epoch=epoch if isinstance(epoch, int) else None,
        step=step if isinstance(step, int) else None,
        created=None if created is None else created.isoformat(timespec="seconds"),
        path=job_prefix,
        files=files,
        digest=checkpoint_digest([asdict(f) for f in files]),
    )


def verify_checkpoint(fs: pafs.FileSystem, checkpoint_path: str) -> CheckpointInfo:
    """Re-read every file of the checkpoint at ``checkpoint_path`` and check size and sha256.

    Raises ``CheckpointError`` naming the first file that is missing or differs."""
    try:
        manifest = json.loads(read_bytes(fs, f"{checkpoint_path}/{MANIFEST}"))
    except FileNotFoundError as e:
        raise CheckpointError(f"{checkpoint_path}: no {MANIFEST} (incomplete checkpoint)") from e
    for entry in manifest["files"]:
        path = f"{checkpoint_path}/{entry['path']}"
        try:
            size, sha = sha256_stream(fs, path)
        except FileNotFoundError as e:
            raise CheckpointError(f"{path}: listed in the manifest but missing") from e
        if size != entry["size"] or sha != entry["sha256"]:
            raise CheckpointError(
                f"{path}: size {size} sha256 {sha} but the manifest says "
                f"size {entry['size']} sha256 {entry['sha256']}"
            )
    if checkpoint_digest(manifest["files"]) != manifest["sha256"]:
        raise CheckpointError(f"{checkpoint_path}: manifest digest does not match its file list")
    return _info(manifest, checkpoint_path)


# ----------------------------------------------------------------------------- metrics


def chunk_name(attempt: int, seq: int, first_step: int, last_step: int) -> str:
    return f"{attempt:04d}-{seq:06d}-{first_step:010d}-{last_step:010d}.jsonl"


def attempt_marker_name(attempt: int, resume_step: int) -> str:
    return f"attempt-{attempt:04d}-from-{resume_step:010d}"


def _scan_metrics(fs: pafs.FileSystem, job_prefix: str):
    chunks, starts = [], {}
    for info in list_files(fs, f"{job_prefix}/{METRICS}"):
        name = _name(info.path)
        if m := _CHUNK_RE.match(name):
            chunks.append((*map(int, m.groups()), info.path))
        elif m := _ATTEMPT_RE.match(name):
            starts[int(m.group(1))] = int(m.group(2))
    return sorted(chunks), starts


def next_attempt(fs: pafs.FileSystem, job_prefix: str) -> int:
    chunks, starts = _scan_metrics(fs, job_prefix)
    used = set(starts) | {c[0] for c in chunks}
    return max(used) + 1 if used else 0


def read_metrics(
    fs: pafs.FileSystem, job_prefix: str, after_step: int | None = None
) -> list[dict[str, Any]]:
    """Metric records with ``step > after_step`` (all if None), in the order they were made.

    Records that a later attempt superseded (steps past the checkpoint it resumed from) are
    dropped. Chunks that hold nothing newer than ``after_step`` are not read."""
    chunks, starts = _scan_metrics(fs, job_prefix)
    attempts = sorted(set(starts) | {c[0] for c in chunks})
    valid_upto: dict[int, float] = {}
    limit = float("inf")
    for a in reversed(attempts):
        valid_upto[a] = limit
        limit = min(limit, starts.get(a, 0))
    lo = -1 if after_step is None else after_step
    out: list[dict[str, Any]] = []
    for attempt, _seq, first, last, path in chunks:
        if last <= lo or first > valid_upto[attempt]:
            continue
        try:
            text = read_bytes(fs, path).decode()
        except FileNotFoundError:
            continue
        for line in text.splitlines():
            if not line:
                continue
            rec = json.loads(line)
            if lo < rec["step"] <= valid_upto[attempt]:
                out.append(rec)
    return out


class MetricsWriter:
    """Rank 0's durable metrics sink: buffered records flushed as numbered JSONL objects.

    ``begin`` records a new attempt that resumes after ``resume_step`` (0 for a fresh run).
    ``log`` buffers a record and writes the buffer once ``flush_every_s`` has passed since the
    last write, unless ``hold`` is set (used so a step's record and the epoch record that
    follows it land in the same object, which keeps ``after_step`` cursors exact).
    """

    def __init__(self, fs: pafs.FileSystem, job_prefix: str, flush_every_s: float = 5.0):
        self.fs, self.root = fs, f"{job_prefix}/{METRICS}"
        self.job_prefix = job_prefix
        self.flush_every_s = flush_every_s
        self.attempt = -1
        self._seq = 0
        self._buf: list[dict[str, Any]] = []
        self._last_flush = time.monotonic()

    def begin(self, resume_step: int) -> int:
        self.attempt = next_attempt(self.fs, self.job_prefix)
        write_bytes(self.fs, f"{self.root}/{attempt_marker_name(self.attempt, resume_step)}", b"")
        self._seq, self._buf = 0, []
        return self.attempt

    def log(self, record: dict[str, Any], hold: bool = False) -> None:
        rec = {"time": round(time.time(), 3), **record}
        if "step" not in rec or "type" not in rec:
            raise ValueError(f"a metric record needs 'type' and 'step': {record}")
        self._buf.append(rec)
        if not hold and time.monotonic() - self._last_flush >= self.flush_every_s:
            self.flush()

    def flush(self) -> None:
        if not self._buf:
            return
        if self.attempt < 0:
            raise RuntimeError("MetricsWriter.begin() must be called before flushing")
        steps = [r["step"] for r in self._buf]
        name = chunk_name(self.attempt, self._seq, min(steps), max(steps))
        data = "".join(
            json.dumps(r, separators=(",", ":"), allow_nan=True) + "\n" for r in self._buf
        )
        write_bytes(self.fs, f"{self.root}/{name}", data.encode())
        self._seq += 1
        self._buf = []
        self._last_flush = time.monotonic()


# ----------------------------------------------------------------------------- job files


def write_json(fs: pafs.FileSystem, path: str, obj: Any) -> None:
    write_bytes(fs, path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def read_json(fs: pafs.FileSystem, path: str) -> Any:
    return json.loads(read_bytes(fs, path))


def read_result(fs: pafs.FileSystem, job_prefix: str) -> dict[str, Any] | None:
    """``result.json`` of a finished (or failed) job, or None while it runs (or if torn)."""
    try:
        result = read_json(fs, f"{job_prefix}/{RESULT}")
    except (FileNotFoundError, ValueError):
        return None
    return result if isinstance(result, dict) else None


def read_logs(fs: pafs.FileSystem, job_prefix: str) -> str | None:
    """The rank-0 worker logs of every attempt, concatenated; None if there are none."""
    logs = [i for i in list_files(fs, f"{job_prefix}/{LOGS}") if i.path.endswith(".log")]
    parts = []
    for info in logs:
        try:
            parts.append(read_bytes(fs, info.path).decode(errors="replace"))
        except FileNotFoundError:
            continue  # pruned between listing and reading
    return "".join(parts) if logs else None


def list_previews(fs: pafs.FileSystem, job_prefix: str) -> list[str]:
    return [i.path for i in list_files(fs, f"{job_prefix}/{PREVIEWS}") if i.path.endswith(".png")]


def has_model(fs: pafs.FileSystem, job_prefix: str) -> bool:
    return exists(fs, f"{job_prefix}/{MODEL}") and exists(fs, f"{job_prefix}/{MODEL_CONFIG}")
