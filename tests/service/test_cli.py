"""The ``greenmim`` CLI against a live API (uvicorn) on the real Ray cluster; the jobs run the
stand-in worker command, so this tests the CLI's behaviour, output and exit codes."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from service.cli import app
from service.stack.local import ApiServer, RayHead, api_env
from service.stack.processes import free_port

from .conftest import TINY, write_fake_artifacts

pytestmark = pytest.mark.service
runner = CliRunner()


@pytest.fixture(scope="module")
def live(
    tmp_path_factory: pytest.TempPathFactory, ray_head: RayHead, fake_python: str
) -> Iterator[dict[str, Any]]:
    d = tmp_path_factory.mktemp("cli")
    env = api_env(
        d, ray_head, None, GREENMIM_WORKER_PYTHON=fake_python, GREENMIM_RECONCILE_INTERVAL_S="0.3"
    )
    api = ApiServer(d, env).start()
    try:
        yield {"dir": d, "env": env, "url": api.url}
    finally:
        api.stop()


def cli(live: dict[str, Any], *args: str, key: str | None = None) -> Any:
    env = {**live["env"], "GREENMIM_URL": live["url"]}
    if key:
        env["GREENMIM_API_KEY"] = key
    return runner.invoke(app, list(args), env=env)


@pytest.fixture(scope="module")
def key(live: dict[str, Any]) -> str:
    r = cli(live, "keys", "create", "--tenant", "cli", "--json")
    assert r.exit_code == 0, r.output
    return str(json.loads(r.stdout)["key"])


def spec_file(tmp_path: Path, seconds: int, exit_code: int = 0, **extra: Any) -> Path:
    spec = {
        **TINY,
        "train": {"epochs": seconds, "global_batch_size": 16, "seed": exit_code},
        **extra,
    }
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_keys_create_refuses_bad_tenant(live: dict[str, Any]) -> None:
    r = cli(live, "keys", "create", "--tenant", "Bad Name!")
    assert r.exit_code == 2 and "tenant" in r.output


def test_submit_wait_exit_codes_and_json(live: dict[str, Any], key: str, tmp_path: Path) -> None:
    ok = cli(live, "submit", str(spec_file(tmp_path, 2)), "--wait", "--json", key=key)
    assert ok.exit_code == 0, ok.output
    job = json.loads(ok.stdout)
    assert job["state"] == "succeeded" and job["progress"]["step"] == 2
    bad = cli(live, "submit", str(spec_file(tmp_path, 1, exit_code=1)), "--wait", key=key)
    assert bad.exit_code == 1 and "failed" in bad.output
    status = cli(live, "status", job["id"], "--json", key=key)
    assert status.exit_code == 0 and json.loads(status.stdout)["id"] == job["id"]
    listed = cli(live, "list", "--json", "--state", "succeeded", key=key)
    assert [j["id"] for j in json.loads(listed.stdout)] == [job["id"]]
    metrics = cli(live, "metrics", job["id"], "--json", key=key)
    assert [json.loads(line)["step"] for line in metrics.stdout.splitlines()] == [1, 2]
    follow = cli(live, "metrics", job["id"], "-f", "--json", key=key)
    assert follow.exit_code == 0 and [
        json.loads(x)["step"] for x in follow.stdout.splitlines()
    ] == [1, 2]
    logs = cli(live, "logs", job["id"], "-f", key=key)
    assert logs.exit_code == 0 and f"fake worker {job['id']}" in logs.stdout


def test_cancel_and_status_exit_code(live: dict[str, Any], key: str, tmp_path: Path) -> None:
    sub = cli(live, "submit", str(spec_file(tmp_path, 60)), "--json", key=key)
    job_id = json.loads(sub.stdout)["id"]
    assert cli(live, "cancel", job_id, key=key).exit_code == 0
    waited = cli(live, "status", job_id, "--wait", "--timeout", "60", key=key)
    assert waited.exit_code == 3 and "cancelled" in waited.output


def test_download_verifies_sha256(live: dict[str, Any], key: str, tmp_path: Path) -> None:
    sub = cli(live, "submit", str(spec_file(tmp_path, 1)), "--json", key=key)
    job_id = json.loads(sub.stdout)["id"]
    shas = write_fake_artifacts(str(live["dir"] / "artifacts"), "cli", job_id)
    r = cli(live, "download", job_id, "-o", str(tmp_path), "--json", key=key)
    assert r.exit_code == 0, r.output
    got = json.loads(r.stdout)
    assert got["sha256"] == shas["model"]
    assert hashlib.sha256(Path(got["path"]).read_bytes()).hexdigest() == shas["model"]


def test_input_and_connection_errors(live: dict[str, Any], key: str, tmp_path: Path) -> None:
    bad = spec_file(tmp_path, 1, mim={"mask_unit": 12})
    r = cli(live, "submit", str(bad), key=key)
    assert r.exit_code == 2 and "mim.mask_unit" in r.output
    assert cli(live, "status", "gm-nope", key=key).exit_code == 2
    assert cli(live, "list", key="gmk_0123456789abcdef_" + "x" * 43).exit_code == 2
    env = {
        **live["env"],
        "GREENMIM_URL": f"http://127.0.0.1:{free_port()}",
        "GREENMIM_API_KEY": key,
    }
    r = runner.invoke(app, ["list"], env=env)
    assert r.exit_code == 4 and "cannot reach" in r.output
    assert os.environ.get("GREENMIM_API_KEY") is None
