"""How the client commands talk to a person: messages, tables, progress, exit codes."""

from __future__ import annotations

import json
import sys
from typing import Any, NoReturn

import httpx
import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from service.client.sdk import ApiError, ChecksumMismatch, Client
from service.schemas import JobOut

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

out = Console()
err = Console(stderr=True)


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
