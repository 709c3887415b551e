"""Real components on loopback for the workers tests: a Ray cluster and an S3 server.

The servers themselves are the session's (``tests/conftest.py``); these fixtures give them the
shapes the workers use.
"""

from __future__ import annotations

import json
import os
import secrets
import sys
from pathlib import Path

import pytest

from workers.storage import S3Settings

VENV_BIN = Path(sys.executable).parent
MICRO = "swin_micro_patch2_window4_64"
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="package")
def ray_cluster(ray_head):
    """``{"address", "env"}`` of the session's Ray head; ``env`` is the whole environment a
    driver process (``python -m workers.run``) of that cluster needs."""
    return {"address": ray_head.address, "env": {**os.environ, **ray_head.client_env()}}


@pytest.fixture(scope="package")
def s3_settings(s3_server) -> S3Settings:
    """How the workers reach the session's S3 server (bucket ``greenmim``)."""
    return s3_server.settings()


@pytest.fixture
def s3_prefix(s3_settings, request):
    """A fresh ``s3://greenmim/<test name>-<random>`` root."""
    name = request.node.name.replace("[", "-").replace("]", "")[:40]
    return f"s3://greenmim/{name}-{secrets.token_hex(3)}"


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
