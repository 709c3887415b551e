"""The FastAPI app: ``create_app()`` builds it from settings; no Ray needed to import or test.

uvicorn --factory service.server.app:create_app --host 127.0.0.1 --port 8000   # development
service/server/serve.py                                                     # under Ray Serve
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager

from fastapi import FastAPI
from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from service.server.adapters.db import make_engine, make_sessionmaker, migrate
from service.server.adapters.store import JobStore
from service.server.api.deps import AppContext
from service.server.api.middleware import BodyLimitAndMetrics, RequestMetrics
from service.server.api.openapi import truthful_openapi
from service.server.api.problems import install_handlers
from service.server.api.routes import health, jobs, models, previews
from service.server.api.routes.ui import mount_ui
from service.server.config import Settings
from service.server.domain.jobs import JobService
from service.server.domain.keys import KeyService
from service.server.domain.ports import ArtifactStore, Scheduler
from service.server.domain.reconciler import Reconciler
from service.states import JobState

log = logging.getLogger(__name__)


class JobsByState(Collector):
    def __init__(self, jobs: JobService) -> None:
        self.jobs = jobs

    def collect(self) -> Iterable[GaugeMetricFamily]:
        g = GaugeMetricFamily("greenmim_jobs", "Jobs by state", labels=["state"])
        try:
            counts = self.jobs.counts_by_state()
        except Exception:  # the database is down: the other metrics still answer
            log.warning("cannot count jobs by state", exc_info=True)
            return
        for state in JobState:
            g.add_metric([state.value], counts.get(state.value, 0))
        yield g


def default_scheduler(settings: Settings) -> Scheduler:
    if settings.scheduler == "none":
        from service.server.adapters.ray_jobs import NullScheduler

        return NullScheduler()
    from service.server.adapters.ray_jobs import RayJobScheduler

    return RayJobScheduler.from_settings(settings)


def default_artifacts(settings: Settings) -> ArtifactStore:
    from service.server.adapters.artifacts import StorageArtifacts

    return StorageArtifacts(
        settings.resolved_storage_root,
        settings.s3(),
        settings.presign_ttl_s,
        settings.s3_public_endpoint_url,
    )


def build_context(
    settings: Settings, scheduler: Scheduler | None = None, artifacts: ArtifactStore | None = None
) -> AppContext:
    engine = make_engine(settings.resolved_database_url)
    migrate(engine)
    sessions = make_sessionmaker(engine)
    scheduler = scheduler or default_scheduler(settings)
    artifacts = artifacts or default_artifacts(settings)
    store = JobStore(sessions)
    service = JobService(store, settings, scheduler, artifacts)
    reconciler = Reconciler(
        store,
        scheduler,
        artifacts,
        service.limits,
        settings.reconcile_interval_s,
        max_attempts=settings.max_attempts,
    )
    service.wake = reconciler.wake
    service.reconciler_error = lambda: reconciler.last_error
    keys = KeyService(sessions, settings.key_pepper.get_secret_value().encode())
    return AppContext(
        settings=settings, engine=engine, jobs=service, keys=keys, reconciler=reconciler
    )


def create_app(
    settings: Settings | None = None,
    *,
    scheduler: Scheduler | None = None,
    artifacts: ArtifactStore | None = None,
) -> FastAPI:
    settings = settings or Settings()
    ctx = build_context(settings, scheduler, artifacts)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        if settings.reconciler_enabled:
            ctx.reconciler.start()
        try:
            yield
        finally:
            ctx.reconciler.stop()
            ctx.engine.dispose()

    app = FastAPI(
        title="GreenMIM service",
        version="0.1.0",
        description="Pretrain (GreenMIM) and fine-tune hierarchical ViTs as jobs on a Ray cluster.",
        lifespan=lifespan,
    )
    app.state.ctx = ctx
    registry = CollectorRegistry()
    registry.register(JobsByState(ctx.jobs))
    app.state.registry = registry
    install_handlers(app)
    app.include_router(jobs.router)
    app.include_router(previews.router)
    app.include_router(models.router)
    app.include_router(health.router)
    mount_ui(app)
    app.openapi = truthful_openapi(app)  # type: ignore[method-assign]
    app.add_middleware(
        BodyLimitAndMetrics,
        max_body_bytes=settings.max_body_bytes,
        metrics=RequestMetrics(registry),
    )
    return app
