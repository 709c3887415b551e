"""Typed dependencies: the app context, the service layer, and the authenticated caller."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy import Engine

from service.server.config import Settings
from service.server.domain.jobs import JobService
from service.server.domain.keys import Caller, KeyService
from service.server.domain.reconciler import Reconciler


@dataclass
class AppContext:
    settings: Settings
    engine: Engine
    jobs: JobService
    keys: KeyService
    reconciler: Reconciler


def get_ctx(request: Request) -> AppContext:
    ctx: AppContext = request.app.state.ctx
    return ctx


ContextDep = Annotated[AppContext, Depends(get_ctx)]


def get_jobs(ctx: ContextDep) -> JobService:
    return ctx.jobs


JobsDep = Annotated[JobService, Depends(get_jobs)]

_bearer = HTTPBearer(auto_error=False, description="an API key from `greenmim keys create`")


def get_caller(
    ctx: ContextDep, creds: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
) -> Caller:
    return ctx.keys.authenticate(creds.credentials if creds else None)


CallerDep = Annotated[Caller, Depends(get_caller)]
