"""``greenmim data pack``: an ImageFolder (local or ``s3://``) to tar shards plus ``index.json``.

The split is the one a job over the ImageFolder would use (``workers.imagefolder``:
``train/``+``val/`` folders, else ``val_fraction`` of each class chosen by ``split_seed``), so a
job over the shards and one over the folder train and validate on the same images. Training
images are shuffled across shards (a seeded permutation), so every shard mixes the classes
and a streaming reader with a modest shuffle buffer sees mixed batches. Image bytes are stored
as they are (no re-encoding); decoding happens in the job (``workers.images``).

Shards are written with webdataset's ``TarWriter`` into a local temporary file, hashed and
uploaded; ``index.json`` is written last, so a prefix with an index is a complete dataset.
Source images are read by a small thread pool (per-object latency dominates on S3).
"""

from __future__ import annotations

import json
import posixpath
import random
import tarfile
import tempfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pyarrow.fs as pafs

from .imagefolder import ImageIndex, index_dataset
from .shard_index import INDEX, Member, ShardIndex, ShardInfo, ShardSplit, has_index
from .spec_data import DataSpec
from .storage import S3Settings, StorageRoot, open_root, upload_file, write_bytes
from .uri_policy import lexical_uri

Progress = Callable[[int, int], None]  # (images done, images in all)


@dataclass(frozen=True)
class PackOptions:
    shard_size: int = 1000  # images per shard (the last of a split may hold fewer)
    val_fraction: float = 0.1
    split_seed: int = 0
    threads: int = 16

    def __post_init__(self) -> None:
        if not 1 <= self.shard_size <= 10_000_000:
            raise ValueError(f"shard_size must be 1..10000000 images, got {self.shard_size}")
        if not 0.0 <= self.val_fraction <= 0.5:
            raise ValueError(f"val_fraction must be in [0, 0.5], got {self.val_fraction}")
        if not 1 <= self.threads <= 256:
            raise ValueError(f"threads must be 1..256, got {self.threads}")


def _ext(path: str) -> str:
    ext = posixpath.splitext(path)[1].lower().lstrip(".")
    return "jpg" if ext == "jpeg" else ext


def pack(
    src: str,
    dest: str,
    options: PackOptions = PackOptions(),
    s3: S3Settings | None = None,
    progress: Progress | None = None,
) -> ShardIndex:
    """Pack the ImageFolder at ``src`` into shards under ``dest``; returns the index written.

    Raises ``ValueError`` for a missing or empty source or a destination that already holds
    an index (nothing is written then)."""
    src, dest = lexical_uri(src), lexical_uri(dest)
    if src.startswith("builtin:") or dest.startswith("builtin:"):
        raise ValueError("pack reads an ImageFolder path or s3:// prefix and writes to one")
    out = open_root(dest, s3)
    if has_index(out.fs, out.base):
        raise ValueError(f"{dest} already holds {INDEX}: pack into an empty prefix")
    data = DataSpec(uri=src, val_fraction=options.val_fraction, split_seed=options.split_seed)
    splits = index_dataset(data, s3)
    src_root = open_root(splits.fs_uri, s3)
    rel_base = src_root.base.rstrip("/") + "/"
    order = list(range(len(splits.train)))
    random.Random(options.split_seed + 2).shuffle(order)
    train = splits.train.subset(order)
    total = len(train) + len(splits.val)
    done = [0]

    def tick(n: int) -> None:
        done[0] += n
        if progress is not None:
            progress(done[0], total)

    tick(0)
    with ThreadPoolExecutor(options.threads) as pool, tempfile.TemporaryDirectory() as tmp:
        writer = _SplitWriter(src_root.fs, rel_base, out, s3, pool, Path(tmp), tick)
        train_split = writer.write("train", train, options.shard_size, members=False)
        val_split = writer.write("val", splits.val, options.shard_size, members=True)
    index = ShardIndex(splits.train.classes, train_split, val_split, source=src)
    doc = index.to_json()
    doc.update(val_fraction=options.val_fraction, split_seed=options.split_seed)
    write_bytes(out.fs, out.path(INDEX), json.dumps(doc, indent=1).encode())
    return index


@dataclass
class _SplitWriter:
    fs: pafs.FileSystem  # the source's
    rel_base: str
    out: StorageRoot  # the destination
    s3: S3Settings | None
    pool: ThreadPoolExecutor
    tmp: Path
    tick: Callable[[int], None]

    def _read(self, path: str) -> bytes:
        with self.fs.open_input_stream(path) as f:
            return f.read()

    def write(self, split: str, images: ImageIndex, shard_size: int, members: bool) -> ShardSplit:
        from webdataset.writer import TarWriter  # imports torch: only when packing

        shards: list[ShardInfo] = []
        where: list[Member] = []
        counts = [0] * len(images.classes)
        for start in range(0, len(images), shard_size):
            name = f"{split}-{len(shards):06d}.tar"
            local = self.tmp / name
            stop = min(start + shard_size, len(images))
            paths = images.paths[start:stop]
            rels = [p[len(self.rel_base) :] if p.startswith(self.rel_base) else p for p in paths]
            with TarWriter(str(local), encoder=False, mtime=0.0) as tw:
                for i, raw in enumerate(self.pool.map(self._read, paths)):
                    label = images.labels[start + i]
                    counts[label] += 1
                    tw.write(
                        {
                            "__key__": f"{start + i:09d}",
                            _ext(paths[i]) or "img": raw,
                            "cls": str(label).encode(),
                            "path": rels[i].encode(),
                        }
                    )
                    self.tick(1)
            if members:
                where += _member_ranges(local, len(shards), images, start, rels)
            size, sha = upload_file(self.out.fs, str(local), self.out.path(name), self.s3)
            local.unlink()
            shards.append(ShardInfo(name, stop - start, size, sha))
        return ShardSplit(tuple(shards), tuple(counts), tuple(where))


def _member_ranges(
    local: Path, shard: int, images: ImageIndex, start: int, rels: list[str]
) -> list[Member]:
    """Byte range of each image in the written shard (its data, after the tar header)."""
    found: list[Member] = []
    with tarfile.open(local) as tf:
        for info in tf.getmembers():
            key, _, ext = info.name.partition(".")
            if ext in ("cls", "path"):
                continue
            i = int(key) - start
            found.append(
                Member(shard, info.offset_data, info.size, images.labels[start + i], rels[i])
            )
    return found
