"""The operator half of ``greenmim``: the local stack (``up``, ``down``, ``restart-api``,
``demo``) and API
keys (``keys create``, which needs the service's database). ``register`` adds these commands
to the CLI built in ``service.cli``."""

from __future__ import annotations

import signal
import time
from pathlib import Path
from typing import Annotated

import typer

from service.client.commands import DataDir, Json, data_dir_of
from service.client.output import EXIT_INPUT, err, fail, out, print_json
from service.stack.admin import ensure_local_key, key_service, stack_settings
from service.stack.demo import run_demo
from service.stack.local import StackState, start_stack, stop_stack
from service.stack.restart import restart_api

app = typer.Typer()
keys_app = typer.Typer(help="API keys (admin: needs the service's database).", no_args_is_help=True)


def register(cli: typer.Typer) -> None:
    """Add the stack and key commands to ``cli``."""
    cli.registered_commands += app.registered_commands
    cli.add_typer(keys_app, name="keys")


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
        int | None, typer.Option(help="CPUs for the Ray head (default: all)", min=1)
    ] = None,
    detach: Annotated[
        bool, typer.Option("--detach", help="leave it running; stop with `greenmim down`")
    ] = False,
) -> None:
    """Start the local stack: Ray head (loopback, token auth), the API, SQLite, local storage."""
    d = data_dir_of(data_dir)
    if StackState.load(d) is not None:
        fail(
            f"a stack is already recorded in {d}; run `greenmim down --data-dir {d}` first",
            EXIT_INPUT,
        )
    with err.status("starting the local stack...") as status:
        state, _env = start_stack(
            d,
            port=port,
            s3=s3,
            serve=not uvicorn,
            num_cpus=num_cpus,
            progress=lambda m: status.update(m),
        )
    key = ensure_local_key(d)
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
    if not stop_stack(data_dir_of(data_dir)):
        fail("no running stack recorded in the data directory", EXIT_INPUT)
    out.print("stopped")


@app.command("restart-api")
def restart_api_command(data_dir: DataDir = None) -> None:
    """Restart the API alone; Ray, running jobs, storage and the database keep running."""
    d = data_dir_of(data_dir)
    if StackState.load(d) is None:
        fail("no running stack recorded in the data directory", EXIT_INPUT)
    with err.status("restarting the API...") as status:
        state = restart_api(d, progress=lambda m: status.update(m))
    out.print(f"the API is back at {state.api_url}")


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
    settings = stack_settings(data_dir_of(data_dir), stack_pepper=False)
    try:
        created = key_service(settings).create(
            tenant, name=name, max_active_jobs=max_jobs, max_gpus=max_gpus
        )
    except ValueError as e:
        fail(str(e), EXIT_INPUT)
    if as_json:
        print_json({"key": created.key, "key_id": created.key_id, "tenant": created.tenant})
    else:
        out.print(f"tenant {created.tenant}, key id {created.key_id}:\n{created.key}")


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
    raise typer.Exit(run_demo(data_dir, pretrain_epochs, finetune_epochs, port, keep, out, err))
