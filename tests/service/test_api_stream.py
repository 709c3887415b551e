"""The metric stream (SSE): every record once, including those written later at a step the
stream already sent, and an exact resume from ``Last-Event-ID``."""

from __future__ import annotations

import json
from typing import Any

import pytest

from service.server.domain.ports import RunPhase
from workers import artifacts as wa
from workers.storage import open_root

from .conftest import Harness

pytestmark = pytest.mark.unit


def _stream_events(text: str) -> list[tuple[str | None, dict[str, Any]]]:
    """(id, data) of every ``metric`` event in an SSE body."""
    out = []
    for block in text.strip().split("\n\n"):
        fields = dict(ln.split(": ", 1) for ln in block.split("\n") if ": " in ln)
        if fields.get("event") == "metric":
            out.append((fields.get("id"), json.loads(fields["data"])))
    return out


def test_the_stream_sends_records_written_later_at_the_step_it_already_sent(
    harness: Harness,
) -> None:
    """A checkpoint or end event is written after the step record of the same step; a stream
    that had sent that step must still send it (and a resumed one must not send it twice)."""
    job_id = harness.submit().json()["id"]
    harness.tick()
    harness.scheduler.phases[job_id] = RunPhase.RUNNING
    harness.tick()
    root = open_root(harness.settings.resolved_storage_root)
    w = wa.MetricsWriter(root.fs, root.job_prefix("tenant-a", job_id), flush_every_s=0)
    w.begin(0)
    for step in (1, 2):
        w.log({"type": "step", "step": step, "epoch": 0, "loss": 1.0 / step})
    w.flush()
    url = f"/v1/jobs/{job_id}/metrics"
    seen: list[str] = []
    with harness.client.stream("GET", url, headers=harness.h(Accept="text/event-stream")) as r:
        for line in r.iter_lines():
            seen.append(line)
            sent = json.loads(line[6:]) if line.startswith("data: ") else {}
            if sent.get("type") == "step" and sent["step"] == 2:
                # step 2 was sent: now its checkpoint event, then the end
                w.log({"type": "event", "event": "checkpoint", "step": 2, "epoch": 1})
                w.log({"type": "event", "event": "end", "step": 2, "epoch": 1})
                w.flush()
                harness.scheduler.phases[job_id] = RunPhase.SUCCEEDED
                harness.tick()
    got = _stream_events("\n".join(seen))
    assert [(i, r["type"], r.get("event")) for i, r in got] == [
        ("1.0", "step", None),
        ("2.0", "step", None),
        ("2.1", "event", "checkpoint"),
        ("2.2", "event", "end"),
    ]
    # reconnecting after the checkpoint event: only what came after it
    with harness.client.stream(
        "GET", url, headers=harness.h(Accept="text/event-stream", **{"Last-Event-ID": "2.1"})
    ) as r:
        resumed = _stream_events("".join(r.iter_text()))
    assert [(i, r.get("event")) for i, r in resumed] == [("2.2", "end")]
