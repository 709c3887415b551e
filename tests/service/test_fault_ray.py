"""Fault drills on the local stack (``greenmim up --uvicorn``, real workers, a micro Swin):

- ``greenmim restart-api`` replaces the API process alone: keys and jobs survive, the running
  job is re-attached (still attempt 1) and finishes;
- the Ray head killed mid-job (every Ray job gone), then ``greenmim down`` and ``up`` on the
  same data directory: the job runs again as attempt 2 under its own Ray submission id, resumes
  from its newest checkpoint, succeeds, and its metrics are contiguous (each step once).

Figures are printed (``-s``) for the README's fault table.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from service.cli import app as cli
from service.client.sdk import Client
from service.stack.admin import ensure_local_key
from service.stack.local import StackState
from service.stack.processes import free_port
from tests.polling import until

pytestmark = [pytest.mark.service, pytest.mark.fault]
runner = CliRunner()

EPOCHS = 3
STEPS_PER_EPOCH = 6  # 192 images / 32


def micro_spec(epochs: int = EPOCHS) -> dict[str, Any]:
    return {
        "kind": "pretrain",
        "model": "swin_micro_patch2_window4_64",
        "data": {"uri": "builtin:digits", "max_samples": 192, "loader_workers": 0},
        "train": {"epochs": epochs, "global_batch_size": 32},
        "resources": {"num_workers": 1, "cpus_per_worker": 1},
        "checkpoint": {"keep_last": 2},
    }


def greenmim(*args: str) -> Any:
    r = runner.invoke(cli, list(args))
    assert r.exit_code == 0, r.output
    return r


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path) -> Iterator[tuple[Path, int]]:
    """``greenmim up --uvicorn --detach`` in a data directory of its own; ``down`` at the end."""
    data_dir = tmp_path_factory.mktemp("stack")
    port = free_port()
    up = ("up", "--data-dir", str(data_dir), "--uvicorn", "--detach", "--num-cpus", "2")
    greenmim(*up, "--port", str(port))
    try:
        yield data_dir, port
    finally:
        runner.invoke(cli, ["down", "--data-dir", str(data_dir)])


def client(data_dir: Path, port: int) -> Client:
    return Client(f"http://127.0.0.1:{port}", ensure_local_key(data_dir), timeout=30)


def wait_done(c: Client, job_id: str, timeout: float = 300) -> Any:
    return until(lambda: (j := c.get(job_id)).state.is_terminal() and j, timeout, every=0.5)


def test_restart_api_alone_keeps_keys_and_jobs(stack: tuple[Path, int]) -> None:
    data_dir, port = stack
    c = client(data_dir, port)
    job = c.submit(micro_spec(epochs=2))
    until(lambda: c.get(job.id).state.value == "running", 180)
    before = StackState.load(data_dir)
    assert before is not None and before.api_pid
    t0 = time.monotonic()
    greenmim("restart-api", "--data-dir", str(data_dir))
    restart_s = time.monotonic() - t0
    after = StackState.load(data_dir)
    assert after is not None and after.api_pid and after.api_pid != before.api_pid
    with pytest.raises(ProcessLookupError):
        os.kill(before.api_pid, 0)  # the old API process is gone
    assert after.ray_pid == before.ray_pid  # Ray (and the job in it) untouched
    c = client(data_dir, port)  # the same key still authenticates
    assert c.get(job.id).state.value in ("running", "succeeded")
    done = wait_done(c, job.id)
    assert done.state.value == "succeeded" and done.attempt == 1, done
    assert done.progress.step == 2 * STEPS_PER_EPOCH
    print(f"\nrestart-api: {restart_s:.1f} s; job {job.id} re-attached, succeeded as attempt 1")


def test_a_job_survives_a_ray_restart_as_attempt_2(stack: tuple[Path, int]) -> None:
    data_dir, port = stack
    c = client(data_dir, port)
    job = c.submit(micro_spec())

    def first_checkpoint() -> Any:
        return [k for k in c.checkpoints(job.id) if k.name != "final"]

    ckpts = until(first_checkpoint, 300, every=0.2)
    state = StackState.load(data_dir)
    assert state is not None and state.ray_pid
    os.killpg(state.ray_pid, signal.SIGKILL)  # the Ray head is lost mid-job, with every Ray job
    greenmim("down", "--data-dir", str(data_dir))  # then the rest of the stack
    t0 = time.monotonic()
    greenmim(
        "up",
        "--data-dir",
        str(data_dir),
        "--uvicorn",
        "--detach",
        "--num-cpus",
        "2",
        "--port",
        str(port),
    )
    c = client(data_dir, port)
    again = until(lambda: (j := c.get(job.id)).attempt == 2 and j, 120)
    back_s = time.monotonic() - t0
    assert again.state.value in ("starting", "running", "succeeded")
    done = wait_done(c, job.id)
    assert done.state.value == "succeeded" and done.attempt == 2, done
    assert done.progress.step == EPOCHS * STEPS_PER_EPOCH

    items = c.metrics(job.id).items
    steps = [r["step"] for r in items if r["type"] == "step"]
    assert steps == list(range(1, EPOCHS * STEPS_PER_EPOCH + 1))  # contiguous: each step once
    epochs = [r["epoch"] for r in items if r["type"] == "epoch"]
    assert epochs == list(range(1, EPOCHS + 1))
    resumed = [r for r in items if r["type"] == "event" and r.get("event") == "resume"]
    # from a checkpoint, not from step 0, and before the end: training really was cut short
    assert resumed and ckpts[0].step <= resumed[-1]["step"] < EPOCHS * STEPS_PER_EPOCH

    events = c.events(job.id)
    new = [e for e in events if e.attempt == 2]
    assert (new[0].from_state, new[0].to_state) == ("running", "starting")
    assert f"{job.id}-a2" in (new[0].reason or "")
    assert "resuming from checkpoint" in (new[0].reason or "")
    assert [e.to_state.value for e in new][-2:] == ["running", "succeeded"]
    print(
        f"\nRay restart: attempt 2 submitted {back_s:.1f} s after `up` began, resumed at step "
        f"{resumed[-1]['step']} of {EPOCHS * STEPS_PER_EPOCH}; steps {len(steps)} contiguous"
    )
