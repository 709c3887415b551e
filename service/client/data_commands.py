"""``greenmim data pack|inspect``: datasets, read and written directly in storage (a local
folder or ``s3://`` with the usual ``GREENMIM_S3_ENDPOINT_URL`` / ``AWS_*`` settings), no
service involved. The dataset logic is the job contract's (``workers.packing``,
``workers.sources``, ``workers.shard_index``), imported when a command runs: packing uses
webdataset, which loads torch; the rest of the client never does.

Exit codes: 0 done; 2 bad input (missing or empty source, destination already packed,
unreadable index).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from service.client.output import EXIT_INPUT, err, fail, out, print_json

data_app = typer.Typer(
    help="Datasets: pack an ImageFolder into shards, inspect what a job would see.",
    no_args_is_help=True,
)
Json = Annotated[bool, typer.Option("--json", help="machine-readable JSON output")]


def _s3(*uris: str) -> Any:
    from workers.storage import S3Settings

    return S3Settings.from_env() if any(u.startswith("s3://") for u in uris) else None


@data_app.command()
def pack(
    src: Annotated[
        str, typer.Argument(help="ImageFolder: /path, file:///path or s3://bucket/prefix")
    ],
    dest: Annotated[str, typer.Argument(help="an empty prefix for the shards and index.json")],
    shard_size: Annotated[int, typer.Option(help="images per shard")] = 1000,
    val_fraction: Annotated[
        float, typer.Option(help="held-out share of each class when SRC has no val/ folder")
    ] = 0.1,
    split_seed: Annotated[int, typer.Option(help="seed of the held-out choice")] = 0,
    threads: Annotated[int, typer.Option(help="parallel reads of source images")] = 16,
    as_json: Json = False,
) -> None:
    """Pack an ImageFolder (local or S3) into tar shards plus index.json (classes, counts,
    sha256 per shard). The split is the one a job over SRC with the same --val-fraction and
    --split-seed uses."""
    from workers.packing import PackOptions
    from workers.packing import pack as do_pack

    try:
        options = PackOptions(shard_size, val_fraction, split_seed, threads)
    except ValueError as e:
        fail(str(e), EXIT_INPUT)
    with Progress(
        TextColumn("packing"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=err,
        disable=as_json,
    ) as bar:
        task = bar.add_task("pack", total=None)
        try:
            index = do_pack(
                src,
                dest,
                options,
                _s3(src, dest),
                lambda done, total: bar.update(task, completed=done, total=total),
            )
        except (ValueError, OSError) as e:
            fail(str(e), EXIT_INPUT)
    if as_json:
        print_json(index.to_json() | {"uri": dest})
        return
    out.print(
        f"{dest}: {index.train.count} train / {index.val.count} val images, "
        f"{len(index.classes)} classes, {len(index.train.shards)} + {len(index.val.shards)} shards"
    )


@data_app.command()
def inspect(
    uri: Annotated[str, typer.Argument(help="a dataset: shards prefix or ImageFolder")],
    data_format: Annotated[
        str, typer.Option("--format", help="auto, imagefolder or shards")
    ] = "auto",
    workers: Annotated[int, typer.Option(help="Ray Train workers of the job")] = 1,
    loader_workers: Annotated[int, typer.Option(help="loader processes per worker")] = 2,
    micro_batch: Annotated[int, typer.Option(help="images per worker per forward pass")] = 64,
    val_fraction: Annotated[float, typer.Option(help="ImageFolder: held-out share")] = 0.1,
    split_seed: Annotated[int, typer.Option(help="ImageFolder: seed of the split")] = 0,
    as_json: Json = False,
) -> None:
    """What a job would see: form, classes, train/val images, and for shards how they split
    over WORKERS x LOADER_WORKERS and how many images an epoch uses."""
    from pydantic import ValidationError

    from workers.shard_index import micro_batches_per_rank
    from workers.sources import open_source
    from workers.spec_data import DataSpec

    try:
        fmt: Literal["auto", "imagefolder", "shards"] = data_format  # type: ignore[assignment]
        data = DataSpec(uri=uri, format=fmt, val_fraction=val_fraction, split_seed=split_seed)
        if min(workers, micro_batch) < 1 or loader_workers < 0:
            raise ValueError("--workers and --micro-batch must be >= 1, --loader-workers >= 0")
        source = open_source(data, _s3(uri))
    except ValidationError as e:
        fail("; ".join(f"{'.'.join(map(str, x['loc']))}: {x['msg']}" for x in e.errors()), 2)
    except (ValueError, OSError) as e:
        fail(str(e), EXIT_INPUT)
    report: dict[str, Any] = {
        "uri": uri,
        "format": source.kind,
        "classes": list(source.classes),
        "train_images": source.num_train,
        "val_images": source.num_val,
    }
    if source.index is not None:
        train = source.index.train
        report["class_counts"] = dict(zip(source.classes, train.class_counts, strict=True))
        report["shards"] = {"train": len(train.shards), "val": len(source.index.val.shards)}
        per_rank = micro_batches_per_rank(train, workers, max(loader_workers, 1), micro_batch)
        used = min(per_rank) * micro_batch * workers if per_rank else 0
        report["per_epoch"] = {
            "workers": workers,
            "loader_workers": loader_workers,
            "micro_batch": micro_batch,
            "micro_batches_per_worker": min(per_rank) if per_rank else 0,
            "images_used": used,
            "images_dropped": train.count - used,
        }
    if as_json:
        print_json(report)
        return
    table = Table("", "value", show_header=False)
    for key, value in report.items():
        if key == "classes":
            value = f"{len(value)}: {', '.join(value[:10])}{' ...' if len(value) > 10 else ''}"
        elif isinstance(value, dict):
            value = ", ".join(f"{k} {v}" for k, v in value.items())
        table.add_row(key, str(value))
    out.print(table)
