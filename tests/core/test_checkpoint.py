"""timm-layout export/import, foreign key layouts, and configs checked on load."""

import json
import re

import pytest
import timm
import torch

import greenmim_core as gc
from greenmim_core.checkpoint import (
    encoder_state_from_timm,
    export_timm,
    filter_foreign_state_dict,
    load_timm,
    load_with_config,
    save_pretrained,
    state_dict_with_config,
)
from greenmim_core.mim import GreenMIM, MIMConfig

pytestmark = pytest.mark.unit

NAME = "swin_micro_patch2_window4_64"


def _microsoft_layout(timm_state: dict) -> dict:
    """timm keys -> Microsoft Swin keys, as their checkpoints store them (written independently)."""
    out = {}
    for k, v in timm_state.items():
        m = re.match(r"layers\.(\d+)\.downsample\.(.*)", k)
        if m:
            k = f"layers.{int(m[1]) - 1}.downsample.{m[2]}"
        out[k.replace("head.fc.", "head.")] = v
    return out


def test_save_pretrained_loads_into_timm_strict_with_equal_features(tmp_path):
    enc = gc.create_model(NAME).eval()
    save_pretrained(tmp_path, enc, enc.cfg)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["architecture"] == "swin_tiny_patch4_window7_224" and config["num_classes"] == 0
    model = timm.create_model(
        config["architecture"], num_classes=config["num_classes"], **config["model_args"]
    )
    from safetensors.torch import load_file

    model.load_state_dict(load_file(tmp_path / "model.safetensors"), strict=True)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert (model.eval().forward_features(x).flatten(1, 2) - enc(x)).abs().max() <= 1e-6
        assert torch.equal(
            load_timm(tmp_path).eval().forward_features(x), model.forward_features(x)
        )


def test_classifier_export_round_trip(tmp_path):
    cfg = gc.get_config(NAME)
    clf = timm.create_model(cfg.timm_arch, num_classes=10, **cfg.model_args()).eval()
    save_pretrained(tmp_path, clf, cfg, num_classes=10)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(load_timm(tmp_path).eval()(x), clf(x))


@pytest.mark.parametrize("wrapper", ["", "encoder.", "module.encoder."])
def test_foreign_layouts_map_to_timm(wrapper):
    cfg = gc.get_config(NAME)
    clf = timm.create_model(cfg.timm_arch, num_classes=10, **cfg.model_args())
    timm_state = clf.state_dict()
    foreign = {wrapper + k: v for k, v in _microsoft_layout(timm_state).items()}
    # what MIM checkpoints also carry: buffers saved as state, the mask token, a decoder
    foreign[wrapper + "layers.0.blocks.0.attn.relative_position_index"] = torch.zeros(3)
    foreign[wrapper + "mask_token"] = torch.zeros(1, 1, 16)
    foreign["decoder.0.weight"] = torch.zeros(3)
    mapped = filter_foreign_state_dict({"model": foreign})
    assert mapped.keys() == timm_state.keys()
    assert all(torch.equal(mapped[k], timm_state[k]) for k in timm_state)
    encoder = encoder_state_from_timm(timm_state)
    gc.create_model(NAME).load_state_dict(encoder, strict=True)


def test_timm_layout_passes_through_unchanged():
    state = gc.create_model(NAME).state_dict()
    assert filter_foreign_state_dict(state).keys() == state.keys()


def test_checkpoint_config_is_checked_on_load():
    enc = gc.create_model(NAME)
    ckpt = state_dict_with_config(enc, enc.cfg)
    other = gc.create_model(NAME)
    load_with_config(other, other.cfg, ckpt)
    assert all(
        torch.equal(a, b)
        for a, b in zip(other.state_dict().values(), enc.state_dict().values(), strict=True)
    )

    wide = gc.create_model("swin_micro_patch2_window8_64")
    with pytest.raises(ValueError, match="window_size: checkpoint 4 != model 8"):
        load_with_config(wide, wide.cfg, ckpt)
    with pytest.raises(ValueError, match="carries no config"):
        load_with_config(other, other.cfg, {"model": ckpt["model"]})


def test_mim_config_round_trips_through_a_checkpoint():
    mim = GreenMIM(
        gc.create_model(NAME), MIMConfig(decoder_dim=32, decoder_depth=1, decoder_heads=4)
    )
    ckpt = state_dict_with_config(mim, mim.cfg)
    with pytest.raises(ValueError, match="mask_ratio: checkpoint 0.75 != model 0.5"):
        load_with_config(
            mim, MIMConfig(mask_ratio=0.5, decoder_dim=32, decoder_depth=1, decoder_heads=4), ckpt
        )


def test_export_config_names_the_green_config():
    enc = gc.create_model(NAME)
    _, config = export_timm(enc, enc.cfg)
    assert config["greenmim"]["config"]["name"] == NAME
    assert config["model_args"]["window_size"] == 4 and config["model_args"]["patch_size"] == 2


TWINS = ["twins_svt_micro", "twins_pcpvt_micro"]


@pytest.mark.parametrize("name", TWINS)
def test_twins_pretrained_encoder_loads_into_timm_strict(tmp_path, name):
    """A pretrained Green Twins (inside GreenMIM) exports as timm's own architecture."""
    mim = GreenMIM(
        gc.create_model(name), MIMConfig(decoder_dim=32, decoder_depth=1, decoder_heads=4)
    )
    enc = mim.encoder.eval()
    save_pretrained(tmp_path, enc, enc.cfg)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["architecture"] == enc.cfg.timm_arch and config["num_classes"] == 0
    assert config["model_args"]["sr_ratios"] == list(enc.cfg.sr_ratios)
    model = timm.create_model(config["architecture"], num_classes=0, **config["model_args"])
    from safetensors.torch import load_file

    model.load_state_dict(load_file(tmp_path / "model.safetensors"), strict=True)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert (model.eval().forward_features(x) - enc(x)).abs().max() <= 1e-6
        assert torch.equal(
            load_timm(tmp_path).eval().forward_features(x), model.forward_features(x)
        )
    # the GreenMIM checkpoint itself (encoder. prefix, decoder, mask token) initialises timm too
    init = encoder_state_from_timm(mim.state_dict())
    assert init.keys() == model.state_dict().keys()
    gc.create_model(name).load_state_dict(init, strict=True)


@pytest.mark.parametrize("name", TWINS)
def test_twins_classifier_round_trip_and_timm_init(tmp_path, name):
    cfg = gc.get_config(name)
    clf = timm.create_model(cfg.timm_arch, num_classes=10, **cfg.model_args()).eval()
    save_pretrained(tmp_path, clf, cfg, num_classes=10)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(load_timm(tmp_path).eval()(x), clf(x))
    # timm Twins classifier weights (as a DDP checkpoint) initialise the encoder
    foreign = {"state_dict": {"module." + k: v for k, v in clf.state_dict().items()}}
    mapped = filter_foreign_state_dict(foreign)
    assert mapped.keys() == clf.state_dict().keys()
    enc = gc.create_model(name).eval()
    enc.load_state_dict(encoder_state_from_timm(foreign), strict=True)
    with torch.no_grad():
        assert torch.equal(enc(x), clf.forward_features(x))
