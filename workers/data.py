"""Images as tensors for training: transforms, the ImageFolder dataset (one object read per
image, unreadable ones replaced and reported), seeds. Listing and splitting an ImageFolder is
``workers.imagefolder``; packed shards are ``workers.shards``."""

from __future__ import annotations

import os
import random

import numpy as np
import pyarrow.fs as pafs
import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch.utils.data import Dataset
from torchvision import transforms as T

from .imagefolder import (
    IMAGE_EXTENSIONS,
    DatasetSplits,
    ImageIndex,
    builtin_class_sizes,
    builtin_train_size,
    cache_dir,
    export_digits,
    held_out_count,
    index_dataset,
    resolve_data_uri,
)
from .images import SkipLog, UnreadableImage, decode_rgb
from .spec import DataSpec
from .storage import S3Settings, open_root

__all__ = [
    "IMAGE_EXTENSIONS", "DatasetSplits", "ImageIndex", "builtin_class_sizes",
    "builtin_train_size", "cache_dir", "export_digits", "held_out_count", "index_dataset",
    "resolve_data_uri",
]  # fmt: skip

MEAN, STD = IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD


def train_transform(img_size: int, data: DataSpec) -> T.Compose:
    """Standard MIM / fine-tune augmentation: random resized crop, flip, normalise."""
    ops: list[object] = [
        T.RandomResizedCrop(
            img_size, scale=data.crop_scale, interpolation=T.InterpolationMode.BICUBIC
        )
    ]
    if data.hflip:
        ops.append(T.RandomHorizontalFlip())
    ops += [T.ToTensor(), T.Normalize(MEAN, STD)]
    return T.Compose(ops)


def eval_transform(img_size: int, crop_pct: float = 0.875) -> T.Compose:
    return T.Compose(
        [
            T.Resize(int(round(img_size / crop_pct)), interpolation=T.InterpolationMode.BICUBIC),
            T.CenterCrop(img_size),
            T.ToTensor(),
            T.Normalize(MEAN, STD),
        ]
    )


def unnormalize(images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) normalised -> [0, 1]."""
    mean = torch.tensor(MEAN, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(STD, device=images.device).view(1, 3, 1, 1)
    return (images * std + mean).clamp(0, 1)


class ImageFolderDataset(Dataset):
    """Map-style dataset that reads one image per ``__getitem__`` from its store.

    An unreadable image is replaced by the next readable one of the list (so batches stay
    full; each image is drawn once per epoch, so it is counted once per epoch) and recorded in
    ``skips``: ``SeededDataset`` passes the names on with the sample, the
    training loop counts them against ``data.max_skipped_images``. Past ``max_tries``
    unreadable images in a row it raises ``UnreadableImage``.

    The pyarrow filesystem is opened lazily in each process (DataLoader workers included), from
    the dataset URI and ``S3Settings``, so the dataset pickles without live connections.
    """

    def __init__(
        self,
        fs_uri: str,
        index: ImageIndex,
        transform,
        s3: S3Settings | None = None,
        max_tries: int = 100,
    ):
        self.fs_uri, self.index, self.transform, self.s3 = fs_uri, index, transform, s3
        self.max_tries = max_tries
        self.skips = SkipLog()
        self._fs: pafs.FileSystem | None = None
        self._pid = -1

    def __len__(self) -> int:
        return len(self.index)

    def _filesystem(self) -> pafs.FileSystem:
        if self._fs is None or self._pid != os.getpid():
            self._fs, self._pid = open_root(self.fs_uri, self.s3).fs, os.getpid()
        return self._fs

    def _where(self, path: str) -> str:
        return f"s3://{path}" if self.fs_uri.startswith("s3://") else path

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        n = len(self.index)
        for k in range(min(self.max_tries, n)):
            j = (i + k) % n
            path = self.index.paths[j]
            try:
                with self._filesystem().open_input_stream(path) as f:
                    raw = f.read()
                img = decode_rgb(raw, self._where(path))
            except (UnreadableImage, OSError) as e:  # OSError: the object cannot be read
                if k == 0:  # a substitute's own failure is counted when it is drawn itself
                    self.skips.add(_named(e, self._where(path)))
                continue
            return self.transform(img), self.index.labels[j]
        raise UnreadableImage(
            self._where(self.index.paths[i]), f"and the next {self.max_tries - 1} unreadable too"
        )

    def __getstate__(self):
        return {**self.__dict__, "_fs": None, "_pid": -1, "skips": SkipLog()}


def _named(e: Exception, where: str) -> UnreadableImage:
    return (
        e if isinstance(e, UnreadableImage) else UnreadableImage(where, f"{type(e).__name__}: {e}")
    )


def shard_indices(n: int, rank: int, world: int) -> list[int]:
    """Indices ``rank, rank + world, ...`` of ``n`` (a disjoint, exhaustive split for eval)."""
    return list(range(rank, n, world))


def derive_seed(*parts: int) -> int:
    """A 32-bit seed derived from integer ``parts`` (e.g. seed, epoch, rank, purpose)."""
    return int(np.random.SeedSequence(list(parts)).generate_state(1)[0])


def seed_worker(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: derive numpy/random seeds from torch's per-worker seed."""
    s = torch.initial_seed() % 2**32
    np.random.seed(s)
    random.seed(s)
