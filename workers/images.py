"""Image bytes to 8-bit RGB, for every mode PIL opens, and the record of images that could not
be read.

``Image.open(...).convert("RGB")`` is wrong for several modes: 16-bit greyscale (``I;16``,
``I``) is clipped at 255 instead of scaled (a 16-bit PNG comes out almost white), alpha is
dropped leaving whatever colour the transparent pixels happen to hold, and EXIF rotation is
ignored. ``decode_rgb`` scales integer modes by their bit depth, composites alpha over white,
and applies the EXIF orientation. Decoding is forced (``load``), so a truncated file fails
here, with its name, and not later inside a transform.
"""

from __future__ import annotations

import io
import json
import logging
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageOps

logger = logging.getLogger(__name__)

_WIDE_INT = {"I;16": 65535, "I;16L": 65535, "I;16B": 65535, "I;16N": 65535, "I": 65535}
_ALPHA = ("RGBA", "LA", "PA", "RGBa", "La")
BACKGROUND = (255, 255, 255)  # alpha is composited over white


class DataError(RuntimeError):
    """The data cannot feed the job (too many unreadable images, shards shorter than their
    index). Not retried: the same data fails the same way. The message names the files."""


class UnreadableImage(ValueError):
    """One image that cannot be decoded; ``where`` names it (a path or ``shard:member``)."""

    def __init__(self, where: str, reason: str):
        super().__init__(f"{where}: {reason}")
        self.where, self.reason = where, reason


def to_rgb(img: Image.Image) -> Image.Image:
    """``img`` (any mode) as 8-bit RGB, scaled by its bit depth, alpha over white."""
    mode = img.mode
    if mode in _WIDE_INT:
        # integer greyscale wider than 8 bits: scale to 0..255 (PIL's convert clips instead)
        a = np.asarray(img, dtype=np.float64) * (255.0 / _WIDE_INT[mode])
        return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8)).convert("RGB")
    if mode == "F":
        a = np.asarray(img, dtype=np.float64)
        a = np.nan_to_num(a, nan=0.0, posinf=0.0, neginf=0.0)
        top = 1.0 if a.size and float(a.max()) <= 1.0 else 255.0
        return Image.fromarray(np.clip(np.rint(a * 255.0 / top), 0, 255).astype(np.uint8)).convert(
            "RGB"
        )
    if mode == "P" and "transparency" in img.info:
        img, mode = img.convert("RGBA"), "RGBA"
    if mode in _ALPHA:
        rgba = img.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (*BACKGROUND, 255))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    return img if mode == "RGB" else img.convert("RGB")  # L, 1, P, CMYK, YCbCr, LAB, HSV


def decode_rgb(raw: bytes, where: str) -> Image.Image:
    """Decode ``raw`` fully to 8-bit RGB; raise ``UnreadableImage`` naming ``where``."""
    try:
        with Image.open(io.BytesIO(raw)) as opened:
            opened.load()
            return to_rgb(ImageOps.exif_transpose(opened) or opened)
    # decoders of arbitrary bytes raise many types (OSError, SyntaxError, struct.error,
    # DecompressionBombError, ...): every one of them means this file is unusable
    except Exception as e:  # noqa: BLE001
        raise UnreadableImage(where, f"{type(e).__name__}: {e}") from e


@dataclass
class SkipLog:
    """Images skipped in one process since the last ``drain``: their names and reasons, and
    how many (a truncated shard is one name for all the images it lacks)."""

    names: list[str] = field(default_factory=list)
    count: int = 0

    def add(self, err: UnreadableImage, count: int = 1) -> None:
        self.names.append(str(err))
        self.count += count

    def drain(self) -> tuple[tuple[str, ...], int]:
        out = (tuple(self.names), self.count)
        self.names, self.count = [], 0
        return out


@dataclass
class SkipBudget:
    """Counts the skipped images of an epoch (all workers) against ``limit``; keeps the first
    names for the error message and logs the first ones it sees."""

    limit: int
    total: int = 0
    first: list[str] = field(default_factory=list)
    keep: int = 20

    def note(self, names: list[str] | tuple[str, ...], log: bool = True) -> None:
        """Names of skipped images: the first ``keep`` are kept (and logged)."""
        for e in names:
            if len(self.first) < self.keep:
                self.first.append(e)
                if log:
                    logger.warning("skipped unreadable image %s", e)

    def add_global(self, count: int) -> None:
        """Add ``count`` skips (summed over the workers); raise ``DataError`` over the limit."""
        self.total += count
        if self.total > self.limit:
            names = "; ".join(self.first)
            raise DataError(
                f"{self.total} unreadable images in one epoch, more than "
                f"data.max_skipped_images={self.limit}; the first: {names}"
            )


DATA_ERRORS = "data_errors"  # under the job prefix: one record per worker that hit a DataError


def record_data_error(fs, job: str, rank: int, err: DataError) -> None:
    """Leave ``err`` for the driver (``data_errors/rank-RRRRR.json``): the workers then end
    normally, so Ray Train does not retry, and the driver fails the job once."""
    from .storage import write_bytes

    doc = {"type": "DataError", "rank": rank, "message": str(err)}
    write_bytes(fs, f"{job}/{DATA_ERRORS}/rank-{rank:05d}.json", json.dumps(doc).encode())


def read_data_errors(fs, job: str) -> list[str]:
    """Messages the workers left (``record_data_error``), rank order."""
    from .storage import list_files, read_bytes

    found = [i.path for i in list_files(fs, f"{job}/{DATA_ERRORS}") if i.path.endswith(".json")]
    return [json.loads(read_bytes(fs, p))["message"] for p in sorted(found)]


def clear_data_errors(fs, job: str) -> None:
    from .storage import delete_dir

    delete_dir(fs, f"{job}/{DATA_ERRORS}")
