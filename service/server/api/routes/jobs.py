"""``/v1/jobs``: thin routes over ``JobService``."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Annotated, Any, Literal
from urllib.parse import quote

from fastapi import APIRouter, Header, Path, Query, Request, Response
from fastapi.responses import RedirectResponse, StreamingResponse
from sqlalchemy.exc import DBAPIError
from starlette.concurrency import run_in_threadpool

from service.schemas import (
    CheckpointList,
    DownloadLink,
    JobEvents,
    JobList,
    JobOut,
    LogsPage,
    MetricsPage,
    Problem,
)
from service.server.api.deps import CallerDep, ContextDep, JobsDep
from service.server.api.problems import database_unavailable
from service.server.api.views import checkpoint_out, event_out, job_out
from service.server.domain import dashboard
from service.server.domain.jobs import JobService
from service.server.domain.ports import Redirect
from service.states import JobState
from workers.spec import JobSpec

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])

# 401 (every route) and 413 (every POST) are added to the document by service.server.api.openapi
_PROBLEMS: dict[int | str, dict[str, Any]] = {
    404: {"model": Problem, "description": "no such job in your tenant"},
}
JobId = Annotated[str, Path(min_length=1, max_length=64, description="a job id (gm-...)")]


@router.post(
    "",
    status_code=202,
    response_model=JobOut,
    summary="Submit a job",
    responses={
        400: {"model": Problem, "description": "the body is not JSON"},
        422: {"model": Problem, "description": "the spec names a field that is wrong, and why"},
        503: {"model": Problem, "description": "Ray cannot be reached; nothing was created"},
    },
)
def submit_job(
    spec: JobSpec,
    caller: CallerDep,
    jobs: JobsDep,
    response: Response,
    idempotency_key: Annotated[
        str | None,
        Header(
            min_length=1, max_length=255, description="same key + same body returns the same job"
        ),
    ] = None,
) -> JobOut:
    job, created = jobs.submit(caller.tenant, spec, idempotency_key)
    response.headers["Location"] = f"/v1/jobs/{job.id}"
    if not created:
        response.headers["Idempotent-Replayed"] = "true"
    return job_out(job)


@router.get(
    "",
    response_model=JobList,
    summary="List your jobs, newest first",
    responses={400: {"model": Problem, "description": "a cursor not from this API"}},
)
def list_jobs(
    caller: CallerDep,
    jobs: JobsDep,
    state: Annotated[list[JobState] | None, Query(description="filter; repeatable")] = None,
    kind: Annotated[Literal["pretrain", "finetune"] | None, Query()] = None,
    cursor: Annotated[str | None, Query(max_length=512)] = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
) -> JobList:
    items, nxt = jobs.list_jobs(caller.tenant, states=state, kind=kind, cursor=cursor, limit=limit)
    return JobList(items=[job_out(j) for j in items], next_cursor=nxt)


@router.get(
    "/{job_id}", response_model=JobOut, summary="A job's state and progress", responses=_PROBLEMS
)
def get_job(job_id: JobId, caller: CallerDep, jobs: JobsDep) -> JobOut:
    return job_out(jobs.get(caller.tenant, job_id))


@router.get(
    "/{job_id}/events",
    response_model=JobEvents,
    summary="A job's state changes and attempts, oldest first",
    responses=_PROBLEMS,
)
def job_events(job_id: JobId, caller: CallerDep, jobs: JobsDep) -> JobEvents:
    return JobEvents(items=[event_out(e) for e in jobs.events(caller.tenant, job_id)])


@router.post(
    "/{job_id}/cancel",
    response_model=JobOut,
    summary="Cancel a queued or running job",
    responses={**_PROBLEMS, 409: {"model": Problem, "description": "the job already ended"}},
)
def cancel_job(job_id: JobId, caller: CallerDep, jobs: JobsDep) -> JobOut:
    return job_out(jobs.cancel(caller.tenant, job_id))


@router.get(
    "/{job_id}/metrics",
    response_model=MetricsPage,
    summary="Metric records after a step; an SSE stream with Accept: text/event-stream",
    responses={**_PROBLEMS, 200: {"content": {"text/event-stream": {}}}},
)
def job_metrics(
    job_id: JobId,
    caller: CallerDep,
    jobs: JobsDep,
    ctx: ContextDep,
    request: Request,
    after_step: Annotated[int | None, Query(ge=-1, le=2**62)] = None,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 1000,
    last_event_id: Annotated[str | None, Header(max_length=32)] = None,
) -> MetricsPage | StreamingResponse:
    recs, nxt, state = jobs.metrics(caller.tenant, job_id, after_step, limit)
    if "text/event-stream" not in request.headers.get("accept", ""):
        return MetricsPage(items=recs, next_after_step=nxt, state=state)
    cursor = _parse_event_id(last_event_id) or StreamCursor(after_step)
    return StreamingResponse(
        _sse(jobs, caller.tenant, job_id, cursor, ctx.settings.sse_poll_interval_s),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


@dataclass
class StreamCursor:
    """Where a metric stream stands: every record up to ``step`` sent, except that at ``step``
    itself only the first ``sent_at_step`` were (records at one step can be written apart: a
    step record, then its checkpoint or end event). Each event's id is ``<step>.<index at that
    step>``, so ``Last-Event-ID`` resumes exactly after the last record a client got."""

    step: int | None
    sent_at_step: int | None = None  # None: the whole of ``step`` was sent

    def unsent(self, recs: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
        """The records not sent yet, with their event ids; the cursor moves past them.
        ``recs`` hold every record after ``read_after()``, in the order they were written."""
        out = []
        index_at: dict[int, int] = {}
        for rec in recs:
            step = int(rec["step"])
            index = index_at[step] = index_at.get(step, -1) + 1
            if self.step is not None and (
                step < self.step
                or step == self.step
                and (self.sent_at_step is None or index < self.sent_at_step)
            ):
                continue
            self.step, self.sent_at_step = step, index + 1
            out.append((f"{step}.{index}", rec))
        return out

    def read_after(self) -> int | None:
        """The ``after_step`` to read from: the current step again while it may grow."""
        return self.step if self.sent_at_step is None or self.step is None else self.step - 1


def _parse_event_id(value: str | None) -> StreamCursor | None:
    step, _, index = (value or "").partition(".")
    if not step.lstrip("-").isdigit() or (index and not index.isdigit()):
        return None
    return StreamCursor(int(step), int(index) + 1 if index else None)


async def _sse(
    jobs: JobService, tenant: str, job_id: str, cursor: StreamCursor, poll_s: float
) -> AsyncIterator[str]:
    """``event: metric`` per record (``id`` = ``<step>.<index at that step>``), ``event:
    state`` on changes, then ``event: end`` once the job is finished and every record was sent.
    Storage reads run in worker threads; the wait between polls holds no thread. While the
    database is down the stream stays open and polls on (the metrics are in storage; the state
    comes back)."""
    last_state: JobState | None = None
    idle = 0.0
    while True:
        try:
            recs, _, state = await run_in_threadpool(
                jobs.metrics, tenant, job_id, cursor.read_after(), 1000
            )
        except DBAPIError as e:  # the database is down: hold the stream and poll again
            if not database_unavailable(e):
                raise
            await asyncio.sleep(poll_s)
            idle += poll_s
            if idle >= 15:
                yield ": keep-alive\n\n"
                idle = 0.0
            continue
        if state != last_state:
            yield f"event: state\ndata: {json.dumps({'state': state.value})}\n\n"
            last_state = state
        fresh = cursor.unsent(recs)
        for event_id, rec in fresh:
            yield f"event: metric\nid: {event_id}\ndata: {json.dumps(rec)}\n\n"
        if state.is_terminal() and not fresh:
            yield f"event: end\ndata: {json.dumps({'state': state.value})}\n\n"
            return
        if fresh and len(recs) >= 1000:
            idle = 0.0
            continue
        await asyncio.sleep(poll_s)
        idle += poll_s
        if idle >= 15:  # keep proxies from closing a quiet stream
            yield ": keep-alive\n\n"
            idle = 0.0


@router.get(
    "/{job_id}/logs",
    response_model=LogsPage,
    summary="Log text from a byte offset",
    responses=_PROBLEMS,
)
def job_logs(
    job_id: JobId,
    caller: CallerDep,
    jobs: JobsDep,
    offset: Annotated[int, Query(ge=0, le=2**62)] = 0,
    limit: Annotated[int, Query(ge=1, le=4 << 20)] = 1 << 20,
    source: Annotated[Literal["driver", "worker"], Query()] = "driver",
) -> LogsPage:
    s = jobs.logs(caller.tenant, job_id, source, offset, limit)
    return LogsPage(
        source=s.source,
        offset=s.offset,
        next_offset=s.next_offset,
        text=s.text,  # type: ignore[arg-type]
        complete=s.complete,
    )


@router.get(
    "/{job_id}/checkpoints",
    response_model=CheckpointList,
    summary="Complete checkpoints (and 'final', the exported timm weights)",
    responses=_PROBLEMS,
)
def list_checkpoints(job_id: JobId, caller: CallerDep, jobs: JobsDep) -> CheckpointList:
    return CheckpointList(
        items=[checkpoint_out(job_id, c) for c in jobs.checkpoints(caller.tenant, job_id)]
    )


CheckpointName = Annotated[str, Path(min_length=1, max_length=128)]
CheckpointFile = Annotated[
    str | None, Query(min_length=1, max_length=256, description="default: the primary file")
]


@router.get(
    "/{job_id}/checkpoints/{name}",
    summary="Download a checkpoint file: a redirect to a short-lived URL (S3) or the bytes",
    responses={
        **_PROBLEMS,
        200: {
            "content": {"application/octet-stream": {}},
            "description": "the file (local storage)",
        },
        307: {"description": "redirect to a presigned URL (S3 storage)"},
    },
    response_class=Response,
)
def download_checkpoint(
    job_id: JobId,
    caller: CallerDep,
    jobs: JobsDep,
    name: CheckpointName,
    file: CheckpointFile = None,
) -> Response:
    target = jobs.open_checkpoint(caller.tenant, job_id, name, file)
    if isinstance(target, Redirect):
        return RedirectResponse(target.url, status_code=307, headers={"Cache-Control": "no-store"})
    return StreamingResponse(
        target.chunks,
        media_type="application/octet-stream",
        headers={
            "Content-Length": str(target.size),
            "Content-Disposition": f'attachment; filename="{target.filename}"',
            "X-Checksum-Sha256": target.sha256,
        },
    )


@router.get(
    "/{job_id}/checkpoints/{name}/link",
    response_model=DownloadLink,
    summary="Where to download a checkpoint file from, as JSON (for browsers, which cannot "
    "send the API key along a cross-origin redirect)",
    responses=_PROBLEMS,
)
def checkpoint_link(
    job_id: JobId,
    caller: CallerDep,
    jobs: JobsDep,
    name: CheckpointName,
    file: CheckpointFile = None,
) -> DownloadLink:
    url = dashboard.download_link(jobs, caller.tenant, job_id, name, file)
    if url is not None:
        return DownloadLink(url=url, presigned=True)
    own = f"/v1/jobs/{job_id}/checkpoints/{name}"
    return DownloadLink(url=own + (f"?file={quote(file)}" if file else ""), presigned=False)
