"""Checkpoints: timm-layout export, foreign key layouts, and configs checked on load.

``GreenSwin``'s and ``GreenTwins``' own state dicts are already in timm's key layout (they
*are* timm models), so export is a copy plus a timm-hub-style ``config.json``.
``filter_foreign_state_dict`` is the one place that knows other codebases' key names
(Microsoft Swin, SimMIM, GreenMIM; Meituan's Twins checkpoints already use timm's keys).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Protocol

import timm
import torch
from safetensors.torch import load_file, save_file
from torch import nn


class EncoderConfig(Protocol):
    """What export needs from an encoder config (``SwinConfig``, ``TwinsConfig``)."""

    timm_arch: str
    img_size: int

    @property
    def num_features(self) -> int: ...

    def model_args(self) -> dict[str, Any]: ...

    def to_dict(self) -> dict[str, Any]: ...


# non-persistent buffers that older checkpoints saved, and MIM-only parameters
_DROP = re.compile(r"(relative_position_index|attn_mask|mask_token|^decoder|\.decoder|^fpn)")
_WRAPPERS = ("module.", "model.", "encoder.", "backbone.")


def export_timm(
    model: nn.Module, cfg: EncoderConfig, num_classes: int = 0
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """State dict in timm's key layout and the config that rebuilds it with ``timm.create_model``.

    ``model`` is a Green encoder (``num_classes=0``) or a timm classifier of the same
    architecture. ``timm.create_model(c["architecture"], num_classes=c["num_classes"],
    **c["model_args"])`` then ``load_state_dict(sd, strict=True)`` reproduces it.
    """
    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
    config = {
        "architecture": cfg.timm_arch,
        "num_classes": num_classes,
        "num_features": cfg.num_features,
        "global_pool": "avg",
        "model_args": cfg.model_args(),
        "pretrained_cfg": {
            "input_size": [3, cfg.img_size, cfg.img_size],
            "mean": list(timm.data.IMAGENET_DEFAULT_MEAN),
            "std": list(timm.data.IMAGENET_DEFAULT_STD),
        },
        "greenmim": {"config": cfg.to_dict()},
    }
    return state, config


def save_pretrained(
    directory: str | Path, model: nn.Module, cfg: EncoderConfig, num_classes: int = 0
) -> None:
    """Write ``model.safetensors`` and ``config.json`` (timm layout) into ``directory``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state, config = export_timm(model, cfg, num_classes)
    save_file(state, str(directory / "model.safetensors"))
    (directory / "config.json").write_text(json.dumps(config, indent=2))


def load_timm(directory: str | Path) -> nn.Module:
    """Build the timm model described by ``config.json`` and load ``model.safetensors`` strictly."""
    directory = Path(directory)
    config = json.loads((directory / "config.json").read_text())
    model = timm.create_model(
        config["architecture"],
        pretrained=False,
        num_classes=config["num_classes"],
        **config["model_args"],
    )
    model.load_state_dict(load_file(str(directory / "model.safetensors")), strict=True)
    return model


def filter_foreign_state_dict(state_dict: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Any supported Swin or Twins checkpoint -> timm's key layout (pure; tensors are not copied).

    Handles ``{"model": ...}``/``{"state_dict": ...}`` containers, DDP/SimMIM/GreenMIM
    prefixes (``module.``, ``encoder.``), MIM-only keys (decoder, mask token), persistent
    copies of buffers, and Microsoft Swin's layout (patch merging at the *end* of a stage,
    ``head.`` instead of ``head.fc.``).
    """
    for container in ("model", "state_dict"):
        if isinstance(state_dict.get(container), dict):
            state_dict = state_dict[container]
    out = {}
    for key, value in state_dict.items():
        while key.startswith(_WRAPPERS):
            key = key.split(".", 1)[1]
        if not _DROP.search(key):
            out[key] = value
    if "layers.0.downsample.reduction.weight" in out:  # Microsoft layout
        renamed = {}
        for key, value in out.items():
            key = re.sub(
                r"^layers\.(\d+)\.downsample", lambda m: f"layers.{int(m[1]) + 1}.downsample", key
            )
            renamed[re.sub(r"^head\.(weight|bias)$", r"head.fc.\1", key)] = value
        out = renamed
    return out


def encoder_state_from_timm(state_dict: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Encoder weights (no classifier head) from a timm-layout or foreign checkpoint."""
    return {
        k: v for k, v in filter_foreign_state_dict(state_dict).items() if not k.startswith("head.")
    }


def state_dict_with_config(model: nn.Module, cfg: Any) -> dict[str, Any]:
    """``{"config": ..., "model": ...}``: a checkpoint that carries the config it was built from."""
    return {"config": cfg.to_dict(), "model": model.state_dict()}


def check_config(saved: dict[str, Any], cfg: Any) -> None:
    """Raise ValueError naming every field where a stored config differs from ``cfg``."""
    saved, expected = json.loads(json.dumps(saved)), json.loads(json.dumps(cfg.to_dict()))
    diff = {k: (saved.get(k), v) for k, v in expected.items() if saved.get(k) != v}
    if diff:
        details = ", ".join(f"{k}: checkpoint {a!r} != model {b!r}" for k, (a, b) in diff.items())
        raise ValueError(f"checkpoint config does not match the model: {details}")


def load_with_config(model: nn.Module, cfg: Any, checkpoint: dict[str, Any]) -> None:
    """Load ``checkpoint`` into ``model`` after checking its config equals ``cfg``."""
    if checkpoint.get("config") is None:
        raise ValueError(
            "checkpoint carries no config; expected one saved by state_dict_with_config"
        )
    check_config(checkpoint["config"], cfg)
    model.load_state_dict(checkpoint["model"], strict=True)
