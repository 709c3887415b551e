"""Jobs over packed shards on the S3 server, on the real Ray cluster (2 workers x 2 loader
processes): pretraining succeeds, a run killed mid-epoch and resumed ends bit-identical to the
uninterrupted one (so it saw the same samples in the same order, masks and augmentations
included), fine-tuning over the shards matches the same job over the ImageFolder they were
packed from, and images that cannot be read are skipped and named, or fail the job once."""

from __future__ import annotations

import os
import signal
import time

import pytest

from workers.artifacts import read_logs, read_metrics, read_result
from workers.packing import PackOptions, pack
from workers.storage import open_root, read_bytes

from .conftest import tiny_spec
from .datasets import colour_folder, write_folder
from .test_training import attempt_starts, finish_job, start_job, steps

pytestmark = pytest.mark.e2e

CORRUPT = {"train/red/zz-corrupt.png": b"\x89PNG\r\n\x1a\nbroken", "train/blue/zz-empty.png": b""}


@pytest.fixture(scope="module")
def data(s3_settings):
    """train/ (32 images a class, 4 classes, and 2 unreadable ones) and val/ (8 a class)."""
    base = f"s3://greenmim/shard-jobs-{os.getpid()}"
    files = {f"train/{k}": v for k, v in colour_folder(32, seed=0).items()}
    files |= {f"val/{k}": v for k, v in colour_folder(8, seed=1).items()} | CORRUPT
    write_folder(f"{base}/folder", files, s3_settings)
    # 130 train images in shards of 32 (the fifth holds 2): 2 workers x 2 loader processes
    # each get 64 or 66 images, 8 micro-batches of 8 (pretrain) or 4 of 16 (fine-tune)
    index = pack(f"{base}/folder", f"{base}/shards", PackOptions(32), s3_settings)
    assert [s.count for s in index.train.shards] == [32, 32, 32, 32, 2]
    return {"folder": f"{base}/folder", "shards": f"{base}/shards", "index": index}


def spec(kind: str, uri: str, **over) -> dict:
    data = {"uri": uri, "max_samples": None, "loader_workers": 2, "crop_scale": [0.8, 1.0],
            "shuffle_buffer": 16}  # fmt: skip
    sections = {"data": {**data, **over.pop("data", {})}, **over}
    if kind == "finetune":
        sections.setdefault(
            "finetune",
            {"init_from": "scratch", "mixup": 0.0, "cutmix": 0.0, "label_smoothing": 0.0,
             "drop_path_rate": 0.0},
        )  # fmt: skip
    return tiny_spec(kind, **sections)


ROOT_URI = "s3://greenmim/shard-jobs-root"


def start(ray_cluster, s3_settings, tmp_path, job_spec, job_id):
    return start_job(ray_cluster, job_spec, ROOT_URI, "acme", job_id, tmp_path, s3_settings)


def finished(proc, s3_settings, job_id, expect_rc=0):
    """Wait for a job's driver; (filesystem, job prefix) of its artifacts."""
    rc, out, _ = finish_job(proc)
    assert rc == expect_rc, out[-4000:]
    root = open_root(ROOT_URI, s3_settings)
    return root.fs, root.job_prefix("acme", job_id)


def run(ray_cluster, s3_settings, tmp_path, job_spec, job_id, expect_rc=0):
    proc = start(ray_cluster, s3_settings, tmp_path, job_spec, job_id)
    return finished(proc, s3_settings, job_id, expect_rc)


PRETRAIN = {"train": {"epochs": 2, "global_batch_size": 16}}  # 8 steps an epoch


@pytest.fixture(scope="module")
def pretrained(ray_cluster, s3_settings, data, tmp_path_factory):
    fs, job = run(
        ray_cluster, s3_settings, tmp_path_factory.mktemp("pre"),
        spec("pretrain", data["shards"], **PRETRAIN), "shards-pre",
    )  # fmt: skip
    return fs, job


def test_pretrain_over_shards_on_s3(pretrained) -> None:
    fs, job = pretrained
    assert read_result(fs, job)["status"] == "succeeded"
    records = read_metrics(fs, job)
    assert steps(records) == list(range(1, 17))  # 2 epochs x 8 steps of 16 images
    starts = [r for r in records if r.get("event") == "start"]
    assert starts[0]["steps_per_epoch"] == 8
    # each epoch draws the unreadable images once: counted when their batch is used (one
    # in a process's unused tail is not), and named in the log
    ends = [r for r in records if r["type"] == "step" and r["step"] in (8, 16)]
    assert all(1 <= r["skipped_images"] <= 2 for r in ends), ends
    logs = read_logs(fs, job)
    assert "zz-corrupt.png" in logs or "zz-empty.png" in logs


def test_killed_and_resumed_run_sees_the_same_samples(
    ray_cluster, s3_settings, data, pretrained, tmp_path
) -> None:
    job_spec = spec("pretrain", data["shards"], **PRETRAIN, resources={"max_failures": 2})
    proc = start(ray_cluster, s3_settings, tmp_path, job_spec, "shards-kill")
    root = open_root(ROOT_URI, s3_settings)
    job = root.job_prefix("acme", "shards-kill")
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:  # kill rank 0 in epoch 2, after epoch 1's checkpoint
        records = read_metrics(root.fs, job)
        done = steps(records)
        if done and 9 <= max(done) <= 13:
            os.kill([r for r in records if r.get("event") == "start"][-1]["pid"], signal.SIGKILL)
            break
        assert not done or max(done) <= 13, "missed the kill window"
        time.sleep(0.02)
    rc, out, _ = finish_job(proc)
    assert rc == 0, out[-4000:]
    assert len(attempt_starts(root.fs, job)) == 2  # it was interrupted and resumed
    fs, ref = pretrained
    assert read_bytes(root.fs, f"{job}/model.safetensors") == read_bytes(
        fs, f"{ref}/model.safetensors"
    )


FINETUNE = {"train": {"epochs": 4, "global_batch_size": 32, "base_lr": 2e-2, "warmup_epochs": 1}}


def test_finetune_over_shards_matches_the_imagefolder(
    ray_cluster, s3_settings, data, tmp_path
) -> None:
    top1 = {}
    procs = {  # the two jobs side by side: 2 x 2 workers x 0.5 CPU fill the cluster's 2 CPUs
        name: start(
            ray_cluster, s3_settings, tmp_path, spec("finetune", uri, **FINETUNE), f"ft-{name}"
        )  # fmt: skip
        for name, uri in (("shards", data["shards"]), ("folder", data["folder"]))
    }
    for name, proc in procs.items():
        fs, job = finished(proc, s3_settings, f"ft-{name}")
        epochs = [r for r in read_metrics(fs, job) if r["type"] == "epoch"]
        top1[name] = epochs[-1]["val_top1"]
        assert len(epochs) == 4
    print(f"\n[fine-tune val top-1 on 32 images] shards {top1['shards']:.1f} %, "
          f"ImageFolder {top1['folder']:.1f} %")  # fmt: skip
    assert min(top1.values()) >= 75.0  # chance is 25 %
    assert abs(top1["shards"] - top1["folder"]) <= 12.5  # 4 of 32 images


def test_too_many_unreadable_images_fail_the_job_once(
    ray_cluster, s3_settings, data, tmp_path
) -> None:
    job_spec = spec(
        "pretrain", data["folder"], data={"max_skipped_images": 0, "loader_workers": 0},
        resources={"max_failures": 2}, train={"epochs": 1, "warmup_epochs": 0},
    )  # fmt: skip
    fs, job = run(ray_cluster, s3_settings, tmp_path, job_spec, "too-bad", expect_rc=1)
    result = read_result(fs, job)
    assert result["status"] == "failed" and result["error"]["type"] == "DataError"
    assert "max_skipped_images=0" in result["error"]["message"]
    assert (
        "zz-corrupt.png" in result["error"]["message"]
        or "zz-empty.png" in result["error"]["message"]
    )
    assert len(attempt_starts(fs, job)) == 1  # not retried although max_failures is 2
