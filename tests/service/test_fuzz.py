"""Property-based fuzz of the OpenAPI document (schemathesis) against the app on a real SQLite
file and local storage; the scheduler is the fake one (this layer's test needs no Ray).

Every generated request is sent with and without a key and checked: no 5xx, the status code is
documented for the operation, the response's media type is a documented one, the body matches
the documented schema, documented headers are present, and every error is problem+json whose
``status`` is the HTTP status. ``FUZZ_EXAMPLES`` examples per operation (default 60)."""

from __future__ import annotations

import itertools
import os
from collections import Counter
from dataclasses import dataclass

import pytest
import schemathesis
from fastapi import FastAPI
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from service.server.api.openapi import PROBLEM_MEDIA
from service.server.app import create_app
from service.server.config import Settings

from .conftest import TINY, FakeScheduler, write_fake_artifacts

pytestmark = pytest.mark.unit
EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "60"))
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    response_headers_conformance,
]


@dataclass
class Target:
    app: FastAPI
    key: str
    job_id: str


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Target:
    """The app with one tenant and one queued job that has artifacts on disk."""
    tmp = tmp_path_factory.mktemp("fuzz")
    cfg = Settings(data_dir=tmp, reconciler_enabled=False)
    app = create_app(cfg, scheduler=FakeScheduler())
    key = app.state.ctx.keys.create("fuzz").key
    with TestClient(app) as c:
        job = c.post("/v1/jobs", json=TINY, headers={"Authorization": f"Bearer {key}"}).json()
    write_fake_artifacts(cfg.resolved_storage_root, "fuzz", job["id"])
    return Target(app, key, job["id"])


def problem_json_errors(ctx: object, response: schemathesis.Response, case: object) -> None:
    if response.status_code >= 400:
        ctype = response.headers.get("content-type", [""])
        ctype = ctype[0] if isinstance(ctype, list) else ctype
        assert ctype.startswith(PROBLEM_MEDIA), (response.status_code, ctype)
        assert response.json()["status"] == response.status_code


def test_responses_conform_to_the_document(target: Target) -> None:
    api = schemathesis.openapi.from_asgi("/openapi.json", target.app)
    operations = [result.ok() for result in api.get_all_operations()]
    requests: Counter[str] = Counter()
    turn = itertools.count()

    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
        def fuzz(case: schemathesis.Case) -> None:
            if "job_id" in (case.path_parameters or {}) and next(turn) % 3 == 0:
                case.path_parameters["job_id"] = target.job_id  # reach success paths too
            for auth in (f"Bearer {target.key}", None):
                headers = {"Authorization": auth} if auth else {}
                case.call_and_validate(
                    headers=headers, checks=CHECKS, additional_checks=[problem_json_errors]
                )
                requests[case.operation.label] += 1

        fuzz()

    # every operation was exercised, with and without a key (a silent no-op cannot pass)
    assert len(operations) >= 10
    assert {op.label for op in operations} == set(requests), requests
    assert all(n >= 2 for n in requests.values()), requests
    print(f"\nschemathesis: {sum(requests.values())} requests over {len(operations)} operations")
