"""Routes + service layer on a real database (SQLite and PostgreSQL) and local storage, a fake
scheduler for Ray: auth and tenants, submit and idempotency, listing."""

from __future__ import annotations

import json
import os
from typing import Any

import pytest

from service.server.domain.ports import RunPhase

from .conftest import TINY, Harness, problem_ok, spec, write_fake_artifacts

pytestmark = pytest.mark.unit


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
