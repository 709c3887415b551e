"""Where reconstruction previews live under a job prefix, and how to list them.

``previews/sample_NN.png`` are written at the end of a pretraining job,
``previews/epoch-EEEE/sample_NN.png`` after each epoch (EEEE = epochs done): the same images
under the same mask, so the series shows the reconstruction improve. Each PNG is
original | masked input | reconstruction (``workers.export.preview_strips``).
"""

from __future__ import annotations

import re

import pyarrow.fs as pafs

from .artifacts import PREVIEWS
from .storage import list_files

_REL_RE = re.compile(r"(?:epoch-(\d{4})/)?(sample_\d{2}\.png)")


def preview_dir(job_prefix: str, epoch: int | None) -> str:
    base = f"{job_prefix}/{PREVIEWS}"
    return base if epoch is None else f"{base}/epoch-{epoch:04d}"


def list_preview_files(
    fs: pafs.FileSystem, job_prefix: str
) -> list[tuple[int | None, pafs.FileInfo]]:
    """Every preview PNG as (epoch, file info), epoch None for the end-of-job ones; sorted by
    path, so by epoch then sample with the end-of-job ones last."""
    base = f"{job_prefix}/{PREVIEWS}"
    out: list[tuple[int | None, pafs.FileInfo]] = []
    for info in list_files(fs, base, recursive=True):
        m = _REL_RE.fullmatch(info.path[len(base) + 1 :])
        if m and info.type == pafs.FileType.File:
            out.append((int(m[1]) if m[1] else None, info))
    return sorted(out, key=lambda e: (e[0] is None, e[0] or 0, e[1].path))
