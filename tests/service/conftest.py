"""Fixtures for the service tests.

Unit tier: the FastAPI app on a real database (a SQLite file, and a database on a real
PostgreSQL server: ``database_url`` runs each test on both) and real local-directory storage, with a
``FakeScheduler`` standing in for Ray (routes and service layer only). Service/e2e tiers use
the session-scoped real components in ``stack.py``: a Ray head with token auth, ``moto_server``.
"""

from __future__ import annotations

import hashlib
import json
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from service.server.adapters.artifacts import StorageArtifacts
from service.server.app import create_app
from service.server.config import Settings
from service.server.domain.ports import AlreadySubmitted, RunPhase, RunStatus
from workers import artifacts as wa
from workers.storage import open_root, write_bytes

TINY = {
    "kind": "pretrain",
    "model": "swin_micro_patch2_window4_64",
    "data": {"uri": "builtin:digits", "max_samples": 64, "loader_workers": 0},
    "train": {"epochs": 1, "global_batch_size": 16},
    "resources": {"num_workers": 1, "cpus_per_worker": 0.5},
}


class FakeScheduler:
    """Records calls; phases (by submission id) are set by the test."""

    def __init__(self, resources: dict[str, float] | None = None) -> None:
        self.resources = resources if resources is not None else {"CPU": 4.0, "GPU": 2.0}
        self.phases: dict[str, RunPhase] = {}
        self.submitted: list[str] = []
        self.stopped: list[str] = []
        self.driver_logs: dict[str, str] = {}

    def submit(
        self, job_id: str, tenant: str, spec: dict[str, Any], submission_id: str | None = None
    ) -> None:
        sid = submission_id or job_id
        if sid in self.phases:
            raise AlreadySubmitted(sid)
        self.submitted.append(sid)
        self.phases[sid] = RunPhase.PENDING

    def status(self, job_id: str) -> RunStatus:
        return RunStatus(
            self.phases.get(job_id, RunPhase.MISSING), raw=str(self.phases.get(job_id))
        )

    def stop(self, job_id: str) -> None:
        self.stopped.append(job_id)
        if self.phases.get(job_id) in (RunPhase.PENDING, RunPhase.RUNNING):
            self.phases[job_id] = RunPhase.STOPPED

    def logs(self, job_id: str) -> str | None:
        return self.driver_logs.get(job_id)

    def cluster_resources(self) -> dict[str, float] | None:
        return self.resources

    def ping(self) -> None:
        return None


class Harness:
    def __init__(self, tmp: Path, database_url: str | None = None) -> None:
        self.tmp = tmp
        self.scheduler = FakeScheduler()
        self.settings = Settings(
            data_dir=tmp,
            database_url=database_url,
            reconciler_enabled=False,
            cluster_resources_ttl_s=0,
        )
        self.artifacts = StorageArtifacts(str(tmp / "artifacts"))
        self.app = create_app(self.settings, scheduler=self.scheduler, artifacts=self.artifacts)
        self.ctx = self.app.state.ctx
        self.client = TestClient(self.app)
        self.key_a = self.ctx.keys.create("tenant-a").key
        self.key_b = self.ctx.keys.create("tenant-b").key

    def h(self, key: str | None = None, **extra: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {key or self.key_a}", **extra}

    def submit(
        self, spec: dict[str, Any] | None = None, key: str | None = None, **headers: str
    ) -> Any:
        return self.client.post("/v1/jobs", json=spec or TINY, headers=self.h(key, **headers))

    def job_count(self) -> int:
        from sqlalchemy import func, select

        from service.server.adapters.db import Job

        with self.ctx.jobs.store.sessions() as s:
            return int(s.scalar(select(func.count()).select_from(Job)) or 0)

    def tick(self) -> None:
        self.ctx.reconciler.tick()


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A new empty job database: a SQLite file, or a database on the session's PostgreSQL."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'greenmim.db'}"
    pg = request.getfixturevalue("postgres_server")
    return str(pg.create_database(f"t_{uuid.uuid4().hex[:16]}"))


@pytest.fixture
def harness(tmp_path: Path, database_url: str) -> Iterator[Harness]:
    h = Harness(tmp_path, database_url)
    with h.client:
        yield h
    h.ctx.engine.dispose()


FAKE_WORKER = """#!{python}
# Stand-in for `python -m workers.run ...`: runs train.epochs seconds, one metric record a
# second (as the workers write them), then exits with code train.seed.
import json, sys, time
sys.path.insert(0, {root!r})
from workers import artifacts as wa
from workers.storage import open_root

args = dict(zip(sys.argv[1::2], sys.argv[2::2]))
spec = json.loads(args["--spec-json"])
job_id, tenant = args["--job-id"], args["--tenant"]
print("fake worker", job_id, flush=True)
root = open_root(args["--storage-root"])
writer = wa.MetricsWriter(root.fs, root.job_prefix(tenant, job_id), flush_every_s=0)
writer.begin(0)
for step in range(1, spec["train"]["epochs"] + 1):
    time.sleep(1)
    writer.log({{"type": "step", "step": step, "epoch": 0, "loss": 1.0 / step}})
code = spec["train"]["seed"]
if code:
    wa.write_json(root.fs, root.job_prefix(tenant, job_id) + "/result.json",
                  {{"status": "failed", "error": {{"type": "RuntimeError", "message": "fake failure"}}}})
sys.exit(code)
"""


@pytest.fixture(scope="session")
def fake_python(tmp_path_factory: pytest.TempPathFactory) -> str:
    """An executable that the scheduler runs in place of the interpreter (see FAKE_WORKER)."""
    path = tmp_path_factory.mktemp("fake") / "fakepy"
    path.write_text(FAKE_WORKER.format(python=sys.executable, root=str(Path(__file__).parents[2])))
    path.chmod(0o755)
    return str(path)


def write_fake_artifacts(root_uri: str, tenant: str, job_id: str) -> dict[str, str]:
    """A checkpoint (state.pt + manifest) and a final export, as the workers lay them out."""
    root = open_root(root_uri)
    prefix = root.job_prefix(tenant, job_id)
    fs = root.fs
    state = b"state-bytes" * 1000
    sha = hashlib.sha256(state).hexdigest()
    write_bytes(fs, f"{prefix}/checkpoints/epoch-0001/state.pt", state)
    manifest = wa.make_manifest(
        "epoch-0001", 1, 4, [{"path": "state.pt", "size": len(state), "sha256": sha}]
    )
    write_bytes(fs, f"{prefix}/checkpoints/epoch-0001/manifest.json", json.dumps(manifest).encode())
    # an incomplete checkpoint: files but no manifest -> never listed
    write_bytes(fs, f"{prefix}/checkpoints/epoch-0002/state.pt", b"partial")
    model = b"weights" * 500
    write_bytes(fs, f"{prefix}/model.safetensors", model)
    write_bytes(fs, f"{prefix}/config.json", b'{"architecture": "x"}')
    return {"state": sha, "model": hashlib.sha256(model).hexdigest()}


def problem_ok(resp: Any, status: int) -> dict[str, Any]:
    """The response is an RFC 9457 problem with ``status``; returns its body."""
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"].startswith("application/problem+json"), resp.headers
    body = resp.json()
    assert body["status"] == status
    assert body["title"] and body["detail"] and body["type"].startswith("https://")
    return body


def spec(**changes: Any) -> dict[str, Any]:
    """TINY with ``section__field=value`` changes."""
    out = json.loads(json.dumps(TINY))
    for dotted, value in changes.items():
        node = out
        *parents, leaf = dotted.split("__")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return out
