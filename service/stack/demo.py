"""``greenmim demo``: from nothing to an accuracy figure, everything over the real stack.

1. start the local stack (Ray head with token auth, the API under Ray Serve, SQLite, local
   storage) in a fresh data directory and create an API key;
2. submit a GreenMIM pretraining job on ``builtin:digits`` over HTTP and show its progress;
3. submit a fine-tuning job that starts from the pretraining job's weights (``job:<id>``);
4. download the fine-tuned ``model.safetensors`` + ``config.json`` (sha256 checked), build
   the timm model from the config, ``load_state_dict(strict=True)``, and report its accuracy on
   the held-out digits split (the same split the job validated on).
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Any

from rich.console import Console

from service.client.output import wait_with_progress
from service.client.sdk import Client
from service.stack.admin import ensure_local_key
from service.stack.local import start_stack, stop_stack
from service.stack.processes import free_port

MODEL = "swin_micro_patch2_window4_64"
VAL_FRACTION = 0.2


def data_spec() -> dict[str, Any]:
    """The built-in digits, one held-out split shared by the pretrain and fine-tune jobs."""
    return {
        "uri": "builtin:digits",
        "val_fraction": VAL_FRACTION,
        "loader_workers": 0,
        "crop_scale": [0.6, 1.0],
        "hflip": False,
    }


def pretrain_spec(epochs: int) -> dict[str, Any]:
    return {
        "kind": "pretrain",
        "model": MODEL,
        "data": data_spec(),
        "train": {"epochs": epochs, "global_batch_size": 64, "base_lr": 6e-3, "warmup_epochs": 1},
        "mim": {"mask_ratio": 0.75},
        "resources": {"num_workers": 1, "cpus_per_worker": 1},
        "checkpoint": {"every_epochs": 1, "keep_last": 1},
    }


def finetune_spec(epochs: int, pretrain_job: str) -> dict[str, Any]:
    return {
        "kind": "finetune",
        "model": MODEL,
        "data": data_spec(),
        "train": {"epochs": epochs, "global_batch_size": 64, "base_lr": 8e-3, "warmup_epochs": 1},
        "finetune": {
            "init_from": f"job:{pretrain_job}",
            "mixup": 0.0,
            "cutmix": 0.0,
            "label_smoothing": 0.1,
            "layer_decay": 0.9,
            "drop_path_rate": 0.0,
        },
        "resources": {"num_workers": 1, "cpus_per_worker": 1},
        "checkpoint": {"every_epochs": 1, "keep_last": 1},
    }


def evaluate_timm(weights: Path, config: Path) -> tuple[float, int]:
    """Top-1 accuracy of the downloaded weights, loaded strictly into timm, on the val split."""
    import timm
    import torch
    from safetensors.torch import load_file

    from workers.data import ImageFolderDataset, eval_transform, index_dataset
    from workers.spec import DataSpec

    cfg = json.loads(config.read_text())
    model = timm.create_model(
        cfg["architecture"], num_classes=cfg["num_classes"], **cfg["model_args"]
    )
    model.load_state_dict(load_file(str(weights)), strict=True)
    model.eval()
    # the job's own split: same DataSpec fields as finetune_spec (split_seed left at its default)
    splits = index_dataset(DataSpec(uri="builtin:digits", val_fraction=VAL_FRACTION))
    img_size = int(cfg["model_args"].get("img_size", 64))
    ds = ImageFolderDataset(splits.fs_uri, splits.val, eval_transform(img_size))
    loader = torch.utils.data.DataLoader(ds, batch_size=128)
    correct = total = 0
    with torch.no_grad():
        for x, y in loader:
            correct += int((model(x).argmax(-1) == y).sum())
            total += len(y)
    return correct / total, total


def run_demo(
    data_dir: Path | None,
    pretrain_epochs: int,
    finetune_epochs: int,
    port: int,
    keep: bool,
    out: Console,
    err: Console,
) -> int:
    t0 = time.monotonic()
    d = (data_dir or Path(tempfile.mkdtemp(prefix="greenmim-demo-"))).resolve()
    port = port or free_port()
    with err.status("starting the local stack (Ray head, API under Ray Serve)...") as status:
        state, _env = start_stack(d, port=port, serve=True, progress=lambda m: status.update(m))
    try:
        key = ensure_local_key(d)
        out.print(
            f"[green]stack up[/green] in {time.monotonic() - t0:.0f}s: {state.api_url} (data: {d})"
        )
        with Client(state.api_url, key) as c:
            pre = c.submit(pretrain_spec(pretrain_epochs), idempotency_key="demo-pretrain")
            out.print(
                f"pretrain job {pre.id}: GreenMIM on {MODEL}, builtin:digits, {pretrain_epochs} epochs"
            )
            pre = wait_with_progress(c, pre.id, timeout=1800)
            if pre.state.value != "succeeded":
                out.print(f"[red]pretraining {pre.state.value}[/red]: {pre.error}")
                return 1
            ft = c.submit(finetune_spec(finetune_epochs, pre.id), idempotency_key="demo-finetune")
            out.print(f"fine-tune job {ft.id}: from job:{pre.id}, {finetune_epochs} epochs")
            ft = wait_with_progress(c, ft.id, timeout=1800)
            if ft.state.value != "succeeded":
                out.print(f"[red]fine-tuning {ft.state.value}[/red]: {ft.error}")
                return 1
            dl = d / "download"
            dl.mkdir(exist_ok=True)
            weights, sha = c.download(ft.id, "final", dl)
            config, _ = c.download(ft.id, "final", dl, file="config.json")
            out.print(f"downloaded {weights.name} (sha256 {sha[:16]}..., verified)")
        acc, n = evaluate_timm(weights, config)
        out.print(
            f"timm.create_model + load_state_dict(strict=True): ok; "
            f"[bold]top-1 accuracy {acc:.1%}[/bold] on {n} held-out digits"
        )
        reported = ((ft.latest_metrics or {}).get("epoch") or {}).get("val_top1")
        if isinstance(reported, float):
            out.print(
                f"(the fine-tuning job itself reported val_top1 {reported:.1f}% on that split)"
            )
        out.print(f"demo finished in {time.monotonic() - t0:.0f}s")
        return 0
    finally:
        if keep:
            out.print(f"the stack keeps running: `greenmim down --data-dir {d}` stops it")
        else:
            stop_stack(d)
