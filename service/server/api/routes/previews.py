"""``/v1/jobs/{id}/previews``: reconstruction previews of a pretraining job (list, PNG)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Path, Response
from starlette.concurrency import run_in_threadpool

from service.schemas import PreviewList, PreviewOut, Problem
from service.server.api.deps import CallerDep, JobsDep
from service.server.api.routes.jobs import JobId
from service.server.domain import dashboard

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])

_PROBLEMS: dict[int | str, dict[str, Any]] = {
    404: {"model": Problem, "description": "no such job (or preview) in your tenant"},
}


@router.get(
    "/{job_id}/previews",
    response_model=PreviewList,
    summary="Reconstruction previews (pretraining): one per sample after each epoch and at the end",
    responses=_PROBLEMS,
)
def list_previews(job_id: JobId, caller: CallerDep, jobs: JobsDep) -> PreviewList:
    items = dashboard.previews(jobs, caller.tenant, job_id)
    return PreviewList(
        items=[
            PreviewOut(
                name=p.name,
                epoch=p.epoch,
                size=p.size,
                url=f"/v1/jobs/{job_id}/previews/{p.name}",
            )
            for p in items
        ]
    )


@router.get(
    "/{job_id}/previews/{name}",
    summary="A preview PNG: original | masked input | reconstruction",
    response_class=Response,
    responses={
        **_PROBLEMS,
        200: {"content": {"image/png": {}}, "description": "the image"},
    },
)
async def get_preview(
    job_id: JobId,
    caller: CallerDep,
    jobs: JobsDep,
    name: Annotated[str, Path(min_length=1, max_length=128)],
) -> Response:
    png = await run_in_threadpool(dashboard.preview_png, jobs, caller.tenant, job_id, name)
    # previews of an epoch never change once written
    return Response(png, media_type="image/png", headers={"Cache-Control": "private, max-age=3600"})
