"""Small generated ImageFolders for the data tests, written to a local folder or S3."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from workers.storage import S3Settings, open_root, write_bytes


def png(array: np.ndarray, mode: str | None = None) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array, mode=mode).save(buf, format="PNG")
    return buf.getvalue()


def identity_image(n: int, size: int = 4) -> bytes:
    """A constant image whose red and green values spell ``n`` (``image_id`` reads it back)."""
    return png(np.full((size, size, 3), [n % 256, n // 256, 7], np.uint8))


def image_id(chw) -> int:
    """``n`` of an ``identity_image`` after ``ToTensor`` (C, H, W in [0, 1])."""
    r, g = (int(round(float(chw[c, 0, 0]) * 255)) for c in (0, 1))
    return r + 256 * g


def colour_image(label: int, rng: np.random.Generator, size: int = 16) -> bytes:
    """Noise tinted by class: a task a micro model learns in a few epochs, flip- and
    crop-invariant (class k of 4: red, green, blue, grey dominant)."""
    base = rng.integers(0, 96, (size, size, 3))
    if label < 3:
        base[..., label] += 150
    else:
        base += 100
    return png(np.clip(base, 0, 255).astype(np.uint8))


def write_folder(
    uri: str,
    files: dict[str, bytes],
    s3: S3Settings | None = None,
) -> None:
    """``files``: relative path -> bytes, written under ``uri`` (local or s3://)."""
    root = open_root(uri, s3)
    for rel, data in files.items():
        write_bytes(root.fs, root.path(*rel.split("/")), data)


def identity_folder(classes: int, per_class: int, size: int = 4) -> dict[str, bytes]:
    files, n = {}, 0
    for c in range(classes):
        for i in range(per_class):
            files[f"c{c}/{i:04d}.png"] = identity_image(n, size)
            n += 1
    return files


def colour_folder(per_class: int, seed: int = 0) -> dict[str, bytes]:
    rng = np.random.default_rng(seed)
    return {
        f"{name}/{i:04d}.png": colour_image(c, rng)
        for c, name in enumerate(("red", "green", "blue", "grey"))
        for i in range(per_class)
    }
