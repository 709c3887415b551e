"""ImageFolder trees on a local disk or an S3 prefix, and built-in sets: listing and splits.

An ImageFolder tree is ``root/<class>/<image>`` (optionally ``root/train/<class>/...`` and
``root/val/<class>/...``). Only the file *list* is held in memory; each image is read from
its store when a sample is drawn, so datasets larger than memory stream from S3.

``builtin:digits`` is scikit-learn's 8x8 handwritten digits (1797 images, 10 classes), which
ships inside the scikit-learn package: it is exported once to an ImageFolder tree under a
cache folder and then read like any other local dataset. Nothing is downloaded.

No torch here: ``greenmim data pack`` lists and splits ImageFolders with these functions.
"""

from __future__ import annotations

import functools
import logging
import os
import posixpath
import random
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.fs as pafs
from PIL import Image

from .spec_data import DataSpec
from .storage import S3Settings, list_files, open_root

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm")


def cache_dir() -> Path:
    """Where built-in datasets are exported: ``$GREENMIM_CACHE_DIR`` or ``~/.cache/greenmim``."""
    return Path(os.environ.get("GREENMIM_CACHE_DIR") or Path.home() / ".cache" / "greenmim")


def export_digits(dest: str | Path) -> Path:
    """Write scikit-learn's digits as an ImageFolder tree ``dest/<digit>/<index>.png`` (8x8, L).

    Idempotent and safe when several processes race: the tree is built in a sibling temporary
    folder and renamed into place; a complete tree is left alone.
    """
    from sklearn.datasets import load_digits

    dest = Path(dest)
    if (dest / ".complete").exists():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    digits = load_digits()
    pixels = np.clip(np.rint(digits.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    for i, (img, label) in enumerate(zip(pixels, digits.target, strict=True)):
        cls = tmp / str(int(label))
        cls.mkdir(exist_ok=True)
        Image.fromarray(img).save(cls / f"{i:04d}.png")
    (tmp / ".complete").touch()
    try:
        os.rename(tmp, dest)
    except OSError:  # another process won the race (dest exists and is not empty)
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


@dataclass(frozen=True)
class ImageIndex:
    """The files of an ImageFolder split: paths on ``fs`` (not held here) and integer labels."""

    classes: tuple[str, ...]
    paths: tuple[str, ...]
    labels: tuple[int, ...]

    def __len__(self) -> int:
        return len(self.paths)

    def subset(self, indices: list[int]) -> ImageIndex:
        return ImageIndex(
            self.classes,
            tuple(self.paths[i] for i in indices),
            tuple(self.labels[i] for i in indices),
        )


def _folder_index(
    fs: pafs.FileSystem, root: str, classes: tuple[str, ...] | None = None
) -> ImageIndex:
    entries = list_files(fs, root, recursive=True)
    by_class: dict[str, list[str]] = {}
    for info in entries:
        if info.type != pafs.FileType.File or not info.path.lower().endswith(IMAGE_EXTENSIONS):
            continue
        rel = info.path[len(root.rstrip("/")) + 1 :]
        if "/" not in rel:
            continue  # images directly under the root have no class
        by_class.setdefault(rel.split("/", 1)[0], []).append(info.path)
    if classes is None:
        classes = tuple(sorted(by_class))
    if not classes:
        raise ValueError(
            f"no images found in ImageFolder layout under {root!r} (root/<class>/<image>)"
        )
    unknown = set(by_class) - set(classes)
    if unknown:
        raise ValueError(f"{root!r} has classes {sorted(unknown)} that the training split lacks")
    paths, labels = [], []
    for label, cls in enumerate(classes):
        for p in sorted(by_class.get(cls, [])):
            paths.append(p)
            labels.append(label)
    return ImageIndex(classes, tuple(paths), tuple(labels))


@dataclass(frozen=True)
class DatasetSplits:
    """Where the images are (``uri`` resolved to a store) and the train/val file lists."""

    fs_uri: str  # the dataset root as a storage URI (local path or s3://...)
    train: ImageIndex
    val: ImageIndex

    @property
    def num_classes(self) -> int:
        return len(self.train.classes)


def held_out_count(class_size: int, val_fraction: float) -> int:
    """Images of one class held out for validation (at least one when the fraction is > 0)."""
    n_val = round(class_size * val_fraction)
    return min(max(n_val, 1), class_size - 1) if val_fraction > 0 else n_val


@functools.lru_cache(maxsize=4)
def builtin_class_sizes(uri: str) -> tuple[int, ...]:
    """Images per class of a ``builtin:`` dataset, without exporting it."""
    if uri != "builtin:digits":
        raise ValueError(f"unknown built-in dataset {uri!r}")
    from sklearn.datasets import load_digits

    return tuple(int(n) for n in np.bincount(load_digits().target))


def builtin_train_size(data: DataSpec) -> int:
    """Training images a job over a ``builtin:`` dataset gets (``index_dataset``'s split)."""
    sizes = builtin_class_sizes(data.uri)
    n = sum(size - held_out_count(size, data.val_fraction) for size in sizes)
    return n if data.max_samples is None else min(n, data.max_samples)


def resolve_data_uri(uri: str) -> str:
    """``builtin:<name>`` -> the exported local folder; other URIs unchanged."""
    if uri == "builtin:digits":
        return str(export_digits(cache_dir() / "datasets" / "digits"))
    if uri.startswith("builtin:"):
        raise ValueError(f"unknown built-in dataset {uri!r}")
    return uri


def index_dataset(data: DataSpec, s3: S3Settings | None = None) -> DatasetSplits:
    """List the dataset and split it. Deterministic in ``data`` (``split_seed``).

    With ``train/`` and ``val/`` folders those are the splits; otherwise ``val_fraction`` of
    each class (at least one image when the fraction is > 0) is held out. ``max_samples``
    then keeps a seeded subset of the training split.
    """
    uri = resolve_data_uri(data.uri)
    root = open_root(uri, s3)
    top = {
        posixpath.basename(i.path)
        for i in list_files(root.fs, root.base)
        if i.type == pafs.FileType.Directory
    }
    if not top and not list_files(root.fs, root.base):
        raise ValueError(f"dataset {data.uri!r} is empty or does not exist")
    if {"train", "val"} <= top:
        train = _folder_index(root.fs, root.path("train"))
        val = _folder_index(root.fs, root.path("val"), train.classes)
    else:
        full = _folder_index(root.fs, root.base)
        rng = random.Random(data.split_seed)
        train_idx, val_idx = [], []
        for label in range(len(full.classes)):
            idx = [i for i, y in enumerate(full.labels) if y == label]
            rng.shuffle(idx)
            n_val = held_out_count(len(idx), data.val_fraction)
            val_idx += idx[:n_val]
            train_idx += idx[n_val:]
        train, val = full.subset(sorted(train_idx)), full.subset(sorted(val_idx))
    if data.max_samples is not None and data.max_samples < len(train):
        keep = sorted(
            random.Random(data.split_seed + 1).sample(range(len(train)), data.max_samples)
        )
        train = train.subset(keep)
    logger.info(
        "dataset %s: %d train / %d val images, %d classes",
        data.uri,
        len(train),
        len(val),
        len(train.classes),
    )
    return DatasetSplits(root.to_uri(root.base) if root.scheme == "s3" else root.base, train, val)
