"""Storage faults: the S3 server refuses connections for a while during a run.

A dedicated moto server sits behind ``drills.OutageProxy`` (the session's server is left alone);
the driver and Ray's workers reach the store through the proxy, the test reads it directly.
Outages start the moment a checkpoint becomes listed, so the first write to meet them is Ray
Train's own run snapshot (the one that used to fail the run at once, ``max allowed: 0``), then
metrics, logs and the next checkpoint upload.
"""

from __future__ import annotations

import dataclasses
import time
from types import SimpleNamespace

import pytest

from service.server.domain.ports import RunPhase, RunStatus
from service.server.domain.reconciler import Reconciler
from service.stack.local import S3Server
from service.states import FailureType
from workers.artifacts import list_checkpoints, read_metrics, read_result, verify_checkpoint
from workers.outcome import read_result_line
from workers.storage import open_root

from .conftest import tiny_spec
from .drills import OutageProxy, attempt_starts, finish, start_driver, steps, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.fault]

EPOCHS = 3
OUTAGE_S = 20.0  # > what pyarrow's default 3 quick tries (~0.15 s) or boto3's legacy ones ride out


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A moto server of its own, and a proxy in front of it that can refuse connections."""
    server = S3Server(tmp_path_factory.mktemp("s3-drill")).start()
    proxy = OutageProxy(server.port)
    direct = server.settings()
    through = dataclasses.replace(direct, endpoint_url=proxy.endpoint)
    try:
        yield SimpleNamespace(server=server, proxy=proxy, direct=direct, through=through)
    finally:
        proxy.down()
        server.stop()


def drill_env(ray_cluster, store, **extra) -> dict:
    return {**ray_cluster["env"], **store.through.to_env(), **extra}


def spec(max_failures: int) -> dict:
    return tiny_spec(
        "pretrain",
        data={"max_samples": 128},
        train={"epochs": EPOCHS},
        resources={"max_failures": max_failures},
    )


def outage_at_first_checkpoint(store, root, job, seconds: float | None) -> int:
    """Refuse connections once epoch 1's checkpoint is listed, for ``seconds`` (None: for good).
    Returns that checkpoint's step."""
    first = wait_for(lambda: list_checkpoints(root.fs, job), 240, "the first checkpoint", 0.01)
    store.proxy.down()
    if seconds is not None:
        time.sleep(seconds)  # the outage itself
        store.proxy.up()
    return first[-1].step


def test_an_outage_within_the_retries_costs_no_failure(ray_cluster, store, tmp_path):
    """20 s of refused connections, no failure budget at all: every writer (Ray's run snapshot,
    metrics, logs, the next checkpoint) waits it out and the run finishes as if nothing happened."""
    root = open_root("s3://greenmim/outage1", store.direct)
    job = root.job_prefix("acme", "out1")
    proc = start_driver(drill_env(ray_cluster, store), spec(0), root.uri, "acme", "out1", tmp_path)
    outage_at_first_checkpoint(store, root, job, OUTAGE_S)
    rc, out, wall = finish(proc)
    assert rc == 0, out[-4000:]
    result = read_result(root.fs, job)
    records = read_metrics(root.fs, job)
    spe = records[0]["steps_per_epoch"]
    assert result["status"] == "succeeded" and result["step"] == EPOCHS * spe
    assert attempt_starts(root.fs, job) == [0]  # no restart was needed
    assert steps(records) == list(range(1, EPOCHS * spe + 1))
    listed = list_checkpoints(root.fs, job)
    assert [c.epoch for c in listed] == [2, 3]
    assert [verify_checkpoint(root.fs, c.path) for c in listed] == listed
    print(f"\n[storage outage {OUTAGE_S:.0f}s, max_failures 0] succeeded, wall {wall:.1f}s")


def test_an_outage_past_the_retries_is_charged_to_the_budget(ray_cluster, store, tmp_path):
    """With 3 quick tries per request, a 6 s outage fails Ray Train's snapshot write: the driver
    restarts the run after a backoff, within ``max_failures``, from the newest listed checkpoint."""
    root = open_root("s3://greenmim/outage2", store.direct)
    job = root.job_prefix("acme", "out2")
    env = drill_env(ray_cluster, store, GREENMIM_S3_MAX_ATTEMPTS="3")
    proc = start_driver(env, spec(3), root.uri, "acme", "out2", tmp_path)
    first = outage_at_first_checkpoint(store, root, job, 6.0)
    rc, out, wall = finish(proc)
    assert rc == 0, out[-4000:]
    restarts = out.count("restarting the run in")
    assert 1 <= restarts <= 3, out[-4000:]
    records = read_metrics(root.fs, job)
    spe = records[0]["steps_per_epoch"]
    resumes = [r for r in records if r.get("event") == "resume"]
    assert resumes and resumes[0]["step"] == first  # the checkpoint listed when it went down
    assert steps(records) == list(range(1, EPOCHS * spe + 1))
    assert read_result(root.fs, job)["status"] == "succeeded"
    print(f"\n[storage outage 6s, 3 tries/request] {restarts} run restart(s), wall {wall:.1f}s")


def test_a_store_that_stays_down_still_gets_a_terminal_result(ray_cluster, store, tmp_path):
    """The store never comes back: the run fails within its budget, the driver exits, and its
    log's result line carries the real error, which the service's reconciler reads when
    ``result.json`` could not be written."""
    root = open_root("s3://greenmim/outage3", store.direct)
    job = root.job_prefix("acme", "out3")
    env = drill_env(ray_cluster, store, GREENMIM_S3_MAX_ATTEMPTS="3")
    proc = start_driver(env, spec(1), root.uri, "acme", "out3", tmp_path)
    try:
        outage_at_first_checkpoint(store, root, job, None)
        rc, out, wall = finish(proc)
    finally:
        store.proxy.up()
    assert rc == 1, out[-4000:]
    logged = read_result_line(out)
    assert logged is not None and logged["status"] == "failed" and logged["result_json"] is False
    assert "NETWORK_CONNECTION" in logged["error"].get("storage", ""), logged
    assert read_result(root.fs, job) is None  # the store never got it

    # the service: Ray says the driver failed; with no result.json it reads the log line
    class Artifacts:
        def read_result(self, tenant, job_id):
            return read_result(root.fs, root.job_prefix(tenant, job_id))

    class Scheduler:
        def logs(self, job_id):
            return out

    reconciler = Reconciler(None, Scheduler(), Artifacts(), lambda t: None, 1.0)  # type: ignore[arg-type]
    ftype, message = reconciler._failure(
        SimpleNamespace(tenant="acme", id="out3", submission_id="out3"),
        RunStatus(RunPhase.FAILED, "exit code 1"),
    )
    assert ftype == FailureType.TRAINING_ERROR
    assert message.startswith(logged["error"]["type"]) and "exit code 1" not in message
    print(f"\n[store down for good, 3 tries/request, max_failures 1] failed, wall {wall:.1f}s")
