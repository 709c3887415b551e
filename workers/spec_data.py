"""The ``data`` section of the job spec: where the images are and how they are read.

Two forms of dataset behind one ``uri``: an ImageFolder tree (``<class>/<image>``, read one
object per image) and shards packed by ``greenmim data pack`` (a prefix holding
``index.json`` and tar shards, streamed; ``workers.shard_index``). ``format: auto`` picks
shards when the prefix holds ``index.json``. Wire schema: fields are only ever added, with
defaults that keep older specs' meaning.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from .uri_policy import lexical_uri

BUILTIN_DATASETS = ("digits",)
STRICT = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class DataSpec(BaseModel):
    """Where the images are: an ImageFolder tree (``class_x/img.png``) or packed shards.

    ``uri`` is an absolute local path, ``file:///abs/path``, ``s3://bucket/prefix`` or
    ``builtin:digits`` (scikit-learn's 8x8 digits, shipped with the package). If an
    ImageFolder tree has ``train/`` and ``val/`` subfolders they are the splits; otherwise
    ``val_fraction`` of each class (a fixed, seeded choice) is held out for validation. Shards
    carry their validation split from packing (``greenmim data pack --val-fraction``).
    """

    model_config = STRICT

    uri: str = Field(
        description="absolute path, file:///path, s3://bucket/prefix or builtin:digits"
    )
    format: Literal["auto", "imagefolder", "shards"] = Field(
        "auto",
        description="auto: shards when the prefix holds index.json (greenmim data pack), "
        "else an ImageFolder tree",
    )
    val_fraction: float = Field(
        0.1, ge=0.0, le=0.5, description="held-out share when there is no val/ folder"
    )
    max_samples: int | None = Field(
        None,
        ge=1,
        le=100_000_000,
        description="use at most this many training images per epoch (demos, tests); "
        "ImageFolder: a seeded subset, shards: fewer steps per epoch",
    )
    crop_scale: tuple[float, float] = Field(
        (0.2, 1.0), description="RandomResizedCrop area range for training images"
    )
    hflip: bool = Field(True, description="random horizontal flip for training images")
    loader_workers: int = Field(
        2, ge=0, le=32, description="DataLoader processes per training worker"
    )
    split_seed: int = Field(
        0, ge=0, le=2**31 - 1, description="seed of the held-out split and max_samples subset"
    )
    shuffle_buffer: int = Field(
        1000,
        ge=1,
        le=1_000_000,
        description="shards: samples each loader process holds to shuffle the stream",
    )
    max_skipped_images: int = Field(
        100,
        ge=0,
        le=1_000_000_000,
        description="unreadable images skipped per epoch (counted, named in the log) before "
        "the job fails; 0 fails on the first",
    )

    @field_validator("uri")
    @classmethod
    def _check_uri(cls, uri: str) -> str:
        name = uri.removeprefix("builtin:")
        if uri.startswith("builtin:") and name not in BUILTIN_DATASETS:
            raise ValueError(
                f"unknown built-in dataset {name!r}; valid: {', '.join(BUILTIN_DATASETS)}"
            )
        lexical_uri(uri)  # raises naming the accepted forms
        return uri

    @field_validator("crop_scale")
    @classmethod
    def _check_scale(cls, scale: tuple[float, float]) -> tuple[float, float]:
        if not 0.0 < scale[0] <= scale[1] <= 1.0:
            raise ValueError(f"crop_scale must satisfy 0 < min <= max <= 1, got {scale}")
        return scale
