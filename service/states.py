"""The job state machine.

    queued -> starting -> running -> succeeded | failed | cancelled
                  \\           \\-> cancelling -> cancelled | succeeded | failed
                   \\-> succeeded | failed | cancelling | cancelled
    running -> starting: a new attempt, the Ray job having vanished (Ray restarted)

Terminal states are final. ``queued`` jobs wait for their tenant's limits; ``starting`` means a
Ray job was submitted and its driver has not started yet; ``cancelling`` means a stop was sent
and Ray has not confirmed it.
"""

from __future__ import annotations

from enum import StrEnum


class JobState(StrEnum):
    QUEUED = "queued"
    STARTING = "starting"
    RUNNING = "running"
    CANCELLING = "cancelling"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    def is_terminal(self) -> bool:
        return self in TERMINAL

    def is_active(self) -> bool:
        """Holds cluster resources (counts against the tenant's limits)."""
        return self in ACTIVE


TERMINAL = frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED})
ACTIVE = frozenset({JobState.STARTING, JobState.RUNNING, JobState.CANCELLING})

_S = JobState
TRANSITIONS: dict[JobState, frozenset[JobState]] = {
    _S.QUEUED: frozenset({_S.STARTING, _S.CANCELLED, _S.FAILED}),
    _S.STARTING: frozenset({_S.RUNNING, _S.SUCCEEDED, _S.FAILED, _S.CANCELLING, _S.CANCELLED}),
    _S.RUNNING: frozenset({_S.STARTING, _S.SUCCEEDED, _S.FAILED, _S.CANCELLING, _S.CANCELLED}),
    _S.CANCELLING: frozenset({_S.CANCELLED, _S.SUCCEEDED, _S.FAILED}),
    _S.SUCCEEDED: frozenset(),
    _S.FAILED: frozenset(),
    _S.CANCELLED: frozenset(),
}


class InvalidTransition(ValueError):
    def __init__(self, src: JobState, dst: JobState) -> None:
        why = "it is final" if src.is_terminal() else f"allowed: {sorted(TRANSITIONS[src])}"
        super().__init__(f"cannot move a job from {src} to {dst}; {why}")
        self.src, self.dst = src, dst


def check_transition(src: JobState, dst: JobState) -> None:
    if dst not in TRANSITIONS[src]:
        raise InvalidTransition(src, dst)


class FailureType(StrEnum):
    """Why a job failed (``failure_type``); the message says the specifics."""

    TRAINING_ERROR = "training_error"  # the workers' command exited non-zero
    SUBMISSION_ERROR = "submission_error"  # Ray refused the job
    LOST = "lost"  # the Ray job vanished (cluster restarted, job record dropped)
    STOPPED_EXTERNALLY = "stopped_externally"  # stopped in Ray, not through the service
    RUNTIME_ENV_ERROR = "runtime_env_error"
    INVALID_SPEC = "invalid_spec"  # the workers refused the spec or its inputs (exit code 2)
