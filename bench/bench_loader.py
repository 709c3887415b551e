"""Loader throughput: images/s of one loader process reading from a real S3 server on loopback
(moto_server), an ImageFolder read one object per image vs the same images packed in shards;
and how many loader processes one GPU needs. Prints a table. Run inside the loopback wrapper:

    ../shared/tools/loopback-only .venv/bin/python bench/bench_loader.py --images 3000
    ../shared/tools/loopback-only .venv/bin/python bench/bench_loader.py --gpu-images-per-s 1450

Each row is one process doing what a DataLoader worker of a job does (loader_workers=1,
torch with one thread): read, decode (``workers.images``), the training transform at
``--img-size`` (random resized crop, flip, normalise), collate into micro-batches of
``--batch``; plus ``read+decode`` alone. ``--gpu-images-per-s`` is the training images/s of
one GPU for the model, from ``bench/gpu_check.sh OUTDIR`` (its Swin-B/224 GreenMIM row, one
GPU); the last column is then ``ceil(gpu images/s / loader images/s)``: the loader processes
(``data.loader_workers``) per GPU that keep it fed. Without it, the column is left blank.
"""

from __future__ import annotations

import argparse
import io
import math
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from service.stack.local import S3Server  # noqa: E402


def table(title: str, header: list[str], rows: list[list[object]]) -> None:
    cells = [header] + [[f"{c:.1f}" if isinstance(c, float) else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    print(f"\n{title}")
    for i, r in enumerate(cells):
        print("| " + " | ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) + " |")
        if i == 0:
            print("|" + "|".join("-" * (w + 1) + ":" for w in widths) + "|")
    sys.stdout.flush()


def make_images(n: int, classes: int, side: int, seed: int = 0) -> dict[str, bytes]:
    """JPEGs of smooth noise (compress like photos, ~side^2/6 bytes), ``classes`` folders."""
    rng = np.random.default_rng(seed)
    files = {}
    for i in range(n):
        small = rng.integers(0, 256, (side // 8, side // 8, 3), dtype=np.uint8)
        img = Image.fromarray(small).resize((side, side), Image.BICUBIC)
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=90)
        files[f"c{i % classes:03d}/{i:06d}.jpg"] = buf.getvalue()
    return files


def upload(s3, bucket: str, prefix: str, files: dict[str, bytes]) -> None:
    client = s3.boto3_client()
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda kv: client.put_object(
            Bucket=bucket, Key=f"{prefix}/{kv[0]}", Body=kv[1]), files.items()))  # fmt: skip


def rate(loader, limit: int) -> float:
    t0, n = time.perf_counter(), 0
    for batch in loader:
        n += len(batch.images) if hasattr(batch, "images") else len(batch)
        if n >= limit:
            break
    return n / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=3000)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--side", type=int, default=256, help="generated JPEG side, px")
    p.add_argument("--img-size", type=int, default=224, help="training crop, px")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--shard-size", type=int, default=500)
    p.add_argument("--gpu-images-per-s", type=float, default=None)
    args = p.parse_args()

    import torch
    from torch.utils.data import DataLoader, SequentialSampler

    from workers.batching import PlanningCollate, SeededBatches, SeededDataset
    from workers.data import ImageFolderDataset, index_dataset, train_transform
    from workers.packing import PackOptions, pack
    from workers.shard_index import read_index
    from workers.shards import ShardStream
    from workers.spec import DataSpec
    from workers.storage import open_root

    torch.set_num_threads(1)
    server = S3Server(Path(tempfile.mkdtemp(prefix="gm-bench-loader-"))).start()
    try:
        s3 = server.settings()
        files = make_images(args.images, args.classes, args.side)
        mean_kb = sum(map(len, files.values())) / len(files) / 1024
        upload(s3, "greenmim", "bench/folder", files)
        t0 = time.perf_counter()
        pack("s3://greenmim/bench/folder", "s3://greenmim/bench/shards",
             PackOptions(args.shard_size, 0.0), s3)  # fmt: skip
        pack_s = time.perf_counter() - t0
        data = DataSpec(uri="s3://greenmim/bench/folder", val_fraction=0.0, hflip=True)
        transform = train_transform(args.img_size, data)
        splits = index_dataset(data, s3)
        root = open_root("s3://greenmim/bench/shards", s3)
        index = read_index(root.fs, root.base, "bench")
        n = len(splits.train)

        def folder_loader(tf):
            ds = SeededDataset(ImageFolderDataset(splits.fs_uri, splits.train, tf, s3))
            batches = SeededBatches(SequentialSampler(range(n)), args.batch, drop_last=True)
            return DataLoader(ds, batch_sampler=batches, collate_fn=PlanningCollate(),
                              num_workers=1)  # fmt: skip

        def shard_loader(tf):
            stream = ShardStream("s3://greenmim/bench/shards", index.train, 0, 1, 1, args.batch,
                                 tf, PlanningCollate(), 1000, s3)  # fmt: skip
            stream.set_epoch(1)
            return DataLoader(stream, batch_size=None, num_workers=1)

        def decode_only(img):
            return torch.zeros(1)

        rows = []
        works = (("read+decode", decode_only), (f"+ train transform {args.img_size}", transform))
        sources = (("ImageFolder, 1 object/image", folder_loader), ("shards", shard_loader))
        for what, tf in works:
            base = None
            for name, make in sources:  # ImageFolder first: the baseline of the ratio
                r = rate(make(tf), n - args.batch)
                base = base or r
                gpu_rate = args.gpu_images_per_s
                need = str(math.ceil(gpu_rate / r)) if gpu_rate else ""
                rows.append([name, what, r, f"{r / base:.2f}x", need])
        gpu = (f"{args.gpu_images_per_s:g} images/s per GPU (given)" if args.gpu_images_per_s
               else "GPU images/s not given: --gpu-images-per-s from bench/gpu_check.sh")  # fmt: skip
        table(
            f"Loader images/s per process, {n} JPEGs of {args.side}px (mean {mean_kb:.1f} KiB), "
            f"S3 server on loopback, batches of {args.batch}; {gpu}",
            ["source", "work", "images/s", "vs ImageFolder", "loader processes per GPU"],
            rows,
        )
        print(f"\npacking {n} images into {len(index.train.shards)} shards: {pack_s:.1f} s "
              f"({n / pack_s:.0f} images/s, 16 reader threads)")  # fmt: skip
        print("command: " + " ".join(["python", "bench/bench_loader.py", *sys.argv[1:]]))
    finally:
        server.stop()


if __name__ == "__main__":
    main()
