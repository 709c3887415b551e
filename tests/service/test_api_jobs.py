"""Routes + service layer (real SQLite and PostgreSQL, local storage, fake scheduler): the
state machine through the reconciler, attempts, artifacts, models, health and metrics."""

from __future__ import annotations

import hashlib
from typing import Any

import pytest
from fastapi.testclient import TestClient

from service.server.domain.ports import RunPhase
from service.states import JobState
from workers import artifacts as wa
from workers.storage import open_root

from .conftest import Harness, problem_ok, spec, write_fake_artifacts

pytestmark = pytest.mark.unit


# -- state machine through the reconciler ----------------------------------------------------


def test_lifecycle_queued_starting_running_succeeded(harness: Harness) -> None:
    job_id = harness.submit().json()["id"]
    harness.tick()
    assert harness.scheduler.submitted == [job_id]
    assert (
        harness.client.get(f"/v1/jobs/{job_id}", headers=harness.h()).json()["state"] == "starting"
    )
    harness.scheduler.phases[job_id] = RunPhase.RUNNING
    harness.tick()
    got = harness.client.get(f"/v1/jobs/{job_id}", headers=harness.h()).json()
    assert got["state"] == "running" and got["started_at"] and not got["ended_at"]
    harness.scheduler.phases[job_id] = RunPhase.SUCCEEDED
    harness.tick()
    got = harness.client.get(f"/v1/jobs/{job_id}", headers=harness.h()).json()
    assert got["state"] == "succeeded" and got["ended_at"]
    ended = got["ended_at"]
    harness.scheduler.phases[job_id] = RunPhase.FAILED  # terminal states are final
    harness.tick()
    got = harness.client.get(f"/v1/jobs/{job_id}", headers=harness.h()).json()
    assert got["state"] == "succeeded" and got["ended_at"] == ended
    assert [e.to_state for e in harness.ctx.jobs.store.events(job_id)] == [
        "queued",
        "starting",
        "running",
        "succeeded",
    ]
    problem_ok(harness.client.post(f"/v1/jobs/{job_id}/cancel", headers=harness.h()), 409)


def test_failure_records_type_and_message(harness: Harness) -> None:
    job_id = harness.submit().json()["id"]
    harness.tick()
    root = open_root(harness.settings.resolved_storage_root)
    wa.write_json(
        root.fs,
        f"{root.job_prefix('tenant-a', job_id)}/result.json",
        {"status": "failed", "error": {"type": "ValueError", "message": "loss is NaN"}},
    )
    harness.scheduler.phases[job_id] = RunPhase.FAILED
    harness.tick()
    got = harness.client.get(f"/v1/jobs/{job_id}", headers=harness.h()).json()
    assert got["state"] == "failed"
    assert got["error"] == {"type": "training_error", "message": "ValueError: loss is NaN"}


def test_vanished_ray_job_runs_again_as_new_attempts_then_fails_as_lost(harness: Harness) -> None:
    """A Ray job that vanished (Ray restarted) is submitted again under a new Ray submission
    id, resuming from the newest checkpoint, each attempt an event; after max_attempts (3)
    the job fails as lost. The job id, its artifacts and its API record stay the same."""
    job_id = harness.submit().json()["id"]
    harness.tick()
    harness.scheduler.phases[job_id] = RunPhase.RUNNING
    harness.tick()
    write_fake_artifacts(harness.settings.resolved_storage_root, "tenant-a", job_id)
    del harness.scheduler.phases[job_id]  # Ray restarted: the job is gone
    harness.tick()
    got = harness.client.get(f"/v1/jobs/{job_id}", headers=harness.h()).json()
    assert (got["state"], got["attempt"]) == ("starting", 2)
    assert got["progress"]["step"] == 4 and got["progress"]["epoch"] == 1  # the checkpoint's
    assert harness.scheduler.submitted == [job_id, f"{job_id}-a2"]
    harness.scheduler.phases[f"{job_id}-a2"] = RunPhase.RUNNING
    harness.tick()
    assert harness.client.get(f"/v1/jobs/{job_id}", headers=harness.h()).json()["state"] == (
        "running"
    )
    del harness.scheduler.phases[f"{job_id}-a2"]  # vanished while running again
    harness.tick()
    del harness.scheduler.phases[f"{job_id}-a3"]  # and while starting
    harness.tick()
    got = harness.client.get(f"/v1/jobs/{job_id}", headers=harness.h()).json()
    assert (got["state"], got["attempt"], got["error"]["type"]) == ("failed", 3, "lost")
    assert "attempt 3 of at most 3" in got["error"]["message"]
    assert harness.scheduler.submitted == [job_id, f"{job_id}-a2", f"{job_id}-a3"]
    r = harness.client.get(f"/v1/jobs/{job_id}/events", headers=harness.h())
    events = r.json()["items"]
    assert [(e["from_state"], e["to_state"], e["attempt"]) for e in events] == [
        (None, "queued", 1),
        ("queued", "starting", 1),
        ("starting", "running", 1),
        ("running", "starting", 2),
        ("starting", "running", 2),
        ("running", "starting", 3),
        ("starting", "failed", 3),
    ]
    assert "checkpoint epoch-0001 (epoch 1, step 4)" in events[3]["reason"]
    assert f"Ray job {job_id}-a2" in events[3]["reason"]
    problem_ok(
        harness.client.get(f"/v1/jobs/{job_id}/events", headers=harness.h(harness.key_b)), 404
    )


def test_a_run_that_succeeded_before_ray_forgot_it_is_not_run_again(harness: Harness) -> None:
    """The Ray job vanished after the workers finished (result.json says succeeded): that end
    is recorded, no new attempt."""
    job_id = harness.submit().json()["id"]
    harness.tick()
    root = open_root(harness.settings.resolved_storage_root)
    result = {"status": "succeeded"}
    wa.write_json(root.fs, f"{root.job_prefix('tenant-a', job_id)}/result.json", result)
    del harness.scheduler.phases[job_id]
    harness.tick()
    got = harness.client.get(f"/v1/jobs/{job_id}", headers=harness.h()).json()
    assert (got["state"], got["attempt"]) == ("succeeded", 1)
    assert harness.scheduler.submitted == [job_id]


@pytest.mark.parametrize(
    "result",
    [
        {"status": "cancelled"},  # the driver got SIGTERM from Ray's own shutdown
        {"status": "failed", "error": {"type": "ActorUnavailableError", "message": "gone"}},
    ],
)
def test_a_run_cut_short_by_the_loss_of_ray_runs_again(
    harness: Harness, result: dict[str, Any]
) -> None:
    """Losing Ray stops or fails the run that was in it (as the Ray restart drill saw: the
    driver outlived the head and recorded ActorUnavailableError): that is no end of the job."""
    job_id = harness.submit().json()["id"]
    harness.tick()
    root = open_root(harness.settings.resolved_storage_root)
    wa.write_json(root.fs, f"{root.job_prefix('tenant-a', job_id)}/result.json", result)
    del harness.scheduler.phases[job_id]
    harness.tick()
    got = harness.client.get(f"/v1/jobs/{job_id}", headers=harness.h()).json()
    assert (got["state"], got["attempt"]) == ("starting", 2)


def test_a_cancel_during_a_vanished_attempt_ends_the_job(harness: Harness) -> None:
    job_id = harness.submit().json()["id"]
    harness.tick()
    harness.client.post(f"/v1/jobs/{job_id}/cancel", headers=harness.h())
    del harness.scheduler.phases[job_id]
    harness.tick()
    got = harness.client.get(f"/v1/jobs/{job_id}", headers=harness.h()).json()
    assert (got["state"], got["attempt"]) == ("cancelled", 1)
    assert harness.scheduler.submitted == [job_id]


def test_tenant_limit_keeps_jobs_queued(harness: Harness) -> None:
    harness.ctx.keys.create("tenant-a", max_active_jobs=1)
    first, second = (harness.submit().json()["id"] for _ in range(2))
    other = harness.submit(key=harness.key_b).json()["id"]
    harness.tick()

    def state(job_id: str, key: str | None = None) -> str:
        return harness.client.get(f"/v1/jobs/{job_id}", headers=harness.h(key)).json()["state"]

    assert (state(first), state(second), state(other, harness.key_b)) == (
        "starting",
        "queued",
        "starting",
    )
    harness.scheduler.phases[first] = RunPhase.SUCCEEDED
    harness.tick()  # first ends, then second starts in the same pass
    assert (state(first), state(second)) == ("succeeded", "starting")


def test_gpu_limit(harness: Harness) -> None:
    harness.ctx.keys.create("tenant-a", max_gpus=1)
    gpu = spec(resources={"num_workers": 1, "gpus_per_worker": 1})
    a, b = (harness.submit(gpu).json()["id"] for _ in range(2))
    harness.tick()
    assert harness.scheduler.submitted == [a]
    too_big = spec(resources={"num_workers": 2, "gpus_per_worker": 1})
    assert "GPU limit" in str(problem_ok(harness.submit(too_big), 422)["errors"])
    assert harness.client.get(f"/v1/jobs/{b}", headers=harness.h()).json()["state"] == "queued"


def test_cancel_queued_and_running(harness: Harness) -> None:
    harness.ctx.keys.create("tenant-a", max_active_jobs=1)
    running, queued = (harness.submit().json()["id"] for _ in range(2))
    harness.tick()
    harness.scheduler.phases[running] = RunPhase.RUNNING
    harness.tick()
    r = harness.client.post(f"/v1/jobs/{queued}/cancel", headers=harness.h())
    assert r.status_code == 200 and r.json()["state"] == "cancelled"
    r = harness.client.post(f"/v1/jobs/{running}/cancel", headers=harness.h())
    assert r.json()["state"] == "cancelling" and harness.scheduler.stopped == [running]
    harness.tick()
    assert (
        harness.client.get(f"/v1/jobs/{running}", headers=harness.h()).json()["state"]
        == "cancelled"
    )
    assert queued not in harness.scheduler.submitted
    # cancelling again is harmless
    assert (
        harness.client.post(f"/v1/jobs/{queued}/cancel", headers=harness.h()).json()["state"]
        == "cancelled"
    )


def test_stopped_outside_service_is_a_failure(harness: Harness) -> None:
    job_id = harness.submit().json()["id"]
    harness.tick()
    harness.scheduler.phases[job_id] = RunPhase.STOPPED
    harness.tick()
    got = harness.client.get(f"/v1/jobs/{job_id}", headers=harness.h()).json()
    assert got["state"] == "failed" and got["error"]["type"] == "stopped_externally"


# -- artifacts -------------------------------------------------------------------------------


def test_checkpoints_listing_and_streamed_download(harness: Harness) -> None:
    job_id = harness.submit().json()["id"]
    shas = write_fake_artifacts(harness.settings.resolved_storage_root, "tenant-a", job_id)
    items = harness.client.get(f"/v1/jobs/{job_id}/checkpoints", headers=harness.h()).json()[
        "items"
    ]
    assert [c["name"] for c in items] == ["epoch-0001", "final"]  # the partial one is not listed
    ck, final = items
    assert (ck["epoch"], ck["step"], ck["sha256"], ck["primary_file"]) == (
        1,
        4,
        shas["state"],
        "state.pt",
    )
    assert final["sha256"] == shas["model"] and final["primary_file"] == "model.safetensors"
    for c, key in ((ck, "state"), (final, "model")):
        r = harness.client.get(c["download"], headers=harness.h())
        assert r.status_code == 200 and hashlib.sha256(r.content).hexdigest() == shas[key]
        assert r.headers["x-checksum-sha256"] == shas[key]
        assert int(r.headers["content-length"]) == len(r.content)
    cfg = harness.client.get(
        f"/v1/jobs/{job_id}/checkpoints/final", params={"file": "config.json"}, headers=harness.h()
    )
    assert cfg.json() == {"architecture": "x"}


@pytest.mark.parametrize(
    ("name", "file"),
    [
        ("epoch-0002", None),
        ("%2e%2e", None),
        ("..%2F..%2Fetc", None),
        ("final", "../../../../etc/passwd"),
        ("final", "/etc/passwd"),
        ("epoch-0001", "../manifest.json"),
        ("epoch-0001", "manifest.json"),
        ("final%00", None),
        ("nope", None),
    ],
)
def test_checkpoint_path_tricks_are_404(harness: Harness, name: str, file: str | None) -> None:
    job_id = harness.submit().json()["id"]
    write_fake_artifacts(harness.settings.resolved_storage_root, "tenant-a", job_id)
    url = f"/v1/jobs/{job_id}/checkpoints/{name}"
    r = harness.client.get(url, params={"file": file} if file else None, headers=harness.h())
    assert r.status_code == 404 and r.headers["content-type"].startswith("application/problem+json")
    assert b"root:" not in r.content and b"state-bytes" not in r.content


def test_metrics_pages_and_progress(harness: Harness) -> None:
    job_id = harness.submit().json()["id"]
    harness.tick()
    harness.scheduler.phases[job_id] = RunPhase.RUNNING
    root = open_root(harness.settings.resolved_storage_root)
    w = wa.MetricsWriter(root.fs, root.job_prefix("tenant-a", job_id), flush_every_s=0)
    w.begin(0)
    for step in range(1, 6):
        w.log({"type": "step", "step": step, "epoch": 0, "loss": 1.0 / step})
    w.log({"type": "epoch", "step": 5, "epoch": 0, "val_loss": float("nan")})
    w.flush()
    url = f"/v1/jobs/{job_id}/metrics"
    page = harness.client.get(url, params={"limit": 2}, headers=harness.h()).json()
    assert [r["step"] for r in page["items"]] == [1, 2] and page["next_after_step"] == 2
    page = harness.client.get(url, params={"after_step": 4, "limit": 1}, headers=harness.h()).json()
    # never cut inside a step: both records of step 5 come together
    assert [(r["type"], r["step"]) for r in page["items"]] == [("step", 5), ("epoch", 5)]
    assert page["items"][1]["val_loss"] is None  # NaN is not JSON
    harness.tick()
    got = harness.client.get(f"/v1/jobs/{job_id}", headers=harness.h()).json()
    assert got["progress"]["step"] == 5 and got["progress"]["epoch"] == 0
    assert got["latest_metrics"]["step"]["loss"] == pytest.approx(0.2)
    harness.scheduler.phases[job_id] = RunPhase.SUCCEEDED
    harness.tick()
    with harness.client.stream(
        "GET", url, params={"after_step": 3}, headers=harness.h(Accept="text/event-stream")
    ) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        text = "".join(r.iter_text())
    events = [blk.split("\n")[0] for blk in text.strip().split("\n\n")]
    assert events == [
        "event: state",
        "event: metric",
        "event: metric",
        "event: metric",
        "event: end",
    ]
    assert "id: 4" in text and "id: 5" in text


def test_logs_with_offset(harness: Harness) -> None:
    job_id = harness.submit().json()["id"]
    harness.scheduler.driver_logs[job_id] = "héllo\nworld\n"
    url = f"/v1/jobs/{job_id}/logs"
    first = harness.client.get(url, params={"limit": 2}, headers=harness.h()).json()
    assert first["text"] == "h" and first["next_offset"] == 1  # never splits 'é'
    rest = harness.client.get(
        url, params={"offset": first["next_offset"]}, headers=harness.h()
    ).json()
    assert first["text"] + rest["text"] == "héllo\nworld\n" and rest["source"] == "driver"
    assert rest["complete"] is False
    del harness.scheduler.driver_logs[job_id]
    root = open_root(harness.settings.resolved_storage_root)
    from workers.storage import write_bytes

    write_bytes(
        root.fs, f"{root.job_prefix('tenant-a', job_id)}/logs/attempt-0000.log", b"worker log\n"
    )
    got = harness.client.get(url, headers=harness.h()).json()
    assert (got["source"], got["text"]) == ("worker", "worker log\n")


# -- models, health, metrics -----------------------------------------------------------------


def test_models_list_twins_with_their_defaults(harness: Harness) -> None:
    models = {m["name"]: m["defaults"] for m in harness.client.get(
        "/v1/models", headers=harness.h()).json()["items"]}  # fmt: skip
    svt, pcpvt = models["twins_svt_small"], models["twins_pcpvt_micro"]
    assert svt["timm_arch"] == "twins_svt_small" and svt["wss"] == [7, 7, 7, 7]
    assert svt["sr_ratios"] == [8, 4, 2, 1] and svt["img_size"] == 224
    assert pcpvt["wss"] is None and pcpvt["img_size"] == 64


def test_models_health_and_prometheus(harness: Harness) -> None:
    models = harness.client.get("/v1/models", headers=harness.h()).json()["items"]
    micro = next(m for m in models if m["name"] == "swin_micro_patch2_window4_64")
    assert micro["defaults"]["img_size"] == 64
    assert harness.client.get("/healthz").json()["status"] == "ok"
    ready = harness.client.get("/healthz", params={"ready": True}).json()
    assert ready["checks"] == {"database": "ok", "ray": "ok", "storage": "ok"}
    harness.submit()
    text = harness.client.get("/metrics").text
    assert 'greenmim_jobs{state="queued"} 1.0' in text
    assert 'greenmim_http_requests_total{method="POST",route="/v1/jobs",status="202"} 1.0' in text
    assert "greenmim_http_request_seconds_bucket" in text
    assert harness.client.get("/docs").status_code == 200
    assert (
        "/v1/jobs/{job_id}/checkpoints/{name}"
        in harness.client.get("/openapi.json").json()["paths"]
    )


def test_readiness_reports_a_down_dependency(harness: Harness) -> None:
    from service.server.domain.ports import SchedulerUnavailable

    def down() -> None:
        raise SchedulerUnavailable("connection refused")

    harness.scheduler.ping = down  # type: ignore[method-assign]
    r = harness.client.get("/healthz", params={"ready": True})
    assert r.status_code == 503 and "connection refused" in r.json()["checks"]["ray"]


def test_submit_when_ray_is_unreachable_is_503_and_creates_nothing(harness: Harness) -> None:
    from service.server.domain.ports import SchedulerUnavailable

    def down() -> dict[str, float]:
        raise SchedulerUnavailable("connection refused")

    harness.scheduler.cluster_resources = down  # type: ignore[method-assign]
    problem_ok(harness.submit(), 503)
    assert harness.job_count() == 0


def test_states_are_an_explicit_machine() -> None:
    """Every (from, to) pair against the machine as the design draws it, written out here."""
    from service.states import InvalidTransition, check_transition

    drawn = {
        "queued": {"starting", "cancelled", "failed"},
        "starting": {"running", "succeeded", "failed", "cancelling", "cancelled"},
        "running": {"starting", "succeeded", "failed", "cancelling", "cancelled"},
        "cancelling": {"cancelled", "succeeded", "failed"},
        "succeeded": set(),
        "failed": set(),
        "cancelled": set(),
    }
    assert {s.value for s in JobState} == set(drawn)
    for src in JobState:
        assert src.is_terminal() == (not drawn[src.value])
        for dst in JobState:
            if dst.value in drawn[src.value]:
                check_transition(src, dst)
            else:
                with pytest.raises(
                    InvalidTransition, match="final" if src.is_terminal() else "allowed"
                ):
                    check_transition(src, dst)


def test_a_database_that_cannot_be_reached_is_a_503_problem_and_other_errors_stay_500(
    harness: Harness,
) -> None:
    """The mapping alone (the drill with a real server stopped is test_fault_database.py):
    a refused connection is a 503 with Retry-After; a broken statement is still a 500."""
    from sqlalchemy.exc import IntegrityError, OperationalError

    job_id = harness.submit().json()["id"]
    store = harness.ctx.jobs.store
    real_get = store.get

    def refused(job_id: str) -> Any:
        raise OperationalError("SELECT", {}, ConnectionRefusedError("connection refused"))

    store.get = refused  # type: ignore[method-assign]
    r = harness.client.get(f"/v1/jobs/{job_id}", headers=harness.h())
    body = problem_ok(r, 503)
    assert r.headers["Retry-After"] == "5" and "database" in body["detail"]

    def broken(job_id: str) -> Any:
        raise IntegrityError("INSERT", {}, ValueError("constraint"))

    store.get = broken  # type: ignore[method-assign]
    client = TestClient(harness.app, raise_server_exceptions=False)
    problem_ok(client.get(f"/v1/jobs/{job_id}", headers=harness.h()), 500)
    store.get = real_get  # type: ignore[method-assign]
    assert harness.client.get(f"/v1/jobs/{job_id}", headers=harness.h()).status_code == 200
