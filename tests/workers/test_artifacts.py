"""Storage roots, checkpoint manifests and the metrics sink, on a local folder and on S3.

The same tests run on both stores; the S3 variants talk to a real moto_server on loopback
(``service`` tier), and cross-check pyarrow's view against plain boto3.
"""

from __future__ import annotations

import hashlib
import json
import os
import random

import pyarrow.fs as pafs
import pytest

from workers.artifacts import (
    CheckpointError,
    MetricsWriter,
    checkpoint_digest,
    list_checkpoints,
    make_manifest,
    read_metrics,
    verify_checkpoint,
)
from workers.storage import (
    S3Settings,
    delete_file,
    exists,
    list_files,
    open_root,
    read_bytes,
    upload_file,
    write_bytes,
)


@pytest.fixture(
    params=[
        pytest.param("local", marks=pytest.mark.unit),
        pytest.param("s3", marks=pytest.mark.service),
    ]
)
def root(request, tmp_path):
    if request.param == "local":
        return open_root(str(tmp_path / "store"))
    s3 = request.getfixturevalue("s3_settings")
    return open_root(request.getfixturevalue("s3_prefix"), s3)


# ----------------------------------------------------------------------------- storage


@pytest.mark.unit
def test_open_root_parses_uris(tmp_path):
    local = open_root(f"file://{tmp_path}/a/../b")
    assert local.scheme == "file" and local.base == f"{tmp_path}/b"
    s3 = open_root(
        "s3://bucket/some/prefix/",
        S3Settings(endpoint_url="http://127.0.0.1:9", region="eu-west-1"),
    )
    assert (
        s3.scheme == "s3"
        and s3.base == "bucket/some/prefix"
        and isinstance(s3.fs, pafs.S3FileSystem)
    )
    assert s3.to_uri(s3.job_prefix("t", "j")) == "s3://bucket/some/prefix/t/j"
    for bad in ("relative/path", "s3://", "file://relative"):
        with pytest.raises(ValueError):
            open_root(bad)
    for tenant, job in (("..", "j"), ("t", "a/b"), ("", "j")):
        with pytest.raises(ValueError):
            local.job_prefix(tenant, job)
    with pytest.raises(ValueError, match="http"):
        S3Settings(endpoint_url="127.0.0.1:9000").filesystem()


@pytest.mark.unit
def test_s3_settings_come_from_the_environment():
    env = {
        "GREENMIM_S3_ENDPOINT_URL": "http://127.0.0.1:9000",
        "AWS_ACCESS_KEY_ID": "AK",
        "AWS_SECRET_ACCESS_KEY": "SK",
        "AWS_REGION": "eu-central-1",
    }
    s = S3Settings.from_env(env)
    assert (s.endpoint_url, s.access_key, s.secret_key, s.region) == (
        "http://127.0.0.1:9000",
        "AK",
        "SK",
        "eu-central-1",
    )
    assert S3Settings.from_env(s.to_env()) == s
    assert "SK" not in repr(s)
    assert S3Settings.from_env({}) == S3Settings()


def test_bytes_round_trip_and_listing(root, tmp_path):
    job = root.job_prefix("tenant", "job")
    payload = os.urandom(3 * (1 << 20) + 17)
    write_bytes(root.fs, f"{job}/a/blob.bin", payload)
    assert read_bytes(root.fs, f"{job}/a/blob.bin") == payload
    src = tmp_path / "src.bin"
    src.write_bytes(payload[::-1])
    size, sha = upload_file(root.fs, str(src), f"{job}/a/up.bin")
    assert (size, sha) == (len(payload), hashlib.sha256(payload[::-1]).hexdigest())
    assert read_bytes(root.fs, f"{job}/a/up.bin") == payload[::-1]
    names = [i.path.rsplit("/", 1)[-1] for i in list_files(root.fs, f"{job}/a")]
    assert names == ["blob.bin", "up.bin"]  # no temporary files left behind
    assert list_files(root.fs, f"{job}/missing") == []
    delete_file(root.fs, f"{job}/a/blob.bin")
    delete_file(root.fs, f"{job}/a/blob.bin")  # missing is fine
    assert not exists(root.fs, f"{job}/a/blob.bin")


# ----------------------------------------------------------------------------- checkpoints


def _write_checkpoint(root, job, name, epoch, step, files: dict[str, bytes], manifest: bool = True):
    entries = []
    for rel, data in files.items():
        write_bytes(root.fs, f"{job}/checkpoints/{name}/{rel}", data)
        entries.append({"path": rel, "size": len(data), "sha256": hashlib.sha256(data).hexdigest()})
    if manifest:
        write_bytes(
            root.fs,
            f"{job}/checkpoints/{name}/manifest.json",
            json.dumps(make_manifest(name, epoch, step, entries)).encode(),
        )
    return entries


def test_only_complete_checkpoints_are_listed(root):
    job = root.job_prefix("t", "j")
    files = {"state.pt": os.urandom(1000), "sub/extra.bin": b"x" * 10}
    entries = _write_checkpoint(root, job, "epoch_00002", 2, 20, files)
    _write_checkpoint(root, job, "epoch_00001", 1, 10, {"state.pt": b"a" * 10})
    _write_checkpoint(
        root, job, "epoch_00003", 3, 30, {"state.pt": b"b" * 10}, manifest=False
    )  # in flight
    # a torn one: manifest present, a file shorter than recorded
    _write_checkpoint(root, job, "epoch_00004", 4, 40, {"state.pt": b"c" * 10})
    write_bytes(root.fs, f"{job}/checkpoints/epoch_00004/state.pt", b"c" * 5)
    write_bytes(
        root.fs, f"{job}/checkpoints/checkpoint_manager_snapshot.json", b"{}"
    )  # Ray's own file

    listed = list_checkpoints(root.fs, job)
    assert [(c.name, c.epoch, c.step) for c in listed] == [
        ("epoch_00001", 1, 10),
        ("epoch_00002", 2, 20),
    ]
    c2 = listed[1]
    assert c2.size == 1010 and c2.digest == checkpoint_digest(entries)
    assert c2.sha256 == c2.primary.sha256 and c2.primary.path == "state.pt"
    assert verify_checkpoint(root.fs, c2.path) == c2

    # same size, different bytes: listed (sizes match) but verification names the file
    write_bytes(root.fs, f"{job}/checkpoints/epoch_00002/state.pt", os.urandom(1000))
    with pytest.raises(CheckpointError, match="state.pt"):
        verify_checkpoint(root.fs, c2.path)
    with pytest.raises(CheckpointError, match="incomplete"):
        verify_checkpoint(root.fs, f"{job}/checkpoints/epoch_00003")


# ----------------------------------------------------------------------------- metrics


def test_metrics_survive_attempts_and_never_repeat_a_step(root):
    """Three attempts: 0 runs to step 13, 1 resumes after 8 and dies at 11, 2 resumes after 8."""
    job = root.job_prefix("t", "m")
    expected = {}
    for attempt, (resume, last) in enumerate([(0, 13), (8, 11), (8, 20)]):
        w = MetricsWriter(root.fs, job, flush_every_s=0.0 if attempt != 1 else 1e9)
        assert w.begin(resume) == attempt
        for step in range(resume + 1, last + 1):
            w.log({"type": "step", "step": step, "epoch": step // 4, "loss": attempt * 100 + step})
            expected[step] = attempt * 100 + step
        w.flush()
    series = read_metrics(root.fs, job)
    assert [r["step"] for r in series] == list(range(1, 21))
    # steps 1..8 from attempt 0, 9..20 from the final attempt: nothing superseded leaks through
    assert [r["loss"] for r in series] == [s if s <= 8 else 200 + s for s in range(1, 21)]

    after = read_metrics(root.fs, job, after_step=15)
    assert [r["step"] for r in after] == list(range(16, 21))
    assert read_metrics(root.fs, job, after_step=20) == []


def test_metrics_hold_keeps_step_and_epoch_record_together(root):
    job = root.job_prefix("t", "hold")
    w = MetricsWriter(root.fs, job, flush_every_s=0.0)
    w.begin(0)
    w.log({"type": "step", "step": 1, "epoch": 0, "loss": 1.0}, hold=True)
    assert read_metrics(root.fs, job) == []  # held back
    w.log({"type": "epoch", "step": 1, "epoch": 1, "val_top1": 50.0})
    got = read_metrics(root.fs, job)
    assert [r["type"] for r in got] == ["step", "epoch"] and all("time" in r for r in got)
    with pytest.raises(ValueError, match="'type' and 'step'"):
        w.log({"loss": 1.0})


@pytest.mark.unit
def test_metrics_reader_matches_a_reference_under_random_attempt_histories(tmp_path):
    """Random crash/resume histories against a plain dict model of 'the latest write wins'."""
    rnd = random.Random(0)
    for case in range(20):
        root = open_root(str(tmp_path / f"c{case}"))
        job = root.job_prefix("t", "j")
        truth: dict[int, float] = {}
        done = 0
        for _ in range(rnd.randint(1, 5)):
            resume = rnd.randint(0, done)  # some checkpoint at or before the furthest step
            truth = {s: v for s, v in truth.items() if s <= resume}
            w = MetricsWriter(root.fs, job, flush_every_s=0.0)
            w.begin(resume)
            end = resume + rnd.randint(0, 12)
            for step in range(resume + 1, end + 1):
                value = rnd.random()
                w.log(
                    {"type": "step", "step": step, "epoch": 0, "v": value}, hold=rnd.random() < 0.5
                )
                truth[step] = value
            if rnd.random() < 0.8:
                w.flush()
            else:  # crashed before flushing its last buffer: those records never existed
                for r in w._buf:
                    truth.pop(r["step"], None)
            done = max(done, end)
        after = rnd.choice([None, 0, rnd.randint(0, max(done, 1))])
        got = [(r["step"], r["v"]) for r in read_metrics(root.fs, job, after_step=after)]
        want = sorted((s, v) for s, v in truth.items() if after is None or s > after)
        assert got == want, case


@pytest.mark.service
def test_s3_objects_are_what_boto3_sees(s3_settings, s3_prefix):
    """pyarrow's S3 writes are plain path-style objects: cross-check with boto3."""
    root = open_root(s3_prefix, s3_settings)
    job = root.job_prefix("t", "x")
    data = os.urandom(12 << 20)  # several multipart parts
    write_bytes(root.fs, f"{job}/big.bin", data)
    bucket, key = f"{job}/big.bin".split("/", 1)
    obj = s3_settings.boto3_client().get_object(Bucket=bucket, Key=key)
    assert obj["ContentLength"] == len(data) and obj["Body"].read() == data
