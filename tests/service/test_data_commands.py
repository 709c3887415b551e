"""Datasets at the edges: ``greenmim data pack|inspect`` against the S3 server (the index and
shards checked with boto3, independently of the code that wrote them), and ``POST /v1/jobs``
refusing datasets a job cannot use before anything is created."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from service.cli import app
from tests.workers.datasets import colour_folder, png, write_folder

from .conftest import TINY, Harness, problem_ok

runner = CliRunner()
ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.service
def test_pack_and_inspect_on_s3(s3_server) -> None:
    s3 = s3_server.settings()
    env = s3.to_env()
    src, dest = "s3://greenmim/cli-data/folder", "s3://greenmim/cli-data/shards"
    write_folder(src, colour_folder(10), s3)
    r = runner.invoke(app, ["data", "pack", src, dest, "--shard-size", "16", "--json"], env=env)
    assert r.exit_code == 0, r.output
    client = s3.boto3_client()
    index = json.loads(client.get_object(Bucket="greenmim", Key="cli-data/shards/index.json")[
        "Body"].read())  # fmt: skip
    assert index["classes"] == ["blue", "green", "grey", "red"]
    assert index["splits"]["train"]["class_counts"] == [9, 9, 9, 9]  # 1 of 10 held out
    assert index["splits"]["val"]["count"] == 4
    for split in index["splits"].values():
        for shard in split["shards"]:
            body = client.get_object(Bucket="greenmim", Key=f"cli-data/shards/{shard['name']}")
            raw = body["Body"].read()
            assert (len(raw), hashlib.sha256(raw).hexdigest()) == (shard["size"], shard["sha256"])
    r = runner.invoke(
        app, ["data", "inspect", dest, "--workers", "2", "--micro-batch", "4", "--json"], env=env
    )
    assert r.exit_code == 0, r.output
    seen = json.loads(r.stdout)
    assert (seen["format"], seen["train_images"], seen["val_images"]) == ("shards", 36, 4)
    # 3 shards (16, 16, 4) over 2 workers x 2 loaders: worker 1 has 16 -> 4 micro-batches
    assert seen["per_epoch"]["micro_batches_per_worker"] == 4
    assert seen["per_epoch"]["images_used"] == 32
    r = runner.invoke(app, ["data", "inspect", src, "--json"], env=env)
    assert json.loads(r.stdout)["format"] == "imagefolder"
    # refusals: an existing index, a missing source
    r = runner.invoke(app, ["data", "pack", src, dest], env=env)
    assert r.exit_code == 2 and "already holds index.json" in r.output
    r = runner.invoke(app, ["data", "inspect", "s3://greenmim/cli-data/nothing"], env=env)
    assert r.exit_code == 2 and "empty or does not exist" in r.output


@pytest.mark.unit
def test_the_data_commands_load_without_torch() -> None:
    probe = "import sys, service.client.data_commands; print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT)
    assert done.stdout.strip() == "False", done.stderr[-2000:]


@pytest.mark.unit
def test_submit_refuses_unusable_datasets(harness: Harness, tmp_path_factory) -> None:
    d = tmp_path_factory.mktemp("datasets")  # outside the service's data directory
    (d / "empty").mkdir()
    write_folder(
        str(d / "one"), {f"only/{i}.png": png(np.zeros((4, 4, 3), np.uint8)) for i in range(4)}
    )
    write_folder(str(d / "two"), colour_folder(2))
    finetune = {**TINY, "kind": "finetune", "finetune": {"init_from": "scratch"}}
    cases = [
        (TINY, d / "missing", "does not exist"),
        (TINY, d / "empty", "is empty"),
        (finetune, d / "one", "at least 2 classes"),
    ]
    for base, uri, msg in cases:
        body = {**base, "data": {"uri": str(uri), "loader_workers": 0}}
        err = problem_ok(harness.submit(body), 422)["errors"][0]
        assert err["loc"] == "data.uri" and msg in err["msg"], err
    body = {**TINY, "data": {"uri": str(d / "two"), "format": "shards", "loader_workers": 0}}
    err = problem_ok(harness.submit(body), 422)["errors"][0]
    assert err["loc"] == "data.uri" and "no index.json" in err["msg"]
    assert harness.job_count() == 0  # nothing half-created
    ok = harness.submit({**finetune, "data": {"uri": str(d / "two"), "loader_workers": 0}})
    assert ok.status_code == 202, ok.text
