"""Checkpoint truth: a listed checkpoint is the one a restarted run continues from.

Ray Train commits a checkpoint to its run snapshot about a second after our manifest makes it
listed; a worker killed in between used to restart from the previous checkpoint while the API
already listed the new one. The drill kills the rank-0 worker at several offsets right after
each checkpoint appears in the listing and checks that every restart continued from the newest
listed checkpoint, that no step was lost or repeated, and that no unlisted folder is left over.
"""

from __future__ import annotations

import os
import signal
import time

import pytest

from workers.artifacts import list_checkpoints, read_metrics, read_result, verify_checkpoint
from workers.storage import list_files, open_root

from .conftest import tiny_spec
from .drills import finish, pid_alive, rank0_pid, start_driver, steps, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.fault]

EPOCHS = 4
OFFSETS_S = (0.0, 0.3, 0.7)  # kill delay after the checkpoint of epoch 1, 2, 3 became listed


def test_resume_starts_from_the_newest_listed_checkpoint_after_a_kill_at_any_moment(
    ray_cluster, tmp_path
):
    root = open_root(str(tmp_path / "store"))
    job = root.job_prefix("acme", "truth1")
    spec = tiny_spec(
        "pretrain",
        data={"max_samples": 128},
        train={"epochs": EPOCHS},
        resources={"max_failures": len(OFFSETS_S)},
    )
    proc = start_driver(ray_cluster["env"], spec, root.uri, "acme", "truth1", tmp_path)
    expected = []  # the step of the newest listed checkpoint at each kill
    for epoch, offset in enumerate(OFFSETS_S, start=1):
        wait_for(
            lambda e=epoch: any(c.epoch == e for c in list_checkpoints(root.fs, job)),
            240,
            f"checkpoint of epoch {epoch}",
            every=0.01,
        )
        pid = rank0_pid(root.fs, job)
        assert pid is not None and pid_alive(pid)
        time.sleep(offset)  # the drill's parameter: how long after the listing the kill lands
        os.kill(pid, signal.SIGKILL)
        expected.append(list_checkpoints(root.fs, job)[-1].step)
        wait_for(lambda p=pid: rank0_pid(root.fs, job) not in (None, p), 240, "the restart")
    rc, out, wall = finish(proc)
    assert rc == 0, out[-4000:]

    records = read_metrics(root.fs, job)
    resumes = [r for r in records if r.get("event") == "resume"]
    assert [r["step"] for r in resumes] == expected
    for r in resumes:  # each attempt's first step follows its checkpoint
        assert steps(records[records.index(r) + 1 :])[0] == r["step"] + 1
    spe = records[0]["steps_per_epoch"]
    assert steps(records) == list(range(1, EPOCHS * spe + 1))  # none lost, none twice

    listed = list_checkpoints(root.fs, job)
    assert [(c.epoch, c.step) for c in listed] == [(3, 3 * spe), (4, 4 * spe)]  # keep_last=2
    assert [verify_checkpoint(root.fs, c.path) for c in listed] == listed
    result = read_result(root.fs, job)
    assert result["status"] == "succeeded"
    assert (result["latest_checkpoint"], result["step"]) == (listed[-1].name, listed[-1].step)
    # no folder outside the listing is left behind (uncommitted ones included)
    folders = [
        i.path
        for i in list_files(root.fs, f"{job}/checkpoints")
        if i.type.name == "Directory" and i.path.rsplit("/", 1)[-1].startswith("epoch_")
    ]
    assert folders == [c.path for c in listed]
    before_commit = sum(
        r["ray_checkpoint"] != f"epoch_{r['epoch']:05d}" for r in resumes
    )  # Ray alone would have gone back one checkpoint
    print(
        f"\n[checkpoint truth] {len(OFFSETS_S)} kills at +{OFFSETS_S} s after listing: "
        f"resumed from steps {expected} as listed; {before_commit} kill(s) landed before "
        f"Ray's commit; wall {wall:.1f}s"
    )
