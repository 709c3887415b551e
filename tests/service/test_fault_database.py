"""Fault drill: the job database (a real PostgreSQL server) stopped for 30 s mid-job.

The API (a uvicorn process over real HTTP) runs a job on the real Ray head (the workers' stand-in
``fake_worker``: one metric record a second, the training is not what is tested here). The
server is stopped with a fast shutdown (connections cut) while the job runs and the job ends
during the outage. Promised: every request meanwhile is a 503 problem+json with Retry-After
(never a 500, never a traceback), a submit creates nothing, a metrics stream (SSE) opened
before stays open and delivers every step, the API answers again by itself once the server is
back (no restart), and the job's terminal state and every metric are there.
Figures are printed (``-s``) for the README's fault table.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from service.server.adapters.db import make_engine, make_sessionmaker
from service.server.domain.keys import KeyService
from service.stack.local import ApiServer, RayHead, api_env
from service.stack.postgres import PostgresServer, server_bindir
from tests.polling import until

from .conftest import TINY

pytestmark = [pytest.mark.service, pytest.mark.fault]

OUTAGE_S = 30.0
JOB_S = 16  # the job ends during the outage: its end is recorded after it


def follow(url: str, key: str, job_id: str, lines: list[str], first: threading.Event) -> None:
    """Read the job's SSE metrics stream to its end; ``first`` is set at the first record."""
    headers = {"Authorization": f"Bearer {key}", "Accept": "text/event-stream"}
    with httpx.stream("GET", f"{url}/v1/jobs/{job_id}/metrics", headers=headers, timeout=120) as r:
        for ln in r.iter_lines():
            if ln:
                lines.append(ln)
            if ln.startswith("id: "):
                first.set()
    first.set()


@pytest.fixture
def pg(tmp_path: Path, postgres_server: PostgresServer) -> Iterator[PostgresServer]:
    """A server of its own (the session's stays up for the other tests)."""
    assert server_bindir() is not None
    srv = PostgresServer(tmp_path / "pg").start()
    try:
        yield srv
    finally:
        srv.destroy()


def test_database_outage_answers_503_then_recovers_with_nothing_lost(
    tmp_path: Path, ray_head: RayHead, fake_python: str, pg: PostgresServer
) -> None:
    url = pg.create_database("greenmim")
    data_dir = tmp_path / "api"
    env = api_env(
        data_dir,
        ray_head,
        None,
        GREENMIM_DATABASE_URL=url,
        GREENMIM_WORKER_PYTHON=fake_python,
        GREENMIM_RECONCILE_INTERVAL_S="0.5",
    )
    api = ApiServer(data_dir, env).start()
    try:
        pepper = (data_dir / "secrets" / "pepper").read_text().strip()
        engine = make_engine(url)
        key = KeyService(make_sessionmaker(engine), pepper.encode()).create("drill").key
        engine.dispose()
        c = httpx.Client(base_url=api.url, headers={"Authorization": f"Bearer {key}"}, timeout=30)
        spec = {**TINY, "train": {"epochs": JOB_S, "global_batch_size": 16, "seed": 0}}
        job_id = c.post("/v1/jobs", json=spec).json()["id"]
        until(lambda: (c.get(f"/v1/jobs/{job_id}").json()["progress"]["step"] or 0) >= 2, 90)
        streamed: list[str] = []  # an SSE follower (`greenmim metrics -f`) across the outage
        first = threading.Event()
        follower = threading.Thread(target=follow, args=(api.url, key, job_id, streamed, first))
        follower.start()
        assert first.wait(60) and streamed[0] == "event: state", streamed  # it is streaming

        pg.stop()
        down_at = time.monotonic()
        statuses: Counter[int] = Counter()
        while time.monotonic() - down_at < OUTAGE_S:
            for r in (
                c.get(f"/v1/jobs/{job_id}"),
                c.get("/v1/jobs"),
                c.post("/v1/jobs", json=spec),
                c.get("/healthz", params={"ready": True}),
            ):
                statuses[r.status_code] += 1
                assert r.status_code == 503, r.text
                if r.url.path.startswith("/v1/"):
                    assert r.headers["content-type"].startswith("application/problem+json")
                    assert r.headers["retry-after"] == "5"
                    body = r.json()
                    assert body["status"] == 503 and "database" in body["detail"]
                    assert "Traceback" not in r.text
                else:
                    assert r.json()["checks"]["database"].startswith("error")
            time.sleep(0.5)
        pg.start()
        up_at = time.monotonic()
        until(lambda: c.get(f"/v1/jobs/{job_id}").status_code == 200, 60, every=0.1)
        api_back_s = time.monotonic() - up_at
        done = until(
            lambda: (
                (j := c.get(f"/v1/jobs/{job_id}").json())["state"] in ("succeeded", "failed") and j
            ),
            60,
        )
        recorded_s = time.monotonic() - up_at
        assert done["state"] == "succeeded", done
        assert done["progress"]["step"] == JOB_S and done["attempt"] == 1
        steps = [r["step"] for r in c.get(f"/v1/jobs/{job_id}/metrics").json()["items"]]
        assert steps == list(range(1, JOB_S + 1))  # every metric, once, in order
        follower.join(timeout=60)
        assert not follower.is_alive()
        ids = [ln.removeprefix("id: ") for ln in streamed if ln.startswith("id: ")]
        assert ids == [f"{i}.0" for i in range(1, JOB_S + 1)], streamed[:12]  # every step once
        assert streamed[-2:] == ["event: end", 'data: {"state": "succeeded"}'], streamed[-4:]
        jobs = c.get("/v1/jobs").json()["items"]
        assert [j["id"] for j in jobs] == [job_id]  # the refused submits created nothing
        assert c.get("/healthz", params={"ready": True}).status_code == 200
        print(
            f"\ndatabase outage {OUTAGE_S:.0f} s: {sum(statuses.values())} requests, "
            f"statuses {dict(statuses)}; API answering {api_back_s:.1f} s after the server "
            f"was back; job end recorded {recorded_s:.1f} s after; {len(steps)}/{JOB_S} metrics"
        )
    finally:
        api.stop()
