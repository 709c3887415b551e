"""The job store: every SQL statement about jobs, their events and tenants' limits.

No tenant checks here (the service layer does them). State changes are a compare-and-set on
the current state that checks the state machine, records a ``JobEvent``, stamps
``started_at`` once and ``ended_at`` once, so concurrent writers (several API replicas, the
reconciler) never undo each other.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from typing import Any

from sqlalchemy import and_, func, or_, select, text, update
from sqlalchemy.orm import sessionmaker

from service.server.adapters.db import Job, JobEvent, Tenant, utcnow
from service.states import FailureType, JobState, check_transition


class JobStore:
    """Persistence of jobs; no tenant checks here (the service does them)."""

    def __init__(self, sessions: sessionmaker[Any]) -> None:
        self.sessions = sessions

    def get(self, job_id: str) -> Job | None:
        with self.sessions() as s:
            return s.get(Job, job_id)

    def in_states(self, states: Iterable[JobState]) -> list[Job]:
        with self.sessions() as s:
            q = (
                select(Job)
                .where(Job.state.in_([st.value for st in states]))
                .order_by(Job.created_at)
            )
            return list(s.scalars(q))

    def transition(
        self,
        job_id: str,
        dst: JobState,
        *,
        expected: Iterable[JobState] | None = None,
        reason: str | None = None,
        **fields: Any,
    ) -> bool:
        """Move ``job_id`` to ``dst`` if its state is still what was read; False if it changed."""
        with self.sessions.begin() as s:
            job = s.get(Job, job_id)
            if job is None:
                return False
            src = JobState(job.state)
            if src == dst or (expected is not None and src not in set(expected)):
                return False
            check_transition(src, dst)
            now = utcnow()
            values: dict[str, Any] = {"state": dst.value, "updated_at": now, **fields}
            if dst == JobState.STARTING and job.submitted_at is None:
                values["submitted_at"] = now
            if dst == JobState.RUNNING and job.started_at is None:
                values["started_at"] = now
            if dst.is_terminal() and job.ended_at is None:
                values["ended_at"] = now
            res = s.execute(
                update(Job).where(Job.id == job_id, Job.state == src.value).values(**values)
            )
            if res.rowcount != 1:  # type: ignore[attr-defined]
                return False
            s.add(
                JobEvent(
                    job_id=job_id,
                    from_state=src.value,
                    to_state=dst.value,
                    at=now,
                    reason=reason,
                    attempt=values.get("attempt", job.attempt),
                )
            )
            return True

    def new_attempt(
        self,
        job_id: str,
        *,
        expected: JobState,
        attempt: int,
        submission_id: str,
        reason: str,
        **fields: Any,
    ) -> bool:
        """Record attempt ``attempt`` (Ray submission ``submission_id``) of a job whose Ray job
        vanished: back to ``starting`` (an event even if it was starting already). A
        compare-and-set on the state and the previous attempt; False if either changed."""
        with self.sessions.begin() as s:
            job = s.get(Job, job_id)
            if job is None or job.state != expected.value or job.attempt != attempt - 1:
                return False
            if expected != JobState.STARTING:
                check_transition(expected, JobState.STARTING)
            now = utcnow()
            res = s.execute(
                update(Job)
                .where(Job.id == job_id, Job.state == expected.value, Job.attempt == attempt - 1)
                .values(
                    state=JobState.STARTING.value,
                    attempt=attempt,
                    ray_submission_id=submission_id,
                    ray_status=None,
                    updated_at=now,
                    **fields,
                )
            )
            if res.rowcount != 1:  # type: ignore[attr-defined]
                return False
            s.add(
                JobEvent(
                    job_id=job_id,
                    from_state=expected.value,
                    to_state=JobState.STARTING.value,
                    at=now,
                    reason=reason,
                    attempt=attempt,
                )
            )
            return True

    def update_fields(self, job_id: str, **fields: Any) -> None:
        with self.sessions.begin() as s:
            s.execute(update(Job).where(Job.id == job_id).values(**fields))

    def events(self, job_id: str) -> list[JobEvent]:
        with self.sessions() as s:
            return list(
                s.scalars(select(JobEvent).where(JobEvent.job_id == job_id).order_by(JobEvent.id))
            )

    def by_idempotency_key(self, tenant: str, key: str) -> Job | None:
        with self.sessions() as s:
            return s.scalars(
                select(Job).where(Job.tenant == tenant, Job.idempotency_key == key)
            ).one_or_none()

    def page(
        self,
        tenant: str,
        *,
        states: Iterable[JobState] | None = None,
        kind: str | None = None,
        after: tuple[datetime, str] | None = None,
        limit: int = 50,
    ) -> list[Job]:
        """A tenant's jobs, newest first, strictly after the (created_at, id) cursor ``after``."""
        q = select(Job).where(Job.tenant == tenant)
        if states:
            q = q.where(Job.state.in_([s.value for s in states]))
        if kind:
            q = q.where(Job.kind == kind)
        if after is not None:
            ts, cid = after
            q = q.where(or_(Job.created_at < ts, and_(Job.created_at == ts, Job.id < cid)))
        q = q.order_by(Job.created_at.desc(), Job.id.desc()).limit(limit)
        with self.sessions() as s:
            return list(s.scalars(q))

    def create(self, job: Job, reason: str) -> None:
        """Insert a new job with its first event; ``IntegrityError`` on a duplicate key."""
        with self.sessions.begin() as s:
            s.add(job)
            s.flush()
            s.add(
                JobEvent(
                    job_id=job.id,
                    from_state=None,
                    to_state=job.state,
                    at=job.created_at,
                    reason=reason,
                    attempt=job.attempt,
                )
            )

    def fail(
        self, job_id: str, ftype: FailureType, message: str, expected: Iterable[JobState]
    ) -> bool:
        return self.transition(
            job_id,
            JobState.FAILED,
            expected=expected,
            reason=message,
            failure_type=ftype.value,
            failure_message=message,
        )

    def tenant(self, name: str) -> Tenant | None:
        with self.sessions() as s:
            return s.get(Tenant, name)

    def counts_by_state(self) -> dict[str, int]:
        with self.sessions() as s:
            rows = s.execute(select(Job.state, func.count()).group_by(Job.state)).all()
        return {state: int(n) for state, n in rows}

    def ping(self) -> None:
        with self.sessions() as s:
            s.execute(text("SELECT 1"))
