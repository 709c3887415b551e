"""``greenmim``: the command line of the service.

Where it finds things: ``--url`` / ``$GREENMIM_URL`` / the running local stack / 127.0.0.1:8000;
``--api-key`` / ``$GREENMIM_API_KEY`` / the key ``greenmim up`` saved in the data directory
(``--data-dir`` / ``$GREENMIM_DATA_DIR`` / ``~/.greenmim``).

Exit codes: 0 ok (job succeeded); 1 job failed; 2 bad input or request refused (4xx);
3 job cancelled; 4 service unreachable or failing (5xx); 5 checksum mismatch; 124 wait timed out.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Annotated, Any, NoReturn

import httpx
import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TransferSpeedColumn,
)
from rich.table import Table

from service.api.schemas import JobOut
from service.client import ApiError, ChecksumMismatch, Client

EXIT_OK, EXIT_FAILED, EXIT_INPUT, EXIT_CANCELLED, EXIT_UNAVAILABLE, EXIT_CHECKSUM, EXIT_TIMEOUT = (
    0,
    1,
    2,
    3,
    4,
    5,
    124,
)
STATE_EXIT = {"succeeded": EXIT_OK, "failed": EXIT_FAILED, "cancelled": EXIT_CANCELLED}

app = typer.Typer(
    help="GreenMIM pretraining and fine-tuning jobs on Ray, over HTTP.", no_args_is_help=True
)
keys_app = typer.Typer(help="API keys (admin: needs the service's database).", no_args_is_help=True)
app.add_typer(keys_app, name="keys")
out = Console()
err = Console(stderr=True)

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
    from service.local_stack import StackState

    d = data_dir_of(data_dir)
    if url is None:
        state = StackState.load(d)
        url = state.api_url if state else "http://127.0.0.1:8000"
    if api_key is None and (d / "api_key").exists():
        api_key = (d / "api_key").read_text().strip()
    return Client(url, api_key)


def fail(message: str, code: int) -> NoReturn:
    err.print(f"[red]error:[/red] {message}")
    raise typer.Exit(code)


def call(fn: Any, *args: Any, **kwargs: Any) -> Any:
    """Run a client call; map its errors to messages and exit codes."""
    try:
        return fn(*args, **kwargs)
    except ApiError as e:
        fail(str(e), EXIT_UNAVAILABLE if e.status >= 500 else EXIT_INPUT)
    except ChecksumMismatch as e:
        fail(str(e), EXIT_CHECKSUM)
    except httpx.HTTPError as e:
        fail(f"cannot reach the service: {e} (is `greenmim up` running? --url?)", EXIT_UNAVAILABLE)
    except TimeoutError as e:
        fail(str(e), EXIT_TIMEOUT)


def print_json(obj: Any) -> None:
    if hasattr(obj, "model_dump"):
        obj = obj.model_dump(mode="json")
    sys.stdout.write(json.dumps(obj, indent=2, default=str) + "\n")


def describe(job: JobOut) -> str:
    p = job.progress
    parts = [f"[bold]{job.id}[/bold] {job.kind} {job.model}: [cyan]{job.state.value}[/cyan]"]
    if p.step is not None:
        parts.append(f"epoch {p.epoch}/{p.epochs} step {p.step}")
    step = (job.latest_metrics or {}).get("epoch") or (job.latest_metrics or {}).get("step") or {}
    vals = {
        k: v
        for k, v in step.items()
        if k not in ("type", "step", "epoch", "time") and isinstance(v, float)
    }
    if vals:
        parts.append(" ".join(f"{k}={v:.4g}" for k, v in list(vals.items())[:4]))
    if job.error:
        parts.append(f"[red]{job.error.type}: {job.error.message}[/red]")
    return "  ".join(parts)


def wait_with_progress(
    client: Client, job_id: str, timeout: float | None, quiet: bool = False
) -> JobOut:
    """Poll a job with a progress bar over its epochs."""
    if quiet:
        return call(client.wait, job_id, timeout)
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("epoch {task.completed:.0f}/{task.total:.0f}"),
        TimeElapsedColumn(),
        console=err,
        transient=False,
    ) as bar:
        task = bar.add_task(job_id, total=1)

        def update(job: JobOut) -> None:
            m = (job.latest_metrics or {}).get("step") or {}
            loss = next((v for k, v in m.items() if "loss" in k and isinstance(v, float)), None)
            desc = f"{job.id} [cyan]{job.state.value:<10}[/cyan]"
            if job.progress.step is not None:
                desc += f" step {job.progress.step}"
            if loss is not None:
                desc += f" loss {loss:.4f}"
            bar.update(
                task, total=job.progress.epochs, completed=job.progress.epoch or 0, description=desc
            )

        return call(client.wait, job_id, timeout, 1.0, update)


def finish(job: JobOut, as_json: bool) -> NoReturn:
    if as_json:
        print_json(job)
    else:
        out.print(describe(job))
    raise typer.Exit(STATE_EXIT.get(job.state.value, EXIT_OK))


# -- the local stack ---------------------------------------------------------------------------


@app.command()
def up(
    data_dir: DataDir = None,
    port: Annotated[int, typer.Option(help="API port on 127.0.0.1")] = 8000,
    s3: Annotated[
        bool, typer.Option("--s3", help="store artifacts in a loopback S3 server (moto)")
    ] = False,
    uvicorn: Annotated[
        bool, typer.Option("--uvicorn", help="run the API under uvicorn, not Ray Serve")
    ] = False,
    num_cpus: Annotated[
        float | None, typer.Option(help="CPUs for the Ray head (default: all)")
    ] = None,
    detach: Annotated[
        bool, typer.Option("--detach", help="leave it running; stop with `greenmim down`")
    ] = False,
) -> None:
    """Start the local stack: Ray head (loopback, token auth), the API, SQLite, local storage."""
    from service.local_stack import StackState, start_stack, stop_stack

    d = data_dir_of(data_dir)
    if StackState.load(d) is not None:
        fail(
            f"a stack is already recorded in {d}; run `greenmim down --data-dir {d}` first",
            EXIT_INPUT,
        )
    with err.status("starting the local stack...") as status:
        state, env = start_stack(
            d,
            port=port,
            s3=s3,
            serve=not uvicorn,
            num_cpus=num_cpus,
            progress=lambda m: status.update(m),
        )
    key = ensure_local_key(d, env)
    out.print(f"[green]GreenMIM is up[/green] at {state.api_url}  (docs: {state.api_url}/docs)")
    out.print(f"data directory: {d}\nAPI key (tenant 'default') saved in {d / 'api_key'}")
    out.print(f"export GREENMIM_URL={state.api_url} GREENMIM_API_KEY={key}", soft_wrap=True)
    if detach:
        return
    out.print("Ctrl-C stops it.")
    stop = {"now": False}
    signal.signal(signal.SIGTERM, lambda *_: stop.update(now=True))
    try:
        while not stop["now"]:
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    stop_stack(d)
    out.print("stopped")


@app.command()
def down(data_dir: DataDir = None) -> None:
    """Stop the local stack started with `greenmim up --detach`."""
    from service.local_stack import stop_stack

    if not stop_stack(data_dir_of(data_dir)):
        fail("no running stack recorded in the data directory", EXIT_INPUT)
    out.print("stopped")


def admin_env(d: Path) -> None:
    """Point Settings at the local stack's database and key pepper unless configured."""
    os.environ.setdefault("GREENMIM_DATA_DIR", str(d))
    pepper = d / "secrets" / "pepper"
    if "GREENMIM_KEY_PEPPER" not in os.environ and pepper.exists():
        os.environ["GREENMIM_KEY_PEPPER"] = pepper.read_text().strip()


def key_service() -> Any:
    from service.core.config import Settings
    from service.db import make_engine, make_sessionmaker, migrate
    from service.domain.keys import KeyService

    settings = Settings()
    engine = make_engine(settings.resolved_database_url)
    migrate(engine)
    return KeyService(make_sessionmaker(engine), settings.key_pepper.get_secret_value().encode())


def ensure_local_key(d: Path, env: dict[str, str]) -> str:
    path = d / "api_key"
    if path.exists():
        return path.read_text().strip()
    os.environ.update({k: v for k, v in env.items() if k.startswith("GREENMIM_")})
    key = key_service().create("default", name="local").key
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(key)
    return str(key)


@keys_app.command("create")
def keys_create(
    tenant: Annotated[str, typer.Option(help="tenant name (created if new)")],
    name: Annotated[str, typer.Option(help="a label for the key")] = "",
    max_jobs: Annotated[int | None, typer.Option(help="tenant limit: concurrent jobs")] = None,
    max_gpus: Annotated[float | None, typer.Option(help="tenant limit: concurrent GPUs")] = None,
    data_dir: DataDir = None,
    as_json: Json = False,
) -> None:
    """Create an API key (printed once; only its hash is stored)."""
    admin_env(data_dir_of(data_dir))
    try:
        created = key_service().create(
            tenant, name=name, max_active_jobs=max_jobs, max_gpus=max_gpus
        )
    except ValueError as e:
        fail(str(e), EXIT_INPUT)
    if as_json:
        print_json({"key": created.key, "key_id": created.key_id, "tenant": created.tenant})
    else:
        out.print(f"tenant {created.tenant}, key id {created.key_id}:\n{created.key}")


# -- jobs ----------------------------------------------------------------------------------------


@app.command()
def submit(
    spec: Annotated[
        Path, typer.Argument(help="job spec, YAML or JSON", exists=True, dir_okay=False)
    ],
    wait: Annotated[
        bool, typer.Option("--wait", "-w", help="wait for the end; exit code = result")
    ] = False,
    timeout: Annotated[float | None, typer.Option(help="seconds to wait at most")] = None,
    idempotency_key: Annotated[str | None, typer.Option(help="retry-safe submit key")] = None,
    url: Url = None,
    api_key: Key = None,
    data_dir: DataDir = None,
    as_json: Json = False,
) -> None:
    """Submit a job spec."""
    with client_of(url, api_key, data_dir) as c:
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
def status(
    job_id: str,
    wait: Annotated[
        bool, typer.Option("--wait", "-w", help="wait for the end; exit code = result")
    ] = False,
    timeout: Annotated[float | None, typer.Option(help="seconds to wait at most")] = None,
    url: Url = None,
    api_key: Key = None,
    data_dir: DataDir = None,
    as_json: Json = False,
) -> None:
    """A job's state and progress (exit code 1 if it failed, 3 if cancelled)."""
    with client_of(url, api_key, data_dir) as c:
        job = wait_with_progress(c, job_id, timeout, quiet=as_json) if wait else call(c.get, job_id)
        finish(job, as_json)


@app.command("list")
def list_jobs(
    state: Annotated[list[str] | None, typer.Option(help="filter by state (repeatable)")] = None,
    kind: Annotated[str | None, typer.Option(help="pretrain or finetune")] = None,
    limit: Annotated[int, typer.Option(help="at most this many")] = 50,
    url: Url = None,
    api_key: Key = None,
    data_dir: DataDir = None,
    as_json: Json = False,
) -> None:
    """Your jobs, newest first."""
    with client_of(url, api_key, data_dir) as c:
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
def cancel(
    job_id: str,
    url: Url = None,
    api_key: Key = None,
    data_dir: DataDir = None,
    as_json: Json = False,
) -> None:
    """Cancel a queued or running job."""
    with client_of(url, api_key, data_dir) as c:
        job = call(c.cancel, job_id)
    if as_json:
        print_json(job)
    else:
        out.print(describe(job))


@app.command()
def metrics(
    job_id: str,
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="stream until the job ends")
    ] = False,
    after_step: Annotated[int | None, typer.Option(help="only records after this step")] = None,
    url: Url = None,
    api_key: Key = None,
    data_dir: DataDir = None,
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

    with client_of(url, api_key, data_dir) as c:
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
def logs(
    job_id: str,
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="keep printing until the job ends")
    ] = False,
    source: Annotated[
        str, typer.Option(help="driver (Ray, all output) or worker (stored files)")
    ] = "driver",
    url: Url = None,
    api_key: Key = None,
    data_dir: DataDir = None,
) -> None:
    """The job's log text."""
    with client_of(url, api_key, data_dir) as c:
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
def download(
    job_id: str,
    checkpoint: Annotated[
        str, typer.Option("--checkpoint", "-c", help="checkpoint name")
    ] = "final",
    file: Annotated[
        str | None, typer.Option(help="file in the checkpoint (default: its primary file)")
    ] = None,
    output: Annotated[Path, typer.Option("--output", "-o", help="file or folder")] = Path("."),
    url: Url = None,
    api_key: Key = None,
    data_dir: DataDir = None,
    as_json: Json = False,
) -> None:
    """Download a checkpoint file and verify its sha256 (``final`` = timm weights; add
    ``--file config.json`` for its config)."""
    with client_of(url, api_key, data_dir) as c:
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
def models(
    url: Url = None, api_key: Key = None, data_dir: DataDir = None, as_json: Json = False
) -> None:
    """Registered architectures."""
    with client_of(url, api_key, data_dir) as c:
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


@app.command()
def demo(
    data_dir: Annotated[
        Path | None, typer.Option("--data-dir", help="default: a new folder under /tmp")
    ] = None,
    pretrain_epochs: Annotated[int, typer.Option(help="GreenMIM pretraining epochs")] = 3,
    finetune_epochs: Annotated[int, typer.Option(help="fine-tuning epochs")] = 10,
    port: Annotated[int, typer.Option(help="API port on 127.0.0.1 (0 = any free port)")] = 0,
    keep: Annotated[
        bool, typer.Option("--keep", help="leave the stack running afterwards")
    ] = False,
) -> None:
    """The whole loop on CPU in minutes: stack up, pretrain on built-in digits over HTTP,
    fine-tune from its checkpoint, download the weights, load them into timm, print accuracy."""
    from service.demo import run_demo

    raise typer.Exit(run_demo(data_dir, pretrain_epochs, finetune_epochs, port, keep, out, err))


if __name__ == "__main__":
    app()
