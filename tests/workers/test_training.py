"""End-to-end runs on a real local Ray cluster (2 CPU workers) with real storage.

All pretraining runs here share the same training settings (only failure handling and the
store differ), and training is deterministic, so every one of them must end with bit-identical
weights: an interrupted-and-resumed run is compared against an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import load as load_safetensors

from workers.artifacts import (
    list_checkpoints,
    list_previews,
    read_metrics,
    read_result,
    verify_checkpoint,
)
from workers.data import ImageFolderDataset, eval_transform, index_dataset, unnormalize
from workers.run import SpecError, prepare
from workers.spec import JobSpec
from workers.storage import open_root, read_bytes

from .conftest import tiny_spec

pytestmark = pytest.mark.e2e

EPOCHS, SPE = 3, 8  # 256 images / 32 per step


def pretrain_spec(**resources) -> dict:
    return tiny_spec("pretrain", train={"epochs": EPOCHS}, resources=resources)


def start_job(cluster, spec: dict, root_uri: str, tenant: str, job_id: str, workdir, s3=None):
    """``python -m workers.run`` as the service submits it: a separate driver process."""
    spec_file = workdir / f"{job_id}.spec.json"
    spec_file.write_text(json.dumps(spec))
    log = open(workdir / f"{job_id}.log", "ab")  # noqa: SIM115 (closed by finish_job)
    cmd = [sys.executable, "-m", "workers.run", "--spec", str(spec_file), "--job-id", job_id,
           "--tenant", tenant, "--storage-root", root_uri, "--metrics-flush-s", "0.1"]  # fmt: skip
    env = {**cluster["env"], **(s3.to_env() if s3 else {})}
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    proc.log, proc.log_path, proc.t0 = log, workdir / f"{job_id}.log", time.monotonic()
    return proc


def finish_job(proc, timeout: float = 300) -> tuple[int, str, float]:
    """Wait for a driver; returns (exit code, its output, wall seconds)."""
    try:
        rc = proc.wait(timeout)
    finally:
        proc.log.close()
    return rc, proc.log_path.read_text(), time.monotonic() - proc.t0


def run_job_process(cluster, spec, root_uri, tenant, job_id, workdir, s3=None):
    rc, out, wall = finish_job(start_job(cluster, spec, root_uri, tenant, job_id, workdir, s3))
    assert rc == 0, out[-4000:]
    return wall


def steps(records) -> list[int]:
    return [r["step"] for r in records if r["type"] == "step"]


def attempt_starts(fs, job) -> list[int]:
    from workers.artifacts import _scan_metrics

    return [s for _, s in sorted(_scan_metrics(fs, job)[1].items())]


def kill_rank0_mid_epoch(fs, job, epoch: int, timeout: float = 180.0):
    """SIGKILL the rank-0 worker process once it is a few steps into ``epoch`` (0-based).

    Returns the checkpoints that were complete at the moment of the kill."""
    lo, hi = epoch * SPE + 1, epoch * SPE + 4  # well before the epoch's checkpoint
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        records = read_metrics(fs, job)
        starts = [r for r in records if r.get("event") in ("start", "resume")]
        done = steps(records)
        if starts and done and lo <= max(done) <= hi:
            before = list_checkpoints(fs, job)
            os.kill(starts[-1]["pid"], signal.SIGKILL)
            return before
        assert not done or max(done) <= hi, f"missed the kill window: already at step {max(done)}"
        time.sleep(0.02)
    raise TimeoutError("training never reached the kill window")


def model_bytes(fs, job) -> bytes:
    return read_bytes(fs, f"{job}/model.safetensors")


@pytest.fixture(scope="module")
def pretrained(ray_cluster, s3_settings, tmp_path_factory):
    """An uninterrupted pretraining run whose checkpoints and outputs go to S3."""
    root_uri = "s3://greenmim/e2e"
    wall = run_job_process(
        ray_cluster,
        pretrain_spec(),
        root_uri,
        "acme",
        "pre1",
        tmp_path_factory.mktemp("pre"),
        s3_settings,
    )
    root = open_root(root_uri, s3_settings)
    print(f"\n[tiny pretrain, 2 workers, S3] wall {wall:.1f}s")
    return {"root": root, "job": root.job_prefix("acme", "pre1"), "wall": wall, "s3": s3_settings}


def test_pretrain_completes_on_s3_and_loss_decreases(pretrained):
    fs, job = pretrained["root"].fs, pretrained["job"]
    result = read_result(fs, job)
    assert (
        result["status"] == "succeeded"
        and result["step"] == EPOCHS * SPE
        and result["epoch"] == EPOCHS
    )

    records = read_metrics(fs, job)
    assert steps(records) == list(range(1, EPOCHS * SPE + 1))
    step_recs = [r for r in records if r["type"] == "step"]
    for key in ("loss", "lr", "images_per_s", "step_time_s", "grad_norm", "peak_memory_mb"):
        assert all(np.isfinite(r[key]) and r[key] >= 0 for r in step_recs), key
    first = np.mean([r["loss"] for r in step_recs[:SPE]])
    last = np.mean([r["loss"] for r in step_recs[-SPE:]])
    assert last < first - 0.02, (first, last)
    epochs = [r for r in records if r["type"] == "epoch"]
    assert [e["epoch"] for e in epochs] == [1, 2, 3] and [e["step"] for e in epochs] == [8, 16, 24]
    assert epochs[-1]["val_loss"] < epochs[0]["val_loss"]
    assert all(e["val_feature_std"] > 0.01 for e in epochs)  # the encoder did not collapse
    # lr: linear warm-up over epoch 1, then cosine decay
    lrs = [r["lr"] for r in step_recs]
    peak = JobSpec.model_validate(pretrain_spec()).peak_lr
    assert all(a < b for a, b in zip(lrs[:SPE], lrs[1:SPE], strict=False))
    assert all(a >= b for a, b in zip(lrs[SPE:], lrs[SPE + 1 :], strict=False))
    assert max(lrs) <= peak and lrs[-1] < max(lrs) / 2


def test_checkpoints_on_s3_match_their_manifests_via_boto3(pretrained):
    fs, job = pretrained["root"].fs, pretrained["job"]
    ckpts = list_checkpoints(fs, job)
    assert [(c.name, c.epoch, c.step) for c in ckpts] == [
        ("epoch_00002", 2, 16),
        ("epoch_00003", 3, 24),
    ]  # keep_last=2
    client = pretrained["s3"].boto3_client()
    bucket, prefix = job.split("/", 1)
    for c in ckpts:
        assert verify_checkpoint(fs, c.path) == c
        manifest = json.loads(
            client.get_object(Bucket=bucket, Key=f"{prefix}/checkpoints/{c.name}/manifest.json")[
                "Body"
            ].read()
        )
        for f in manifest["files"]:
            body = client.get_object(
                Bucket=bucket, Key=f"{prefix}/checkpoints/{c.name}/{f['path']}"
            )["Body"].read()
            assert (len(body), hashlib.sha256(body).hexdigest()) == (f["size"], f["sha256"])
    listed = client.list_objects_v2(Bucket=bucket, Prefix=f"{prefix}/checkpoints/epoch_00001/")
    assert listed.get("KeyCount", 0) == 0  # the oldest checkpoint was deleted


def test_exported_encoder_loads_into_timm_strictly(pretrained):
    fs, job = pretrained["root"].fs, pretrained["job"]
    config = json.loads(read_bytes(fs, f"{job}/config.json"))
    state = load_safetensors(read_bytes(fs, f"{job}/model.safetensors"))
    model = timm.create_model(
        config["architecture"], num_classes=config["num_classes"], **config["model_args"]
    )
    model.load_state_dict(state, strict=True)
    assert config["num_classes"] == 0

    # the export is the encoder of the final checkpoint, tensor for tensor
    final = list_checkpoints(fs, job)[-1]
    ckpt = torch.load(io.BytesIO(read_bytes(fs, f"{final.path}/state.pt")), weights_only=True)
    encoder = {
        k.removeprefix("encoder."): v for k, v in ckpt["model"].items() if k.startswith("encoder.")
    }
    assert encoder.keys() == state.keys()
    assert all(torch.equal(encoder[k], state[k]) for k in state)


def test_previews_show_original_masked_and_reconstruction(pretrained):
    fs, job = pretrained["root"].fs, pretrained["job"]
    paths = list_previews(fs, job)
    assert len(paths) == 4
    spec = JobSpec.model_validate(pretrain_spec())
    splits = index_dataset(spec.data)
    val = ImageFolderDataset(splits.fs_uri, splits.val, eval_transform(64))
    for i, path in enumerate(paths):
        img = np.asarray(Image.open(io.BytesIO(read_bytes(fs, path))).convert("RGB"))[
            ::2, ::2
        ]  # undo 2x
        assert img.shape == (64, 64 * 3 + 4, 3)
        original, masked, recon = img[:, :64], img[:, 66:130], img[:, 132:]
        want = (
            (unnormalize(val[i][0][None])[0].permute(1, 2, 0).numpy() * 255)
            .round()
            .astype(np.uint8)
        )
        assert np.array_equal(original, want)
        grey = (masked == 128).all(axis=2)
        units = grey.reshape(4, 16, 4, 16).all(axis=(1, 3))  # 16 px mask units
        assert units.sum() == 12  # 75 % of 16 units masked
        visible = ~np.repeat(np.repeat(units, 16, 0), 16, 1)
        assert np.array_equal(recon[visible], original[visible])  # visible pixels are kept


def test_finetune_from_the_pretrain_job_reports_accuracy(ray_cluster, pretrained, tmp_path):
    root, fs = pretrained["root"], pretrained["root"].fs
    spec = tiny_spec(
        "finetune",
        train={"epochs": 2, "base_lr": 2e-2, "warmup_epochs": 0},
        data={"loader_workers": 1},  # images decoded in a DataLoader process inside the Ray worker
        finetune={"init_from": "job:pre1", "mixup": 0.0, "cutmix": 0.0, "layer_decay": 0.75},
    )
    wall = run_job_process(ray_cluster, spec, root.uri, "acme", "ft1", tmp_path, pretrained["s3"])
    print(f"\n[tiny fine-tune, 2 workers, S3] wall {wall:.1f}s")
    job = root.job_prefix("acme", "ft1")
    assert read_result(fs, job)["status"] == "succeeded"
    records = read_metrics(fs, job)
    start = next(r for r in records if r.get("event") == "start")
    assert start["init"]["path"] == f"{pretrained['job']}/model.safetensors"
    assert start["init"]["loaded"] == len(load_safetensors(model_bytes(fs, pretrained["job"])))
    epochs = [r for r in records if r["type"] == "epoch"]
    assert len(epochs) == 2 and all(0 <= e["val_top1"] <= e["val_top5"] <= 100 for e in epochs)

    # the reported accuracy is what the exported timm classifier scores on the same split
    config = json.loads(read_bytes(fs, f"{job}/config.json"))
    assert config["num_classes"] == 10
    model = timm.create_model(config["architecture"], num_classes=10, **config["model_args"])
    model.load_state_dict(load_safetensors(model_bytes(fs, job)), strict=True)
    model.eval()
    parsed = JobSpec.model_validate(spec)
    splits = index_dataset(parsed.data)
    val = ImageFolderDataset(splits.fs_uri, splits.val, eval_transform(64))
    images = torch.stack([val[i][0] for i in range(len(val))])
    labels = torch.tensor(splits.val.labels)
    with torch.no_grad():
        top1 = 100.0 * float((model(images).argmax(1) == labels).float().mean())
    assert abs(top1 - epochs[-1]["val_top1"]) <= 100.0 / len(val) + 1e-6, (
        top1,
        epochs[-1]["val_top1"],
    )
    print(
        f"[tiny fine-tune] val top-1 {epochs[-1]['val_top1']:.1f}% top-5 {epochs[-1]['val_top5']:.1f}%"
    )


def test_killed_worker_resumes_from_last_checkpoint(ray_cluster, pretrained, tmp_path):
    root = open_root(str(tmp_path / "store"))
    job = root.job_prefix("acme", "kill1")
    proc = start_job(
        ray_cluster, pretrain_spec(max_failures=1), root.uri, "acme", "kill1", tmp_path
    )
    before = kill_rank0_mid_epoch(root.fs, job, epoch=1)
    rc, out, wall = finish_job(proc)
    assert rc == 0, out[-4000:]
    print(f"\n[tiny pretrain with one worker killed, local dir] wall {wall:.1f}s")
    assert read_result(root.fs, job)["status"] == "succeeded"

    assert [c.step for c in before] == [SPE]  # killed in epoch 2, after the epoch-1 checkpoint
    after = list_checkpoints(root.fs, job)
    assert [(c.epoch, c.step) for c in after] == [(2, 2 * SPE), (3, 3 * SPE)]
    assert [verify_checkpoint(root.fs, c.path) for c in after] == after
    assert attempt_starts(root.fs, job) == [0, SPE]  # the second attempt resumed after step 8
    records = read_metrics(root.fs, job)
    assert steps(records) == list(range(1, EPOCHS * SPE + 1))  # no step lost, none twice
    resume = next(r for r in records if r.get("event") == "resume")
    assert (resume["step"], resume["epoch"], resume["attempt"]) == (SPE, 1, 1)
    # the second attempt's first step is the one after the checkpoint
    assert steps(records[records.index(resume) + 1 :])[0] == SPE + 1
    # and resuming changed nothing: same weights as the uninterrupted run
    assert model_bytes(root.fs, job) == model_bytes(pretrained["root"].fs, pretrained["job"])


def test_rerunning_a_failed_job_resumes_it(ray_cluster, pretrained, tmp_path):
    """No retries allowed: the kill fails the run; the same command again picks it up."""
    root = open_root(str(tmp_path / "store"))
    job = root.job_prefix("acme", "rerun1")
    spec = pretrain_spec(max_failures=0)
    proc = start_job(ray_cluster, spec, root.uri, "acme", "rerun1", tmp_path)
    kill_rank0_mid_epoch(root.fs, job, epoch=1)
    rc, out, _ = finish_job(proc)
    assert rc == 1, out[-4000:]
    failed = read_result(root.fs, job)
    assert failed["status"] == "failed" and failed["error"]["type"] and failed["step"] == SPE

    wall = run_job_process(ray_cluster, spec, root.uri, "acme", "rerun1", tmp_path)
    print(f"\n[rerun of a failed job] wall {wall:.1f}s")
    assert read_result(root.fs, job)["status"] == "succeeded"
    assert attempt_starts(root.fs, job) == [0, SPE]
    assert steps(read_metrics(root.fs, job)) == list(range(1, EPOCHS * SPE + 1))
    assert model_bytes(root.fs, job) == model_bytes(pretrained["root"].fs, pretrained["job"])

    # a different spec under the same job id is refused, and nothing changes
    changed = dict(spec, train={**spec["train"], "epochs": EPOCHS + 1})
    with pytest.raises(SpecError) as info:
        prepare(JobSpec.model_validate(changed), root.uri, "acme", "rerun1")
    assert info.value.field == "job_id"


def test_sigterm_cancels_the_job(ray_cluster, tmp_path):
    """``ray job stop`` signals the driver: the job ends as cancelled and frees the cluster."""
    root = open_root(str(tmp_path / "store"))
    job = root.job_prefix("acme", "cancel1")
    proc = start_job(ray_cluster, pretrain_spec(), root.uri, "acme", "cancel1", tmp_path)
    deadline = time.monotonic() + 120
    while not steps(read_metrics(root.fs, job)) and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    rc, out, _ = finish_job(proc, timeout=60)
    assert rc == 130, out[-3000:]
    assert read_result(root.fs, job)["status"] == "cancelled"
    assert max(steps(read_metrics(root.fs, job))) < EPOCHS * SPE
    # the workers went with the driver: both CPUs are free again
    probe = "import ray; ray.init(); print(ray.available_resources().get('CPU', 0))"

    def free_cpus() -> float:
        out = subprocess.run(
            [sys.executable, "-c", probe], env=ray_cluster["env"], capture_output=True, text=True
        )
        return float(out.stdout.strip().splitlines()[-1])

    deadline = time.monotonic() + 60
    while free_cpus() < 2.0:
        assert time.monotonic() < deadline, "the cancelled job's workers still hold CPUs"
        time.sleep(1)


def test_more_gpus_than_the_cluster_has_is_rejected_before_scheduling(ray_cluster, tmp_path):
    root = open_root(str(tmp_path / "store"))
    spec = tiny_spec("pretrain", resources={"gpus_per_worker": 1})
    rc, out, _ = finish_job(start_job(ray_cluster, spec, root.uri, "acme", "gpu1", tmp_path))
    assert rc == 2 and "resources.gpus_per_worker" in out and "cluster has 0" in out, out[-3000:]
    assert not os.path.exists(root.job_prefix("acme", "gpu1"))  # nothing half-created
