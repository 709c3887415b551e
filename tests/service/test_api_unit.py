"""Routes + service layer on a real SQLite file and local storage; a fake scheduler for Ray."""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

import pytest

from service.server.domain.ports import RunPhase
from service.states import JobState
from workers import artifacts as wa
from workers.storage import open_root

from .conftest import TINY, Harness, problem_ok, write_fake_artifacts

pytestmark = pytest.mark.unit


def spec(**changes: Any) -> dict[str, Any]:
    out = json.loads(json.dumps(TINY))
    for dotted, value in changes.items():
        node = out
        *parents, leaf = dotted.split("__")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return out


# -- auth and tenants ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer nope"},
        {"Authorization": "Basic abc"},
        {"Authorization": "Bearer gmk_0123456789abcdef_" + "x" * 43},
    ],
)
def test_missing_or_invalid_token_is_401(harness: Harness, headers: dict[str, str]) -> None:
    for method, path in [
        ("GET", "/v1/jobs"),
        ("POST", "/v1/jobs"),
        ("GET", "/v1/models"),
        ("GET", "/v1/jobs/gm-x"),
        ("POST", "/v1/jobs/gm-x/cancel"),
    ]:
        r = harness.client.request(
            method, path, headers=headers, json=TINY if method == "POST" else None
        )
        problem_ok(r, 401)
        assert r.headers["www-authenticate"] == "Bearer"
    assert harness.job_count() == 0


def test_revoked_key_is_401(harness: Harness) -> None:
    created = harness.ctx.keys.create("tenant-a")
    assert harness.client.get("/v1/jobs", headers=harness.h(created.key)).status_code == 200
    assert harness.ctx.keys.revoke(created.key_id)
    problem_ok(harness.client.get("/v1/jobs", headers=harness.h(created.key)), 401)


def test_keys_are_stored_hashed(harness: Harness) -> None:
    from sqlalchemy import select

    from service.server.adapters.db import ApiKey

    with harness.ctx.jobs.store.sessions() as s:
        rows = list(s.scalars(select(ApiKey)))
    secret = harness.key_a.split("_", 2)[2]
    assert rows and all(secret not in r.secret_hash and len(r.secret_hash) == 64 for r in rows)


def test_tenant_isolation(harness: Harness) -> None:
    job = harness.submit().json()
    write_fake_artifacts(harness.settings.resolved_storage_root, "tenant-a", job["id"])
    base = f"/v1/jobs/{job['id']}"
    for path in [
        base,
        f"{base}/metrics",
        f"{base}/logs",
        f"{base}/checkpoints",
        f"{base}/checkpoints/final",
    ]:
        problem_ok(harness.client.get(path, headers=harness.h(harness.key_b)), 404)
        assert harness.client.get(path, headers=harness.h()).status_code == 200
    problem_ok(harness.client.post(f"{base}/cancel", headers=harness.h(harness.key_b)), 404)
    assert harness.client.get("/v1/jobs", headers=harness.h(harness.key_b)).json()["items"] == []
    assert harness.client.get(base, headers=harness.h()).json()["state"] == "queued"


def test_spec_cannot_point_into_another_tenants_artifacts(harness: Harness) -> None:
    root = harness.settings.resolved_storage_root
    for uri in [f"{root}/tenant-b/gm-1/model.safetensors", f"file://{root}//tenant-b/x"]:
        body = spec(kind="finetune", finetune={"init_from": uri})
        body.pop("mim", None)
        r = harness.submit(body)
        assert problem_ok(r, 422)["errors"][0]["loc"] == "finetune.init_from"
    r = harness.submit(spec(data__uri=f"{root}/tenant-b/data"))
    assert problem_ok(r, 422)["errors"][0]["loc"] == "data.uri"
    assert harness.job_count() == 0


def test_no_spelling_of_the_artifacts_root_gets_through(harness: Harness, tmp_path) -> None:
    """Dot segments, doubled slashes, /proc, symlinks, the root itself and its parent: each
    once reached tenant-b's files; each is a 422 naming the field, and nothing is created."""
    root = harness.settings.resolved_storage_root
    data_dir = str(harness.settings.data_dir)
    victim = f"{root}/tenant-b/gm-1"
    os.makedirs(victim)
    (tmp_path / "innocent").symlink_to(victim)
    spellings = [
        f"{root}/./tenant-b/gm-1/model.safetensors",
        f"{data_dir}/./artifacts/tenant-b/gm-1/model.safetensors",
        f"file://{root}/../artifacts/tenant-b/gm-1",
        f"/proc/self/root{victim}/model.safetensors",
        f"{tmp_path}/innocent/model.safetensors",
        f"{root}/tenant-a/gm-0",  # even the caller's own: 'job:<id>' is the way in
        root,
        data_dir,
    ]
    for uri in spellings:
        body = spec(kind="finetune", finetune={"init_from": uri})
        body.pop("mim", None)
        err = problem_ok(harness.submit(body), 422)["errors"][0]
        assert err["loc"] == "finetune.init_from", (uri, err)
        assert "job:<id>" in err["msg"] or "pseudo file system" in err["msg"], (uri, err)
        err = problem_ok(harness.submit(spec(data__uri=uri)), 422)["errors"][0]
        assert err["loc"] == "data.uri", (uri, err)
    assert harness.job_count() == 0


def test_the_workers_get_the_same_read_policy(harness: Harness) -> None:
    """The Ray entrypoint carries the policy, so the workers re-check with the service's."""
    import shlex

    from service.server.adapters.ray_jobs import RayJobScheduler, launch_command

    sched = RayJobScheduler.from_settings(harness.settings)
    argv = shlex.split(launch_command("python", "gm-1", "t", "/r", {}, sched.policy_args))
    assert f"--protected={os.path.realpath(harness.settings.data_dir)}" in argv


# -- submit, idempotency, bad input ----------------------------------------------------------


def test_submit_is_202_with_location_and_persisted(harness: Harness) -> None:
    r = harness.submit()
    assert r.status_code == 202
    body = r.json()
    assert r.headers["location"] == f"/v1/jobs/{body['id']}"
    assert body["state"] == "queued" and body["progress"]["epochs"] == 1
    got = harness.client.get(r.headers["location"], headers=harness.h()).json()
    assert got["id"] == body["id"] and got["spec"]["model"] == TINY["model"]
    events = harness.ctx.jobs.store.events(body["id"])
    assert [(e.from_state, e.to_state) for e in events] == [(None, "queued")]


def test_idempotency_key(harness: Harness) -> None:
    first = harness.submit(**{"Idempotency-Key": "k1"})
    again = harness.submit(**{"Idempotency-Key": "k1"})
    assert first.status_code == again.status_code == 202
    assert first.json()["id"] == again.json()["id"]
    assert again.headers["idempotent-replayed"] == "true"
    other = harness.submit(spec(train__epochs=2), **{"Idempotency-Key": "k1"})
    assert "different body" in problem_ok(other, 422)["detail"]
    # keys are per tenant
    b = harness.submit(key=harness.key_b, **{"Idempotency-Key": "k1"})
    assert b.status_code == 202 and b.json()["id"] != first.json()["id"]
    assert harness.job_count() == 2


@pytest.mark.parametrize(
    ("body", "status", "loc"),
    [
        (b"{not json", 400, None),
        (b"", 422, None),
        (b"[1, 2]", 422, None),
        (json.dumps(spec(bogus=1)).encode(), 422, "bogus"),
        (json.dumps(spec(train__bogus=1)).encode(), 422, "train.bogus"),
        (json.dumps(spec(train__epochs="many")).encode(), 422, "train.epochs"),
        (json.dumps(spec(train__epochs=0)).encode(), 422, "train.epochs"),
        (json.dumps(spec(model="resnet50")).encode(), 422, "model"),
        (json.dumps(spec(kind="evaluate")).encode(), 422, "kind"),
        (json.dumps(spec(mim={"mask_unit": 12})).encode(), 422, "mim.mask_unit"),
        (json.dumps(spec(mim={"mask_ratio": 1.5})).encode(), 422, "mim.mask_ratio"),
        (json.dumps(spec(data__uri="relative/path")).encode(), 422, "data.uri"),
        (
            json.dumps(spec(resources={"num_workers": 4, "cpus_per_worker": 2})).encode(),
            422,
            "resources.cpus_per_worker",
        ),
        (
            json.dumps(spec(resources={"num_workers": 1, "gpus_per_worker": 8})).encode(),
            422,
            "resources.gpus_per_worker",
        ),
        (b"{" + b'"x": "' + b"a" * 400_000 + b'"}', 413, None),
    ],
)
def test_bad_input_is_4xx_problem_and_creates_nothing(
    harness: Harness, body: bytes, status: int, loc: str | None
) -> None:
    r = harness.client.post(
        "/v1/jobs", content=body, headers=harness.h(**{"Content-Type": "application/json"})
    )
    problem = problem_ok(r, status)
    if loc is not None:
        assert loc in [e["loc"] for e in problem["errors"]], problem
        assert loc in problem["detail"]
    assert harness.job_count() == 0


def test_chunked_huge_body_is_413(harness: Harness) -> None:
    def gen():  # no Content-Length: the limit must hold while streaming
        for _ in range(100):
            yield b"x" * 10_000

    r = harness.client.post("/v1/jobs", content=gen(), headers=harness.h())
    problem_ok(r, 413)
    assert harness.job_count() == 0


def test_finetune_from_job_must_be_own_succeeded_pretrain(harness: Harness) -> None:
    pre = harness.submit().json()["id"]
    ft = spec(kind="finetune", finetune={"init_from": f"job:{pre}"})
    ft.pop("mim", None)
    assert "queued" in problem_ok(harness.submit(ft), 422)["detail"]
    other = harness.submit(key=harness.key_b).json()["id"]
    ft["finetune"]["init_from"] = f"job:{other}"
    assert "no job" in problem_ok(harness.submit(ft), 422)["detail"]
    harness.tick()
    harness.scheduler.phases[pre] = RunPhase.SUCCEEDED
    harness.tick()
    ft["finetune"]["init_from"] = f"job:{pre}"
    assert harness.submit(ft).status_code == 202


def test_unknown_job_and_routes(harness: Harness) -> None:
    problem_ok(harness.client.get("/v1/jobs/gm-doesnotexist", headers=harness.h()), 404)
    problem_ok(harness.client.get("/v1/nothing", headers=harness.h()), 404)
    problem_ok(harness.client.delete("/v1/jobs", headers=harness.h()), 405)


# -- listing ---------------------------------------------------------------------------------


def test_cursor_pagination_and_filters(harness: Harness) -> None:
    ids = [harness.submit().json()["id"] for _ in range(5)]
    seen, cursor, pages = [], None, 0
    while True:
        params: dict[str, Any] = {"limit": 2, **({"cursor": cursor} if cursor else {})}
        page = harness.client.get("/v1/jobs", params=params, headers=harness.h()).json()
        seen += [j["id"] for j in page["items"]]
        pages += 1
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert pages == 3 and seen == list(reversed(ids))
    harness.client.post(f"/v1/jobs/{ids[0]}/cancel", headers=harness.h())
    got = harness.client.get("/v1/jobs", params={"state": "cancelled"}, headers=harness.h()).json()
    assert [j["id"] for j in got["items"]] == [ids[0]]
    assert (
        harness.client.get("/v1/jobs", params={"kind": "finetune"}, headers=harness.h()).json()[
            "items"
        ]
        == []
    )
    problem_ok(
        harness.client.get("/v1/jobs", params={"cursor": "garbage!"}, headers=harness.h()), 400
    )
    problem_ok(harness.client.get("/v1/jobs", params={"state": "bogus"}, headers=harness.h()), 422)


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


def test_vanished_ray_job_fails_as_lost(harness: Harness) -> None:
    job_id = harness.submit().json()["id"]
    harness.tick()
    del harness.scheduler.phases[job_id]
    harness.tick()
    got = harness.client.get(f"/v1/jobs/{job_id}", headers=harness.h()).json()
    assert got["state"] == "failed" and got["error"]["type"] == "lost"
    assert "vanished" in got["error"]["message"]


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
        "running": {"succeeded", "failed", "cancelling", "cancelled"},
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


# -- numbers a tenant controls ---------------------------------------------------------------

FINETUNE = {
    **{k: v for k, v in TINY.items() if k != "mim"},
    "kind": "finetune",
    "finetune": {"init_from": "scratch", "mixup": 0.8},
}


def _raw_submit(harness: Harness, body: str) -> Any:
    headers = {**harness.h(), "Content-Type": "application/json"}
    return harness.client.post("/v1/jobs", content=body, headers=headers)


@pytest.mark.timeout(30)  # the divisor search once took 114 s here and held the API
@pytest.mark.parametrize(
    ("field", "literal"),
    [
        ("train.global_batch_size", "1000000007"),
        ("train.global_batch_size", "1" + "0" * 400),
        ("train.max_micro_batch", "1" + "0" * 400),
        ("data.max_samples", "1" + "0" * 400),
        ("train.accum_steps", "1" + "0" * 400),
        ("train.base_lr", "1e400"),
        ("finetune.mixup", "Infinity"),
        ("finetune.cutmix", "NaN"),
        ("finetune.mixup", "-Infinity"),
    ],
)
def test_unbounded_or_non_finite_numbers_are_422(
    harness: Harness, field: str, literal: str
) -> None:
    section, leaf = field.split(".")
    marker = "__NUMBER__"
    body = json.loads(json.dumps(FINETUNE))
    body.setdefault(section, {})[leaf] = marker
    r = _raw_submit(harness, json.dumps(body).replace(f'"{marker}"', literal))
    errors = problem_ok(r, 422)["errors"]
    assert [e["loc"] for e in errors] == [field], errors
    assert harness.job_count() == 0


@pytest.mark.parametrize(
    ("changes", "needle"),
    [
        ({"train__global_batch_size": 4096}, "cannot fill one step"),  # > the 1797 digits
        ({"data__max_samples": 8, "train__global_batch_size": 16}, "at most 8 training images"),
        (
            {"resources__num_workers": 2, "data__max_samples": 15, "train__global_batch_size": 16},
            "over 2 worker(s)",
        ),
    ],
)
def test_specs_that_cannot_fill_a_step_are_422(
    harness: Harness, changes: dict[str, Any], needle: str
) -> None:
    err = problem_ok(harness.submit(spec(**changes)), 422)["errors"][0]
    assert err["loc"] == "train.global_batch_size" and needle in err["msg"], err
    assert harness.job_count() == 0


# -- the OpenAPI document ---------------------------------------------------------------------


def test_openapi_documents_every_status_and_media_type(harness: Harness) -> None:
    """Each status these tests see a route answer is documented, with the media type sent."""
    doc = harness.client.get("/openapi.json").json()
    want = {
        ("post", "/v1/jobs"): {"202", "400", "401", "413", "422", "503"},
        ("get", "/v1/jobs"): {"200", "400", "401", "422"},
        ("get", "/v1/jobs/{job_id}"): {"200", "401", "404", "422"},
        ("post", "/v1/jobs/{job_id}/cancel"): {"200", "401", "404", "409", "413", "422"},
        ("get", "/v1/jobs/{job_id}/checkpoints/{name}"): {"200", "307", "401", "404", "422"},
        ("get", "/v1/models"): {"200", "401"},
        ("get", "/healthz"): {"200", "422", "503"},
    }
    for (method, path), statuses in want.items():
        responses = doc["paths"][path][method]["responses"]
        assert statuses <= set(responses), (method, path, sorted(responses))
        for status, resp in responses.items():
            if int(status) >= 400 and (path, status) != ("/healthz", "503"):
                assert list(resp["content"]) == ["application/problem+json"], (path, status)
    assert "HTTPValidationError" not in doc["components"]["schemas"]
    assert doc["paths"]["/v1/models"]["get"]["security"] == [{"bearer": []}]
    # the statuses are real: a bad cursor is a 400, a missing key on /v1/models a 401
    problem_ok(harness.client.get("/v1/jobs?cursor=zz", headers=harness.h()), 400)
    problem_ok(harness.client.get("/v1/models"), 401)
