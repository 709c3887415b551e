"""The client half of ``greenmim``: commands that talk to the API over HTTP (the SDK in
``service.client.sdk``), nothing of the server imported.

Where they find things: ``--url`` / ``$GREENMIM_URL`` / the running local stack /
127.0.0.1:8000; ``--api-key`` / ``$GREENMIM_API_KEY`` / the key ``greenmim up`` saved in the
data directory (``--data-dir`` / ``$GREENMIM_DATA_DIR`` / ``~/.greenmim``). These three options
are declared once, by ``with_client``.

Exit codes: 0 ok (job succeeded); 1 job failed; 2 bad input or request refused (4xx);
3 job cancelled; 4 service unreachable or failing (5xx); 5 checksum mismatch; 124 wait timed out.
"""

from __future__ import annotations

import functools
import inspect
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TransferSpeedColumn,
)
from rich.table import Table

from service.client.output import (
    EXIT_INPUT,
    EXIT_OK,
    STATE_EXIT,
    call,
    describe,
    err,
    fail,
    finish,
    out,
    print_json,
    wait_with_progress,
)
from service.client.sdk import Client

app = typer.Typer(
    help="GreenMIM pretraining and fine-tuning jobs on Ray, over HTTP.", no_args_is_help=True
)

DataDir = Annotated[
    Path | None, typer.Option("--data-dir", envvar="GREENMIM_DATA_DIR", help="default ~/.greenmim")
]
Url = Annotated[str | None, typer.Option("--url", envvar="GREENMIM_URL", help="API base URL")]
Key = Annotated[
    str | None, typer.Option("--api-key", envvar="GREENMIM_API_KEY", help="bearer API key")
]
Json = Annotated[bool, typer.Option("--json", help="machine-readable JSON output")]


def data_dir_of(data_dir: Path | None) -> Path:
    return (data_dir or Path.home() / ".greenmim").expanduser().resolve()


def client_of(url: str | None, api_key: str | None, data_dir: Path | None) -> Client:
    """A client for ``url``, else the local stack recorded in the data directory."""
    d = data_dir_of(data_dir)
    if url is None:
        url = recorded_api_url(d) or "http://127.0.0.1:8000"
    if api_key is None and (d / "api_key").exists():
        api_key = (d / "api_key").read_text().strip()
    return Client(url, api_key)


def recorded_api_url(data_dir: Path) -> str | None:
    """The API URL ``greenmim up`` recorded in ``stack.json``, if a stack is recorded."""
    try:
        return str(json.loads((data_dir / "stack.json").read_text())["api_url"])
    except (FileNotFoundError, ValueError, KeyError):
        return None


def with_client(command: Callable[..., Any]) -> Callable[..., Any]:
    """Give a command ``--url``, ``--api-key`` and ``--data-dir`` and call it with an open
    ``Client`` as its first parameter ``c``."""
    sig = inspect.signature(command, eval_str=True)
    own = [p for p in sig.parameters.values() if p.name != "c"]
    shared = [
        inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=kind)
        for name, kind in (("url", Url), ("api_key", Key), ("data_dir", DataDir))
    ]

    @functools.wraps(command)
    def run(
        *args: Any,
        url: str | None = None,
        api_key: str | None = None,
        data_dir: Path | None = None,
        **kwargs: Any,
    ) -> Any:
        with client_of(url, api_key, data_dir) as c:
            return command(c, *args, **kwargs)

    run.__signature__ = sig.replace(parameters=own + shared)  # type: ignore[attr-defined]
    run.__annotations__ = {p.name: p.annotation for p in own + shared}
    return run


# -- jobs ----------------------------------------------------------------------------------------


@app.command()
@with_client
def submit(
    c: Client,
    spec: Annotated[
        Path, typer.Argument(help="job spec, YAML or JSON", exists=True, dir_okay=False)
    ],
    wait: Annotated[
        bool, typer.Option("--wait", "-w", help="wait for the end; exit code = result")
    ] = False,
    timeout: Annotated[float | None, typer.Option(help="seconds to wait at most")] = None,
    idempotency_key: Annotated[str | None, typer.Option(help="retry-safe submit key")] = None,
    as_json: Json = False,
) -> None:
    """Submit a job spec."""
    try:
        job = call(c.submit, spec, idempotency_key)
    except ValueError as e:
        fail(f"{spec}: {e}", EXIT_INPUT)
    if not wait:
        if as_json:
            print_json(job)
        else:
            out.print(f"submitted {job.id} ({job.state.value})")
        return
    finish(wait_with_progress(c, job.id, timeout, quiet=as_json), as_json)


@app.command()
@with_client
def status(
    c: Client,
    job_id: str,
    wait: Annotated[
        bool, typer.Option("--wait", "-w", help="wait for the end; exit code = result")
    ] = False,
    timeout: Annotated[float | None, typer.Option(help="seconds to wait at most")] = None,
    as_json: Json = False,
) -> None:
    """A job's state and progress (exit code 1 if it failed, 3 if cancelled)."""
    job = wait_with_progress(c, job_id, timeout, quiet=as_json) if wait else call(c.get, job_id)
    finish(job, as_json)


@app.command("list")
@with_client
def list_jobs(
    c: Client,
    state: Annotated[list[str] | None, typer.Option(help="filter by state (repeatable)")] = None,
    kind: Annotated[str | None, typer.Option(help="pretrain or finetune")] = None,
    limit: Annotated[int, typer.Option(help="at most this many")] = 50,
    as_json: Json = False,
) -> None:
    """Your jobs, newest first."""
    jobs = []
    for job in call(lambda: list(_take(c.iter_jobs(state, kind), limit))):
        jobs.append(job)
    if as_json:
        print_json([j.model_dump(mode="json") for j in jobs])
        return
    table = Table("id", "kind", "model", "state", "epoch", "step", "created")
    for j in jobs:
        table.add_row(
            j.id,
            j.kind,
            j.model,
            j.state.value,
            f"{j.progress.epoch or 0}/{j.progress.epochs}",
            str(j.progress.step or ""),
            j.created_at.strftime("%Y-%m-%d %H:%M:%S"),
        )
    out.print(table)


def _take(it: Any, n: int) -> Any:
    for i, x in enumerate(it):
        if i >= n:
            return
        yield x


@app.command()
@with_client
def cancel(
    c: Client,
    job_id: str,
    as_json: Json = False,
) -> None:
    """Cancel a queued or running job."""
    job = call(c.cancel, job_id)
    if as_json:
        print_json(job)
    else:
        out.print(describe(job))


@app.command()
@with_client
def metrics(
    c: Client,
    job_id: str,
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="stream until the job ends")
    ] = False,
    after_step: Annotated[int | None, typer.Option(help="only records after this step")] = None,
    as_json: Json = False,
) -> None:
    """Metric records (one per line); -f follows the live stream (SSE)."""

    def show(rec: dict[str, Any]) -> None:
        if as_json:
            sys.stdout.write(json.dumps(rec) + "\n")
            sys.stdout.flush()
            return
        vals = " ".join(
            f"{k}={v:.5g}" if isinstance(v, float) else f"{k}={v}"
            for k, v in rec.items()
            if k not in ("type", "step", "epoch", "time")
        )
        out.print(
            f"{rec.get('type', ''):<6} epoch {rec.get('epoch')} step {rec.get('step')}  {vals}"
        )

    if follow:
        final = None
        for event, data in call(lambda: list(_events(c, job_id, after_step, show))):
            final = data if event == "end" else final
        state = (final or {}).get("state", "")
        raise typer.Exit(STATE_EXIT.get(state, EXIT_OK))
    cursor = after_step
    while True:
        page = call(c.metrics, job_id, cursor)
        for rec in page.items:
            show(rec)
        if not page.items or page.next_after_step == cursor:
            break
        cursor = page.next_after_step


def _events(c: Client, job_id: str, after: int | None, show: Any) -> Any:
    for event, data in c.stream_metrics(job_id, after):
        if event == "metric":
            show(data)
        elif event == "state":
            err.print(f"[dim]state: {data.get('state')}[/dim]")
        yield event, data


@app.command()
@with_client
def logs(
    c: Client,
    job_id: str,
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="keep printing until the job ends")
    ] = False,
    source: Annotated[
        str, typer.Option(help="driver (Ray, all output) or worker (stored files)")
    ] = "driver",
) -> None:
    """The job's log text."""
    if follow:

        def pump() -> None:
            for text in c.follow_logs(job_id, source):
                sys.stdout.write(text)
                sys.stdout.flush()

        call(pump)
        raise typer.Exit(STATE_EXIT.get(call(c.get, job_id).state.value, EXIT_OK))
    page = call(c.logs, job_id, 0, source)
    sys.stdout.write(page.text)


@app.command()
@with_client
def download(
    c: Client,
    job_id: str,
    checkpoint: Annotated[
        str, typer.Option("--checkpoint", "-c", help="checkpoint name")
    ] = "final",
    file: Annotated[
        str | None, typer.Option(help="file in the checkpoint (default: its primary file)")
    ] = None,
    output: Annotated[Path, typer.Option("--output", "-o", help="file or folder")] = Path("."),
    as_json: Json = False,
) -> None:
    """Download a checkpoint file and verify its sha256 (``final`` = timm weights; add
    ``--file config.json`` for its config)."""
    if as_json:
        path, sha = call(c.download, job_id, checkpoint, output, file)
        print_json({"path": str(path), "sha256": sha})
        return
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        console=err,
    ) as bar:
        task = bar.add_task(f"{job_id}/{checkpoint}", total=None)
        path, sha = call(
            c.download,
            job_id,
            checkpoint,
            output,
            file,
            lambda done, total: bar.update(task, completed=done, total=total),
        )
    out.print(f"{path}  sha256 {sha} (verified)")


@app.command()
@with_client
def models(c: Client, as_json: Json = False) -> None:
    """Registered architectures."""
    items = call(c.models)
    if as_json:
        print_json([m.model_dump() for m in items])
        return
    table = Table("name", "img_size", "window", "embed_dim", "depths")
    for m in items:
        d = m.defaults
        table.add_row(
            m.name,
            str(d.get("img_size")),
            str(d.get("window_size")),
            str(d.get("embed_dim")),
            str(d.get("depths")),
        )
    out.print(table)
