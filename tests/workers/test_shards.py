"""Packed shards without Ray: packing round trip (checked with Python's own tarfile and
hashlib), the split over workers x loader processes (every sample exactly once per epoch,
counted through real DataLoader processes), order as a function of (seed, epoch, rank) only,
and the index's guards."""

from __future__ import annotations

import collections
import hashlib
import json
import tarfile
from pathlib import Path

import pytest
from torch.utils.data import DataLoader
from torchvision import transforms as T

from workers.batching import PlanningCollate
from workers.imagefolder import index_dataset
from workers.packing import PackOptions, pack
from workers.shard_index import (
    ShardIndexError,
    assignment,
    parse_index,
    read_index,
    shard_steps_per_epoch,
)
from workers.shards import ShardMembers, ShardStream
from workers.sources import open_source
from workers.spec_data import DataSpec
from workers.storage import open_root

from .datasets import identity_folder, image_id, write_folder

pytestmark = pytest.mark.unit

CLASSES, PER_CLASS = 3, 40  # 120 images; 12 held out -> 108 train


@pytest.fixture(scope="module")
def packed(tmp_path_factory) -> dict:
    d = tmp_path_factory.mktemp("shards")
    files = identity_folder(CLASSES, PER_CLASS)
    write_folder(str(d / "folder"), files)
    index = pack(str(d / "folder"), str(d / "shards"), PackOptions(shard_size=27))
    return {"dir": d, "files": files, "index": index, "uri": str(d / "shards")}


def stream(packed, rank, world, loaders, micro, buffer=16) -> ShardStream:
    split = packed["index"].train
    return ShardStream(
        packed["uri"], split, rank, world, loaders, micro, T.ToTensor(), PlanningCollate(), buffer
    )


def epoch_ids(s: ShardStream, epoch_seed: int, loaders: int) -> list[int]:
    s.set_epoch(epoch_seed)
    loader = DataLoader(s, batch_size=None, num_workers=loaders)
    return [image_id(im) for b in loader for im in b.images]


def test_pack_round_trip(packed) -> None:
    d, index = packed["dir"], packed["index"]
    assert index.classes == ("c0", "c1", "c2")
    doc = json.loads((d / "shards" / "index.json").read_text())
    assert parse_index(doc, "x") == index
    seen: dict[str, bytes] = {}
    for split in (index.train, index.val):
        for shard in split.shards:
            raw = (d / "shards" / shard.name).read_bytes()
            assert (len(raw), hashlib.sha256(raw).hexdigest()) == (shard.size, shard.sha256)
            with tarfile.open(d / "shards" / shard.name) as tf:
                names = tf.getnames()
                members = {n.split(".", 1)[0] for n in names}
                assert len(members) == shard.count
                for key in members:
                    path = tf.extractfile(f"{key}.path").read().decode()
                    label = int(tf.extractfile(f"{key}.cls").read())
                    assert path not in seen
                    seen[path] = tf.extractfile(f"{key}.png").read()
                    assert index.classes[label] == path.split("/")[0]
    assert seen == packed["files"]  # every image once, bytes unchanged
    # the held-out split is the one a job over the ImageFolder uses
    folder = index_dataset(DataSpec(uri=str(d / "folder")))
    val_paths = {m.path for m in index.val.members}
    assert val_paths == {p.split("/folder/")[1] for p in folder.val.paths}
    assert index.val.class_counts == (4, 4, 4)
    # training images are shuffled across shards: the first shard mixes the classes
    with tarfile.open(d / "shards" / index.train.shards[0].name) as tf:
        labels = {tf.extractfile(n).read() for n in tf.getnames() if n.endswith(".cls")}
    assert len(labels) == CLASSES


def test_validation_members_read_back_by_byte_range(packed) -> None:
    val = ShardMembers(packed["uri"], packed["index"].val, T.ToTensor())
    files = packed["files"]
    order = sorted(files)
    for i, m in enumerate(packed["index"].val.members):
        image, label = val[i]
        assert image_id(image) == order.index(m.path)  # identity images are numbered in order
        assert packed["index"].classes[label] == m.path.split("/")[0]


@pytest.mark.parametrize("shard_size", [27, 20])
def test_two_workers_two_loaders_see_every_sample_once(tmp_path, packed, shard_size) -> None:
    uri = str(tmp_path / "s")
    index = pack(str(packed["dir"] / "folder"), uri, PackOptions(shard_size=shard_size))
    p = {**packed, "uri": uri, "index": index}
    micro = 9
    counts: collections.Counter[int] = collections.Counter()
    per_rank = []
    for rank in range(2):
        ids = epoch_ids(stream(p, rank, 2, 2, micro), 1234 + rank, loaders=2)
        per_rank.append(len(ids))
        counts.update(ids)
    assert max(counts.values()) == 1  # no sample twice, across workers and loader processes
    steps = shard_steps_per_epoch(index.train, 2, 2, micro, 1)
    assert min(per_rank) >= steps * micro  # every worker can make the epoch's steps
    train_ids = {
        sorted(p["files"]).index(f"c{c}/{i:04d}.png") for c in range(3) for i in range(PER_CLASS)
    } - {sorted(p["files"]).index(m.path) for m in index.val.members}
    if shard_size == 27:  # 4 shards of 27, a multiple of micro: nothing dropped
        assert set(counts) == train_ids and steps * micro * 2 == len(train_ids)
    else:  # 6 shards (20, ..., 8): the partial micro-batches of each process are dropped
        assert set(counts) < train_ids


def test_assignment_is_disjoint_and_complete() -> None:
    for n, w, ell in [(7, 2, 2), (16, 4, 3), (3, 4, 2), (1, 1, 1)]:
        parts = [k for rank in assignment(n, w, ell) for mine in rank for k in mine]
        assert sorted(parts) == list(range(n))


def test_order_depends_on_seed_epoch_rank_only(packed) -> None:
    """A resumed worker (a new stream object, new processes) replays the epoch's order."""
    uninterrupted = stream(packed, 0, 2, 2, 9)
    runs = [epoch_ids(uninterrupted, seed, 2) for seed in (11, 12, 13)]
    resumed = epoch_ids(stream(packed, 0, 2, 2, 9), 13, 2)
    assert resumed == runs[2]
    assert runs[0] != runs[1] and sorted(runs[0]) == sorted(runs[1])  # reshuffled per epoch
    assert runs[0] != sorted(runs[0])  # and shuffled at all
    assert epoch_ids(stream(packed, 0, 2, 2, 9), 11, 0) != runs[0]  # layout is part of it


def test_index_names_only_files_in_its_prefix(packed) -> None:
    doc = packed["index"].to_json()
    for bad in ["../other/train-000000.tar", "a/b.tar", "/abs.tar", "x.tar.gz", ".hidden.tar"]:
        broken = json.loads(json.dumps(doc))
        broken["splits"]["train"]["shards"][0]["name"] = bad
        with pytest.raises(ShardIndexError, match="not a plain .tar file name"):
            parse_index(broken, "idx")
    broken = json.loads(json.dumps(doc))
    broken["splits"]["train"]["class_counts"][0] += 1
    with pytest.raises(ShardIndexError, match="do not add up"):
        parse_index(broken, "idx")


def test_missing_shard_or_index_refused(tmp_path, packed) -> None:
    uri = tmp_path / "copy"
    uri.mkdir()
    for f in Path(packed["uri"]).iterdir():
        (uri / f.name).write_bytes(f.read_bytes())
    (uri / packed["index"].train.shards[1].name).unlink()
    with pytest.raises(ValueError, match="train-000001.tar"):
        open_source(DataSpec(uri=str(uri)))
    (uri / "index.json").write_text("{not json")
    with pytest.raises(ShardIndexError, match="not JSON"):
        read_index(open_root(str(uri)).fs, str(uri), str(uri))
    # format: shards on a plain folder says what is missing
    with pytest.raises(ShardIndexError, match="no index.json"):
        open_source(DataSpec(uri=str(packed["dir"] / "folder"), format="shards"))


def test_truncated_shard_counts_its_missing_images(tmp_path, packed) -> None:
    uri = tmp_path / "cut"
    uri.mkdir()
    for f in Path(packed["uri"]).iterdir():
        (uri / f.name).write_bytes(f.read_bytes())
    shard = packed["index"].train.shards[0]
    raw = (uri / shard.name).read_bytes()
    (uri / shard.name).write_bytes(raw[: len(raw) // 2 + 100])  # cut inside a member
    s = ShardStream(str(uri), packed["index"].train, 0, 1, 1, 9, T.ToTensor(), PlanningCollate(), 4)
    s.set_epoch(5)
    batches = list(s)
    ids = [image_id(im) for b in batches for im in b.images]
    skipped = sum(b.num_skipped for b in batches)
    names = [n for b in batches for n in b.skipped]
    full = [b for b in batches if len(b.images)]
    assert len(full) == packed["index"].train.count // 9  # a second pass filled the gap
    assert len(set(ids)) + skipped > packed["index"].train.count - 9  # pass 1: all but a tail
    assert 0 < skipped < shard.count
    assert len(names) == 1 and shard.name in names[0] and "not read" in names[0]
