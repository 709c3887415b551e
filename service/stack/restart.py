"""Restart one part of a recorded local stack (``greenmim restart-api``).

``stack.json`` records ports and pids; the secrets are files in the data directory; from both
the API's settings are rebuilt exactly as ``start_stack`` made them.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from service.stack.local import (
    ApiServer,
    RayHead,
    S3Server,
    StackState,
    api_env,
    serve_deploy,
)
from service.stack.processes import kill_group, secret_file, wait_http

log = logging.getLogger(__name__)


def _port(url: str) -> int:
    return int(url.rsplit(":", 1)[1].split("/", 1)[0])


def recorded_api_env(state: StackState) -> dict[str, str]:
    """The API's environment for the stack ``state`` records."""
    if state.ray_address is None:
        raise RuntimeError(
            "this stack was recorded without its Ray address; `greenmim down` and `up` once"
        )
    d = Path(state.data_dir)
    ray = RayHead(
        d,
        token=secret_file(d / "secrets" / "ray_token"),
        gcs_port=_port(state.ray_address),
        dashboard_port=_port(state.dashboard_url),
    )
    s3 = None
    if state.s3_endpoint:
        s3 = S3Server(
            d, port=_port(state.s3_endpoint), secret_key=secret_file(d / "secrets" / "s3_secret")
        )
    return api_env(d, ray, s3)


def restart_api(data_dir: Path, progress: Any = None) -> StackState:
    """Stop and start the API of the recorded stack alone: Ray (and its running jobs), the S3
    server and the database stay. Under Serve the application is deleted and deployed again;
    under uvicorn the process is replaced on the same port. The new API's reconciler
    re-attaches to every job."""
    data_dir = data_dir.resolve()
    state = StackState.load(data_dir)
    if state is None:
        raise FileNotFoundError(f"no stack recorded in {data_dir}; start one with `greenmim up`")
    say = progress or (lambda msg: log.info(msg))
    env = recorded_api_env(state)
    port = _port(state.api_url)
    if state.serve:
        say("deploying the API under Ray Serve again")
        serve_deploy(env, port, data_dir / "logs" / "serve.log", extra_args=("--restart",))
    else:
        if state.api_pid:
            say(f"stopping the API (pid {state.api_pid})")
            kill_group(state.api_pid)
        say(f"starting the API (uvicorn) on 127.0.0.1:{port}")
        state.api_pid = ApiServer(data_dir, env, port=port).start().pid
    wait_http(f"{state.api_url}/healthz", 120)
    state.save()
    return state
