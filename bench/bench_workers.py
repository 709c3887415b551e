"""Workers benchmarks; prints tables. Run inside the loopback-only wrapper:

    ../shared/tools/loopback-only .venv/bin/python bench/bench_workers.py upload
    ../shared/tools/loopback-only .venv/bin/python bench/bench_workers.py speed
    ../shared/tools/loopback-only .venv/bin/python bench/bench_workers.py accuracy --seeds 0 1 2

upload    checkpoint upload to a loopback S3 server (moto_server): the checkpoint path
          (sha256 + boto3 parallel multipart + manifest), the same through a pyarrow
          S3FileSystem stream (used without S3 credentials at hand), pyarrow.fs.copy_files
          (Ray Train's default upload) and a plain boto3 multipart upload of the same bytes.
speed     training images/s of one worker process with one CPU thread (what a Ray worker with
          cpus_per_worker=1 gets), GreenMIM pretraining vs dense fine-tuning steps.
accuracy  on the built-in digits: GreenMIM pretraining, then fine-tuning from it vs from
          scratch with the same fine-tune budget, a few seeds; real Ray jobs on a local
          2-CPU cluster (python -m workers.run, as the service submits them).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from service.stack.local import RayHead, S3Server  # noqa: E402
from workers.storage import open_root  # noqa: E402


def table(title: str, header: list[str], rows: list[list[object]]) -> None:
    cells = [header] + [[f"{c:.2f}" if isinstance(c, float) else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    print(f"\n{title}")
    for i, r in enumerate(cells):
        print("  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)))
        if i == 0:
            print("  ".join("-" * w for w in widths))
    sys.stdout.flush()


# ----------------------------------------------------------------------------- upload


def bench_upload(sizes_mb: list[int], repeats: int) -> None:
    import pyarrow.fs as pafs
    from boto3.s3.transfer import TransferConfig

    from workers.checkpointing import upload_with_manifest

    server = S3Server(Path(tempfile.mkdtemp(prefix="gm-bench-s3-"))).start()
    s3 = server.settings()
    client = s3.boto3_client()
    root = open_root(f"s3://{server.bucket}/ckpt", s3)
    transfer = TransferConfig(
        multipart_threshold=8 << 20, multipart_chunksize=8 << 20, max_concurrency=10
    )
    rows = []
    try:
        for size in sizes_mb:
            tmp = Path(tempfile.mkdtemp(prefix="gm-bench-"))
            (tmp / "ckpt").mkdir()
            (tmp / "ckpt" / "state.pt").write_bytes(os.urandom(size << 20))
            times: dict[str, list[float]] = {
                "checkpoint": [],
                "stream": [],
                "copy_files": [],
                "boto3": [],
            }
            for i in range(repeats):
                dest = root.path(f"{size}mb-{i}")
                t0 = time.perf_counter()
                upload_with_manifest(root.fs, tmp / "ckpt", f"{dest}/a", "a", 1, 1, s3)
                times["checkpoint"].append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                upload_with_manifest(root.fs, tmp / "ckpt", f"{dest}/s", "s", 1, 1)
                times["stream"].append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                pafs.copy_files(str(tmp / "ckpt"), f"{dest}/b", destination_filesystem=root.fs)
                times["copy_files"].append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                client.upload_file(
                    str(tmp / "ckpt" / "state.pt"),
                    server.bucket,
                    f"ckpt/{size}mb-{i}/c/state.pt",
                    Config=transfer,
                )
                times["boto3"].append(time.perf_counter() - t0)
                root.fs.delete_dir(dest)  # keep the in-memory server small
            shutil.rmtree(tmp)
            med = {k: statistics.median(v) for k, v in times.items()}
            rows.append(
                [
                    size,
                    *(size / med[k] for k in ("checkpoint", "stream", "copy_files", "boto3")),
                    med["checkpoint"] / med["boto3"],
                ]
            )
    finally:
        server.stop()
    table(
        f"checkpoint upload to moto_server on loopback, MB/s (median of {repeats})",
        [
            "size MB",
            "checkpoint upload",
            "pyarrow stream+sha256",
            "pyarrow copy_files",
            "boto3 multipart",
            "time ckpt/boto3",
        ],
        rows,
    )


# ----------------------------------------------------------------------------- speed


def bench_speed(steps: int) -> None:
    import torch

    from workers.model import build_module, create_optimizer
    from workers.spec import JobSpec

    torch.set_num_threads(1)
    cases = [
        ("swin_micro_patch2_window4_64", "pretrain", 16),
        ("swin_micro_patch2_window4_64", "finetune", 16),
        ("swin_tiny_patch4_window7_224", "pretrain", 8),
        ("swin_tiny_patch4_window7_224", "finetune", 8),
    ]
    rows = []
    for model, kind, batch in cases:
        spec = {
            "kind": kind,
            "model": model,
            "data": {"uri": "builtin:digits"},
            "train": {"epochs": 1, "global_batch_size": batch},
        }
        if kind == "finetune":
            spec["finetune"] = {"init_from": "scratch"}
        elif "micro" in model:  # a decoder in proportion to the 128-wide micro encoder
            spec["mim"] = {"decoder_dim": 64, "decoder_depth": 1, "decoder_heads": 4}
        job = JobSpec.model_validate(spec)
        built = build_module(job, num_classes=10)
        opt = create_optimizer(job, built)
        size = job.arch_config().img_size
        images, labels = torch.randn(batch, 3, size, size), torch.randint(0, 10, (batch,))
        times = []
        for i in range(steps + 1):
            t0 = time.perf_counter()
            if kind == "pretrain":
                loss = built.module(images, built.module.random_mask(batch))[0]
            else:
                loss = torch.nn.functional.cross_entropy(built.module(images), labels)
            loss.backward()
            opt.step()
            opt.zero_grad()
            if i:  # the first step warms up allocators and caches
                times.append(time.perf_counter() - t0)
        step = statistics.median(times)
        rows.append([model, kind, batch, step, batch / step])
    table(
        f"one worker, 1 CPU thread, fp32, median of {steps} steps (forward+backward+AdamW)",
        ["model", "kind", "batch", "step s", "images/s"],
        rows,
    )


# ----------------------------------------------------------------------------- accuracy


def run_job(head: RayHead, spec: dict, storage: str, job_id: str, workdir: Path) -> float:
    spec_file = workdir / f"{job_id}.json"
    spec_file.write_text(json.dumps(spec))
    cmd = [sys.executable, "-m", "workers.run", "--spec", str(spec_file), "--job-id", job_id,
           "--tenant", "bench", "--storage-root", storage]  # fmt: skip
    t0 = time.monotonic()
    with open(workdir / f"{job_id}.log", "wb") as log:
        rc = subprocess.run(
            cmd,
            env={**os.environ, **head.client_env()},
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=REPO,
        ).returncode
    if rc:
        raise RuntimeError(f"{job_id} exited {rc}; see {workdir / f'{job_id}.log'}")
    return time.monotonic() - t0


def bench_accuracy(seeds: list[int], pretrain_epochs: int, finetune_epochs: int) -> None:
    from workers.artifacts import read_metrics

    data = {"uri": "builtin:digits", "loader_workers": 0, "crop_scale": [0.6, 1.0], "hflip": False}
    resources = {"num_workers": 2, "cpus_per_worker": 1}
    pretrain = {
        "kind": "pretrain", "model": "swin_micro_patch2_window4_64", "data": data, "resources": resources,
        "train": {"epochs": pretrain_epochs, "global_batch_size": 64, "base_lr": 2.5e-3,
                  "warmup_epochs": max(1, pretrain_epochs // 10), "weight_decay": 0.05},
        "mim": {"mask_ratio": 0.75, "decoder_dim": 128, "decoder_depth": 2, "decoder_heads": 4},
        "checkpoint": {"every_epochs": max(1, pretrain_epochs // 2), "keep_last": 1},
    }  # fmt: skip

    def finetune(seed: int, init: str) -> dict:
        return {
            "kind": "finetune", "model": "swin_micro_patch2_window4_64", "data": data, "resources": resources,
            "train": {"epochs": finetune_epochs, "global_batch_size": 32, "base_lr": 1e-2,
                      "warmup_epochs": 1, "weight_decay": 0.05, "seed": seed},
            "finetune": {"init_from": init, "layer_decay": 0.75, "label_smoothing": 0.1,
                         "mixup": 0.0, "cutmix": 0.0, "drop_path_rate": 0.1},
            "checkpoint": {"every_epochs": finetune_epochs, "keep_last": 1},
        }  # fmt: skip

    workdir = Path(tempfile.mkdtemp(prefix="gm-bench-acc-"))
    storage = str(workdir / "store")
    cache = workdir / "cache"
    head = RayHead(
        workdir / "ray", num_cpus=2, extra_env={"GREENMIM_CACHE_DIR": str(cache)}
    ).start()
    os.environ["GREENMIM_CACHE_DIR"] = str(cache)
    root = open_root(storage)
    try:
        walls = {"pretrain": run_job(head, pretrain, storage, "pre", workdir)}
        pre_records = read_metrics(root.fs, root.job_prefix("bench", "pre"))
        pre_epochs = [r for r in pre_records if r["type"] == "epoch"]
        speed = statistics.median(
            r["images_per_s_per_worker"] for r in pre_records if r["type"] == "step"
        )
        print(
            f"\npretrain: {pretrain_epochs} epochs in {walls['pretrain']:.0f}s; val MIM loss "
            f"{pre_epochs[0]['val_loss']:.3f} -> {pre_epochs[-1]['val_loss']:.3f}; feature spread "
            f"{pre_epochs[0]['val_feature_std']:.3f} -> {pre_epochs[-1]['val_feature_std']:.3f}; "
            f"{speed:.0f} images/s per worker (Ray, 2 workers x 1 CPU)"
        )
        rows = []
        for seed in seeds:
            row: list[object] = [seed]
            for name, init in (("pretrained", "job:pre"), ("scratch", "scratch")):
                job_id = f"ft-{name}-{seed}"
                walls[job_id] = run_job(head, finetune(seed, init), storage, job_id, workdir)
                epochs = [
                    r
                    for r in read_metrics(root.fs, root.job_prefix("bench", job_id))
                    if r["type"] == "epoch"
                ]
                row += [epochs[-1]["val_top1"], max(e["val_top1"] for e in epochs)]
            rows.append(row)
        mean = ["mean"] + [statistics.mean(float(r[i]) for r in rows) for i in range(1, 5)]
        spread = ["stdev"] + [
            statistics.stdev(float(r[i]) for r in rows) if len(rows) > 1 else 0.0
            for i in range(1, 5)
        ]
        table(
            f"digits val top-1 % after {finetune_epochs} fine-tune epochs (same budget); "
            f"GreenMIM pretrain {pretrain_epochs} epochs",
            ["seed", "pretrained final", "pretrained best", "scratch final", "scratch best"],
            rows + [mean, spread],
        )
        table("wall time per job", ["job", "wall s"], [[k, v] for k, v in walls.items()])
    finally:
        head.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="what", required=True)
    up = sub.add_parser("upload")
    up.add_argument("--sizes-mb", type=int, nargs="+", default=[16, 64, 256])
    up.add_argument("--repeats", type=int, default=5)
    sp = sub.add_parser("speed")
    sp.add_argument("--steps", type=int, default=5)
    acc = sub.add_parser("accuracy")
    acc.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    acc.add_argument("--pretrain-epochs", type=int, default=30)
    acc.add_argument("--finetune-epochs", type=int, default=10)
    args = parser.parse_args()
    if args.what == "upload":
        bench_upload(args.sizes_mb, args.repeats)
    elif args.what == "speed":
        bench_speed(args.steps)
    else:
        bench_accuracy(args.seeds, args.pretrain_epochs, args.finetune_epochs)


if __name__ == "__main__":
    main()
