"""A small typed Python client of the HTTP API (the ``greenmim`` CLI is built on it).

    from service.client.sdk import Client
    c = Client("http://127.0.0.1:8000", api_key)
    job = c.submit(spec)                      # dict, JobSpec, or a YAML/JSON file path
    job = c.wait(job.id)                      # until succeeded/failed/cancelled
    path, sha = c.download(job.id, "final", "model.safetensors")

Errors are ``ApiError`` carrying the problem+json body. A download follows the API's redirect
to a presigned URL without sending the API key there, and checks the sha256 the API lists.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx

from service.schemas import (
    CheckpointOut,
    JobEventOut,
    JobEvents,
    JobList,
    JobOut,
    LogsPage,
    MetricsPage,
    ModelOut,
)
from service.states import JobState
from workers.spec_file import read_spec_file

TERMINAL = tuple(s.value for s in JobState if s.is_terminal())


class ApiError(Exception):
    def __init__(self, status: int, problem: dict[str, Any]) -> None:
        self.status = status
        self.problem = problem
        detail = problem.get("detail") or problem.get("title") or "error"
        errors = problem.get("errors") or []
        extra = (
            "".join(f"\n  {e.get('loc')}: {e.get('msg')}" for e in errors[:10])
            if len(errors) > 1
            else ""
        )
        super().__init__(f"HTTP {status}: {detail}{extra}")


class ChecksumMismatch(Exception):
    pass


class Client:
    def __init__(self, base_url: str, api_key: str | None, timeout: float = 30.0) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.base_url = base_url.rstrip("/")
        self.http = httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout)

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _check(self, r: httpx.Response) -> httpx.Response:
        if r.status_code >= 400:
            try:
                body = r.json()
            except ValueError:
                body = {"detail": r.text[:500]}
            raise ApiError(r.status_code, body if isinstance(body, dict) else {"detail": str(body)})
        return r

    # -- jobs ------------------------------------------------------------------------------

    def submit(self, spec: Any, idempotency_key: str | None = None) -> JobOut:
        if isinstance(spec, str | Path):
            spec = read_spec_file(spec)
        elif hasattr(spec, "model_dump"):
            spec = spec.model_dump(mode="json")
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        r = self._check(self.http.post("/v1/jobs", json=spec, headers=headers))
        return JobOut.model_validate(r.json())

    def get(self, job_id: str) -> JobOut:
        return JobOut.model_validate(self._check(self.http.get(f"/v1/jobs/{job_id}")).json())

    def list_jobs(
        self,
        state: list[str] | None = None,
        kind: str | None = None,
        limit: int = 50,
        cursor: str | None = None,
    ) -> JobList:
        params: dict[str, Any] = {"limit": limit}
        if state:
            params["state"] = state
        if kind:
            params["kind"] = kind
        if cursor:
            params["cursor"] = cursor
        return JobList.model_validate(self._check(self.http.get("/v1/jobs", params=params)).json())

    def iter_jobs(
        self, state: list[str] | None = None, kind: str | None = None
    ) -> Iterator[JobOut]:
        cursor = None
        while True:
            page = self.list_jobs(state, kind, 200, cursor)
            yield from page.items
            if page.next_cursor is None:
                return
            cursor = page.next_cursor

    def events(self, job_id: str) -> list[JobEventOut]:
        """The job's state changes and attempts, oldest first."""
        r = self._check(self.http.get(f"/v1/jobs/{job_id}/events"))
        return JobEvents.model_validate(r.json()).items

    def cancel(self, job_id: str) -> JobOut:
        return JobOut.model_validate(
            self._check(self.http.post(f"/v1/jobs/{job_id}/cancel")).json()
        )

    def wait(
        self,
        job_id: str,
        timeout: float | None = None,
        poll_s: float = 1.0,
        on_update: Callable[[JobOut], None] | None = None,
        until: tuple[str, ...] = TERMINAL,
    ) -> JobOut:
        """Poll until the job reaches a state in ``until``; ``TimeoutError`` after ``timeout``."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            job = self.get(job_id)
            if on_update:
                on_update(job)
            if job.state.value in until:
                return job
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {job.state.value} after {timeout:.0f}s")
            time.sleep(poll_s)

    # -- metrics and logs ------------------------------------------------------------------

    def metrics(self, job_id: str, after_step: int | None = None, limit: int = 1000) -> MetricsPage:
        params: dict[str, Any] = {"limit": limit}
        if after_step is not None:
            params["after_step"] = after_step
        r = self._check(self.http.get(f"/v1/jobs/{job_id}/metrics", params=params))
        return MetricsPage.model_validate(r.json())

    def stream_metrics(
        self, job_id: str, after_step: int | None = None
    ) -> Iterator[tuple[str, dict[str, Any]]]:
        """Server-sent events: ``("state", {...})``, ``("metric", record)``, finally ``("end", ...)``."""
        params = {"after_step": after_step} if after_step is not None else {}
        with self.http.stream(
            "GET",
            f"/v1/jobs/{job_id}/metrics",
            params=params,
            headers={"Accept": "text/event-stream"},
            timeout=httpx.Timeout(30.0, read=None),
        ) as r:
            if r.status_code >= 400:
                r.read()
                self._check(r)
            event, data = "message", []
            for line in r.iter_lines():
                if line.startswith("event:"):
                    event = line[6:].strip()
                elif line.startswith("data:"):
                    data.append(line[5:].strip())
                elif line == "":
                    if data:
                        yield event, json.loads("\n".join(data))
                        if event == "end":
                            return
                    event, data = "message", []

    def logs(self, job_id: str, offset: int = 0, source: str = "driver") -> LogsPage:
        r = self._check(
            self.http.get(f"/v1/jobs/{job_id}/logs", params={"offset": offset, "source": source})
        )
        return LogsPage.model_validate(r.json())

    def follow_logs(
        self, job_id: str, source: str = "driver", poll_s: float = 1.0
    ) -> Iterator[str]:
        offset = 0
        while True:
            page = self.logs(job_id, offset, source)
            if page.text:
                yield page.text
            if page.complete:
                return
            if page.next_offset == offset:
                time.sleep(poll_s)
            offset = page.next_offset

    # -- checkpoints -----------------------------------------------------------------------

    def checkpoints(self, job_id: str) -> list[CheckpointOut]:
        r = self._check(self.http.get(f"/v1/jobs/{job_id}/checkpoints"))
        return [CheckpointOut.model_validate(c) for c in r.json()["items"]]

    def download(
        self,
        job_id: str,
        name: str = "final",
        dest: str | Path | None = None,
        file: str | None = None,
        on_progress: Callable[[int, int], None] | None = None,
    ) -> tuple[Path, str]:
        """Download one file of a checkpoint to ``dest`` (a file or folder); verify its sha256."""
        entry = next((c for c in self.checkpoints(job_id) if c.name == name), None)
        if entry is None:
            raise ApiError(404, {"detail": f"job {job_id} has no checkpoint named {name!r}"})
        rel = file or entry.primary_file
        meta = next((f for f in entry.files if f.path == rel), None)
        if meta is None:
            raise ApiError(404, {"detail": f"checkpoint {name!r} has no file {rel!r}"})
        target = Path(dest) if dest is not None else Path.cwd()
        if str(dest).endswith("/"):
            target.mkdir(parents=True, exist_ok=True)
        if target.is_dir():
            target = target / rel.rsplit("/", 1)[-1]
        params = {"file": file} if file else {}
        r = self._check(
            self.http.get(
                f"/v1/jobs/{job_id}/checkpoints/{name}",
                params=params,
                follow_redirects=False,
                headers={"Accept": "*/*"},
            )
        )
        h = hashlib.sha256()
        done = 0
        tmp = target.with_name(f".{target.name}.part")
        if r.status_code in (301, 302, 303, 307, 308):
            # A presigned URL carries its own authorisation: never send our API key there.
            with httpx.stream(
                "GET", r.headers["location"], timeout=httpx.Timeout(30.0, read=300.0)
            ) as s:
                if s.status_code >= 400:
                    s.read()
                    self._check(s)
                done = self._save(s, tmp, h, meta.size, on_progress)
        else:
            with self.http.stream(
                "GET", f"/v1/jobs/{job_id}/checkpoints/{name}", params=params
            ) as s:
                if s.status_code >= 400:
                    s.read()
                    self._check(s)
                done = self._save(s, tmp, h, meta.size, on_progress)
        digest = h.hexdigest()
        if digest != meta.sha256 or done != meta.size:
            tmp.unlink(missing_ok=True)
            raise ChecksumMismatch(
                f"{name}/{rel}: got {done} bytes sha256 {digest}, expected {meta.size} bytes sha256 {meta.sha256}"
            )
        tmp.replace(target)
        return target, digest

    @staticmethod
    def _save(
        s: httpx.Response,
        tmp: Path,
        h: Any,
        total: int,
        on_progress: Callable[[int, int], None] | None,
    ) -> int:
        done = 0
        tmp.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            for chunk in s.iter_bytes(1 << 20):
                f.write(chunk)
                h.update(chunk)
                done += len(chunk)
                if on_progress:
                    on_progress(done, total)
        return done

    # -- misc ------------------------------------------------------------------------------

    def models(self) -> list[ModelOut]:
        return [
            ModelOut.model_validate(m)
            for m in self._check(self.http.get("/v1/models")).json()["items"]
        ]

    def health(self, ready: bool = False) -> dict[str, Any]:
        r = self.http.get("/healthz", params={"ready": ready})
        return dict(r.json())
