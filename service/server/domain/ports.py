"""What the service layer needs from the outside world: a scheduler and an artifact reader.

``service.server.adapters.ray_jobs.RayJobScheduler`` and ``service.server.adapters.artifacts.StorageArtifacts`` are the real
implementations; unit tests of the routes pass simple fakes.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Protocol

from workers.artifacts import CheckpointInfo


class RunPhase(StrEnum):
    """A scheduler-side job's phase (Ray's JobStatus, plus MISSING for a vanished job)."""

    PENDING = "pending"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    STOPPED = "stopped"
    MISSING = "missing"


@dataclass(frozen=True)
class RunStatus:
    phase: RunPhase
    message: str | None = None
    error_type: str | None = None
    raw: str | None = None
    exit_code: int | None = None


class SchedulerUnavailable(RuntimeError):
    """The scheduler cannot be reached; retry later."""


class AlreadySubmitted(RuntimeError):
    """A run with this id already exists (a submit that was retried after a crash)."""


class SubmissionRejected(RuntimeError):
    """The scheduler refused the job for good."""


class Scheduler(Protocol):
    """Runs are named by a submission id: the job id, or ``<job id>-a<N>`` for attempt N."""

    def submit(
        self, job_id: str, tenant: str, spec: dict[str, Any], submission_id: str | None = None
    ) -> None:
        """Start job ``job_id`` as the run ``submission_id`` (default: the job id)."""
        ...

    def status(self, submission_id: str) -> RunStatus: ...

    def stop(self, submission_id: str) -> None: ...

    def logs(self, submission_id: str) -> str | None:
        """The driver's log text, or None when the scheduler no longer has it."""
        ...

    def cluster_resources(self) -> dict[str, float] | None:
        """Totals over the cluster's nodes (``{"CPU": 8.0, "GPU": 1.0}``); None = unknown."""
        ...

    def ping(self) -> None:
        """Raise ``SchedulerUnavailable`` unless the scheduler answers."""
        ...


@dataclass(frozen=True)
class Redirect:
    url: str


@dataclass(frozen=True)
class Stream:
    chunks: Iterator[bytes]
    size: int
    filename: str
    sha256: str


@dataclass(frozen=True)
class PreviewInfo:
    """A reconstruction preview: ``epoch`` = epochs done when it was drawn (None: end of job)."""

    name: str
    epoch: int | None
    size: int


class ArtifactStore(Protocol):
    def list_checkpoints(self, tenant: str, job_id: str) -> list[CheckpointInfo]: ...

    def read_metrics(
        self, tenant: str, job_id: str, after_step: int | None, limit: int
    ) -> list[dict[str, Any]]: ...

    def read_logs(self, tenant: str, job_id: str) -> str | None:
        """The workers' own log files, concatenated; None if there are none."""
        ...

    def read_result(self, tenant: str, job_id: str) -> dict[str, Any] | None:
        """The workers' ``result.json`` (status, error type and message), None while running."""
        ...

    def open_checkpoint_file(
        self, tenant: str, job_id: str, name: str, file: str | None
    ) -> Redirect | Stream: ...

    def list_previews(self, tenant: str, job_id: str) -> list[PreviewInfo]: ...

    def read_preview(self, tenant: str, job_id: str, name: str) -> bytes:
        """The PNG named ``name`` in ``list_previews``; ``NotFound`` for any other name."""
        ...

    def ping(self) -> None: ...
