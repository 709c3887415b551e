"""The deployment files keep Ray's control plane private and point at code that exists."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.unit
ROOT = Path(__file__).parents[2]


def test_compose_publishes_only_the_api_and_s3() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    published = {
        name: [str(p).rsplit(":", 1)[-1] for p in svc.get("ports", [])]
        for name, svc in compose["services"].items()
    }
    assert published["ray-head"] == ["8000"] and published["minio"] == ["9000"]
    assert all(not ports for name, ports in published.items() if name not in ("ray-head", "minio"))
    for svc in compose["services"].values():
        env = svc.get("environment") or {}
        if "GREENMIM_ENV" in env:
            assert env["GREENMIM_ENV"] == "production" and env["RAY_AUTH_MODE"] == "token"


def test_rayservice_imports_the_serve_builder() -> None:
    docs = list(yaml.safe_load_all((ROOT / "deploy/kuberay/rayservice.yaml").read_text()))
    service = next(d for d in docs if d["kind"] == "RayService")
    serve_cfg = yaml.safe_load(service["spec"]["serveConfigV2"])
    module, attr = serve_cfg["applications"][0]["import_path"].split(":")
    assert callable(getattr(importlib.import_module(module), attr))
    head = service["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert {"name": "RAY_AUTH_MODE", "value": "token"} in head["env"]
    assert [p["port"] for p in service["spec"]["serveService"]["spec"]["ports"]] == [8000]


# Serve's own default is 5 concurrent requests per replica; at that limit the proxy rejects,
# backs off and re-probes every further request, and the API collapsed under load
# (bench/bench_service.py get). The bench keeps up to 64 requests in flight.
MIN_ONGOING = 64


def _max_ongoing(app: object) -> int:
    return int(app._bound_deployment.max_ongoing_requests)  # type: ignore[attr-defined]


def test_serve_replica_takes_concurrent_requests() -> None:
    from service.server import serve as serve_app

    assert serve_app.DEFAULT_MAX_ONGOING_REQUESTS >= MIN_ONGOING
    assert _max_ongoing(serve_app.build()) == serve_app.DEFAULT_MAX_ONGOING_REQUESTS
    assert _max_ongoing(serve_app.app_builder({})) == serve_app.DEFAULT_MAX_ONGOING_REQUESTS
    assert _max_ongoing(serve_app.build(max_ongoing_requests=7)) == 7
    assert serve_app.parser().parse_args([]).max_ongoing_requests >= MIN_ONGOING


def test_deployments_configure_max_ongoing_requests() -> None:
    from service.server import serve as serve_app

    docs = list(yaml.safe_load_all((ROOT / "deploy/kuberay/rayservice.yaml").read_text()))
    service = next(d for d in docs if d["kind"] == "RayService")
    app_cfg = yaml.safe_load(service["spec"]["serveConfigV2"])["applications"][0]
    assert _max_ongoing(serve_app.app_builder(app_cfg["args"])) >= MIN_ONGOING
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    argv = compose["services"]["api"]["command"].split()
    assert argv[:3] == ["python", "-m", "service.server.serve"]
    assert serve_app.parser().parse_args(argv[3:]).max_ongoing_requests >= MIN_ONGOING


def test_every_ray_node_runs_serve_behind_haproxy() -> None:
    """The Python proxy relays each request over an actor call and topped out near 55 req/s on
    2 cores; every way of starting Ray here sets Serve's HAProxy mode instead."""
    from service.stack.local import SERVE_ENV, RayHead

    want = {"RAY_SERVE_ENABLE_HA_PROXY": "1", "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"}
    assert SERVE_ENV == want
    assert want.items() <= RayHead(Path("/nonexistent")).client_env().items()
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    for name in ("ray-head", "ray-worker", "api"):
        env = compose["services"][name]["environment"]
        assert want.items() <= {k: str(v) for k, v in env.items()}.items(), name
    docs = list(yaml.safe_load_all((ROOT / "deploy/kuberay/rayservice.yaml").read_text()))
    cluster = next(d for d in docs if d["kind"] == "RayService")["spec"]["rayClusterConfig"]
    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    for group in groups:
        env = {e["name"]: e.get("value") for e in group["template"]["spec"]["containers"][0]["env"]}
        assert want.items() <= env.items()
