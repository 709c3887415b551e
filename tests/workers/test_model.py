"""Optimiser groups, schedule, initial weights and checkpoint state (no Ray)."""

from __future__ import annotations

import json
import math
import random

import numpy as np
import pyarrow.fs as pafs
import pytest
import timm
import torch
from safetensors.torch import save_file

from workers.artifacts import MANIFEST, make_manifest
from workers.checkpointing import read_state, rng_state, set_rng_state, write_state
from workers.model import (
    build_module,
    compile_blocks,
    create_optimizer,
    create_scheduler,
    load_initial_encoder,
    resolve_init_from,
    resolved_precision,
)
from workers.spec import JobSpec
from workers.storage import open_root

from .conftest import tiny_spec

pytestmark = pytest.mark.unit


def spec_of(kind="pretrain", **kw) -> JobSpec:
    if kind == "finetune":
        kw.setdefault("finetune", {"init_from": "scratch"})
    return JobSpec.model_validate(tiny_spec(kind, **kw))


def groups_by_param(optimizer) -> dict[int, dict]:
    return {id(p): g for g in optimizer.param_groups for p in g["params"]}


@pytest.mark.parametrize("kind", ["pretrain", "finetune"])
def test_no_weight_decay_on_norms_biases_and_position_tables(kind):
    spec = spec_of(kind, train={"weight_decay": 0.05})
    built = build_module(spec, num_classes=10)
    groups = groups_by_param(create_optimizer(spec, built))
    named = dict(built.module.named_parameters())
    assert set(groups) == {id(p) for p in named.values()}  # every parameter is optimised once
    for name, p in named.items():
        exempt = p.ndim <= 1 or "relative_position_bias_table" in name or "mask_token" in name
        assert groups[id(p)]["weight_decay"] == (0.0 if exempt else 0.05), name


def test_layer_decay_scales_lr_by_depth():
    spec = spec_of("finetune", finetune={"init_from": "scratch", "layer_decay": 0.5})
    built = build_module(spec, num_classes=10)
    groups = groups_by_param(create_optimizer(spec, built))
    enc = built.encoder
    scale = {name: groups[id(p)]["lr_scale"] for name, p in enc.named_parameters()}
    assert scale["head.fc.weight"] == 1.0
    assert scale["patch_embed.proj.weight"] == min(scale.values())
    # deeper blocks learn faster: stage 0 < stage 3, each a power of the decay
    s0, s3 = scale["layers.0.blocks.0.attn.qkv.weight"], scale["layers.3.blocks.1.attn.qkv.weight"]
    assert s0 < s3 < 1.0
    assert math.log(s0 / s3, 0.5) == pytest.approx(round(math.log(s0 / s3, 0.5)))


def test_schedule_is_warmup_then_cosine_per_step():
    spec = spec_of(train={"epochs": 4, "warmup_epochs": 1, "base_lr": 1e-2, "min_lr": 1e-5})
    built = build_module(spec, 0)
    opt = create_optimizer(spec, built)
    sched = create_scheduler(spec, opt, steps_per_epoch=10)
    lrs = []
    for t in range(40):
        sched.step_update(num_updates=t)
        lrs.append(opt.param_groups[0]["lr"])
    peak = spec.peak_lr
    assert lrs[0] == pytest.approx(1e-6)
    assert all(a < b for a, b in zip(lrs[:10], lrs[1:10], strict=False))
    cosine = [1e-5 + 0.5 * (peak - 1e-5) * (1 + math.cos(math.pi * t / 40)) for t in range(10, 40)]
    assert lrs[10:] == pytest.approx(cosine)
    # a schedule restored from its state dict continues identically, even one built from a
    # spec with another learning rate (as a resumed job's would be if its spec were edited)
    other = spec_of(train={"epochs": 4, "warmup_epochs": 1, "base_lr": 5e-3, "min_lr": 1e-5})
    opt2 = create_optimizer(other, build_module(other, 0))
    sched2 = create_scheduler(other, opt2, steps_per_epoch=10)
    sched2.load_state_dict(sched.state_dict())
    resumed = []
    for t in range(20, 40):
        sched2.step_update(num_updates=t)
        resumed.append(opt2.param_groups[0]["lr"])
    assert resumed == lrs[20:]


def test_initial_weights_from_a_timm_checkpoint(tmp_path):
    spec = spec_of("finetune")
    cfg = spec.arch_config()
    donor = timm.create_model(cfg.timm_arch, num_classes=5, **cfg.model_args())
    save_file(donor.state_dict(), str(tmp_path / "model.safetensors"))
    built = build_module(spec, num_classes=10)
    root = open_root(str(tmp_path.parent / f"{tmp_path.name}-store"))
    fs, path = resolve_init_from(str(tmp_path), root, "t")  # a folder holding model.safetensors
    summary = load_initial_encoder(built.encoder, fs, path)
    mine = built.encoder.state_dict()
    for k, v in donor.state_dict().items():
        if not k.startswith("head."):
            assert torch.equal(mine[k], v), k
    assert mine["head.fc.weight"].shape == (10, cfg.num_features)  # fresh head, right size
    assert summary["loaded"] == len([k for k in donor.state_dict() if not k.startswith("head.")])

    # the same weights through a .pth file with a DDP prefix and a {"model": ...} container
    torch.save(
        {"model": {f"module.{k}": v for k, v in donor.state_dict().items()}}, tmp_path / "w.pth"
    )
    other = build_module(spec, num_classes=10)
    load_initial_encoder(other.encoder, pafs.LocalFileSystem(), str(tmp_path / "w.pth"))
    assert torch.equal(
        other.encoder.layers[2].blocks[0].attn.qkv.weight, donor.layers[2].blocks[0].attn.qkv.weight
    )


def test_initial_weights_of_another_architecture_are_refused(tmp_path):
    tiny = timm.create_model("swin_tiny_patch4_window7_224", num_classes=0)
    save_file(tiny.state_dict(), str(tmp_path / "model.safetensors"))
    built = build_module(spec_of("finetune"), num_classes=10)
    with pytest.raises(ValueError, match="do not fit"):
        load_initial_encoder(
            built.encoder, pafs.LocalFileSystem(), str(tmp_path / "model.safetensors")
        )
    root = open_root(str(tmp_path / "store"))
    with pytest.raises(ValueError, match="job 'nope'"):
        resolve_init_from("job:nope", root, "t")
    with pytest.raises(ValueError, match="neither a weights file"):
        resolve_init_from(str(tmp_path / "empty"), root, "t")


def test_rng_state_round_trips_through_a_checkpoint(tmp_path):
    torch.manual_seed(1)
    np.random.seed(2)
    random.seed(3)
    torch.rand(5), np.random.rand(3), random.random()
    state = rng_state()
    expected = (torch.rand(4), np.random.rand(4), [random.random() for _ in range(4)])
    write_state(tmp_path, {"rng": state, "model": {"w": torch.ones(3)}}, "{}")
    files = [
        {"path": p.name, "size": p.stat().st_size, "sha256": _sha(p)} for p in tmp_path.iterdir()
    ]
    (tmp_path / MANIFEST).write_text(json.dumps(make_manifest("c", 1, 1, files)))
    loaded = read_state(tmp_path)
    torch.manual_seed(99), np.random.seed(99), random.seed(99)
    set_rng_state(loaded["rng"])
    got = (torch.rand(4), np.random.rand(4), [random.random() for _ in range(4)])
    assert (
        torch.equal(got[0], expected[0])
        and np.array_equal(got[1], expected[1])
        and got[2] == expected[2]
    )

    raw = bytearray((tmp_path / "state.pt").read_bytes())
    raw[-1] ^= 0xFF
    (tmp_path / "state.pt").write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="does not match its manifest"):
        read_state(tmp_path)


def _sha(path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_initial_weights_from_a_pretrain_checkpoint_folder(tmp_path):
    """A training checkpoint of a pretrain job (GreenMIM state, decoder included) as init_from."""
    pre = build_module(spec_of("pretrain"), num_classes=0)
    write_state(tmp_path, {"model": pre.module.state_dict()}, "{}")
    built = build_module(spec_of("finetune"), num_classes=10)
    store = open_root(str(tmp_path.parent / f"{tmp_path.name}-store"))
    fs, path = resolve_init_from(f"file://{tmp_path}", store, "t")
    assert path.endswith("/state.pt")
    summary = load_initial_encoder(built.encoder, fs, path)
    want = pre.encoder.state_dict()
    got = built.encoder.state_dict()
    assert summary["loaded"] == len([k for k in want if not k.startswith("head.")])
    assert all(torch.equal(got[k], v) for k, v in want.items() if not k.startswith("head."))


TWINS_MICRO = "twins_svt_micro"


@pytest.mark.parametrize("kind", ["pretrain", "finetune"])
def test_twins_jobs_build_train_a_step_and_skip_decay_on_peg(kind):
    """A Twins spec uses the same fields as a Swin one; one optimiser step changes the weights."""
    spec = spec_of(kind, model=TWINS_MICRO, train={"weight_decay": 0.05})
    built = build_module(spec, num_classes=10)
    opt = create_optimizer(spec, built)
    groups = groups_by_param(opt)
    named = dict(built.module.named_parameters())
    assert set(groups) == {id(p) for p in named.values()}
    for name, p in named.items():
        exempt = p.ndim <= 1 or "pos_block" in name or "mask_token" in name
        assert groups[id(p)]["weight_decay"] == (0.0 if exempt else 0.05), name
    images = torch.randn(4, 3, 64, 64)
    if kind == "pretrain":
        loss = built.module(images)[0]
    else:
        loss = torch.nn.functional.cross_entropy(built.module(images), torch.arange(4))
    before = built.encoder.patch_embeds[0].proj.weight.detach().clone()
    loss.backward()
    opt.step()
    assert torch.isfinite(loss)
    assert not torch.equal(before, built.encoder.patch_embeds[0].proj.weight)


def test_twins_finetune_initialises_from_a_timm_twins(tmp_path):
    spec = spec_of("finetune", model=TWINS_MICRO)
    cfg = spec.arch_config()
    donor = timm.create_model(cfg.timm_arch, num_classes=5, **cfg.model_args())
    save_file(donor.state_dict(), str(tmp_path / "model.safetensors"))
    built = build_module(spec, num_classes=10)
    summary = load_initial_encoder(
        built.encoder, pafs.LocalFileSystem(), str(tmp_path / "model.safetensors")
    )
    mine = built.encoder.state_dict()
    assert summary["loaded"] == len(donor.state_dict()) - 2  # all but the donor's head
    for k, v in donor.state_dict().items():
        if not k.startswith("head."):
            assert torch.equal(mine[k], v), k
    assert mine["head.weight"].shape == (10, cfg.num_features)
    # a Swin checkpoint does not fit a Twins encoder
    spec_swin = spec_of("finetune")
    swin = build_module(spec_swin, num_classes=10).encoder
    save_file(swin.state_dict(), str(tmp_path / "swin.safetensors"))
    with pytest.raises(ValueError, match="do not fit twins_svt_micro|lack encoder keys"):
        load_initial_encoder(
            built.encoder, pafs.LocalFileSystem(), str(tmp_path / "swin.safetensors")
        )


def test_twins_spec_rejects_a_mask_unit_off_the_final_stride():
    with pytest.raises(ValueError, match="final stride 16"):
        spec_of("pretrain", model=TWINS_MICRO, mim={"mask_unit": 24})
    with pytest.raises(ValueError, match="window size 4 must be >= 2 and divide stage 3 grid 6"):
        spec_of("pretrain", model=TWINS_MICRO, train={"img_size": 96})


def test_precision_defaults_to_auto_bf16_on_cuda_only():
    spec = spec_of()
    assert spec.train.precision == "auto"
    assert resolved_precision("auto", torch.device("cuda")) == "bf16"
    assert resolved_precision("auto", torch.device("cpu")) == "fp32"
    for explicit in ("fp32", "bf16"):
        assert spec_of(train={"precision": explicit}).train.precision == explicit
        assert resolved_precision(explicit, torch.device("cpu")) == explicit


@pytest.mark.parametrize("kind", ["pretrain", "finetune"])
def test_adamw_is_fused_on_cuda_only(kind):
    spec = spec_of(kind)
    built = build_module(spec, 10 if kind == "finetune" else 0)
    assert not create_optimizer(spec, built, torch.device("cpu")).defaults.get("fused")
    if torch.cuda.is_available():
        built.module.cuda()
        assert create_optimizer(spec, built, torch.device("cuda")).defaults["fused"] is True


def test_compile_blocks_keeps_timm_parameter_names():
    built = build_module(spec_of(train={"compile": True}), 0)
    keys = list(built.encoder.state_dict())
    compile_blocks(built.encoder)
    assert list(built.encoder.state_dict()) == keys
