"""The job service: submit, read, list and cancel jobs, every query scoped to one tenant.

All SQL lives in ``service.server.adapters.store.JobStore``; state changes go through its compare-and-set
``transition``, so concurrent writers (several API replicas, the reconciler) never undo each
other.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from pydantic import ValidationError
from sqlalchemy.exc import IntegrityError

from service.server.adapters.db import Job, JobEvent, utcnow
from service.server.adapters.store import JobStore
from service.server.config import Settings
from service.server.domain.admission import check_locations
from service.server.domain.errors import (
    BadRequest,
    Conflict,
    IdempotencyConflict,
    InvalidSpec,
    NotFound,
    Unavailable,
)
from service.server.domain.ports import (
    ArtifactStore,
    Redirect,
    Scheduler,
    SchedulerUnavailable,
    Stream,
)
from service.states import FailureType, JobState
from workers.artifacts import CheckpointInfo
from workers.spec import JobSpec
from workers.spec_rules import validate_against_cluster

log = logging.getLogger(__name__)


def new_job_id() -> str:
    return f"gm-{uuid.uuid4().hex[:20]}"


def spec_digest(spec: JobSpec) -> str:
    canonical = json.dumps(spec.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def job_gpus(spec: JobSpec) -> float:
    return spec.resources.num_workers * spec.resources.gpus_per_worker


def job_cpus(spec: JobSpec) -> float:
    return spec.resources.num_workers * spec.resources.cpus_per_worker


def encode_cursor(created_at: datetime, job_id: str) -> str:
    raw = json.dumps([created_at.isoformat(), job_id]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, str]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        ts, job_id = json.loads(raw)
        return datetime.fromisoformat(ts), str(job_id)
    except (ValueError, TypeError, binascii.Error, UnicodeDecodeError) as e:
        raise BadRequest("the cursor is not one this API returned; start again without it") from e


@dataclass(frozen=True)
class TenantLimits:
    max_active_jobs: int
    max_gpus: float


class ClusterResourceCache:
    """``scheduler.cluster_resources()``, cached for ``ttl`` seconds (it is an HTTP call)."""

    def __init__(self, scheduler: Scheduler, ttl: float) -> None:
        self._scheduler = scheduler
        self._ttl = ttl
        self._value: dict[str, float] | None = None
        self._at = 0.0
        self._lock = threading.Lock()

    def get(self) -> dict[str, float] | None:
        with self._lock:
            if self._value is None or time.monotonic() - self._at > self._ttl:
                self._value = self._scheduler.cluster_resources()  # None (unknown) is not cached
                self._at = time.monotonic()
            return self._value


class JobService:
    def __init__(
        self,
        store: JobStore,
        settings: Settings,
        scheduler: Scheduler,
        artifacts: ArtifactStore,
        wake: Callable[[], None] = lambda: None,
    ) -> None:
        self.store = store
        self.settings = settings
        self.scheduler = scheduler
        self.artifacts = artifacts
        self.wake = wake
        self.reconciler_error: Callable[[], str | None] | None = None
        self.cluster = ClusterResourceCache(scheduler, settings.cluster_resources_ttl_s)

    # -- reads ------------------------------------------------------------------------------

    def get(self, tenant: str, job_id: str) -> Job:
        job = self.store.get(job_id)
        if job is None or job.tenant != tenant:
            raise NotFound(f"no job {job_id!r} in your tenant")
        return job

    def list_jobs(
        self,
        tenant: str,
        *,
        states: list[JobState] | None = None,
        kind: str | None = None,
        cursor: str | None = None,
        limit: int = 50,
    ) -> tuple[list[Job], str | None]:
        after = decode_cursor(cursor) if cursor else None
        jobs = self.store.page(tenant, states=states, kind=kind, after=after, limit=limit + 1)
        nxt = (
            encode_cursor(jobs[limit - 1].created_at, jobs[limit - 1].id)
            if len(jobs) > limit
            else None
        )
        return jobs[:limit], nxt

    def events(self, tenant: str, job_id: str) -> list[JobEvent]:
        """The job's state changes and attempts, oldest first."""
        self.get(tenant, job_id)
        return self.store.events(job_id)

    def limits(self, tenant: str) -> TenantLimits:
        t = self.store.tenant(tenant)
        return TenantLimits(
            max_active_jobs=(
                t.max_active_jobs
                if t and t.max_active_jobs is not None
                else self.settings.tenant_max_active_jobs
            ),
            max_gpus=t.max_gpus if t and t.max_gpus is not None else self.settings.tenant_max_gpus,
        )

    def counts_by_state(self) -> dict[str, int]:
        return self.store.counts_by_state()

    def readiness(self) -> dict[str, str]:
        """Each dependency's state ("ok" or "error: ..."): database, Ray, storage, reconciler."""
        checks: dict[str, str] = {}
        for name, probe in (
            ("database", self.store.ping),
            ("ray", self.scheduler.ping),
            ("storage", self.artifacts.ping),
        ):
            try:
                probe()
                checks[name] = "ok"
            except Exception as e:
                checks[name] = f"error: {e}"
        if self.reconciler_error is not None:
            error = self.reconciler_error()
            if error:
                checks["reconciler"] = f"error: {error}"
        return checks

    # -- submit -----------------------------------------------------------------------------

    def submit(self, tenant: str, spec: JobSpec, idempotency_key: str | None) -> tuple[Job, bool]:
        """Create a queued job; return it and whether it is new (False: idempotent replay)."""
        digest = spec_digest(spec)
        if idempotency_key is not None:
            existing = self._by_idempotency_key(tenant, idempotency_key)
            if existing is not None:
                return self._replay(existing, digest), False
        self._validate_runnable(tenant, spec)
        now = utcnow()
        job = Job(
            id=new_job_id(),
            tenant=tenant,
            kind=spec.kind,
            model=spec.model,
            state=JobState.QUEUED.value,
            spec=spec.model_dump(mode="json"),
            spec_sha256=digest,
            idempotency_key=idempotency_key,
            gpus=job_gpus(spec),
            cpus=job_cpus(spec),
            created_at=now,
            updated_at=now,
            cancel_requested=False,
        )
        try:
            self.store.create(job, reason="submitted")
        except IntegrityError:
            # A concurrent request with the same Idempotency-Key won the insert.
            existing = (
                self._by_idempotency_key(tenant, idempotency_key) if idempotency_key else None
            )
            if existing is None:
                raise
            return self._replay(existing, digest), False
        log.info("job %s queued for tenant %s (%s %s)", job.id, tenant, spec.kind, spec.model)
        self.wake()
        return job, True

    def _by_idempotency_key(self, tenant: str, key: str) -> Job | None:
        return self.store.by_idempotency_key(tenant, key)

    @staticmethod
    def _replay(existing: Job, digest: str) -> Job:
        if existing.spec_sha256 != digest:
            raise IdempotencyConflict(
                f"Idempotency-Key was first used for job {existing.id} with a different body; "
                "use a new key for a different job"
            )
        return existing

    def _validate_runnable(self, tenant: str, spec: JobSpec) -> None:
        """Checks that need the cluster, the tenant or other jobs; raise ``InvalidSpec``."""
        limits = self.limits(tenant)
        gpus = job_gpus(spec)
        if gpus > limits.max_gpus + 1e-9:
            raise InvalidSpec(
                f"the job needs {gpus:g} GPUs but your tenant may use at most {limits.max_gpus:g}",
                [{"loc": "resources.gpus_per_worker", "msg": "over the tenant's GPU limit"}],
            )
        try:
            resources = self.cluster.get()
        except SchedulerUnavailable as e:
            raise Unavailable(
                f"the Ray cluster cannot be reached ({e}); nothing was created, retry"
            ) from e
        if resources is not None:
            try:
                validate_against_cluster(spec, resources)
            except ValidationError as e:
                errors = [
                    {"loc": ".".join(map(str, err["loc"])), "msg": err["msg"]} for err in e.errors()
                ]
                raise InvalidSpec(
                    "; ".join(f"{x['loc']}: {x['msg']}" for x in errors), errors
                ) from e
        check_locations(self.settings, self.store, tenant, spec)

    # -- artifacts --------------------------------------------------------------------------

    def metrics(
        self, tenant: str, job_id: str, after_step: int | None, limit: int
    ) -> tuple[list[dict[str, Any]], int | None, JobState]:
        job = self.get(tenant, job_id)
        recs = self.artifacts.read_metrics(tenant, job_id, after_step, limit)
        nxt = int(recs[-1]["step"]) if recs else after_step
        return recs, nxt, JobState(job.state)

    def logs(self, tenant: str, job_id: str, source: str, offset: int, limit: int) -> LogSlice:
        """Log text from byte ``offset``: the Ray driver's log (worker output is forwarded to
        it) or, with ``source='worker'`` or once Ray has forgotten the job, the workers' files."""
        job = self.get(tenant, job_id)
        text: str | None = None
        if source == "driver":
            try:
                text = self.scheduler.logs(job.submission_id)
            except SchedulerUnavailable:
                text = None
            if text is None:
                source = "worker"
        if text is None:
            text = self.artifacts.read_logs(tenant, job_id) or ""
        chunk, nxt = slice_utf8(text.encode(), offset, limit)
        done = JobState(job.state).is_terminal() and nxt >= len(text.encode())
        return LogSlice(source=source, offset=offset, next_offset=nxt, text=chunk, complete=done)

    def checkpoints(self, tenant: str, job_id: str) -> list[CheckpointInfo]:
        self.get(tenant, job_id)
        return self.artifacts.list_checkpoints(tenant, job_id)

    def open_checkpoint(
        self, tenant: str, job_id: str, name: str, file: str | None
    ) -> Redirect | Stream:
        self.get(tenant, job_id)
        return self.artifacts.open_checkpoint_file(tenant, job_id, name, file)

    # -- cancel -----------------------------------------------------------------------------

    def cancel(self, tenant: str, job_id: str) -> Job:
        """Queued jobs end at once; submitted ones go to ``cancelling`` until Ray confirms."""
        for _ in range(5):
            job = self.get(tenant, job_id)
            state = JobState(job.state)
            if state in (JobState.CANCELLED, JobState.CANCELLING):
                return job
            if state.is_terminal():
                raise Conflict(f"job {job_id} already ended ({state}); there is nothing to cancel")
            if state == JobState.QUEUED:
                if self.store.transition(
                    job_id,
                    JobState.CANCELLED,
                    expected=[state],
                    reason="cancelled while queued",
                    cancel_requested=True,
                ):
                    return self.get(tenant, job_id)
                continue
            if self.store.transition(
                job_id,
                JobState.CANCELLING,
                expected=[state],
                reason="cancel requested",
                cancel_requested=True,
            ):
                try:
                    self.scheduler.stop(job.submission_id)
                except SchedulerUnavailable:
                    log.warning("stop of %s not delivered; the reconciler retries", job_id)
                self.wake()
                return self.get(tenant, job_id)
        return self.get(tenant, job_id)

    def fail(
        self, job_id: str, ftype: FailureType, message: str, expected: Iterable[JobState]
    ) -> bool:
        return self.store.fail(job_id, ftype, message, expected)


@dataclass(frozen=True)
class LogSlice:
    source: str
    offset: int
    next_offset: int
    text: str
    complete: bool


def slice_utf8(data: bytes, offset: int, limit: int) -> tuple[str, int]:
    """``data[offset:offset+limit]`` decoded, never splitting a UTF-8 character; the next offset."""
    end = min(len(data), offset + limit)
    while end < len(data) and end > offset and (data[end] & 0xC0) == 0x80:
        end -= 1
    return data[offset:end].decode(errors="replace"), end
