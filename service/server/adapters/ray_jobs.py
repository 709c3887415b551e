"""The scheduler on Ray: one Ray Job per training job, through the Ray Jobs API.

The submission id is our job id for a job's first attempt and ``<job id>-a<N>`` for attempt N
(``service.server.domain.reconciler.attempt_submission_id``), so a retried submit after a crash
cannot start a second run of one attempt (Ray answers "already exists"). The workers get the
job id itself, so every attempt works under the same storage prefix and resumes there. The entrypoint is the workers' command ``python -m workers.run``
with the spec inline. Ray token auth: the token (``Settings.ray_auth_token``) goes to
``JobSubmissionClient`` as an ``Authorization`` header; nothing is set in the environment.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shlex
import threading
from typing import Any

import requests

from service.server.config import Settings
from service.server.domain.ports import (
    AlreadySubmitted,
    RunPhase,
    RunStatus,
    SchedulerUnavailable,
    SubmissionRejected,
)

log = logging.getLogger(__name__)

_PHASES = {
    "PENDING": RunPhase.PENDING,
    "RUNNING": RunPhase.RUNNING,
    "SUCCEEDED": RunPhase.SUCCEEDED,
    "FAILED": RunPhase.FAILED,
    "STOPPED": RunPhase.STOPPED,
}


def launch_command(
    python: str,
    job_id: str,
    tenant: str,
    storage_root: str,
    spec: dict[str, Any],
    policy_args: list[str] | None = None,
) -> str:
    """The Ray entrypoint of one job: ``python -m workers.run`` with the spec inline (a few
    KiB of JSON) and the read policy the workers enforce again (``ReadPolicy.to_args``)."""
    args = [
        python,
        "-m",
        "workers.run",
        "--spec-json",
        json.dumps(spec, separators=(",", ":")),
        "--job-id",
        job_id,
        "--tenant",
        tenant,
        "--storage-root",
        storage_root,
        *(policy_args or []),
    ]
    return shlex.join(args)


class RayJobScheduler:
    def __init__(
        self,
        dashboard_url: str,
        storage_root: str,
        *,
        python: str,
        entrypoint_num_cpus: float = 0.1,
        env_vars: dict[str, str] | None = None,
        auth_token: str | None = None,
        policy_args: list[str] | None = None,
    ) -> None:
        self.dashboard_url = dashboard_url.rstrip("/")
        self.storage_root = storage_root
        self.policy_args = policy_args or []
        self.python = python
        self.entrypoint_num_cpus = entrypoint_num_cpus
        self.env_vars = env_vars or {}
        self.headers = {"Authorization": f"Bearer {auth_token}"} if auth_token else None
        self._client: Any = None
        self._lock = threading.Lock()

    @classmethod
    def from_settings(cls, settings: Settings) -> RayJobScheduler:
        env = settings.forwarded_env()
        token = settings.ray_auth_token.get_secret_value() if settings.ray_auth_token else None
        return cls(
            settings.ray_dashboard_url,
            settings.resolved_storage_root,
            python=settings.worker_python,
            entrypoint_num_cpus=settings.entrypoint_num_cpus,
            env_vars=env,
            auth_token=token,
            policy_args=settings.read_policy.to_args(),
        )

    def _jobs(self) -> Any:
        with self._lock:
            if self._client is None:
                from ray.job_submission import JobSubmissionClient

                try:
                    self._client = JobSubmissionClient(self.dashboard_url, headers=self.headers)
                except Exception as e:
                    raise SchedulerUnavailable(f"Ray at {self.dashboard_url}: {e}") from e
            return self._client

    def _call(self, fn: str, *args: Any, **kwargs: Any) -> Any:
        try:
            return getattr(self._jobs(), fn)(*args, **kwargs)
        except (requests.exceptions.RequestException, ConnectionError) as e:
            self._client = None  # reconnect next time (the dashboard may have restarted)
            raise SchedulerUnavailable(
                f"Ray Jobs API at {self.dashboard_url} unreachable: {e}"
            ) from e
        except RuntimeError as e:
            text = str(e)
            if "status code 404" in text or "does not exist" in text:
                raise LookupError(text) from e
            if "already exists" in text:
                raise AlreadySubmitted(text) from e
            if "status code 5" in text:
                raise SchedulerUnavailable(text) from e
            if "status code 4" in text:
                raise SubmissionRejected(text) from e
            raise SchedulerUnavailable(text) from e
        except Exception as e:  # ray.exceptions.AuthenticationError and friends
            if type(e).__name__ == "AuthenticationError":
                raise SchedulerUnavailable(f"Ray rejected our token: {e}") from e
            raise

    def submit(
        self, job_id: str, tenant: str, spec: dict[str, Any], submission_id: str | None = None
    ) -> None:
        entrypoint = launch_command(
            self.python, job_id, tenant, self.storage_root, spec, self.policy_args
        )
        runtime_env = {"env_vars": dict(self.env_vars)} if self.env_vars else None
        sid = submission_id or job_id
        self._call(
            "submit_job",
            entrypoint=entrypoint,
            submission_id=sid,
            runtime_env=runtime_env,
            metadata={"greenmim_tenant": tenant, "greenmim_job": job_id},
            entrypoint_num_cpus=self.entrypoint_num_cpus,
        )
        log.info("submitted Ray job %s (job %s)", sid, job_id)

    def status(self, job_id: str) -> RunStatus:
        try:
            info = self._call("get_job_info", job_id)
        except LookupError:
            return RunStatus(RunPhase.MISSING, "no such Ray job")
        raw = str(getattr(info.status, "value", info.status))
        return RunStatus(
            _PHASES.get(raw, RunPhase.PENDING),
            info.message,
            getattr(info, "error_type", None),
            raw,
            getattr(info, "driver_exit_code", None),
        )

    def stop(self, job_id: str) -> None:
        with contextlib.suppress(LookupError):
            self._call("stop_job", job_id)

    def logs(self, job_id: str) -> str | None:
        try:
            text = self._call("get_job_logs", job_id)
        except LookupError:
            return None
        return str(text)

    def cluster_resources(self) -> dict[str, float] | None:
        """Total resources of the alive nodes (Ray's state API, over the dashboard)."""
        client = self._jobs()
        try:
            r = client._do_request("GET", "/api/v0/nodes?limit=10000&detail=1")
        except requests.exceptions.RequestException as e:
            raise SchedulerUnavailable(f"Ray state API unreachable: {e}") from e
        if r.status_code != 200:
            raise SchedulerUnavailable(f"Ray state API answered {r.status_code}: {r.text[:200]}")
        nodes = r.json().get("data", {}).get("result", {}).get("result", [])
        if not any(n.get("state") == "ALIVE" for n in nodes):
            return None  # a cluster still registering its nodes: unknown, not empty
        total: dict[str, float] = {}
        for node in nodes:
            if node.get("state") != "ALIVE":
                continue
            for k, v in (node.get("resources_total") or {}).items():
                total[k] = total.get(k, 0.0) + float(v)
        return total

    def ping(self) -> None:
        client = self._jobs()
        try:
            r = client._do_request("GET", "/api/version")
        except requests.exceptions.RequestException as e:
            raise SchedulerUnavailable(f"Ray dashboard unreachable: {e}") from e
        if r.status_code != 200:
            raise SchedulerUnavailable(f"Ray dashboard answered {r.status_code}")


class NullScheduler:
    """Accepts jobs and never runs them (``GREENMIM_SCHEDULER=none``: API work without Ray)."""

    def submit(
        self, job_id: str, tenant: str, spec: dict[str, Any], submission_id: str | None = None
    ) -> None:
        raise SchedulerUnavailable("no scheduler configured (GREENMIM_SCHEDULER=none)")

    def status(self, job_id: str) -> RunStatus:
        return RunStatus(RunPhase.PENDING)

    def stop(self, job_id: str) -> None:
        return None

    def logs(self, job_id: str) -> str | None:
        return None

    def cluster_resources(self) -> dict[str, float] | None:
        return None

    def ping(self) -> None:
        return None
