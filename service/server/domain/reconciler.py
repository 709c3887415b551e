"""Keeps our job states in line with the scheduler's, and starts queued jobs within limits.

One ``tick``: (1) every active job (starting, running, cancelling) is compared with the Ray job
of its current attempt and moved along the state machine; progress (epoch, step, latest
metrics) is read from the job's metrics in storage. A Ray job that vanished (Ray restarted, the
head lost) is submitted again as the next attempt of the same job, under the Ray submission id
``<job id>-a<N>`` (Ray never reuses an id); the workers resume from the job's newest checkpoint
because the job id, and so its storage prefix, stays. After ``max_attempts`` the job fails as
``lost``. (2) queued jobs, oldest first, are submitted while their tenant stays under its
limits on concurrent jobs and GPUs. Everything it needs is in the database, Ray and storage, so
an API restart loses nothing: the next tick re-attaches to whatever is running. Several
reconcilers (replicas) may run at once: every write is a compare-and-set on the state (and the
attempt), and a Ray submission id names one attempt, so an attempt cannot start twice. A tick
that fails (the database or Ray down) is retried with backoff, up to ``MAX_BACKOFF_S``.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections import defaultdict
from collections.abc import Callable
from typing import Any

from service.server.adapters.db import Job
from service.server.adapters.store import JobStore
from service.server.domain.jobs import TenantLimits
from service.server.domain.ports import (
    AlreadySubmitted,
    ArtifactStore,
    RunPhase,
    RunStatus,
    Scheduler,
    SchedulerUnavailable,
    SubmissionRejected,
)
from service.states import ACTIVE, FailureType, JobState
from workers.artifacts import CheckpointInfo
from workers.outcome import read_result_line

log = logging.getLogger(__name__)

_RAY_FAILURE_TYPES = {"RUNTIME_ENV_SETUP_FAILED": FailureType.RUNTIME_ENV_ERROR}
MAX_BACKOFF_S = 8.0


def attempt_submission_id(job_id: str, attempt: int) -> str:
    """The Ray submission id of a job's attempt: the job id first, ``<id>-a<N>`` after."""
    return job_id if attempt <= 1 else f"{job_id}-a{attempt}"


class Reconciler:
    """Its collaborators are passed in: the job store, the scheduler, the artifacts (for
    results and progress) and the tenants' limits (``JobService.limits``)."""

    def __init__(
        self,
        store: JobStore,
        scheduler: Scheduler,
        artifacts: ArtifactStore,
        limits: Callable[[str], TenantLimits],
        interval_s: float,
        max_attempts: int = 3,
    ) -> None:
        self.store = store
        self.scheduler = scheduler
        self.artifacts = artifacts
        self.limits = limits
        self.interval_s = interval_s
        self.max_attempts = max_attempts
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._tick_lock = threading.Lock()
        self.last_error: str | None = None

    # -- lifecycle ------------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="greenmim-reconciler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None

    def wake(self) -> None:
        self._wake.set()

    def _run(self) -> None:
        failures = 0
        while not self._stop.is_set():
            wait = self.interval_s
            try:
                self.tick()
                self.last_error = None
                failures = 0
            except Exception as e:  # the database or storage is down: retry with backoff
                self.last_error = repr(e)
                failures += 1
                wait = min(MAX_BACKOFF_S, self.interval_s * 2 ** min(failures - 1, 10))
                if failures == 1:
                    log.exception("reconcile tick failed; retrying")
                else:
                    log.warning("reconcile tick failed (%d in a row): %r", failures, e)
            self._wake.wait(wait)
            self._wake.clear()

    # -- one pass -------------------------------------------------------------------------

    def tick(self) -> None:
        with self._tick_lock:
            if self._sync_active():
                self._start_queued()

    def _sync_active(self) -> bool:
        """Returns False when the scheduler is unreachable (nothing else to do this tick)."""
        for job in self.store.in_states(ACTIVE):
            try:
                status = self.scheduler.status(job.submission_id)
            except SchedulerUnavailable as e:
                log.warning("scheduler unreachable: %s", e)
                return False
            self.apply(job, status)
        return True

    def apply(self, job: Job, status: RunStatus) -> None:
        store = self.store
        state = JobState(job.state)
        if status.raw and status.raw != job.ray_status:
            store.update_fields(job.id, ray_status=status.raw)
        phase = status.phase
        if phase in (RunPhase.PENDING, RunPhase.RUNNING):
            if state == JobState.CANCELLING:
                self._stop_quietly(job.submission_id)  # a stop lost in a crash is sent again
            elif phase == RunPhase.RUNNING and state == JobState.STARTING:
                store.transition(
                    job.id, JobState.RUNNING, expected=[state], reason="Ray job running"
                )
            if phase == RunPhase.RUNNING:
                self.sync_progress(job)
            return
        self.sync_progress(job)
        if phase == RunPhase.SUCCEEDED:
            store.transition(job.id, JobState.SUCCEEDED, expected=[state], reason=status.message)
        elif phase == RunPhase.FAILED:
            ftype, message = self._failure(job, status)
            self.store.fail(job.id, ftype, message, expected=[state])
        elif phase == RunPhase.STOPPED:
            if job.cancel_requested:
                store.transition(
                    job.id, JobState.CANCELLED, expected=[state], reason="stopped on request"
                )
            else:
                self.store.fail(
                    job.id,
                    FailureType.STOPPED_EXTERNALLY,
                    "the Ray job was stopped outside the service",
                    expected=[state],
                )
        elif phase == RunPhase.MISSING:
            if job.cancel_requested:
                store.transition(
                    job.id,
                    JobState.CANCELLED,
                    expected=[state],
                    reason="Ray job gone after a cancel request",
                )
            elif not self._ended_while_unwatched(job, state):
                self._next_attempt(job, state)

    def _ended_while_unwatched(self, job: Job, state: JobState) -> bool:
        """A run that succeeded (its ``result.json`` says so) before Ray forgot it, e.g. while
        the API was down too: record that end instead of running it again. A result saying
        failed is no such end: losing Ray fails the run too (its workers vanish), so that job
        runs again, within its attempts."""
        if (self._result(job) or {}).get("status") != "succeeded":
            return False
        return self.store.transition(
            job.id,
            JobState.SUCCEEDED,
            expected=[state],
            reason=f"the workers' result.json says succeeded; Ray no longer has "
            f"{job.submission_id}",
        )

    def _next_attempt(self, job: Job, state: JobState) -> None:
        """Submit a vanished job again, resuming from its newest checkpoint; ``lost`` once
        ``max_attempts`` attempts are used."""
        gone = (
            f"the Ray job {job.submission_id} of attempt {job.attempt} vanished (last Ray "
            f"status: {job.ray_status or 'unknown'}); the Ray cluster was probably restarted"
        )
        if job.attempt >= self.max_attempts:
            self.store.fail(
                job.id,
                FailureType.LOST,
                f"{gone}. That was attempt {job.attempt} of at most {self.max_attempts} "
                "(GREENMIM_MAX_ATTEMPTS); submit the job again.",
                expected=[state],
            )
            return
        attempt = job.attempt + 1
        sid = attempt_submission_id(job.id, attempt)
        resume = self._newest_checkpoint(job)
        try:
            self.scheduler.submit(job.id, job.tenant, job.spec, submission_id=sid)
        except AlreadySubmitted:
            log.info("attempt %d of %s was already submitted (re-attaching)", attempt, job.id)
        except SchedulerUnavailable as e:
            log.warning("cannot resubmit %s now: %s", job.id, e)
            return
        except SubmissionRejected as e:
            self.store.fail(
                job.id,
                FailureType.SUBMISSION_ERROR,
                f"{gone}; Ray refused attempt {attempt}: {e}",
                expected=[state],
            )
            return
        fields: dict[str, Any] = {}
        if resume is not None:
            where = (
                f"resuming from checkpoint {resume.name} (epoch {resume.epoch}, step {resume.step})"
            )
            fields = {"epoch": resume.epoch, "step": resume.step}
        else:
            where = "starting over (no checkpoint yet)"
            fields = {"epoch": None, "step": None}
        reason = f"attempt {attempt} submitted as Ray job {sid}, {where}: {gone}"
        if self.store.new_attempt(
            job.id, expected=state, attempt=attempt, submission_id=sid, reason=reason, **fields
        ):
            log.warning("job %s: %s", job.id, reason)
            return
        current = self.store.get(job.id)  # cancelled meanwhile, or another replica won
        if current is None or current.submission_id != sid:
            self._stop_quietly(sid)

    def _newest_checkpoint(self, job: Job) -> CheckpointInfo | None:
        try:
            found = self.artifacts.list_checkpoints(job.tenant, job.id)
        except Exception:
            log.warning("cannot list the checkpoints of %s", job.id, exc_info=True)
            return None
        training = [c for c in found if c.name != "final" and c.step is not None]
        return max(training, key=lambda c: c.step or 0, default=None)

    def _failure(self, job: Job, status: RunStatus) -> tuple[FailureType, str]:
        result = self._result(job)
        error = result.get("error") if result else None
        if isinstance(error, dict) and error.get("message"):
            etype = str(error.get("type") or "")
            return FailureType.TRAINING_ERROR, f"{etype}: {error['message']}".lstrip(": ")
        if status.exit_code == 2:  # workers.run: the spec or its inputs cannot run
            return FailureType.INVALID_SPEC, self._rejection(
                job
            ) or status.message or "invalid spec"
        ftype = _RAY_FAILURE_TYPES.get(status.error_type or "", FailureType.TRAINING_ERROR)
        return ftype, status.message or "the job failed without a message; see its logs"

    def _rejection(self, job: Job) -> str | None:
        """The workers' own reason for refusing a job (their 'rejected:' log line)."""
        try:
            text = self.scheduler.logs(job.submission_id) or ""
        except SchedulerUnavailable:
            return None
        lines = [ln for ln in text.splitlines() if "rejected:" in ln]
        return lines[-1].split("rejected:", 1)[1].strip() if lines else None

    def _result(self, job: Job) -> dict[str, Any] | None:
        """``result.json``, else the result line the driver printed last (written when the
        store was down as the driver ended)."""
        try:
            result = self.artifacts.read_result(job.tenant, job.id)
        except Exception:
            log.debug("no readable result.json for %s", job.id, exc_info=True)
            result = None
        if result is None:
            with contextlib.suppress(SchedulerUnavailable):
                result = read_result_line(self.scheduler.logs(job.submission_id))
        return result

    def sync_progress(self, job: Job) -> None:
        """Fold metric records newer than the stored step into epoch/step/latest_metrics."""
        try:
            recs = self.artifacts.read_metrics(job.tenant, job.id, job.step, limit=1 << 30)
        except Exception:
            log.warning("cannot read metrics of %s", job.id, exc_info=True)
            return
        if not recs:
            return
        latest: dict[str, Any] = dict(job.latest_metrics or {})
        for rec in recs:
            latest[str(rec.get("type", "step"))] = rec
        last = recs[-1]
        epoch = max(
            (int(r["epoch"]) for r in recs if r.get("epoch") is not None), default=job.epoch
        )
        self.store.update_fields(job.id, step=int(last["step"]), epoch=epoch, latest_metrics=latest)

    def _stop_quietly(self, job_id: str) -> None:
        with contextlib.suppress(SchedulerUnavailable):
            self.scheduler.stop(job_id)

    def _start_queued(self) -> None:
        queued = self.store.in_states([JobState.QUEUED])
        if not queued:
            return
        active_jobs: dict[str, int] = defaultdict(int)
        active_gpus: dict[str, float] = defaultdict(float)
        for job in self.store.in_states(ACTIVE):
            active_jobs[job.tenant] += 1
            active_gpus[job.tenant] += job.gpus
        limits: dict[str, TenantLimits] = {}
        for job in queued:
            lim = limits.setdefault(job.tenant, self.limits(job.tenant))
            if active_jobs[job.tenant] >= lim.max_active_jobs:
                continue
            if active_gpus[job.tenant] + job.gpus > lim.max_gpus + 1e-9:
                continue
            try:
                self.scheduler.submit(job.id, job.tenant, job.spec)
            except AlreadySubmitted:
                log.info("job %s was already submitted (re-attaching)", job.id)
            except SchedulerUnavailable as e:
                log.warning("cannot submit %s now: %s", job.id, e)
                return
            except SubmissionRejected as e:
                self.store.fail(
                    job.id,
                    FailureType.SUBMISSION_ERROR,
                    f"Ray refused the job: {e}",
                    expected=[JobState.QUEUED],
                )
                continue
            if self.store.transition(
                job.id, JobState.STARTING, expected=[JobState.QUEUED], reason="submitted to Ray"
            ):
                active_jobs[job.tenant] += 1
                active_gpus[job.tenant] += job.gpus
            else:  # cancelled between our read and the submit
                self._stop_quietly(job.id)
