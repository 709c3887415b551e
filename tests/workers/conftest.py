"""Real components on loopback for the workers tests: a Ray cluster and an S3 server.

Run the servers' tests inside ``/work/shared/tools/loopback-only`` so nothing can leave lo.
The Ray head uses token authentication (``RAY_AUTH_MODE=token`` + a fresh ``RAY_AUTH_TOKEN``)
and is stopped by killing the process group this fixture started.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from workers.storage import S3Settings

VENV_BIN = Path(sys.executable).parent
MICRO = "swin_micro_patch2_window4_64"
REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise TimeoutError(f"{what} did not come up within {timeout}s")


def _stop_group(proc: subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL, the process group we created for ``proc`` (only ours)."""
    try:
        pgid = os.getpgid(proc.pid)
    except ProcessLookupError:
        return
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait)
            # raylet's children may outlive the CLI briefly; give the group a moment
            time.sleep(0.5)
        except subprocess.TimeoutExpired:
            continue


@pytest.fixture(scope="session")
def cache_dir():
    d = tempfile.mkdtemp(prefix="gmw-cache-")
    old = os.environ.get("GREENMIM_CACHE_DIR")
    os.environ["GREENMIM_CACHE_DIR"] = d
    yield Path(d)
    if old is None:
        os.environ.pop("GREENMIM_CACHE_DIR", None)
    else:
        os.environ["GREENMIM_CACHE_DIR"] = old
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="session")
def ray_cluster(cache_dir):
    """A 2-CPU Ray head on 127.0.0.1 with token auth.

    Yields ``{"address", "env"}``; ``env`` is what a client process (a Ray Job driver such as
    ``python -m workers.run``) needs to connect. This process never connects itself, so its
    own Ray state (imports, auth mode) cannot leak between test modules."""
    token = secrets.token_hex(32)
    port = free_port()
    temp_dir = tempfile.mkdtemp(prefix="gmw-ray-", dir="/tmp")
    env = {
        **os.environ,
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": token,
        "GREENMIM_CACHE_DIR": str(cache_dir),
        "RAY_USAGE_STATS_ENABLED": "0",
        "PYTHONPATH": str(REPO),
    }
    cmd = [
        str(VENV_BIN / "ray"), "start", "--head", "--block",
        "--node-ip-address", "127.0.0.1", "--port", str(port),
        "--num-cpus", "2", "--num-gpus", "0",
        "--include-dashboard", "false", "--dashboard-host", "127.0.0.1",
        "--temp-dir", temp_dir, "--disable-usage-stats",
    ]  # fmt: skip
    log_path = Path(temp_dir) / "ray-start.log"
    log = open(log_path, "wb")  # noqa: SIM115 (lives as long as the cluster)
    proc = subprocess.Popen(
        cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    address = f"127.0.0.1:{port}"
    client_env = {**env, "RAY_ADDRESS": address}
    try:

        def up() -> bool:
            if proc.poll() is not None:
                raise RuntimeError(f"ray start exited: {log_path.read_text()[-2000:]}")
            with socket.socket() as s:
                return s.connect_ex(("127.0.0.1", port)) == 0

        _wait(up, 60, "Ray head")
        # a token-authenticated client sees both CPUs: the cluster is ready for jobs
        probe = "import ray; ray.init(); print(ray.cluster_resources().get('CPU', 0))"
        _wait(
            lambda: (
                subprocess.run(
                    [sys.executable, "-c", probe],
                    env=client_env,
                    capture_output=True,
                    text=True,
                    timeout=60,
                )
                .stdout.strip()
                .endswith("2.0")
            ),
            90,
            "Ray node",
        )
        yield {"address": address, "env": client_env}
    finally:
        _stop_group(proc)
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def s3_server():
    """A real S3-compatible HTTP server (moto_server) on a free loopback port, with a bucket.

    Yields ``S3Settings`` for it; the bucket is ``greenmim-test``."""
    port = free_port()
    proc = subprocess.Popen(
        [str(VENV_BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    settings = S3Settings(
        endpoint_url=f"http://127.0.0.1:{port}",
        region="us-east-1",
        access_key="testing",
        secret_key="testing",
    )
    try:

        def up() -> bool:
            with socket.socket() as s:
                return s.connect_ex(("127.0.0.1", port)) == 0

        _wait(up, 30, "moto_server")
        settings.boto3_client().create_bucket(Bucket="greenmim-test")
        yield settings
    finally:
        _stop_group(proc)


@pytest.fixture
def s3_prefix(s3_server, request):
    """A fresh ``s3://greenmim-test/<test name>-<random>`` root."""
    name = request.node.name.replace("[", "-").replace("]", "")[:40]
    return f"s3://greenmim-test/{name}-{secrets.token_hex(3)}"


@pytest.fixture
def make_spec():
    return tiny_spec


def tiny_spec(kind: str = "pretrain", **sections) -> dict:
    """A spec small enough for 2 CPU cores: 64 px micro Swin, a few hundred digits, 2 workers."""
    spec = {
        "kind": kind,
        "model": MICRO,
        "data": {
            "uri": "builtin:digits",
            "max_samples": 256,
            "loader_workers": 0,
            "crop_scale": [0.5, 1.0],
        },
        "train": {
            "epochs": 3,
            "global_batch_size": 32,
            "base_lr": 1e-2,
            "warmup_epochs": 1,
            "seed": 0,
        },
        "resources": {"num_workers": 2, "cpus_per_worker": 0.5, "max_failures": 0},
        "checkpoint": {"every_epochs": 1, "keep_last": 2},
    }
    if kind == "pretrain":
        spec["mim"] = {"decoder_dim": 64, "decoder_depth": 1, "decoder_heads": 4}
    for key, value in sections.items():
        spec[key] = {**spec.get(key, {}), **value} if isinstance(value, dict) else value
    return json.loads(json.dumps(spec))
