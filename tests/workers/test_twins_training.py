"""A micro Twins-SVT pretrained and fine-tuned by the workers on a real local Ray cluster.

The same spec fields as the Swin runs in ``test_training.py``; only ``model`` differs.
"""

from __future__ import annotations

import json

import pytest
import timm
from safetensors.torch import load as load_safetensors

from workers.artifacts import read_metrics, read_result
from workers.storage import open_root, read_bytes

from .conftest import tiny_spec
from .test_training import run_job_process

pytestmark = pytest.mark.e2e

MODEL = "twins_svt_micro"
SMALL = {"model": MODEL, "data": {"max_samples": 64}, "resources": {"num_workers": 1}}


def _exported(fs, job):
    config = json.loads(read_bytes(fs, f"{job}/config.json"))
    model = timm.create_model(
        config["architecture"], num_classes=config["num_classes"], **config["model_args"]
    )
    model.load_state_dict(load_safetensors(read_bytes(fs, f"{job}/model.safetensors")), strict=True)
    return config, model


def test_twins_pretrain_then_finetune(ray_cluster, tmp_path):
    root = open_root(str(tmp_path / "store"))
    fs = root.fs
    pre = tiny_spec(
        "pretrain", train={"epochs": 1, "global_batch_size": 16, "warmup_epochs": 0}, **SMALL
    )
    run_job_process(ray_cluster, pre, root.uri, "acme", "twpre", tmp_path)
    pre_job = root.job_prefix("acme", "twpre")
    assert read_result(fs, pre_job)["status"] == "succeeded"
    losses = [r["loss"] for r in read_metrics(fs, pre_job) if r["type"] == "step"]
    assert losses and all(0.0 < v < 10.0 for v in losses)
    config, _ = _exported(fs, pre_job)
    assert (config["architecture"], config["num_classes"]) == ("twins_svt_small", 0)
    assert config["model_args"]["wss"] == [4, 4, 4, 4]

    ft = tiny_spec(
        "finetune",
        train={"epochs": 1, "global_batch_size": 16, "warmup_epochs": 0},
        finetune={"init_from": "job:twpre", "mixup": 0.0, "cutmix": 0.0, "layer_decay": 0.75},
        **SMALL,
    )
    run_job_process(ray_cluster, ft, root.uri, "acme", "twft", tmp_path)
    ft_job = root.job_prefix("acme", "twft")
    assert read_result(fs, ft_job)["status"] == "succeeded"
    start = next(r for r in read_metrics(fs, ft_job) if r.get("event") == "start")
    assert start["init"]["loaded"] == len(
        load_safetensors(read_bytes(fs, f"{pre_job}/model.safetensors"))
    )
    config, model = _exported(fs, ft_job)
    assert config["num_classes"] == 10 and model.head.out_features == 10
