"""JobSpec: what is accepted, what is rejected, and that every rejection names its field."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

import greenmim_core
from workers.spec import JobSpec, job_spec_schema, load_spec
from workers.spec_rules import validate_against_cluster

from .conftest import MICRO, tiny_spec

pytestmark = pytest.mark.unit


def errors_of(data: dict) -> list[tuple[tuple, str]]:
    with pytest.raises(ValidationError) as info:
        JobSpec.model_validate(data)
    return [(e["loc"], e["msg"]) for e in info.value.errors()]


def test_minimal_pretrain_gets_mim_defaults():
    spec = JobSpec.model_validate(
        {
            "kind": "pretrain",
            "model": MICRO,
            "data": {"uri": "builtin:digits"},
            "train": {"epochs": 1, "global_batch_size": 8},
        }
    )
    assert spec.mim is not None and spec.mim.mask_ratio == 0.75
    assert spec.resources.num_workers == 1 and spec.accum_steps == 1 and spec.micro_batch == 8
    assert spec.peak_lr == pytest.approx(spec.train.base_lr * 8 / 256)


def test_json_round_trip_is_identity():
    spec = JobSpec.model_validate(
        tiny_spec("finetune", finetune={"init_from": "job:abc", "mixup": 0.0})
    )
    again = JobSpec.model_validate_json(spec.model_dump_json())
    assert again == spec


@pytest.mark.parametrize("model", greenmim_core.list_models())
def test_every_registered_model_is_accepted_with_its_default_mask_unit(model):
    cfg = greenmim_core.get_config(model)
    spec = JobSpec.model_validate(tiny_spec(model=model))
    assert spec.arch_config() == cfg
    # and a unit of twice the stride is fine exactly when it tiles the image
    double = 2 * cfg.final_stride
    data = tiny_spec(model=model, mim={"mask_unit": double})
    if cfg.img_size % double:
        assert errors_of(data)[0][0] == ("mim", "mask_unit")
    else:
        JobSpec.model_validate(data)


@pytest.mark.parametrize(
    ("change", "loc", "needle"),
    [
        ({"model": "swin_nope"}, ("model",), MICRO),  # the message lists valid names
        ({"bogus": 1}, ("bogus",), "Extra inputs"),
        ({"kind": "train"}, ("kind",), "pretrain"),
        ({"mim": {"mask_unit": 8}}, ("mim", "mask_unit"), "final stride 16"),
        ({"mim": {"mask_unit": 48}}, ("mim", "mask_unit"), "does not divide img_size 64"),
        ({"mim": {"mask_ratio": 1.0}}, ("mim", "mask_ratio"), "less than 1"),
        (
            {"mim": {"mask_ratio": 0.99}},
            ("mim", "mask_ratio"),
            "at least one unit must stay visible",
        ),
        (
            {"mim": {"decoder_dim": 64, "decoder_heads": 5}},
            ("mim", "decoder_heads"),
            "not divisible",
        ),
        ({"mim": {"depth": 2}}, ("mim", "depth"), "Extra inputs"),
        ({"train": {"img_size": 48}}, ("train", "img_size"), "window_size 4"),
        ({"train": {"img_size": 72}}, ("train", "img_size"), "final stride"),
        ({"train": {"global_batch_size": 31}}, ("train", "global_batch_size"), "num_workers 2"),
        ({"train": {"accum_steps": 3}}, ("train", "accum_steps"), "not divisible by accum_steps 3"),
        ({"train": {"accum_steps": 0}}, ("train", "accum_steps"), "1..65536 or 'auto'"),
        ({"train": {"epochs": 0}}, ("train", "epochs"), "greater than or equal to 1"),
        ({"train": {"warmup_epochs": 3}}, ("train", "warmup_epochs"), "shorter than epochs"),
        ({"train": {"precision": "fp16"}}, ("train", "precision"), "bf16"),
        ({"train": {"base_lr": 0}}, ("train", "base_lr"), "greater than 0"),
        ({"data": {"uri": "data/relative"}}, ("data", "uri"), "absolute"),
        ({"data": {"uri": "builtin:cifar"}}, ("data", "uri"), "digits"),
        ({"data": {"uri": "s3:///nobucket"}}, ("data", "uri"), "bucket"),
        ({"data": {"crop_scale": [0.9, 0.5]}}, ("data", "crop_scale"), "min <= max"),
        ({"resources": {"cpus_per_worker": 0}}, ("resources", "cpus_per_worker"), "greater than 0"),
        ({"resources": {"gpus_per_worker": 1.5}}, ("resources", "gpus_per_worker"), "whole number"),
        (
            {"checkpoint": {"keep_last": 0}},
            ("checkpoint", "keep_last"),
            "greater than or equal to 1",
        ),
        ({"finetune": {"init_from": "scratch"}}, ("finetune",), "pretrain job takes no 'finetune'"),
    ],
)
def test_bad_pretrain_specs_name_the_field(change, loc, needle):
    data = tiny_spec(**change)
    errs = errors_of(data)
    assert loc in [e[0] for e in errs], errs
    assert any(needle in msg for l_, msg in errs if l_ == loc), errs


@pytest.mark.parametrize(
    ("change", "loc", "needle"),
    [
        ({"finetune": None}, ("finetune",), "needs a 'finetune' section"),
        ({"finetune": {"num_classes": 10}}, ("finetune", "init_from"), "required"),
        ({"finetune": {"init_from": "job:"}}, ("finetune", "init_from"), "job id"),
        ({"finetune": {"init_from": "weights.pth"}}, ("finetune", "init_from"), "absolute path"),
        (
            {"finetune": {"init_from": "scratch", "layer_decay": 0}},
            ("finetune", "layer_decay"),
            "greater than 0",
        ),
        (
            {"finetune": {"init_from": "scratch", "num_classes": 1}},
            ("finetune", "num_classes"),
            "greater than or equal to 2",
        ),
        (
            {"finetune": {"init_from": "scratch"}, "mim": {}},
            ("mim",),
            "finetune job takes no 'mim'",
        ),
        # mixup pairs up samples, so micro batches must be even: 30 / 2 workers = 15
        (
            {"finetune": {"init_from": "scratch"}, "train": {"global_batch_size": 30}},
            ("train", "global_batch_size"),
            "even",
        ),
    ],
)
def test_bad_finetune_specs_name_the_field(change, loc, needle):
    data = tiny_spec("finetune", **change)
    if change.get("finetune") is None and "finetune" in change:
        data.pop("finetune")
    errs = errors_of(data)
    assert loc in [e[0] for e in errs], errs
    assert any(needle in msg for l_, msg in errs if l_ == loc), errs


def test_several_problems_are_reported_together():
    errs = errors_of(tiny_spec(mim={"mask_unit": 8}, train={"global_batch_size": 31}))
    assert {e[0] for e in errs} == {("mim", "mask_unit"), ("train", "global_batch_size")}


@settings(max_examples=60, deadline=None)
@given(
    workers=st.integers(1, 8),
    batch=st.integers(1, 512),
    accum=st.one_of(st.just("auto"), st.integers(1, 8)),
    max_micro=st.integers(1, 64),
)
def test_batch_arithmetic(workers, batch, accum, max_micro):
    data = tiny_spec(
        data={"max_samples": 1024},  # enough images for every batch drawn here
        train={"global_batch_size": batch, "accum_steps": accum, "max_micro_batch": max_micro},
        resources={"num_workers": workers},
    )
    valid = batch % workers == 0 and (accum == "auto" or (batch // workers) % accum == 0)
    if not valid:
        errors_of(data)
        return
    spec = JobSpec.model_validate(data)
    assert spec.micro_batch * spec.accum_steps * workers == batch
    if accum == "auto":
        # the fewest accumulation steps that keep micro batches within max_micro_batch
        per_worker = batch // workers
        best = min(
            k
            for k in range(1, per_worker + 1)
            if per_worker % k == 0 and per_worker // k <= max_micro
        )
        assert spec.accum_steps == best


def test_validate_against_cluster():
    spec = JobSpec.model_validate(
        tiny_spec(resources={"num_workers": 2, "cpus_per_worker": 1, "gpus_per_worker": 1})
    )
    with pytest.raises(ValidationError) as info:
        validate_against_cluster(spec, {"CPU": 1.0, "memory": 1e9})
    locs = {e["loc"]: e["msg"] for e in info.value.errors()}
    assert set(locs) == {("resources", "gpus_per_worker"), ("resources", "cpus_per_worker")}
    assert "2 GPU, but the cluster has 0" in locs[("resources", "gpus_per_worker")]
    validate_against_cluster(spec, {"CPU": 2.0, "GPU": 2.0})


def test_schema_export_and_cli(tmp_path):
    schema = job_spec_schema()
    assert schema["additionalProperties"] is False
    assert {"kind", "model", "data", "train"} <= set(schema["required"])
    out = subprocess.run(
        [sys.executable, "-m", "workers.spec", "--schema"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert json.loads(out.stdout) == schema

    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(tiny_spec(mim={"mask_unit": 8})))
    out = subprocess.run(
        [sys.executable, "-m", "workers.spec", str(bad)], capture_output=True, text=True
    )
    assert out.returncode == 2 and "mim.mask_unit" in out.stderr


@pytest.mark.parametrize("name", ["pretrain_digits.json", "finetune_digits.json"])
def test_example_specs_are_valid(name):
    from pathlib import Path

    import workers

    spec = load_spec(Path(workers.__file__).parent / "examples" / name)
    assert spec.data.uri == "builtin:digits" and spec.resources.num_workers == 2
