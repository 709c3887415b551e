"""What a job trains: the module, its optimiser and schedule (timm factories), initial weights.

- pretrain: ``GreenMIM(encoder, MIMConfig)``; ``loss, pred, mask = module(images, mask)``.
- finetune: ``Classifier(encoder)``: the dense encoder (timm's own forward) with timm's
  classification head (``reset_classifier``), so ``encoder.state_dict()`` is a complete timm
  classifier state dict.

The optimiser is AdamW without weight decay on norms, biases and position tables; fine-tuning
adds layer-wise lr decay through timm's ``group_matcher``. The schedule is timm's cosine with
linear warm-up, stepped per optimiser update.

On CUDA: AdamW is the fused kernel, ``train.precision: auto`` is bf16 autocast, and
``train.compile`` compiles the encoder blocks' token-wise layers (``compile_blocks``).
"""

from __future__ import annotations

import io
import json
import logging
from dataclasses import dataclass
from typing import Any, cast

import pyarrow.fs as pafs
import torch
from timm.models.swin_transformer import SwinTransformerBlock
from timm.models.twins import Block as TwinsBlock
from timm.optim import create_optimizer_v2
from timm.optim._param_groups import param_groups_weight_decay
from timm.scheduler import create_scheduler_v2
from torch import nn

from greenmim_core.checkpoint import encoder_state_from_timm
from greenmim_core.encoder import GreenEncoder
from greenmim_core.mim import GreenMIM, MIMConfig

from .spec import JobSpec
from .storage import S3Settings, StorageRoot, exists, read_bytes, split_uri
from .uri_policy import ReadPolicy

logger = logging.getLogger(__name__)

# 2-D parameters that are tables, not weights: no weight decay (besides every 1-D parameter)
NO_DECAY_PATTERNS = (
    "*relative_position_bias_table",
    "*absolute_pos_embed",
    "*pos_embed",
    "*mask_token",
    "*pos_block.*",  # Twins' PEG convolutions, as timm's Twins.no_weight_decay() lists them
)


class Classifier(nn.Module):
    """The dense encoder + timm's head; ``forward(images) -> logits (B, num_classes)``."""

    def __init__(self, encoder: GreenEncoder, num_classes: int):
        super().__init__()
        encoder.reset_classifier(num_classes)
        self.encoder = encoder

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.encoder.forward_head(self.encoder.forward_features(images))


@dataclass
class Built:
    module: nn.Module  # what runs forward (wrapped by DDP later)
    encoder: GreenEncoder  # inside ``module``; exported at the end
    cfg: Any  # the encoder's greenmim_core config (SwinConfig, TwinsConfig)
    mim_cfg: MIMConfig | None
    num_classes: int  # 0 for pretrain


def build_module(spec: JobSpec, num_classes: int) -> Built:
    cfg = spec.arch_config()
    encoder = cfg.build()
    if spec.kind == "pretrain":
        assert spec.mim is not None  # guaranteed by JobSpec validation
        mim_cfg = MIMConfig(**spec.mim.config_kwargs())
        return Built(GreenMIM(encoder, mim_cfg), encoder, cfg, mim_cfg, 0)
    return Built(Classifier(encoder, num_classes), encoder, cfg, None, num_classes)


def resolved_precision(precision: str, device: torch.device) -> str:
    """``train.precision`` on ``device``: ``auto`` is bf16 on CUDA and fp32 elsewhere."""
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return precision


def compile_blocks(encoder: GreenEncoder) -> None:
    """``torch.compile`` each block's token-wise layers in place (parameter names unchanged).

    Norms and MLP hold most of a block's FLOPs (Swin's and Twins') and see (B, N, C) tokens whose shape is
    fixed by the batch and mask ratio, on the visible path as on the dense one; the attention
    core's shapes change with every batch of masks, so it stays eager.
    """
    for blk in encoder.modules():
        if isinstance(blk, SwinTransformerBlock | TwinsBlock):
            for module in (blk.norm1, blk.norm2, blk.mlp):
                cast(nn.Module, module).compile()


def create_optimizer(
    spec: JobSpec, built: Built, device: torch.device | None = None
) -> torch.optim.Optimizer:
    """AdamW; the fused CUDA kernel when ``device`` is CUDA (params must already be there)."""
    lr, wd = spec.peak_lr, spec.train.weight_decay
    extra: dict[str, Any] = {"fused": True} if device is not None and device.type == "cuda" else {}
    if spec.kind == "finetune":
        assert spec.finetune is not None
        # timm reads no_weight_decay() and group_matcher() from the timm model itself
        return create_optimizer_v2(
            built.encoder,
            opt="adamw",
            lr=lr,
            weight_decay=wd,
            layer_decay=spec.finetune.layer_decay,
            **extra,
        )
    groups = param_groups_weight_decay(built.module, wd, no_weight_decay_list=NO_DECAY_PATTERNS)
    return create_optimizer_v2(groups, opt="adamw", lr=lr, weight_decay=wd, **extra)


def create_scheduler(spec: JobSpec, optimizer: torch.optim.Optimizer, steps_per_epoch: int):
    """timm cosine schedule in optimiser updates; call ``step_update(num_updates=step)``."""
    scheduler, _ = create_scheduler_v2(
        optimizer,
        sched="cosine",
        num_epochs=spec.train.epochs,
        # timm multiplies by updates_per_epoch, so fractional warm-up epochs work
        warmup_epochs=spec.train.warmup_epochs,  # type: ignore[arg-type]
        warmup_lr=min(1e-6, spec.peak_lr),
        min_lr=min(spec.train.min_lr, spec.peak_lr),
        step_on_epochs=False,
        updates_per_epoch=steps_per_epoch,
    )
    return scheduler


# ----------------------------------------------------------------------------- initial weights


def resolve_init_from(
    init_from: str,
    root: StorageRoot,
    tenant: str,
    s3: S3Settings | None = None,
    policy: ReadPolicy | None = None,
) -> tuple[pafs.FileSystem, str]:
    """``FinetuneSpec.init_from`` -> (fs, path) of a weights file; raises ValueError if absent
    or refused.

    ``job:<id>`` is that job's ``model.safetensors`` under the same tenant and root. Any other
    URI must pass ``policy`` (default: the read policy of ``root`` alone) and is opened in its
    canonical form. A folder is searched for ``model.safetensors``, then for a training
    checkpoint (``state.pt``).
    """
    if init_from.startswith("job:"):
        job_id = init_from.removeprefix("job:")
        path = f"{root.job_prefix(tenant, job_id)}/model.safetensors"
        if not exists(root.fs, path):
            raise ValueError(
                f"finetune.init_from: job {job_id!r} has no exported weights (model.safetensors) "
                "under this tenant; is it a finished job?"
            )
        return root.fs, path
    policy = policy or ReadPolicy.of(root.uri)
    fs, path = split_uri(policy.check(init_from, "finetune.init_from"), s3)
    if path.endswith(".safetensors") or path.endswith((".pth", ".pt", ".bin")):
        if not exists(fs, path):
            raise ValueError(f"finetune.init_from: {init_from!r} does not exist")
        return fs, path
    for name in ("model.safetensors", "state.pt"):
        if exists(fs, f"{path}/{name}"):
            return fs, f"{path}/{name}"
    raise ValueError(
        f"finetune.init_from: {init_from!r} is neither a weights file (.safetensors/.pth/.pt/.bin) "
        "nor a folder holding model.safetensors or a checkpoint's state.pt"
    )


def load_weights_file(fs: pafs.FileSystem, path: str) -> dict[str, torch.Tensor]:
    raw = read_bytes(fs, path)
    if path.endswith(".safetensors"):
        from safetensors.torch import load

        return load(raw)
    state = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a state dict, got {type(state).__name__}")
    return state


def load_initial_encoder(encoder: GreenEncoder, fs: pafs.FileSystem, path: str) -> dict[str, Any]:
    """Load encoder weights (any timm-layout or foreign Swin/Twins checkpoint) into ``encoder``.

    The classifier head stays freshly initialised. Raises ValueError on missing encoder keys or
    shape mismatches (e.g. another architecture). Returns a summary for the logs."""
    state = encoder_state_from_timm(load_weights_file(fs, path))
    own = encoder.state_dict()
    mismatched = [
        f"{k}: checkpoint {tuple(v.shape)} != model {tuple(own[k].shape)}"
        for k, v in state.items()
        if k in own and own[k].shape != v.shape
    ]
    if mismatched:
        raise ValueError(
            f"initial weights {path} do not fit {encoder.cfg.name}: " + "; ".join(mismatched[:5])
        )
    result = encoder.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not k.startswith("head.")]
    if missing:
        raise ValueError(f"initial weights {path} lack encoder keys: {missing[:8]}")
    summary = {"path": path, "loaded": len(state), "unexpected": list(result.unexpected_keys)}
    logger.info("initial weights: %s", json.dumps(summary)[:500])
    return summary


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def unwrap(module: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel wrapper (or the module itself)."""
    return module.module if isinstance(module, nn.parallel.DistributedDataParallel) else module
