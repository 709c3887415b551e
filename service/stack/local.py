"""The embedded local stack under one data directory: a Ray head on loopback with token auth,
the API (under Ray Serve, or uvicorn), SQLite, and local-directory storage or a loopback S3
server (``moto_server``). Used by ``greenmim up`` and by the tests' fixtures.

    data_dir/
      greenmim.db          SQLite job store
      artifacts/           storage root (local mode)
      secrets/ray_token    Ray auth token (0600), secrets/pepper (API key HMAC key)
      stack.json           ports, pids and URLs of a running stack (for `greenmim down`)
      logs/                ray.log, api.log, s3.log

Every process binds 127.0.0.1 and is started in its own process group so ``stop`` ends exactly
what it started (never ``ray stop``, which would end every Ray on the machine).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

from service.stack.processes import (
    STOP_GRACE_S,
    executable,
    free_port,
    kill_group,
    secret_file,
    spawn,
    wait_http,
)
from workers.storage import S3Settings

log = logging.getLogger(__name__)


# Serve's throughput mode: HAProxy on the HTTP port in front of replicas that serve HTTP
# themselves (direct ingress), instead of the Python proxy relaying every request to the replica
# over an actor call. On 2 cores the Python proxy tops out near 55 req/s for this API; HAProxy
# holds 100 req/s at p99 ~20 ms (service/README.md, "Serve under load").
SERVE_ENV = {"RAY_SERVE_ENABLE_HA_PROXY": "1", "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"}

# How long a stopped Ray head may take before SIGKILL. On SIGTERM its GCS server lingers past
# 20 s; the head keeps nothing worth the wait (jobs live in the service's database and their
# checkpoints in storage, and the reconciler runs vanished jobs again), so a short grace.
RAY_STOP_GRACE_S = 5.0


@dataclass
class RayHead:
    """``ray start --head --block`` on 127.0.0.1 with token auth, in its own process group."""

    data_dir: Path
    num_cpus: float = 2
    num_gpus: int | None = None
    token: str = ""
    gcs_port: int = 0
    dashboard_port: int = 0
    pid: int | None = None
    temp_dir: str = ""
    extra_env: dict[str, str] = field(default_factory=dict)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.gcs_port}"

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def client_env(self) -> dict[str, str]:
        """What a process needs to talk to this cluster (Ray clients, drivers); the head gets
        it too, so Serve runs in the mode ``SERVE_ENV`` sets."""
        return {
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN": self.token,
            "RAY_ADDRESS": self.address,
            "RAY_USAGE_STATS_ENABLED": "0",
            **SERVE_ENV,
        }

    def start(self, timeout: float = 120) -> RayHead:
        self.token = self.token or secret_file(self.data_dir / "secrets" / "ray_token")
        self.gcs_port = self.gcs_port or free_port()
        self.dashboard_port = self.dashboard_port or free_port()
        # Unix socket paths must stay short: a long data_dir gets a short temp dir instead.
        tag = hashlib.sha256(str(self.data_dir.resolve()).encode()).hexdigest()[:8]
        self.temp_dir = self.temp_dir or os.path.join(tempfile.gettempdir(), f"gm-ray-{tag}")
        cmd = [
            executable("ray"),
            "start",
            "--head",
            "--block",
            "--disable-usage-stats",
            "--node-ip-address",
            "127.0.0.1",
            "--port",
            str(self.gcs_port),
            "--dashboard-host",
            "127.0.0.1",
            "--dashboard-port",
            str(self.dashboard_port),
            "--include-dashboard",
            "true",
            "--ray-client-server-port",
            str(free_port()),
            "--dashboard-agent-listen-port",
            str(free_port()),
            "--dashboard-agent-grpc-port",
            str(free_port()),
            "--metrics-export-port",
            str(free_port()),
            "--runtime-env-agent-port",
            str(free_port()),
            "--num-cpus",
            str(self.num_cpus),
            "--temp-dir",
            self.temp_dir,
        ]
        if self.num_gpus is not None:
            cmd += ["--num-gpus", str(self.num_gpus)]
        env = {**os.environ, **self.client_env(), **self.extra_env}
        env.pop("RAY_ADDRESS")
        proc = spawn(cmd, self.data_dir / "logs" / "ray.log", env)
        self.pid = proc.pid
        try:
            wait_http(
                f"{self.dashboard_url}/api/version",
                timeout,
                proc,
                headers={"Authorization": f"Bearer {self.token}"},
            )
            self._wait_jobs_api(timeout)
        except Exception:
            self.stop()
            raise
        return self

    def _wait_jobs_api(self, timeout: float) -> None:
        """Until the Jobs API answers and the state API lists the head node."""
        deadline = time.monotonic() + timeout
        auth = {"Authorization": f"Bearer {self.token}"}
        while time.monotonic() < deadline:
            try:
                jobs = httpx.get(f"{self.dashboard_url}/api/jobs/", timeout=5, headers=auth)
                nodes = httpx.get(
                    f"{self.dashboard_url}/api/v0/nodes?limit=10", timeout=5, headers=auth
                )
                listed = nodes.status_code == 200 and nodes.json()["data"]["result"]["result"]
                if jobs.status_code == 200 and listed:
                    return
            except (httpx.HTTPError, ValueError, KeyError):
                pass
            time.sleep(0.5)
        raise TimeoutError("Ray Jobs API did not come up")

    def stop(self) -> None:
        if self.pid is not None:
            kill_group(self.pid, RAY_STOP_GRACE_S)
            self.pid = None


@dataclass
class S3Server:
    """``moto_server`` on loopback: a real S3-compatible HTTP server (development and tests)."""

    data_dir: Path
    port: int = 0
    bucket: str = "greenmim"
    pid: int | None = None
    access_key: str = "greenmim-local"
    secret_key: str = ""

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def env(self) -> dict[str, str]:
        """The same as environment variables, for processes (the API, Ray's workers)."""
        return self.settings().to_env()

    def settings(self) -> S3Settings:
        """How clients (boto3, pyarrow, the workers) reach this server."""
        return S3Settings(
            endpoint_url=self.endpoint,
            region="us-east-1",
            access_key=self.access_key,
            secret_key=self.secret_key,
        )

    def start(self, timeout: float = 60) -> S3Server:
        self.port = self.port or free_port()
        self.secret_key = self.secret_key or secret_file(self.data_dir / "secrets" / "s3_secret")
        proc = spawn(
            [executable("moto_server"), "-H", "127.0.0.1", "-p", str(self.port)],
            self.data_dir / "logs" / "s3.log",
            dict(os.environ),
        )
        self.pid = proc.pid
        wait_http(f"{self.endpoint}/", timeout, proc)
        self.settings().boto3_client().create_bucket(Bucket=self.bucket)
        return self

    def stop(self) -> None:
        if self.pid is not None:
            kill_group(self.pid)
            self.pid = None


@dataclass
class ApiServer:
    """The API as a uvicorn process (``--factory service.server.app:create_app``)."""

    data_dir: Path
    env: dict[str, str]
    port: int = 0
    pid: int | None = None
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 60) -> ApiServer:
        self.port = self.port or free_port()
        cmd = [
            sys.executable,
            "-m",
            "uvicorn",
            "--factory",
            "service.server.app:create_app",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--log-level",
            "warning",
        ]
        self.proc = spawn(cmd, self.data_dir / "logs" / "api.log", {**os.environ, **self.env})
        self.pid = self.proc.pid
        wait_http(f"{self.url}/healthz", timeout, self.proc)
        return self

    def kill(self) -> None:
        """SIGKILL, as a crash would."""
        if self.pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pid, signal.SIGKILL)
            if self.proc is not None:
                self.proc.wait()
            self.pid = None

    def stop(self) -> None:
        if self.pid is not None:
            kill_group(self.pid)
            self.pid = None


def api_env(data_dir: Path, ray: RayHead, s3: S3Server | None, **overrides: str) -> dict[str, str]:
    """Settings (``GREENMIM_*``) for an API talking to this stack."""
    env = {
        **ray.client_env(),
        "GREENMIM_ENV": "development",
        "GREENMIM_DATA_DIR": str(data_dir),
        "GREENMIM_RAY_DASHBOARD_URL": ray.dashboard_url,
        "GREENMIM_RAY_AUTH_TOKEN": ray.token,
        "GREENMIM_KEY_PEPPER": secret_file(data_dir / "secrets" / "pepper"),
        "GREENMIM_WORKER_PYTHON": sys.executable,
        "GREENMIM_RECONCILE_INTERVAL_S": "1",
    }
    if s3 is not None:
        env.update(s3.env())
        env["GREENMIM_STORAGE_ROOT"] = f"s3://{s3.bucket}/artifacts"
    env.update(overrides)
    return env


def serve_deploy(
    env: dict[str, str],
    port: int,
    log_path: Path,
    timeout: float = 180,
    extra_args: tuple[str, ...] = (),
) -> None:
    """Deploy the API under Ray Serve on 127.0.0.1:``port`` (a short-lived driver does it);
    ``extra_args`` go to ``python -m service.server.serve``."""
    cmd = [sys.executable, "-m", "service.server.serve", "--port", str(port), *extra_args]
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as logf:
        rc = subprocess.run(
            cmd, env={**os.environ, **env}, stdout=logf, stderr=subprocess.STDOUT, timeout=timeout
        ).returncode
    if rc != 0:
        raise RuntimeError(f"deploying the API under Ray Serve failed (exit {rc}); see {log_path}")


@dataclass
class StackState:
    data_dir: str
    api_url: str
    ray_pid: int | None
    s3_pid: int | None
    api_pid: int | None
    dashboard_url: str
    s3_endpoint: str | None
    ray_address: str | None = None  # None: recorded before `restart-api` existed
    serve: bool = True  # the API under Ray Serve (else a uvicorn process, api_pid)

    def save(self) -> None:
        Path(self.data_dir, "stack.json").write_text(json.dumps(asdict(self), indent=2))

    @classmethod
    def load(cls, data_dir: Path) -> StackState | None:
        p = data_dir / "stack.json"
        return cls(**json.loads(p.read_text())) if p.exists() else None


def start_stack(
    data_dir: Path,
    *,
    port: int = 8000,
    s3: bool = False,
    serve: bool = True,
    num_cpus: float | None = None,
    progress: Any = None,
) -> tuple[StackState, dict[str, str]]:
    """Start everything; returns the state and the API's environment."""
    data_dir = data_dir.resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    say = progress or (lambda msg: log.info(msg))
    s3srv = None
    if s3:
        say("starting the loopback S3 server")
        s3srv = S3Server(data_dir).start()
    say("starting the Ray head (127.0.0.1, token auth)")
    ray = RayHead(
        data_dir, num_cpus=num_cpus or os.cpu_count() or 2, extra_env=s3srv.env() if s3srv else {}
    ).start()
    env = api_env(data_dir, ray, s3srv)
    api_pid = None
    try:
        if serve:
            say(f"deploying the API under Ray Serve on 127.0.0.1:{port}")
            serve_deploy(env, port, data_dir / "logs" / "serve.log")
        else:
            say(f"starting the API (uvicorn) on 127.0.0.1:{port}")
            api = ApiServer(data_dir, env, port=port).start()
            api_pid = api.pid
        wait_http(f"http://127.0.0.1:{port}/healthz", 120)
    except Exception:
        ray.stop()
        if s3srv:
            s3srv.stop()
        raise
    state = StackState(
        str(data_dir),
        f"http://127.0.0.1:{port}",
        ray.pid,
        s3srv.pid if s3srv else None,
        api_pid,
        ray.dashboard_url,
        s3srv.endpoint if s3srv else None,
        ray.address,
        serve,
    )
    state.save()
    return state, env


def stop_stack(data_dir: Path) -> bool:
    state = StackState.load(data_dir.resolve())
    if state is None:
        return False
    for pid, grace in (
        (state.api_pid, STOP_GRACE_S),
        (state.ray_pid, RAY_STOP_GRACE_S),
        (state.s3_pid, STOP_GRACE_S),
    ):
        if pid:
            kill_group(pid, grace)
    (data_dir.resolve() / "stack.json").unlink(missing_ok=True)
    return True
