"""Reading packed shards in a job: a training stream per worker and loader process, and the
validation images one by one.

Training (``ShardStream``, a torch ``IterableDataset`` yielding whole ``Batch``es): worker
``rank``'s loader process ``j`` reads the shards ``workers.shard_index.assignment`` gives it,
in an order shuffled per epoch, through webdataset's tar iteration (``tar_file_expander``,
``group_by_keys``) and its shuffle buffer. Every random choice is seeded from the epoch seed
(``derive_seed(seed, epoch, rank, ...)``, set with ``set_epoch`` before each pass) and ``j``:
the shard order, the buffer's draws, the augmentation of each image and the masks of each
batch. So a run killed and resumed at an epoch boundary sees the same samples in the same
order as one that was not. The DataLoader must not keep its processes across epochs
(``persistent_workers=False``): each pass starts them with the new epoch seed.

Unreadable images are skipped (decoded in the loader process, ``workers.images``) and reported
with the next batch; a shard that ends early or cannot be read counts the images it lacks.
A process that falls short of the micro-batches its shards promise (``shard_index``) reads
them again to fill the gap, so skipped images within the limit never starve a step.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any

import pyarrow.fs as pafs
import torch
from torch.utils.data import Dataset, IterableDataset, get_worker_info
from webdataset.filters import _shuffle
from webdataset.tariterators import group_by_keys, tar_file_expander

from .batching import Batch
from .data import derive_seed
from .images import SkipLog, UnreadableImage, decode_rgb
from .shard_index import ShardSplit, assignment
from .storage import S3Settings, open_root

_READ_BUFFER = 8 << 20
_META = ("cls", "path", "__key__", "__url__", "__local_path__")


class _Lazy:
    """Opens the store's filesystem once per process (the object pickles without it)."""

    fs_uri: str
    s3: S3Settings | None
    _fs: pafs.FileSystem | None = None
    _base: str = ""
    _pid: int = -1

    def _filesystem(self) -> tuple[pafs.FileSystem, str]:
        if self._fs is None or self._pid != os.getpid():
            root = open_root(self.fs_uri, self.s3)
            self._fs, self._base, self._pid = root.fs, root.base, os.getpid()
        return self._fs, self._base

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_fs": None, "_pid": -1}


class ShardStream(_Lazy, IterableDataset):
    """One worker's training batches from its shards (see the module docstring).

    ``collate(samples) -> Batch`` gets ``(image, label, batch seed)`` triples."""

    def __init__(
        self,
        fs_uri: str,
        split: ShardSplit,
        rank: int,
        world: int,
        loaders: int,
        micro_batch: int,
        transform: Callable,
        collate: Callable[[list[tuple[Any, ...]]], Batch],
        shuffle_buffer: int,
        s3: S3Settings | None = None,
    ):
        self.fs_uri, self.split, self.s3 = fs_uri, split, s3
        self.rank, self.world, self.loaders = rank, world, max(loaders, 1)
        self.micro_batch, self.transform, self.collate = micro_batch, transform, collate
        self.shuffle_buffer = shuffle_buffer
        self.epoch_seed = 0

    def set_epoch(self, epoch_seed: int) -> None:
        """Seed of the next pass (from seed, epoch, rank); call before ``iter``."""
        self.epoch_seed = epoch_seed

    def shards_of(self, loader: int) -> list[int]:
        return assignment(len(self.split.shards), self.world, self.loaders)[self.rank][loader]

    def __iter__(self) -> Iterator[Batch]:
        info = get_worker_info()
        j = 0 if info is None else info.id
        if info is not None and info.num_workers != self.loaders:
            raise ValueError(f"{info.num_workers} loader processes, planned for {self.loaders}")
        rng = random.Random(derive_seed(self.epoch_seed, j, 1))
        order = self.shards_of(j)
        rng.shuffle(order)
        # the full micro-batches the index promises this process (shard_index's step count)
        promised = sum(self.split.shards[k].count for k in order) // self.micro_batch
        skips, made = SkipLog(), 0
        for fill in (False, True):
            # images skipped in the first pass leave it short: a second pass over the same
            # shards tops it up (its skips are not counted again), as an unreadable image of an
            # ImageFolder is replaced by the next readable one
            for batch in self._pass(order, j, made, SkipLog() if fill else skips, rng):
                if fill and made >= promised:
                    break
                made += 1
                names, count = skips.drain()
                yield _with_skips(batch, names, count)
            if made >= promised or not made:
                break
        names, count = skips.drain()
        if count:  # skips after the last full batch still count: an empty batch carries them
            yield Batch(torch.empty(0), torch.empty(0, dtype=torch.long), None, None, names, count)

    def _pass(
        self, order: list[int], j: int, n: int, skips: SkipLog, rng: random.Random
    ) -> Iterator[Batch]:
        """Full micro-batches from one read of ``order``, numbered on from batch ``n``."""
        buffer = self.shuffle_buffer
        samples = _shuffle(self._samples(order, skips), buffer, buffer, rng=rng)
        batch: list[tuple[Any, ...]] = []
        seed = derive_seed(self.epoch_seed, j, 2, n)
        for s in samples:
            where = f"{s['__url__']}:{s.get('path', b'?').decode(errors='replace')}"
            try:
                ext = next(k for k in s if k not in _META)
                img = decode_rgb(s[ext], where)
                label = int(s["cls"])
            except (UnreadableImage, StopIteration, KeyError, ValueError) as e:
                err = e if isinstance(e, UnreadableImage) else UnreadableImage(where, repr(e))
                skips.add(err)
                continue
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(derive_seed(seed, len(batch)))
                batch.append((self.transform(img), label, seed))
            if len(batch) == self.micro_batch:
                yield self.collate(batch)
                batch, n = [], n + 1
                seed = derive_seed(self.epoch_seed, j, 2, n)

    def _samples(self, order: list[int], skips: SkipLog) -> Iterator[dict[str, Any]]:
        fs, base = self._filesystem()
        for k in order:
            shard = self.split.shards[k]
            path = f"{base}/{shard.name}"
            url = f"s3://{path}" if self.fs_uri.startswith("s3://") else path
            got = 0
            try:
                # buffered: tarfile reads in small blocks, each would be a ranged GET on S3
                with fs.open_input_stream(path, buffer_size=_READ_BUFFER) as stream:
                    source = [{"url": url, "stream": stream}]
                    for sample in group_by_keys(tar_file_expander(source)):
                        got += 1
                        yield sample
            except Exception as e:  # noqa: BLE001 - a broken shard is data, reported below
                reason = f"{type(e).__name__}: {e}"
            else:
                reason = "ended early"
            if got < shard.count:
                skips.add(
                    UnreadableImage(url, f"{reason}; {shard.count - got} of its images not read"),
                    shard.count - got,
                )


def _with_skips(batch: Batch, names: tuple[str, ...], count: int) -> Batch:
    return replace(batch, skipped=names, num_skipped=count)


class ShardMembers(_Lazy, Dataset):
    """The validation split, one image per ``__getitem__`` (a ranged read of its shard); an
    unreadable image is replaced by the next readable one, as in ``ImageFolderDataset``."""

    def __init__(self, fs_uri: str, split: ShardSplit, transform, s3: S3Settings | None = None):
        self.fs_uri, self.split, self.transform, self.s3 = fs_uri, split, transform, s3
        self.skips = SkipLog()

    def __len__(self) -> int:
        return len(self.split.members)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        fs, base = self._filesystem()
        n = len(self.split.members)
        for k in range(min(n, 100)):
            m = self.split.members[(i + k) % n]
            shard = self.split.shards[m.shard].name
            where = f"{shard}:{m.path}"
            try:
                with fs.open_input_file(f"{base}/{shard}") as f:
                    raw = f.read_at(m.size, m.offset)
                img = decode_rgb(raw, where)
            except (UnreadableImage, OSError) as e:
                if k == 0:
                    err = e if isinstance(e, UnreadableImage) else UnreadableImage(where, str(e))
                    self.skips.add(err)
                continue
            return self.transform(img), m.label
        raise UnreadableImage(f"validation image {i}", "it and the next 99 are unreadable")
