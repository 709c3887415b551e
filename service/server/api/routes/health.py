from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from service.schemas import Health
from service.server.api.deps import ContextDep

router = APIRouter(tags=["health"])


@router.get(
    "/healthz",
    response_model=Health,
    summary="Liveness; with ?ready=true, readiness (database, Ray, storage)",
    responses={503: {"model": Health, "description": "a dependency is down"}},
)
def healthz(ctx: ContextDep, ready: Annotated[bool, Query()] = False) -> Response:
    if not ready:
        return JSONResponse(Health(status="ok").model_dump())
    checks = ctx.jobs.readiness()
    ok = all(v == "ok" for v in checks.values())
    body = Health(status="ok" if ok else "unavailable", checks=checks)
    return JSONResponse(body.model_dump(), status_code=200 if ok else 503)


@router.get(
    "/metrics",
    summary="Prometheus metrics",
    response_class=Response,
    responses={200: {"content": {"text/plain": {}}}},
)
def metrics(request: Request) -> Response:
    return Response(generate_latest(request.app.state.registry), media_type=CONTENT_TYPE_LATEST)
