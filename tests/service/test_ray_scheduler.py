"""The Ray Jobs scheduler and the reconciler against a real local Ray cluster (token auth on).

The jobs here run a stand-in for the workers' command (``fake_worker``: sleeps, writes metric
records like the workers do, exits with a chosen code) so these tests exercise Ray, not
training; ``test_e2e.py`` runs the real workers."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from service.server.adapters.artifacts import StorageArtifacts
from service.server.adapters.ray_jobs import RayJobScheduler
from service.server.app import create_app
from service.server.config import Settings
from service.server.domain.ports import AlreadySubmitted, RunPhase
from service.stack.local import RayHead
from tests.polling import until

from .conftest import TINY

pytestmark = pytest.mark.service


def fake_spec(seconds: int, exit_code: int = 0) -> dict[str, Any]:
    """``train.epochs`` = seconds the fake worker runs, ``train.seed`` = its exit code."""
    spec = {**TINY, "train": {"epochs": seconds, "global_batch_size": 16, "seed": exit_code}}
    return spec


@pytest.fixture(scope="module")
def scheduler(
    ray_head: RayHead, fake_python: str, tmp_path_factory: pytest.TempPathFactory
) -> RayJobScheduler:
    root = str(tmp_path_factory.mktemp("ray-artifacts"))
    return RayJobScheduler(
        ray_head.dashboard_url, root, python=fake_python, auth_token=ray_head.token
    )


def test_ray_enforces_token_auth(ray_head: RayHead) -> None:
    url = f"{ray_head.dashboard_url}/api/jobs/"
    assert httpx.get(url).status_code in (401, 403)
    assert httpx.get(url, headers={"Authorization": "Bearer wrong-token"}).status_code in (401, 403)
    assert httpx.get(url, headers={"Authorization": f"Bearer {ray_head.token}"}).status_code == 200


def test_scheduler_contract(scheduler: RayJobScheduler) -> None:
    scheduler.ping()
    assert scheduler.cluster_resources()["CPU"] == pytest.approx(2.0)
    scheduler.submit("gm-ok", "t", fake_spec(1))
    with pytest.raises(AlreadySubmitted):
        scheduler.submit("gm-ok", "t", fake_spec(1))
    scheduler.submit("gm-bad", "t", fake_spec(1, exit_code=3))
    scheduler.submit("gm-long", "t", fake_spec(60))
    assert until(lambda: scheduler.status("gm-long").phase == RunPhase.RUNNING)
    scheduler.stop("gm-long")
    assert until(lambda: scheduler.status("gm-long").phase == RunPhase.STOPPED)
    ok = until(lambda: (s := scheduler.status("gm-ok")).phase == RunPhase.SUCCEEDED and s)
    bad = until(lambda: (s := scheduler.status("gm-bad")).phase == RunPhase.FAILED and s)
    assert ok.exit_code == 0 and bad.exit_code == 3
    assert "fake worker gm-ok" in (scheduler.logs("gm-ok") or "")
    assert scheduler.status("gm-never-submitted").phase == RunPhase.MISSING
    assert scheduler.logs("gm-never-submitted") is None


class Api:
    def __init__(self, tmp: Path, ray: RayHead, python: str) -> None:
        self.settings = Settings(
            data_dir=tmp,
            ray_dashboard_url=ray.dashboard_url,
            worker_python=python,
            reconcile_interval_s=0.3,
            cluster_resources_ttl_s=60,
            tenant_max_active_jobs=3,
        )
        self.ray = ray
        self.key: str | None = None
        self.start()

    def start(self) -> None:
        scheduler = RayJobScheduler(
            self.ray.dashboard_url,
            self.settings.resolved_storage_root,
            python=self.settings.worker_python,
            auth_token=self.ray.token,
        )
        self.app = create_app(
            self.settings,
            scheduler=scheduler,
            artifacts=StorageArtifacts(self.settings.resolved_storage_root),
        )
        self.client = TestClient(self.app).__enter__()
        if self.key is None:
            self.key = self.app.state.ctx.keys.create("ray-test").key
        self.client.headers["Authorization"] = f"Bearer {self.key}"

    def stop(self) -> None:
        self.client.__exit__(None, None, None)

    def state(self, job_id: str) -> dict[str, Any]:
        return dict(self.client.get(f"/v1/jobs/{job_id}").json())

    def wait_state(self, job_id: str, states: set[str], timeout: float = 60) -> dict[str, Any]:
        return dict(until(lambda: (j := self.state(job_id))["state"] in states and j, timeout))


@pytest.fixture
def api(tmp_path: Path, ray_head: RayHead, fake_python: str) -> Iterator[Api]:
    a = Api(tmp_path, ray_head, fake_python)
    yield a
    a.stop()


def test_reconciler_runs_jobs_to_the_end_with_progress(api: Api) -> None:
    ok = api.client.post("/v1/jobs", json=fake_spec(6)).json()["id"]
    bad = api.client.post("/v1/jobs", json=fake_spec(1, exit_code=1)).json()["id"]
    running = api.wait_state(ok, {"running", "succeeded"})
    assert running["started_at"] is not None
    done = api.wait_state(ok, {"succeeded", "failed"})
    assert done["state"] == "succeeded", done
    assert done["progress"]["step"] == 6
    assert done["latest_metrics"]["step"]["loss"] == pytest.approx(1 / 6)
    failed = api.wait_state(bad, {"succeeded", "failed"})
    assert failed["state"] == "failed" and failed["error"]["type"] == "training_error"
    assert "fake failure" in failed["error"]["message"]
    logs = api.client.get(f"/v1/jobs/{ok}/logs").json()
    assert f"fake worker {ok}" in logs["text"] and logs["source"] == "driver"


def test_cancel_running_and_queued_on_ray(api: Api) -> None:
    api.app.state.ctx.keys.create("ray-test", max_active_jobs=1)
    first = api.client.post("/v1/jobs", json=fake_spec(60)).json()["id"]
    second = api.client.post("/v1/jobs", json=fake_spec(60)).json()["id"]
    api.wait_state(first, {"running"})
    assert api.state(second)["state"] == "queued"  # over the tenant's limit of 1
    assert api.client.post(f"/v1/jobs/{second}/cancel").json()["state"] == "cancelled"
    assert api.client.post(f"/v1/jobs/{first}/cancel").json()["state"] == "cancelling"
    assert api.wait_state(first, {"cancelled"})["ended_at"]
    sched = api.app.state.ctx.jobs.scheduler
    assert sched.status(first).phase == RunPhase.STOPPED
    assert sched.status(second).phase == RunPhase.MISSING  # never reached Ray
    api.app.state.ctx.keys.create("ray-test", max_active_jobs=3)


def test_restart_reattaches_and_vanished_jobs_run_again(api: Api) -> None:
    job = api.client.post("/v1/jobs", json=fake_spec(10)).json()["id"]
    api.wait_state(job, {"running"})
    api.stop()  # the API goes away mid-job; the Ray job keeps running
    time.sleep(5)
    api.start()  # same database: the reconciler re-attaches
    done = api.wait_state(job, {"succeeded", "failed"})
    assert done["state"] == "succeeded" and done["progress"]["step"] == 10
    assert done["attempt"] == 1
    # while the API is down, its Ray job disappears (stopped and deleted, as after a
    # cluster restart): on restart the job runs again as attempt 2, a Ray job of its own
    ghost = api.client.post("/v1/jobs", json=fake_spec(15)).json()["id"]
    api.wait_state(ghost, {"running"})
    api.stop()
    ray = RayJobScheduler(
        api.ray.dashboard_url, "/unused", python="python", auth_token=api.ray.token
    )
    ray.stop(ghost)
    until(lambda: ray.status(ghost).phase == RunPhase.STOPPED)
    ray._jobs().delete_job(ghost)
    assert ray.status(ghost).phase == RunPhase.MISSING
    api.start()
    again = api.wait_state(ghost, {"succeeded", "failed", "cancelled"}, timeout=120)
    assert again["state"] == "succeeded" and again["attempt"] == 2, again
    assert ray.status(f"{ghost}-a2").phase == RunPhase.SUCCEEDED
    events = api.client.get(f"/v1/jobs/{ghost}/events").json()["items"]
    assert [(e["from_state"], e["to_state"], e["attempt"]) for e in events] == [
        (None, "queued", 1),
        ("queued", "starting", 1),
        ("starting", "running", 1),
        ("running", "starting", 2),
        ("starting", "running", 2),
        ("running", "succeeded", 2),
    ]
    assert f"{ghost}-a2" in events[3]["reason"] and "vanished" in events[3]["reason"]
