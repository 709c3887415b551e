"""What a tenant controls, bounded (numbers, locations through the API) and the OpenAPI
document that says so (real SQLite, local storage, fake scheduler)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from .conftest import TINY, Harness, problem_ok, spec

pytestmark = pytest.mark.unit


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
