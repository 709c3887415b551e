"""Domain records as the API's response bodies (``service.schemas``)."""

from __future__ import annotations

from service.schemas import (
    CheckpointFileOut,
    CheckpointOut,
    JobError,
    JobEventOut,
    JobOut,
    Progress,
)
from service.server.adapters.db import Job, JobEvent
from service.states import JobState
from workers.artifacts import CheckpointInfo


def job_out(job: Job) -> JobOut:
    base = f"/v1/jobs/{job.id}"
    error = (
        JobError(type=job.failure_type, message=job.failure_message or "")
        if job.failure_type
        else None
    )
    return JobOut(
        id=job.id,
        kind=job.kind,
        model=job.model,
        state=JobState(job.state),
        created_at=job.created_at,
        updated_at=job.updated_at,
        submitted_at=job.submitted_at,
        started_at=job.started_at,
        ended_at=job.ended_at,
        attempt=job.attempt or 1,
        progress=Progress(epoch=job.epoch, step=job.step, epochs=int(job.spec["train"]["epochs"])),
        latest_metrics=job.latest_metrics,
        error=error,
        spec=job.spec,
        links={
            "self": base,
            "metrics": f"{base}/metrics",
            "logs": f"{base}/logs",
            "checkpoints": f"{base}/checkpoints",
            "cancel": f"{base}/cancel",
            "events": f"{base}/events",
        },
    )


def checkpoint_out(job_id: str, c: CheckpointInfo) -> CheckpointOut:
    return CheckpointOut(
        name=c.name,
        epoch=c.epoch,
        step=c.step,
        size=c.size,
        sha256=c.sha256,
        created=c.created,
        primary_file=c.primary.path,
        files=[CheckpointFileOut(path=f.path, size=f.size, sha256=f.sha256) for f in c.files],
        download=f"/v1/jobs/{job_id}/checkpoints/{c.name}",
    )


def event_out(e: JobEvent) -> JobEventOut:
    return JobEventOut(
        at=e.at,
        from_state=JobState(e.from_state) if e.from_state else None,
        to_state=JobState(e.to_state),
        attempt=e.attempt,
        reason=e.reason,
    )
