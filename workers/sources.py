"""A job's dataset, whichever its form: an ImageFolder tree or packed shards, what it holds
(classes, training and validation images), the steps an epoch has, and whether a job can run
on it. No torch: the service calls ``submit_problems`` at submit time.

``open_source`` is the one place that decides the form (``data.format``; ``auto`` = shards when
the prefix holds ``index.json``) and reads the listing or index; ``job_problems`` holds the
rules a dataset must meet for a job (enough images for a step; fine-tuning: two classes or
more and a validation split). ``submit_problems`` applies them where that is cheap: a shard
index is read (one small object and one listing), an ImageFolder only has its top level
listed (classes), never all its objects.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import pyarrow.fs as pafs

from .imagefolder import DatasetSplits, index_dataset, resolve_data_uri
from .shard_index import ShardIndex, has_index, missing_shards, read_index, shard_steps_per_epoch
from .spec_data import DataSpec
from .storage import S3Settings, list_files, open_root

if TYPE_CHECKING:
    from .spec import JobSpec

Problem = tuple[str, str]  # (spec field, message)


@dataclass(frozen=True)
class DataSource:
    """An opened dataset: ``folder`` (ImageFolder lists) or ``index`` (shards), one of them."""

    kind: Literal["imagefolder", "shards"]
    uri: str  # as named in the spec (canonical)
    fs_uri: str  # the root to open with ``open_root``
    classes: tuple[str, ...]
    folder: DatasetSplits | None = None
    index: ShardIndex | None = None

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def num_train(self) -> int:
        return self.index.train.count if self.index else len(self._folder.train)

    @property
    def num_val(self) -> int:
        return len(self.index.val.members) if self.index else len(self._folder.val)

    @property
    def _folder(self) -> DatasetSplits:
        assert self.folder is not None
        return self.folder

    def steps_per_epoch(self, spec: JobSpec) -> int:
        if self.index is None:
            return spec.steps_per_epoch(self.num_train)
        return shard_steps_per_epoch(
            self.index.train,
            spec.resources.num_workers,
            max(spec.data.loader_workers, 1),
            spec.micro_batch,
            spec.accum_steps,
            spec.data.max_samples,
        )


def open_source(data: DataSpec, s3: S3Settings | None = None) -> DataSource:
    """Open the dataset ``data.uri`` names (already checked by the read policy).

    Raises ``ValueError`` (or ``OSError``) with a message naming the dataset."""
    uri = resolve_data_uri(data.uri)
    root = open_root(uri, s3)
    fs_uri = root.to_uri(root.base) if root.scheme == "s3" else root.base
    form = data.format
    if form == "auto":
        is_builtin = data.uri.startswith("builtin:")
        form = "shards" if not is_builtin and has_index(root.fs, root.base) else "imagefolder"
    if form == "imagefolder":
        splits = index_dataset(data, s3)
        return DataSource("imagefolder", data.uri, splits.fs_uri, splits.train.classes, splits)
    index = read_index(root.fs, root.base, data.uri)
    missing = missing_shards(root.fs, root.base, index)
    if missing:
        raise ValueError(
            f"{data.uri}: {len(missing)} shard(s) named in index.json are missing or of "
            f"another size: {', '.join(missing[:5])}"
        )
    if not index.train.count:
        raise ValueError(f"{data.uri}: the shard index lists no training images")
    return DataSource("shards", data.uri, fs_uri, index.classes, index=index)


def job_problems(spec: JobSpec, source: DataSource) -> list[Problem]:
    """What keeps ``spec`` from running on ``source`` (empty when it can run)."""
    problems: list[Problem] = []
    if spec.kind == "finetune":
        problems += class_problems(source.classes, spec)
        if not source.num_val:
            what = (
                "a val split (pack with --val-fraction > 0)"
                if source.index
                else ("a validation split (val/ folder or val_fraction > 0)")
            )
            problems.append(("data.val_fraction", f"fine-tuning needs {what}"))
    if not problems and source.steps_per_epoch(spec) < 1:
        how = (
            f" in {spec.resources.num_workers} worker(s) x {max(spec.data.loader_workers, 1)} "
            f"loader process(es) of micro-batches of {spec.micro_batch}"
            if source.index
            else ""
        )
        problems.append(
            (
                "train.global_batch_size",
                f"{source.num_train} training images cannot fill one step of "
                f"{spec.train.global_batch_size} images{how}",
            )
        )
    return problems


def class_problems(classes: tuple[str, ...], spec: JobSpec) -> list[Problem]:
    if len(classes) < 2:
        return [
            (
                "data.uri",
                f"fine-tuning needs at least 2 classes; {spec.data.uri} has "
                f"{len(classes)} ({', '.join(classes) or 'none'})",
            )
        ]
    ft = spec.finetune
    if ft is not None and ft.num_classes is not None and ft.num_classes < len(classes):
        return [
            (
                "finetune.num_classes",
                f"{ft.num_classes} < the dataset's {len(classes)} classes",
            )
        ]
    return []


def submit_problems(spec: JobSpec, uri: str, s3: S3Settings | None = None) -> list[Problem]:
    """The checks that are cheap enough for submit time, on ``uri`` (``data.uri`` after the
    read policy). Shards: the index is read and checked whole. ImageFolder: the folder must
    exist and have class folders (fine-tuning: two or more); its images are counted later,
    by the job (``workers.run.prepare``). Raises ``OSError`` when the store cannot be reached."""
    if uri.startswith("builtin:"):
        return []
    data = spec.data.model_copy(update={"uri": uri})
    try:
        root = open_root(uri, s3)
        if data.format == "shards" or (data.format == "auto" and has_index(root.fs, root.base)):
            return job_problems(spec, open_source(data.model_copy(update={"format": "shards"}), s3))
        info = root.fs.get_file_info(root.base)
        if info.type == pafs.FileType.NotFound:
            return [("data.uri", f"{spec.data.uri} does not exist")]
        if info.type == pafs.FileType.File:
            return [("data.uri", f"{spec.data.uri} is a file; name the dataset's folder")]
        top = _class_folders(root.fs, root.base)
        if {"train", "val"} <= set(top):
            top = _class_folders(root.fs, f"{root.base}/train")
    except ValueError as e:  # OSError (the store is down) is the caller's: retry later
        return [("data.uri", str(e))]
    if not top:
        return [("data.uri", f"{spec.data.uri} is empty: no <class>/<image> folders in it")]
    return class_problems(tuple(top), spec) if spec.kind == "finetune" else []


def _class_folders(fs: pafs.FileSystem, path: str) -> list[str]:
    return sorted(i.base_name for i in list_files(fs, path) if i.type == pafs.FileType.Directory)
