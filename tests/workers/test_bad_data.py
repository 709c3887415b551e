"""Bad data: every image mode PIL opens decodes to the right 8-bit RGB; unreadable images
(corrupt, truncated, empty, not an image) are skipped, counted and named, up to the spec's
limit; datasets a job cannot use (missing, empty, one class for fine-tuning) are refused
before anything runs, naming ``data.uri``."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from workers.batching import PlanningCollate, SeededDataset
from workers.data import ImageFolderDataset, index_dataset
from workers.images import DataError, SkipBudget, UnreadableImage, decode_rgb, to_rgb
from workers.packing import PackOptions, pack
from workers.run import SpecError, prepare
from workers.sources import submit_problems
from workers.spec import DataSpec, JobSpec

from .conftest import tiny_spec
from .datasets import colour_folder, png, write_folder

pytestmark = pytest.mark.unit


def encode(img: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def as_array(img: Image.Image) -> np.ndarray:
    return np.asarray(img, dtype=np.int32)


def test_16_bit_greyscale_png_is_scaled_not_saturated() -> None:
    ramp = (np.arange(64 * 64, dtype=np.uint32).reshape(64, 64) * 16).astype(np.uint16)
    raw = encode(Image.fromarray(ramp))  # a 16-bit greyscale PNG (mode I;16 or I)
    out = as_array(decode_rgb(raw, "ramp.png"))
    want = np.rint(ramp / 257.0).astype(np.int32)
    assert out.shape == (64, 64, 3)
    assert np.abs(out - want[..., None]).max() <= 1
    assert (out == 255).mean() < 0.01  # the old convert("RGB") made ~98 % of it 255


def test_16_bit_png_reaches_training_scaled(tmp_path) -> None:
    ramp = (np.arange(32 * 32, dtype=np.uint32).reshape(32, 32) * 64).astype(np.uint16)
    files = {"a/0.png": encode(Image.fromarray(ramp)), "b/0.png": encode(Image.fromarray(ramp))}
    write_folder(str(tmp_path / "d"), files)
    splits = index_dataset(DataSpec(uri=str(tmp_path / "d"), val_fraction=0.0))
    image, _ = ImageFolderDataset(splits.fs_uri, splits.train, as_array)[0]
    assert np.abs(image - np.rint(ramp / 257.0)[..., None]).max() <= 1


def test_palette_alpha_cmyk_and_other_modes() -> None:
    rgb = np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    # palette without transparency: the palette's colours
    pal = Image.fromarray(rgb).quantize(16)
    assert np.array_equal(as_array(decode_rgb(encode(pal), "p.png")), as_array(pal.convert("RGB")))
    # palette with a transparent index: those pixels become the white background
    pal.info["transparency"] = 0
    out = as_array(decode_rgb(encode(pal), "pt.png"))
    idx = np.asarray(pal)
    assert (out[idx == 0] == 255).all() and (idx == 0).any()
    # RGBA: composited over white, alpha 128 -> halfway
    rgba = np.dstack([np.zeros((8, 8, 3), np.uint8), np.full((8, 8), 128, np.uint8)])
    assert np.abs(as_array(decode_rgb(png(rgba, "RGBA"), "a.png")) - 127).max() <= 1
    # LA likewise
    la = Image.fromarray(np.dstack([np.zeros((8, 8), np.uint8), np.zeros((8, 8), np.uint8)]), "LA")
    assert (as_array(to_rgb(la)) == 255).all()
    # CMYK (JPEG) -> RGB close to PIL's own conversion of the decoded pixels
    cmyk = Image.fromarray(rgb).convert("CMYK")
    got = as_array(decode_rgb(encode(cmyk, "JPEG"), "c.jpg"))
    assert got.shape == (8, 8, 3)
    # 1-bit, float
    assert set(np.unique(as_array(to_rgb(Image.new("1", (4, 4), 1))))) == {255}
    f = Image.fromarray(np.full((4, 4), 0.5, np.float32), "F")
    assert (as_array(to_rgb(f)) == 128).all()


def test_exif_orientation_is_applied() -> None:
    img = Image.new("RGB", (6, 2), (10, 20, 30))
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90 degrees
    buf = io.BytesIO()
    img.save(buf, format="JPEG", exif=exif)
    assert decode_rgb(buf.getvalue(), "r.jpg").size == (2, 6)


BAD = {
    "red/corrupt.png": b"\x89PNG\r\n\x1a\n" + b"\x00garbage" * 10,
    "red/empty.jpg": b"",
    "red/text.jpg": b"this is not an image",
}


@pytest.fixture
def bad_folder(tmp_path):
    files = colour_folder(6)
    good = files["red/0000.png"]
    files["red/truncated.png"] = good[: len(good) // 2]
    files.update(BAD)
    write_folder(str(tmp_path / "bad"), files)
    return tmp_path / "bad"


def test_unreadable_images_are_skipped_named_and_counted(bad_folder) -> None:
    splits = index_dataset(DataSpec(uri=str(bad_folder), val_fraction=0.0))
    ds = ImageFolderDataset(splits.fs_uri, splits.train, lambda im: as_array(im))
    seeded = SeededDataset(ds)
    collate = PlanningCollate()
    bad = {p for p in splits.train.paths if p.rsplit("/", 1)[1] in {
        "corrupt.png", "empty.jpg", "text.jpg", "truncated.png"}}  # fmt: skip
    samples = [seeded[(i, 0)] for i in range(len(ds))]
    batch = collate(samples)
    assert batch.num_skipped == len(bad) == 4
    named = " ".join(batch.skipped)
    assert all(p in named for p in bad)
    assert "UnidentifiedImageError" in named or "OSError" in named
    assert len(batch.images) == len(ds)  # replaced by the next readable image: batches stay full


def test_skip_budget_fails_once_over_the_limit_naming_files() -> None:
    budget = SkipBudget(limit=2)
    budget.note(("s3://b/x/1.jpg: OSError: truncated",))
    budget.add_global(2)
    with pytest.raises(
        DataError, match=r"3 unreadable images in one epoch.*max_skipped_images=2.*1\.jpg"
    ):
        budget.add_global(1)


def test_decode_error_names_the_file() -> None:
    with pytest.raises(UnreadableImage, match="cat/7.jpg"):
        decode_rgb(b"nope", "cat/7.jpg")


def ft(uri: str, **data) -> JobSpec:
    return JobSpec.model_validate(
        tiny_spec("finetune", data={"uri": uri, "max_samples": None, **data},
                  finetune={"init_from": "scratch"})
    )  # fmt: skip


def pre(uri: str) -> JobSpec:
    return JobSpec.model_validate(tiny_spec("pretrain", data={"uri": uri, "max_samples": None}))


def test_submit_refuses_missing_empty_and_one_class_datasets(tmp_path, bad_folder) -> None:
    (tmp_path / "empty").mkdir()
    one = tmp_path / "one"
    write_folder(str(one), {f"only/{i}.png": png(np.zeros((4, 4, 3), np.uint8)) for i in range(64)})
    cases = {
        str(tmp_path / "missing"): "does not exist",
        str(tmp_path / "empty"): "is empty",
        str(one): "at least 2 classes",
    }
    for uri, msg in cases.items():
        problems = submit_problems(ft(uri), uri)
        assert problems and problems[0][0] == "data.uri" and msg in problems[0][1], problems
    assert submit_problems(pre(str(one)), str(one)) == []  # pretraining needs no labels
    assert submit_problems(ft(str(bad_folder)), str(bad_folder)) == []
    # shards: the index is read whole at submit
    shards = tmp_path / "one-shards"
    pack(str(one), str(shards), PackOptions(shard_size=16))
    assert submit_problems(ft(str(shards)), str(shards))[0][0] == "data.uri"
    (shards / "index.json").write_text("[]")
    assert "not a greenmim-shards index" in submit_problems(pre(str(shards)), str(shards))[0][1]
    assert "no index.json" in submit_problems(ft(str(one), format="shards"), str(one))[0][1]


def test_workers_refuse_a_one_class_finetune(tmp_path) -> None:
    one = tmp_path / "one"
    write_folder(str(one), {f"only/{i}.png": png(np.zeros((4, 4, 3), np.uint8)) for i in range(80)})
    with pytest.raises(SpecError) as e:
        prepare(ft(str(one)), str(tmp_path / "root"), "t", "j")
    assert e.value.field == "data.uri" and "at least 2 classes" in e.value.message
