"""Packed shards: the index format, how shards are split over workers and loader processes,
and how many steps an epoch has. No torch (``greenmim data inspect`` and the service use it).

A shard dataset is a prefix (local or ``s3://``) holding ``index.json`` and tar shards in
webdataset's layout (``<key>.<ext>`` image bytes as packed, ``<key>.cls`` the label,
``<key>.path`` the source path; one sample's files adjacent). ``index.json``::

    {"format": "greenmim-shards", "version": 1, "classes": ["cat", "dog"],
     "source": "s3://...", "val_fraction": 0.1, "split_seed": 0,
     "splits": {"train": {"count": N, "class_counts": [...],
                          "shards": [{"name": "train-000000.tar", "count": 1000,
                                      "size": bytes, "sha256": "..."}, ...]},
                "val": {..., "members": [[shard, offset, size, label, "path"], ...]}}}

``val`` also lists where each image's bytes lie (``members``), so validation reads images
one by one, like an ImageFolder, and every worker evaluates a disjoint part.

Splitting: shard ``k`` of a split goes to worker ``k % W`` and, among that worker's shards,
to loader process ``(k // W) % L``: no shard is read twice in an epoch. Each (worker, loader)
drops its last partial micro-batch; an epoch has as many steps as the worker with the fewest
full micro-batches can make, so every worker makes the same number (DDP). Pack with a shard
count that is a multiple of ``W x L`` and equal shards, and every image is used every epoch.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

import pyarrow.fs as pafs

INDEX = "index.json"
FORMAT = "greenmim-shards"
VERSION = 1
SHARD_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,200}\.tar$")


@dataclass(frozen=True)
class ShardInfo:
    name: str  # a file name under the prefix (checked: no '/', no '..')
    count: int
    size: int
    sha256: str


@dataclass(frozen=True)
class Member:
    """Where one validation image's bytes are: ``shard`` (position in the split), byte range."""

    shard: int
    offset: int
    size: int
    label: int
    path: str


@dataclass(frozen=True)
class ShardSplit:
    shards: tuple[ShardInfo, ...]
    class_counts: tuple[int, ...]
    members: tuple[Member, ...] = ()

    @property
    def count(self) -> int:
        return sum(s.count for s in self.shards)


@dataclass(frozen=True)
class ShardIndex:
    classes: tuple[str, ...]
    train: ShardSplit
    val: ShardSplit
    source: str = ""

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def to_json(self) -> dict:
        def split(s: ShardSplit) -> dict:
            out: dict = {
                "count": s.count,
                "class_counts": list(s.class_counts),
                "shards": [s_.__dict__ for s_ in s.shards],
            }
            if s.members:
                out["members"] = [[m.shard, m.offset, m.size, m.label, m.path] for m in s.members]
            return out

        return {
            "format": FORMAT,
            "version": VERSION,
            "classes": list(self.classes),
            "source": self.source,
            "splits": {"train": split(self.train), "val": split(self.val)},
        }


class ShardIndexError(ValueError):
    """``index.json`` is missing, unreadable or inconsistent; the message says what."""


def parse_index(doc: object, where: str) -> ShardIndex:
    """Validate an ``index.json`` document; raise ``ShardIndexError`` naming the problem."""

    def bad(msg: str) -> ShardIndexError:
        return ShardIndexError(f"{where}: {msg}")

    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise bad(f"not a {FORMAT} index (made by 'greenmim data pack')")
    if doc.get("version") != VERSION:
        raise bad(f"index version {doc.get('version')!r}; this release reads {VERSION}")
    classes = doc.get("classes")
    if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes):
        raise bad("'classes' must be a list of names")
    splits = doc.get("splits")
    if not isinstance(splits, dict):
        raise bad("'splits' is missing")

    def split(name: str) -> ShardSplit:
        s = splits.get(name) or {"shards": [], "class_counts": [0] * len(classes)}
        try:
            shards = tuple(
                ShardInfo(str(x["name"]), int(x["count"]), int(x["size"]), str(x["sha256"]))
                for x in s["shards"]
            )
            counts = tuple(int(c) for c in s["class_counts"])
            members = tuple(Member(*m) for m in s.get("members", []))
        except (KeyError, TypeError, ValueError) as e:
            raise bad(f"split {name!r} is malformed ({type(e).__name__}: {e})") from e
        for sh in shards:
            if not SHARD_NAME.match(sh.name) or ".." in sh.name:
                raise bad(f"shard name {sh.name!r} is not a plain .tar file name in the prefix")
            if sh.count < 0:
                raise bad(f"shard {sh.name} has a negative count")
        if len(counts) != len(classes) or sum(counts) != sum(sh.count for sh in shards):
            raise bad(f"split {name!r}: class counts do not add up to its shards' counts")
        if any(not 0 <= m.shard < len(shards) or not 0 <= m.label < len(classes) for m in members):
            raise bad(f"split {name!r}: a member names a shard or class that does not exist")
        return ShardSplit(shards, counts, members)

    return ShardIndex(tuple(classes), split("train"), split("val"), str(doc.get("source", "")))


def read_index(fs: pafs.FileSystem, base: str, display: str) -> ShardIndex:
    """Read and validate ``{base}/index.json``; ``display`` is the URI named in errors."""
    path = f"{base.rstrip('/')}/{INDEX}"
    try:
        with fs.open_input_stream(path) as f:
            raw = f.read()
    except FileNotFoundError as e:
        raise ShardIndexError(
            f"{display}: no {INDEX} (pack shards with 'greenmim data pack')"
        ) from e
    except OSError as e:
        raise ShardIndexError(f"{display}/{INDEX} cannot be read: {e}") from e
    try:
        doc = json.loads(raw)
    except ValueError as e:
        raise ShardIndexError(f"{display}/{INDEX} is not JSON: {e}") from e
    return parse_index(doc, f"{display}/{INDEX}")


def has_index(fs: pafs.FileSystem, base: str) -> bool:
    info = fs.get_file_info(f"{base.rstrip('/')}/{INDEX}")
    return info.type == pafs.FileType.File


def missing_shards(fs: pafs.FileSystem, base: str, index: ShardIndex) -> list[str]:
    """Shards the index names that the prefix lacks or holds with another size (one listing)."""
    sizes = {
        i.base_name: i.size
        for i in fs.get_file_info(pafs.FileSelector(base, allow_not_found=True))
        if i.type == pafs.FileType.File
    }
    return [s.name for s in (*index.train.shards, *index.val.shards) if sizes.get(s.name) != s.size]


def assignment(num_shards: int, world: int, loaders: int) -> list[list[list[int]]]:
    """``[rank][loader]`` -> the shard positions it reads (disjoint, together all)."""
    out: list[list[list[int]]] = [[[] for _ in range(loaders)] for _ in range(world)]
    for k in range(num_shards):
        out[k % world][(k // world) % loaders].append(k)
    return out


def micro_batches_per_rank(
    split: ShardSplit, world: int, loaders: int, micro_batch: int
) -> list[int]:
    """Full micro-batches each worker's loader processes make in one epoch."""
    return [
        sum(sum(split.shards[k].count for k in mine) // micro_batch for mine in rank)
        for rank in assignment(len(split.shards), world, loaders)
    ]


def shard_steps_per_epoch(
    split: ShardSplit,
    world: int,
    loaders: int,
    micro_batch: int,
    accum: int,
    max_samples: int | None = None,
) -> int:
    """Optimiser steps per epoch over ``split``: the same on every worker."""
    per_rank = micro_batches_per_rank(split, world, loaders, micro_batch)
    steps = min(per_rank) // accum if per_rank else 0
    if max_samples is not None:
        steps = min(steps, max_samples // (world * micro_batch * accum))
    return steps
