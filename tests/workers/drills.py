"""Helpers of the fault drills (tests/workers/test_*fault*.py, test_checkpoint_truth.py,
test_node_loss.py): driver processes as the service starts them, metric probes, and a TCP
proxy in front of the S3 server that can refuse connections for a while (an outage)."""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import sys
import threading
import time

from tests.polling import until
from workers.artifacts import _scan_metrics, read_metrics


def start_driver(env: dict, spec: dict, root_uri: str, tenant: str, job_id: str, workdir):
    """``python -m workers.run`` as the service submits it: a separate driver process."""
    spec_file = workdir / f"{job_id}.spec.json"
    spec_file.write_text(json.dumps(spec))
    log = open(workdir / f"{job_id}.log", "ab")  # noqa: SIM115 (closed by finish)
    cmd = [sys.executable, "-m", "workers.run", "--spec", str(spec_file), "--job-id", job_id,
           "--tenant", tenant, "--storage-root", root_uri, "--metrics-flush-s", "0.1"]  # fmt: skip
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    proc.log, proc.log_path, proc.t0 = log, workdir / f"{job_id}.log", time.monotonic()
    return proc


def finish(proc, timeout: float = 300) -> tuple[int, str, float]:
    """Wait for a driver; returns (exit code, its output, wall seconds)."""
    try:
        rc = proc.wait(timeout)
    finally:
        proc.log.close()
    return rc, proc.log_path.read_text(), time.monotonic() - proc.t0


def steps(records) -> list[int]:
    return [r["step"] for r in records if r["type"] == "step"]


def attempt_starts(fs, job) -> list[int]:
    return [s for _, s in sorted(_scan_metrics(fs, job)[1].items())]


def wait_for(predicate, timeout: float, what: str, every: float = 0.02):
    return until(predicate, timeout, every, what)


def rank0_pid(fs, job) -> int | None:
    starts = [r for r in read_metrics(fs, job) if r.get("event") in ("start", "resume")]
    return starts[-1]["pid"] if starts else None


def pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


class OutageProxy:
    """A TCP forwarder on a loopback port in front of ``target_port``. ``down()`` closes the
    listening socket and every open connection, so clients meet refused connections (as when
    the store's process is gone) while the store keeps its data; ``up()`` listens again on the
    same port."""

    def __init__(self, target_port: int, port: int = 0):
        self.target = ("127.0.0.1", target_port)
        self.port = port
        self._listener: socket.socket | None = None
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()
        self.up()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def up(self) -> None:
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", self.port))
        self.port = s.getsockname()[1]
        s.listen(64)
        self._listener = s
        threading.Thread(target=self._accept, args=(s,), daemon=True).start()

    def down(self) -> None:
        with self._lock:
            listener, self._listener = self._listener, None
            conns, self._conns = self._conns, []
        if listener is not None:
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)
            listener.close()
        for c in conns:
            with contextlib.suppress(OSError):
                c.shutdown(socket.SHUT_RDWR)
            c.close()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(self.target)
            except OSError:
                client.close()
                continue
            with self._lock:
                if self._listener is not listener:
                    client.close()
                    server.close()
                    return
                self._conns += [client, server]
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(1 << 16):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)
