"""Response bodies of the HTTP API (the request body is ``workers.spec.JobSpec``): the wire
contract the server answers with and the client SDK parses. No server imports here."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, Field

from service.states import JobState


class Problem(BaseModel):
    """RFC 9457 problem details."""

    type: str
    title: str
    status: int
    detail: str
    instance: str | None = None
    errors: list[dict[str, Any]] | None = None


class Progress(BaseModel):
    epoch: int | None = Field(None, description="last epoch reported (0-based)")
    step: int | None = Field(None, description="optimiser steps done")
    epochs: int = Field(description="epochs requested")


class JobError(BaseModel):
    type: str
    message: str


class JobOut(BaseModel):
    id: str
    kind: str
    model: str
    state: JobState
    created_at: datetime
    updated_at: datetime
    submitted_at: datetime | None
    started_at: datetime | None
    ended_at: datetime | None
    attempt: int = Field(
        1, description="1 + the times the job was submitted again after its Ray job vanished"
    )
    progress: Progress
    latest_metrics: dict[str, Any] | None = Field(
        None, description="the newest metric record of each type ('step', 'epoch', ...)"
    )
    error: JobError | None = None
    spec: dict[str, Any]
    links: dict[str, str]


class JobEventOut(BaseModel):
    at: datetime
    from_state: JobState | None = Field(description="null for the submission")
    to_state: JobState
    attempt: int | None = Field(description="the attempt the change belongs to")
    reason: str | None


class JobEvents(BaseModel):
    items: list[JobEventOut] = Field(description="state changes and new attempts, oldest first")


class JobList(BaseModel):
    items: list[JobOut]
    next_cursor: str | None = Field(
        None, description="pass as ?cursor= for the next page; null at the end"
    )


class MetricsPage(BaseModel):
    items: list[dict[str, Any]] = Field(description="records: type, step, epoch, time and values")
    next_after_step: int | None = Field(description="pass as ?after_step= to continue")
    state: JobState


class LogsPage(BaseModel):
    source: Literal["driver", "worker"]
    offset: int
    next_offset: int
    text: str
    complete: bool = Field(description="the job is finished and no more text will come")


class CheckpointFileOut(BaseModel):
    path: str
    size: int
    sha256: str


class CheckpointOut(BaseModel):
    name: str
    epoch: int | None
    step: int | None
    size: int = Field(description="bytes over all files")
    sha256: str = Field(description="sha256 of the primary file (what a download returns)")
    created: datetime | None
    primary_file: str
    files: list[CheckpointFileOut]
    download: str


class CheckpointList(BaseModel):
    items: list[CheckpointOut]


class PreviewOut(BaseModel):
    name: str
    epoch: int | None = Field(
        description="epochs done when it was drawn; null for the end-of-job previews"
    )
    size: int = Field(description="bytes")
    url: str = Field(description="the PNG: original | masked input | reconstruction")


class PreviewList(BaseModel):
    items: list[PreviewOut] = Field(description="by epoch, then sample; end-of-job ones last")


class DownloadLink(BaseModel):
    url: str = Field(
        description="where the file is: a short-lived presigned storage URL (fetch it without "
        "the API key), or this API's download route (send the key)"
    )
    presigned: bool


class ModelOut(BaseModel):
    name: str
    defaults: dict[str, Any]


class ModelList(BaseModel):
    items: list[ModelOut]


class Health(BaseModel):
    status: Literal["ok", "unavailable"]
    checks: dict[str, str] = Field(default_factory=dict)
