"""Stopping what the local stack started: a process group is gone once no member runs. A
zombie does not run: our own unreaped child, or an orphan whose init never reaps it (as in some
containers), used to keep ``kill_group`` waiting out its whole timeout at every stop."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import pytest

from service.stack.processes import group_alive, kill_group, spawn
from tests.polling import until

pytestmark = [
    pytest.mark.unit,
    pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads procfs"),
]

# a leader with a child of its own, both asleep
TWO_SLEEPERS = "import subprocess, time; subprocess.Popen(['sleep', '60']); time.sleep(60)"


def state_of(pid: int) -> str:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


def members(pgid: int) -> list[int]:
    """The running processes of a group, read from procfs."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            state, _, pgrp = (entry / "stat").read_text().rsplit(")", 1)[1].split()[:3]
        except (OSError, ValueError):
            continue
        if int(pgrp) == pgid and state != "Z":
            found.append(int(entry.name))
    return found


def test_a_group_left_with_zombies_is_not_alive(tmp_path: Path) -> None:
    proc = spawn([sys.executable, "-c", "import time; time.sleep(60)"], tmp_path / "log", {})
    assert group_alive(proc.pid)
    os.killpg(proc.pid, signal.SIGKILL)
    until(lambda: state_of(proc.pid) == "Z", 10)
    os.killpg(proc.pid, 0)  # signal 0 still finds the group: its zombie leader is in it
    assert not group_alive(proc.pid)
    proc.wait()


def test_kill_group_stops_the_group_and_reaps_our_child(tmp_path: Path) -> None:
    proc = spawn([sys.executable, "-c", TWO_SLEEPERS], tmp_path / "log", dict(os.environ))
    until(lambda: len(members(proc.pid)) == 2, 10)  # the leader and its sleeping child
    kill_group(proc.pid)
    assert members(proc.pid) == []
    assert not group_alive(proc.pid)
    with pytest.raises(ChildProcessError):  # already reaped: no zombie left behind
        os.waitpid(proc.pid, os.WNOHANG)
