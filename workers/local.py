"""A local Ray head on loopback with token authentication, for demos, tests and benchmarks.

    head = LocalRayHead.start(num_cpus=2)
    subprocess.run([... "python", "-m", "workers.run", ...], env=head.client_env())
    head.stop()

The head is ``ray start --head --block`` in its own process group, bound to 127.0.0.1, with a
fresh ``RAY_AUTH_TOKEN``; ``stop`` ends exactly that process group (never ``ray stop``, which
would stop every Ray instance on the machine).
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

logger = logging.getLogger(__name__)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_open(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise TimeoutError(f"{what} not ready after {timeout:.0f}s")


def stop_process_group(proc: subprocess.Popen, grace_s: float = 10.0) -> None:
    """SIGTERM then SIGKILL the process group led by ``proc`` (started with start_new_session)."""
    try:
        pgid = os.getpgid(proc.pid)
    except ProcessLookupError:
        return
    for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait)
        except subprocess.TimeoutExpired:
            continue
        time.sleep(0.5)  # children of the leader may take a moment to follow


@dataclass
class LocalRayHead:
    address: str
    token: str
    temp_dir: str
    proc: subprocess.Popen
    env: dict[str, str] = field(default_factory=dict)

    @classmethod
    def start(
        cls,
        num_cpus: int = 2,
        num_gpus: int = 0,
        env: dict[str, str] | None = None,
        timeout: float = 90.0,
    ) -> LocalRayHead:
        """Start the head and wait until a token-authenticated client sees its CPUs."""
        token = secrets.token_hex(32)
        port = free_port()
        temp_dir = tempfile.mkdtemp(prefix="gm-ray-", dir="/tmp")  # short: Ray's socket paths
        full_env = {
            **os.environ,
            **(env or {}),
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN": token,
            "RAY_USAGE_STATS_ENABLED": "0",
        }
        ray_bin = str(Path(sys.executable).parent / "ray")
        cmd = [
            ray_bin, "start", "--head", "--block",
            "--node-ip-address", "127.0.0.1", "--port", str(port),
            "--num-cpus", str(num_cpus), "--num-gpus", str(num_gpus),
            "--include-dashboard", "false", "--dashboard-host", "127.0.0.1",
            "--temp-dir", temp_dir, "--disable-usage-stats",
        ]  # fmt: skip
        log = open(Path(temp_dir) / "ray-start.log", "wb")  # noqa: SIM115 (inherited by the child)
        proc = subprocess.Popen(
            cmd, env=full_env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        log.close()
        head = cls(f"127.0.0.1:{port}", token, temp_dir, proc, full_env)
        try:

            def up() -> bool:
                if proc.poll() is not None:
                    raise RuntimeError(f"ray start exited:\n{head.start_log()[-2000:]}")
                return port_open(port)

            wait_for(up, timeout, "Ray head")
            probe = "import ray; ray.init(); print(ray.cluster_resources().get('CPU', 0))"
            wait_for(
                lambda: (
                    subprocess.run(
                        [sys.executable, "-c", probe],
                        env=head.client_env(),
                        capture_output=True,
                        text=True,
                        timeout=60,
                    )
                    .stdout.strip()
                    .endswith(f"{float(num_cpus)}")
                ),
                timeout,
                "Ray node",
            )
        except BaseException:
            head.stop()
            raise
        logger.info("Ray head at %s (temp dir %s)", head.address, temp_dir)
        return head

    def client_env(self) -> dict[str, str]:
        """Environment for a driver process (e.g. ``python -m workers.run``) of this cluster."""
        return {**self.env, "RAY_ADDRESS": self.address}

    def start_log(self) -> str:
        path = Path(self.temp_dir) / "ray-start.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self) -> None:
        stop_process_group(self.proc)
        shutil.rmtree(self.temp_dir, ignore_errors=True)
