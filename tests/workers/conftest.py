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
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from workers.local import LocalRayHead, free_port, port_open, stop_process_group, wait_for
from workers.storage import S3Settings

VENV_BIN = Path(sys.executable).parent
MICRO = "swin_micro_patch2_window4_64"
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="package")
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


@pytest.fixture(scope="package")
def ray_cluster(cache_dir):
    """A 2-CPU Ray head on 127.0.0.1 with token auth.

    Yields ``{"address", "env"}``; ``env`` is what a client process (a Ray Job driver such as
    ``python -m workers.run``) needs to connect. This process never connects itself, so its
    own Ray state (imports, auth mode) cannot leak between test modules."""
    head = LocalRayHead.start(
        num_cpus=2, env={"GREENMIM_CACHE_DIR": str(cache_dir), "PYTHONPATH": str(REPO)}
    )
    try:
        yield {"address": head.address, "env": head.client_env()}
    finally:
        head.stop()


@pytest.fixture(scope="package")
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
        wait_for(lambda: port_open(port), 30, "moto_server")
        settings.boto3_client().create_bucket(Bucket="greenmim-test")
        yield settings
    finally:
        stop_process_group(proc)


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
