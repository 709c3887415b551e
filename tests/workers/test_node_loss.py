"""Node loss: a two-node Ray cluster on loopback (a head and a second ``ray start --address``
on the same host, one CPU each) runs a 2-worker job, one worker per node. The second node is
killed (``ray start`` and every process below it, SIGKILL) after the first checkpoint; Ray Train restarts the
worker group, which waits for capacity until a replacement node joins, then resumes from the
newest listed checkpoint and the job succeeds with every step done once."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from service.stack.local import RayHead
from service.stack.processes import executable, free_port, kill_group, spawn
from workers.artifacts import list_checkpoints, read_metrics, read_result
from workers.storage import open_root

from .conftest import tiny_spec
from .drills import finish, pid_alive, start_driver, steps, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.fault]

EPOCHS = 2


def start_node(head: RayHead, log_dir) -> subprocess.Popen[bytes]:
    """``ray start --address`` on 127.0.0.1: a second node of ``head``'s cluster, one CPU."""
    cmd = [executable("ray"), "start", "--block", "--disable-usage-stats",
           "--address", head.address, "--node-ip-address", "127.0.0.1", "--num-cpus", "1",
           "--temp-dir", head.temp_dir]  # fmt: skip
    for flag in ("--node-manager-port", "--object-manager-port", "--metrics-export-port",
                 "--dashboard-agent-listen-port", "--dashboard-agent-grpc-port",
                 "--runtime-env-agent-port"):  # fmt: skip
        cmd += [flag, str(free_port())]
    env = {**os.environ, **head.client_env(), **head.extra_env}
    env.pop("RAY_ADDRESS")
    return spawn(cmd, log_dir / f"node-{len(list(log_dir.glob('node-*')))}.log", env)


def kill_node(node: subprocess.Popen[bytes]) -> None:
    """SIGKILL a node: ``ray start`` and every process below it (raylet, its Ray workers,
    which do not share its process group)."""
    tree = [node.pid, *descendants(node.pid)]
    for pid in tree:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    node.wait(30)
    wait_for(lambda: not any(pid_alive(p) for p in tree[1:]), 60, "the node's processes to die")


def descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def alive_nodes(head: RayHead) -> int:
    auth = {"Authorization": f"Bearer {head.token}"}
    try:
        r = httpx.get(f"{head.dashboard_url}/api/v0/nodes?limit=20", headers=auth, timeout=5)
        nodes = r.json()["data"]["result"]["result"]
    except (httpx.HTTPError, ValueError, KeyError):
        return -1
    return sum(n["state"] == "ALIVE" for n in nodes)


def test_a_lost_node_is_survived(tmp_path_factory, cache_dir, tmp_path):
    head = RayHead(
        tmp_path_factory.mktemp("ray2"),
        num_cpus=1,
        extra_env={
            "GREENMIM_CACHE_DIR": str(cache_dir),
            # a node is declared dead after 3 missed health checks a second apart (Ray's
            # defaults: 5 missed, 3 s apart), as an operator of a small cluster may set it
            "RAY_health_check_period_ms": "1000",
            "RAY_health_check_failure_threshold": "3",
        },
    ).start()
    nodes: list[subprocess.Popen[bytes]] = []
    try:
        nodes.append(start_node(head, tmp_path))
        wait_for(lambda: alive_nodes(head) == 2, 120, "the second node", every=0.5)
        root = open_root(str(tmp_path / "store"))
        job = root.job_prefix("acme", "node1")
        spec = tiny_spec(
            "pretrain",
            data={"max_samples": 128},
            train={"epochs": EPOCHS},
            resources={"num_workers": 2, "cpus_per_worker": 1.0, "max_failures": 2},
        )
        env = {**os.environ, **head.client_env()}
        proc = start_driver(env, spec, root.uri, "acme", "node1", tmp_path)
        wait_for(lambda: list_checkpoints(root.fs, job), 240, "the first checkpoint")
        kill_node(nodes[0])
        listed = list_checkpoints(root.fs, job)[-1].step
        t_kill = time.monotonic()
        wait_for(lambda: alive_nodes(head) == 1, 120, "Ray to see the node gone", every=0.5)
        print(
            f"\n[node loss] Ray saw the node gone {time.monotonic() - t_kill:.1f}s after the kill"
        )
        # the run cannot place 2 one-CPU workers on the one-CPU head: it waits for capacity
        wait_for(lambda: "[FailurePolicy] RETRY" in proc.log_path.read_text(), 120, "Ray's retry")
        nodes.append(start_node(head, tmp_path))  # the replacement
        rc, out, wall = finish(proc, timeout=400)
        assert rc == 0, out[-4000:]
    finally:
        for node in nodes:
            kill_group(node.pid)
        head.stop()
    records = read_metrics(root.fs, job)
    spe = records[0]["steps_per_epoch"]
    resumes = [r for r in records if r.get("event") == "resume"]
    assert resumes and resumes[0]["step"] == listed  # the newest listed at the loss
    assert resumes[0]["world_size"] == 2
    assert steps(records) == list(range(1, EPOCHS * spe + 1))
    assert read_result(root.fs, job)["status"] == "succeeded"
    print(f"\n[node loss, 2 nodes x 1 CPU, 2 workers] resumed at step {resumes[0]['step']}, "
          f"wall {wall:.1f}s")  # fmt: skip
