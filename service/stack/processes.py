"""Processes of the local stack: free loopback ports, spawning into a process group of its
own, waiting for HTTP, stopping exactly the group we started, secrets on disk."""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_http(
    url: str,
    timeout: float,
    proc: subprocess.Popen[bytes] | None = None,
    headers: dict[str, str] | None = None,
) -> None:
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process for {url} exited with {proc.returncode}")
        try:
            r = httpx.get(url, timeout=2, headers=headers)
            if r.status_code < 500:
                return
            last = f"HTTP {r.status_code}"
        except httpx.HTTPError as e:
            last = str(e)
        time.sleep(0.25)
    raise TimeoutError(f"{url} not up after {timeout:.0f}s ({last})")


def secret_file(path: Path) -> str:
    """Read a secret, creating it (random, mode 0600) the first time."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))
    return path.read_text().strip()


def spawn(cmd: list[str], log_path: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    out = open(log_path, "ab")  # noqa: SIM115 (the child owns it)
    return subprocess.Popen(
        cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
    )


STOP_GRACE_S = 20.0  # how long a stopped process group may take before SIGKILL


def kill_group(pid: int, timeout: float = STOP_GRACE_S) -> None:
    """SIGTERM the process group led by ``pid`` (one we started), then SIGKILL what is left."""
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while group_alive(pid):
        if time.monotonic() >= deadline:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
            break
        time.sleep(0.2)
    # a leader that is our own child stays a zombie until reaped; it is dead or dying here
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)


def group_alive(pgid: int) -> bool:
    """Whether a process group has a member that still runs. Zombies do not count: one whose
    parent is gone waits for an init that, in some containers, never reaps it."""
    proc = Path("/proc")
    if not (proc / "self" / "stat").exists():  # no procfs: the group exists or not
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return False
        return True
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:  # gone meanwhile
            continue
        state, _ppid, pgrp = stat.rsplit(")", 1)[1].split()[:3]  # after "pid (comm)"
        if int(pgrp) == pgid and state not in ("Z", "X"):
            return True
    return False


def executable(name: str) -> str:
    here = Path(sys.executable).parent / name
    return str(here) if here.exists() else (shutil.which(name) or name)
