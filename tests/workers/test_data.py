"""Datasets: the built-in digits export, ImageFolder indexing and splits, S3 streaming."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_digits

from workers.data import (
    ImageFolderDataset,
    eval_transform,
    export_digits,
    index_dataset,
    shard_indices,
    train_transform,
    unnormalize,
)
from workers.spec import DataSpec
from workers.storage import open_root, upload_file


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory):
    return export_digits(tmp_path_factory.mktemp("data") / "digits")


@pytest.mark.unit
def test_digits_export_is_the_sklearn_dataset(digits_dir):
    ref = load_digits()
    files = sorted(digits_dir.glob("*/*.png"))
    assert len(files) == len(ref.images) == 1797
    assert sorted(p.name for p in digits_dir.iterdir() if p.is_dir()) == [str(d) for d in range(10)]
    for path in files[::97]:
        i = int(path.stem)
        assert int(path.parent.name) == ref.target[i]
        pixels = np.asarray(Image.open(path))
        assert pixels.shape == (8, 8)
        assert np.array_equal(pixels, np.rint(ref.images[i] * 255 / 16).astype(np.uint8))
    before = {p: p.stat().st_mtime_ns for p in files[:5]}
    assert export_digits(digits_dir) == digits_dir  # idempotent, nothing rewritten
    assert {p: p.stat().st_mtime_ns for p in files[:5]} == before


@pytest.mark.unit
def test_split_is_stratified_disjoint_and_seeded(digits_dir):
    spec = DataSpec(uri=str(digits_dir), val_fraction=0.1)
    a, b = index_dataset(spec), index_dataset(spec)
    c = index_dataset(spec.model_copy(update={"split_seed": 1}))
    assert a == b and a.train != c.train
    assert not set(a.train.paths) & set(a.val.paths)
    assert len(a.train) + len(a.val) == 1797
    counts = np.bincount(a.val.labels, minlength=10)
    totals = np.bincount(a.val.labels + a.train.labels, minlength=10)
    assert np.array_equal(counts, np.rint(totals * 0.1).astype(int))
    sub = index_dataset(DataSpec(uri=str(digits_dir), max_samples=100))
    assert len(sub.train) == 100 and set(sub.train.paths) <= set(
        index_dataset(DataSpec(uri=str(digits_dir))).train.paths
    )


@pytest.mark.unit
def test_train_val_folders_are_used_as_given(tmp_path):
    for split, n in (("train", 3), ("val", 2)):
        for cls in ("cat", "dog"):
            d = tmp_path / split / cls
            d.mkdir(parents=True)
            for i in range(n):
                Image.new("RGB", (8, 8), (i, 0, 0)).save(d / f"{i}.png")
    (tmp_path / "train" / "cat" / "notes.txt").write_text("not an image")
    splits = index_dataset(DataSpec(uri=f"file://{tmp_path}"))
    assert (
        splits.train.classes == ("cat", "dog") and len(splits.train) == 6 and len(splits.val) == 4
    )
    assert splits.val.labels == (0, 0, 1, 1)
    (tmp_path / "val" / "bird").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "val" / "bird" / "0.png")
    with pytest.raises(ValueError, match="bird"):
        index_dataset(DataSpec(uri=str(tmp_path)))
    with pytest.raises(ValueError, match="no images"):
        index_dataset(DataSpec(uri=str(tmp_path / "train" / "cat")))


@pytest.mark.unit
def test_transforms(digits_dir):
    splits = index_dataset(DataSpec(uri=str(digits_dir)))
    ds = ImageFolderDataset(splits.fs_uri, splits.val, eval_transform(64))
    x, y = ds[0]
    assert x.shape == (3, 64, 64) and y == splits.val.labels[0]
    # eval: deterministic, grey in all three channels, and unnormalize inverts Normalize
    assert torch.equal(x, ds[0][0])
    img = unnormalize(x[None])[0]
    assert torch.allclose(img[0], img[1], atol=1e-6) and img.min() >= 0 and img.max() <= 1
    aug = ImageFolderDataset(
        splits.fs_uri, splits.train, train_transform(64, DataSpec(uri="builtin:digits"))
    )
    torch.manual_seed(0)
    a = aug[0][0]
    torch.manual_seed(0)
    assert torch.equal(a, aug[0][0])  # augmentation is reproducible from the torch seed


@pytest.mark.unit
def test_shards_partition_the_indices():
    for n, world in ((10, 3), (7, 2), (1, 4)):
        shards = [shard_indices(n, r, world) for r in range(world)]
        assert sorted(i for s in shards for i in s) == list(range(n))


@pytest.mark.service
def test_imagefolder_streams_from_s3(digits_dir, s3_settings, s3_prefix, tmp_path):
    """Upload a few classes to the S3 server; the S3 index and samples equal the local ones."""
    root = open_root(s3_prefix, s3_settings)
    local = tmp_path / "small"
    for cls in ("3", "7"):
        (local / cls).mkdir(parents=True)
        for p in sorted((digits_dir / cls).glob("*.png"))[:20]:
            (local / cls / p.name).write_bytes(p.read_bytes())
            upload_file(root.fs, str(p), root.path("ds", cls, p.name))
    spec_s3 = DataSpec(uri=root.to_uri(root.path("ds")), val_fraction=0.25)
    spec_local = DataSpec(uri=str(local), val_fraction=0.25)
    s3_splits, local_splits = index_dataset(spec_s3, s3_settings), index_dataset(spec_local)
    assert s3_splits.train.labels == local_splits.train.labels
    assert [p.rsplit("/", 2)[-2:] for p in s3_splits.val.paths] == [
        p.rsplit("/", 2)[-2:] for p in local_splits.val.paths
    ]

    remote = ImageFolderDataset(s3_splits.fs_uri, s3_splits.val, eval_transform(64), s3_settings)
    here = ImageFolderDataset(local_splits.fs_uri, local_splits.val, eval_transform(64))
    # through a DataLoader worker process too (the filesystem is reopened after pickling)
    loader = torch.utils.data.DataLoader(remote, batch_size=5, num_workers=1)
    got = torch.cat([x for x, _ in loader])
    want = torch.stack([here[i][0] for i in range(len(here))])
    assert torch.equal(got, want)
