"""Reads the dashboard needs beyond ``JobService``: reconstruction previews and a
download link a browser can follow. Each checks the tenant first
(``JobService.get``), so another tenant's job is a ``NotFound`` here as everywhere."""

from __future__ import annotations

from service.server.domain.jobs import JobService
from service.server.domain.ports import PreviewInfo, Redirect


def previews(jobs: JobService, tenant: str, job_id: str) -> list[PreviewInfo]:
    jobs.get(tenant, job_id)
    return jobs.artifacts.list_previews(tenant, job_id)


def preview_png(jobs: JobService, tenant: str, job_id: str, name: str) -> bytes:
    jobs.get(tenant, job_id)
    return jobs.artifacts.read_preview(tenant, job_id, name)


def download_link(
    jobs: JobService, tenant: str, job_id: str, name: str, file: str | None
) -> str | None:
    """The storage's presigned URL for the file, or None when the API streams it itself."""
    target = jobs.open_checkpoint(tenant, job_id, name, file)
    if isinstance(target, Redirect):
        return target.url
    close = getattr(target.chunks, "close", None)
    if close is not None:
        close()  # a generator that never started: nothing was opened
    return None
