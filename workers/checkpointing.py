"""Training checkpoints through Ray Train's storage, made visible only when complete.

A checkpoint is a folder ``{job}/checkpoints/<name>/`` holding ``state.pt`` (model, optimiser,
schedule, epoch, step, RNG states, spec and configs) and ``spec.json``. Ray Train uploads it
with ``checkpoint_upload_fn=ManifestUploader(...)``: each file is streamed to the store (S3
objects appear only when complete) while its sha256 is computed, and ``manifest.json`` is
written last. Ray Train's ``CheckpointConfig(num_to_keep=K)`` deletes old folders; just before,
``retire_old_manifests`` removes their manifests so a folder being deleted is never listed.

**What a run resumes from.** The listing is the truth: a checkpoint is listed once its manifest
is written, and a resumed attempt starts from the newest listed checkpoint (``resume_from``),
not from Ray Train's own choice. Ray commits a checkpoint to its run snapshot only after the
upload returns (about a second later); a worker killed in between made Ray restart from the
previous one although the API already listed the new one. Choosing the listing instead of
listing only what Ray committed keeps the listing cheap (no Ray state to parse) and gives the
promise both ways: whatever the API shows is what a restart continues from. Rank 0 decides and
broadcasts, so every rank loads the same checkpoint.
"""

from __future__ import annotations

import json
import logging
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.fs as pafs
import torch

from .artifacts import CHECKPOINTS, MANIFEST, list_checkpoints, make_manifest
from .storage import (
    S3Settings,
    delete_dir,
    delete_file,
    list_files,
    sha256_file,
    upload_file,
    write_bytes,
)

logger = logging.getLogger(__name__)

STATE = "state.pt"
STATE_FORMAT = 1


def checkpoint_name(epoch: int) -> str:
    """Folder name of the checkpoint taken after ``epoch`` completed epochs."""
    return f"epoch_{epoch:05d}"


def rng_state() -> dict[str, Any]:
    """This process's RNG states in a form ``torch.load(weights_only=True)`` accepts."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": [kind, torch.from_numpy(np.asarray(keys).astype(np.int64)), pos, has_gauss, gauss],
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    random.setstate(_as_tuples(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuples(x: Any) -> Any:
    return tuple(_as_tuples(v) for v in x) if isinstance(x, list | tuple) else x


def training_state(
    kind: str, epoch: int, step: int, built: Any, optimizer: Any, scheduler: Any
) -> dict[str, Any]:
    """Everything a resumed run needs (``built`` is ``workers.model.Built``)."""
    return {
        "kind": kind,
        "epoch": epoch,
        "step": step,
        "model": built.module.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": None,  # bf16 needs no loss scaling; fp16 is not offered
        "rng": rng_state(),
        "arch": built.cfg.to_dict(),
        "mim": built.mim_cfg.to_dict() if built.mim_cfg is not None else None,
        "num_classes": built.num_classes,
    }


def write_state(directory: str | Path, state: dict[str, Any], spec_json: str) -> None:
    directory = Path(directory)
    torch.save({"format": STATE_FORMAT, **state}, directory / STATE)
    (directory / "spec.json").write_text(spec_json)


def read_state(directory: str | Path) -> dict[str, Any]:
    """Load ``state.pt`` from a downloaded checkpoint folder after checking it against its manifest."""
    directory = Path(directory)
    manifest_path = directory / MANIFEST
    if not manifest_path.exists():
        raise ValueError(f"checkpoint {directory} has no {MANIFEST}; it is incomplete")
    manifest = json.loads(manifest_path.read_text())
    for entry in manifest["files"]:
        size, sha = sha256_file(directory / entry["path"])
        if (size, sha) != (entry["size"], entry["sha256"]):
            raise ValueError(f"checkpoint file {entry['path']} does not match its manifest")
    state = torch.load(directory / STATE, map_location="cpu", weights_only=True)
    if state.get("format") != STATE_FORMAT:
        raise ValueError(f"checkpoint format {state.get('format')} is not {STATE_FORMAT}")
    return state


def upload_with_manifest(
    fs: pafs.FileSystem,
    local_dir: str | Path,
    dest: str,
    name: str,
    epoch: int,
    step: int,
    s3: S3Settings | None = None,
) -> dict[str, Any]:
    """Upload every file of ``local_dir`` to ``dest`` (hashing as it streams), then the manifest.

    Returns the manifest. A stale manifest at ``dest`` (a failed attempt's) is removed first."""
    local = Path(local_dir)
    delete_file(fs, f"{dest}/{MANIFEST}")
    files = []
    for p in sorted(q for q in local.rglob("*") if q.is_file() and q.name != MANIFEST):
        rel = p.relative_to(local).as_posix()
        size, sha = upload_file(fs, str(p), f"{dest}/{rel}", s3)
        files.append({"path": rel, "size": size, "sha256": sha})
    manifest = make_manifest(name, epoch, step, files)
    write_bytes(fs, f"{dest}/{MANIFEST}", json.dumps(manifest, indent=2).encode())
    return manifest


class ManifestUploader:
    """``checkpoint_upload_fn`` for ``ray.train.report``: ``upload_with_manifest`` into Ray's storage.

    Runs on the reporting worker. Destination and filesystem are Ray Train's own storage
    context, so Ray manages (restores, deletes) the result like any checkpoint it uploaded.
    """

    def __init__(self, epoch: int, step: int, s3: S3Settings | None = None):
        self.epoch, self.step, self.s3 = epoch, step, s3
        self.uploaded: dict[str, Any] | None = None

    def __call__(self, checkpoint, checkpoint_dir_name: str):
        import ray.train

        storage = ray.train.get_context().get_storage()
        fs = storage.storage_filesystem
        dest = f"{storage.experiment_fs_path}/{checkpoint_dir_name}"
        t0 = time.perf_counter()
        manifest = upload_with_manifest(
            fs, checkpoint.path, dest, checkpoint_dir_name, self.epoch, self.step, self.s3
        )
        seconds = time.perf_counter() - t0
        self.uploaded = {**manifest, "upload_s": seconds}
        logger.info(
            "checkpoint %s: %d bytes in %.2fs (%.1f MB/s), sha256 %s",
            dest, manifest["size"], seconds, manifest["size"] / 2**20 / max(seconds, 1e-9), manifest["sha256"][:12],
        )  # fmt: skip
        return ray.train.Checkpoint(path=dest, filesystem=fs)


def resume_from(fs: pafs.FileSystem, job_prefix: str, ray_checkpoint: Any) -> Any:
    """The checkpoint a (re)started attempt loads: the newest listed one, as a
    ``ray.train.Checkpoint`` (Ray's own choice when it is that one), or None for a fresh start.

    Ray's choice is used only when nothing is listed (then it is incomplete and ``read_state``
    refuses it)."""
    import ray.train

    listed = list_checkpoints(fs, job_prefix)
    if not listed:
        return ray_checkpoint
    newest = listed[-1]
    if ray_checkpoint is not None and ray_checkpoint.path.rstrip("/") == newest.path:
        return ray_checkpoint
    if ray_checkpoint is not None:
        logger.info(
            "resuming from listed checkpoint %s; Ray had %s", newest.name, ray_checkpoint.path
        )
    return ray.train.Checkpoint(path=newest.path, filesystem=fs)


def agreed_resume(fs: pafs.FileSystem, job_prefix: str, world: int) -> tuple[Any, str | None]:
    """In a Ray Train worker: ``resume_from`` as rank 0 sees it, broadcast to every rank, and
    the name of Ray's own choice (None for none)."""
    import ray.train

    ray_choice = ray.train.get_checkpoint()
    ray_name = None if ray_choice is None else ray_choice.path.rstrip("/").rsplit("/", 1)[-1]
    rank = ray.train.get_context().get_world_rank()
    choice = [resume_from(fs, job_prefix, ray_choice) if rank == 0 else None]
    if world > 1 and torch.distributed.is_initialized():
        torch.distributed.broadcast_object_list(choice, src=0)
    return choice[0], ray_name


def committed_paths() -> set[str]:
    """In a Ray Train worker: the checkpoint folders Ray's run snapshot holds, once every
    reported checkpoint is committed."""
    import ray.train

    mode = ray.train.CheckpointConsistencyMode.COMMITTED
    return {
        c.checkpoint.path for c in ray.train.get_all_reported_checkpoints(consistency_mode=mode)
    }


def retire_old_manifests(
    fs: pafs.FileSystem, job_prefix: str, keep_last: int, tracked: set[str] | None = None
) -> list[str]:
    """Delete the manifests of all but the newest ``keep_last`` checkpoints (Ray deletes the folders).

    ``tracked``: the folders Ray Train's run snapshot holds. A retired or unlisted folder outside
    it (committed by no one: its worker was killed before Ray's commit, and the run resumed from
    it through ``resume_from``) is Ray's to delete never, so it is deleted here."""
    listed = list_checkpoints(fs, job_prefix)
    kept = {info.path for info in listed[-keep_last:]}
    retired = []
    for info in listed[:-keep_last]:
        delete_file(fs, f"{info.path}/{MANIFEST}")
        retired.append(info.name)
    tracked = {p.rstrip("/") for p in tracked or ()}
    # guard: the newest listed one was just committed, so Ray's paths must name it as we do
    if listed and listed[-1].path in tracked:
        for entry in list_files(fs, f"{job_prefix}/{CHECKPOINTS}"):
            name = entry.path.rsplit("/", 1)[-1]
            if entry.type != pafs.FileType.Directory or not name.startswith("epoch_"):
                continue
            if entry.path not in kept and entry.path not in tracked:
                delete_file(fs, f"{entry.path}/{MANIFEST}")
                delete_dir(fs, entry.path)
    return retired
