"""End to end over real HTTP: a real Ray cluster (token auth), the real workers, ``moto_server``
as S3 storage, a SQLite file, the API as a uvicorn process (SIGKILLed mid-job and restarted),
and the API under Ray Serve."""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from service.client.sdk import Client
from service.stack.local import ApiServer, RayHead, S3Server, api_env, serve_deploy
from service.stack.processes import free_port

pytestmark = pytest.mark.e2e

MODEL = "swin_micro_patch2_window4_64"


def pretrain_spec(model: str = MODEL) -> dict[str, Any]:
    return {
        "kind": "pretrain",
        "model": model,
        "data": {"uri": "builtin:digits", "max_samples": 192, "loader_workers": 0},
        "train": {"epochs": 3, "global_batch_size": 32},
        "resources": {"num_workers": 1, "cpus_per_worker": 1},
        "checkpoint": {"keep_last": 1},
    }


def finetune_spec(source: str, model: str = MODEL) -> dict[str, Any]:
    return {
        "kind": "finetune",
        "model": model,
        "data": {"uri": "builtin:digits", "max_samples": 256, "loader_workers": 0},
        "train": {"epochs": 3, "global_batch_size": 32, "base_lr": 2e-3},
        "finetune": {"init_from": f"job:{source}", "mixup": 0.0, "cutmix": 0.0},
        "resources": {"num_workers": 1, "cpus_per_worker": 1},
        "checkpoint": {"keep_last": 1},
    }


@pytest.fixture(scope="module")
def stack(
    tmp_path_factory: pytest.TempPathFactory, ray_head: RayHead, s3_server: S3Server
) -> Iterator[tuple[ApiServer, dict[str, str]]]:
    data_dir = tmp_path_factory.mktemp("e2e")
    env = api_env(data_dir, ray_head, s3_server, GREENMIM_RECONCILE_INTERVAL_S="0.5")
    api = ApiServer(data_dir, env).start()
    try:
        yield api, env
    finally:
        api.stop()


def api_key(env: dict[str, str], tenant: str) -> str:
    """``greenmim keys create`` against the API's database (same settings as the API)."""
    from service.stack.admin import key_service, stack_settings

    return str(key_service(stack_settings(Path(env["GREENMIM_DATA_DIR"]))).create(tenant).key)


def test_pretrain_finetune_crash_restart_download_timm(
    stack: tuple[ApiServer, dict[str, str]], tmp_path: Path
) -> None:
    api, env = stack
    c = Client(api.url, api_key(env, "e2e"))

    # -- pretrain: submit -> running (metrics visible while it runs) -> succeeded
    pre = c.submit(pretrain_spec())
    seen_running_metrics = False
    while True:
        job = c.get(pre.id)
        if job.state.value == "running" and c.metrics(pre.id).items:
            seen_running_metrics = True
        if job.state.value in ("succeeded", "failed", "cancelled"):
            break
        time.sleep(0.5)
    assert job.state.value == "succeeded", job.error
    assert seen_running_metrics, "no metric record was visible while the job ran"
    assert [e for e in job.latest_metrics or {}] and job.progress.epoch == 3

    # -- checkpoints listed; the final weights download through a presigned S3 URL
    ckpts = {ck.name: ck for ck in c.checkpoints(pre.id)}
    assert "final" in ckpts and any(n != "final" for n in ckpts)
    raw = httpx.get(
        f"{api.url}/v1/jobs/{pre.id}/checkpoints/final",
        headers={"Authorization": c.http.headers["Authorization"]},
    )
    assert raw.status_code == 307
    location = raw.headers["location"]
    assert location.startswith(env["GREENMIM_S3_ENDPOINT_URL"]) and "X-Amz-Expires=300" in location
    weights, sha = c.download(pre.id, "final", tmp_path)
    config, _ = c.download(pre.id, "final", tmp_path, file="config.json")
    assert sha == ckpts["final"].sha256
    load_into_timm(weights, config, expect_classes=0)

    # -- fine-tune from it; the API is SIGKILLed mid-job and restarted
    ft = c.submit(finetune_spec(pre.id))
    until_running_with_metrics(c, ft.id)
    api.kill()
    time.sleep(3)
    with pytest.raises(httpx.HTTPError):
        c.get(ft.id)
    api.start()
    done = c.wait(ft.id, timeout=600)
    assert done.state.value == "succeeded", done.error
    assert done.progress.epoch == 3 and done.ended_at is not None

    records = all_metrics(c, ft.id)
    keys = [(r["type"], r["step"]) for r in records if r["type"] in ("step", "epoch")]
    assert len(keys) == len(set(keys)), "a step was reported twice"
    assert [r["step"] for r in records if r["type"] == "step"] == list(range(1, 25))
    steps = [r["step"] for r in records]
    assert steps == sorted(steps) and done.progress.step == steps[-1]
    epochs = [r for r in records if r["type"] == "epoch"]
    assert [r["epoch"] for r in epochs] == [1, 2, 3]

    (tmp_path / "ft").mkdir()
    weights, sha = c.download(ft.id, "final", tmp_path / "ft")
    config, _ = c.download(ft.id, "final", tmp_path / "ft", file="config.json")
    load_into_timm(weights, config, expect_classes=10)


def test_twins_pretrain_then_finetune_over_http(
    stack: tuple[ApiServer, dict[str, str]], tmp_path: Path
) -> None:
    """A micro Twins (SVT) job goes the same way as a Swin one: same spec fields, same worker
    code, listed by /v1/models; both exports load into timm strictly."""
    api, env = stack
    c = Client(api.url, api_key(env, "twins"))
    assert "twins_svt_micro" in {m.name for m in c.models()}
    spec = pretrain_spec("twins_svt_micro")
    spec["train"]["epochs"] = 1
    pre = c.wait(c.submit(spec).id, timeout=600)
    assert pre.state.value == "succeeded", pre.error
    weights, _ = c.download(pre.id, "final", tmp_path)
    config, _ = c.download(pre.id, "final", tmp_path, file="config.json")
    load_into_timm(weights, config, expect_classes=0)
    ft_spec = finetune_spec(pre.id, "twins_svt_micro")
    ft_spec["train"]["epochs"] = 1
    ft = c.wait(c.submit(ft_spec).id, timeout=600)
    assert ft.state.value == "succeeded", ft.error
    (tmp_path / "ft").mkdir()
    weights, _ = c.download(ft.id, "final", tmp_path / "ft")
    config, _ = c.download(ft.id, "final", tmp_path / "ft", file="config.json")
    load_into_timm(weights, config, expect_classes=10)


def until_running_with_metrics(c: Client, job_id: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = c.get(job_id)
        assert job.state.value in ("queued", "starting", "running"), (job.state, job.error)
        if job.state.value == "running" and c.metrics(job_id).items:
            return
        time.sleep(0.5)
    raise TimeoutError(job_id)


def all_metrics(c: Client, job_id: str) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    cursor = None
    while True:
        page = c.metrics(job_id, cursor, limit=5)
        if not page.items:
            return out
        out += page.items
        cursor = page.next_after_step


def load_into_timm(weights: Path, config: Path, expect_classes: int) -> None:
    import timm
    import torch
    from safetensors.torch import load_file

    cfg = json.loads(config.read_text())
    assert cfg["num_classes"] == expect_classes
    model = timm.create_model(
        cfg["architecture"], num_classes=cfg["num_classes"], **cfg["model_args"]
    )
    result = model.load_state_dict(load_file(str(weights)), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    model.eval()
    with torch.no_grad():
        out = model(
            torch.randn(
                2, 3, cfg["model_args"].get("img_size", 64), cfg["model_args"].get("img_size", 64)
            )
        )
    assert torch.isfinite(out).all()


def test_api_under_ray_serve(ray_head: RayHead, tmp_path: Path) -> None:
    env = api_env(tmp_path, ray_head, None)
    port = free_port()
    serve_deploy(env, port, tmp_path / "serve.log")
    url = f"http://127.0.0.1:{port}"
    ready = httpx.get(f"{url}/healthz", params={"ready": True}, timeout=30)
    assert ready.status_code == 200, ready.text
    assert ready.json()["checks"] == {"database": "ok", "ray": "ok", "storage": "ok"}
    assert httpx.get(f"{url}/v1/jobs").status_code == 401
    key = api_key(env, "serve")
    with Client(url, key) as c:
        assert any(m.name == MODEL for m in c.models())
        assert c.list_jobs().items == []
        bad = httpx.post(
            f"{url}/v1/jobs",
            content=b"{",
            headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
        )
        assert bad.status_code == 400 and bad.headers["content-type"].startswith(
            "application/problem+json"
        )
    # 50 requests at once all answer, and the replica never turned one away (at Serve's default
    # of 5 ongoing requests it rejects and the proxy backs off and retries: throughput collapses).
    statuses = asyncio.run(concurrent_gets(f"{url}/v1/jobs", key, 50))
    assert statuses == [200] * 50
    replica_logs = Path(ray_head.temp_dir, "session_latest", "logs", "serve").glob("replica_*.log")
    assert not [ln for f in replica_logs for ln in f.read_text().splitlines() if "rejecting" in ln]
    subprocess_shutdown_serve(env)


async def concurrent_gets(url: str, key: str, n: int) -> list[int]:
    limits = httpx.Limits(max_connections=n)
    headers = {"Authorization": f"Bearer {key}"}
    async with httpx.AsyncClient(headers=headers, limits=limits, timeout=120) as client:
        responses = await asyncio.gather(*(client.get(url) for _ in range(n)))
    return [r.status_code for r in responses]


def subprocess_shutdown_serve(env: dict[str, str]) -> None:
    import subprocess
    import sys

    code = "import ray; from ray import serve; ray.init(address='auto', log_to_driver=False); serve.shutdown()"
    subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, **env},
        check=True,
        timeout=120,
        capture_output=True,
    )
