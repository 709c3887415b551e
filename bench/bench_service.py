"""Service benchmarks on this machine; prints tables (not a test).

    python bench/bench_service.py get     [--rate 100] [--seconds 20] [--serve]
    python bench/bench_service.py latency [--jobs 3]
    python bench/bench_service.py all

``get``: open-loop load of ``GET /v1/jobs/{id}`` at a fixed rate (requests are sent on a
schedule, not after the previous answer, so a slow server shows up as latency) against the API
on a real SQLite file; by default the API runs under uvicorn with no scheduler, with ``--serve``
it runs under Ray Serve on a local Ray head. ``latency``: the local stack (Ray head with token
auth, the API under Serve), a tiny real pretrain job submitted over HTTP, and the time from the
202 to the job's ``starting`` and ``running`` states; each job is cancelled once running.
On a shared host, run it in a network namespace with only loopback (Serve binds all interfaces).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

import httpx

from service.client.sdk import Client
from service.stack.local import (
    ApiServer,
    RayHead,
    api_env,
    free_port,
    serve_deploy,
    start_stack,
    stop_stack,
)

SPEC = {
    "kind": "pretrain",
    "model": "swin_micro_patch2_window4_64",
    "data": {"uri": "builtin:digits", "max_samples": 64, "loader_workers": 0},
    "train": {"epochs": 50, "global_batch_size": 16},
    "resources": {"num_workers": 1, "cpus_per_worker": 1},
}


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


def table(title: str, rows: list[tuple[str, str]]) -> None:
    width = max(len(k) for k, _ in rows)
    print(f"\n{title}\n" + "-" * (width + 22))
    for k, v in rows:
        print(f"{k:<{width}}  {v:>18}")


def make_key(env: dict[str, str], tenant: str) -> str:
    import os

    from service.cli import key_service

    saved = dict(os.environ)
    os.environ.update(env)
    try:
        return str(key_service().create(tenant).key)
    finally:
        os.environ.clear()
        os.environ.update(saved)


async def open_loop(
    url: str, headers: dict[str, str], rate: float, seconds: float
) -> tuple[list[float], int, float]:
    lat: list[float] = []
    errors = 0
    n = int(rate * seconds)
    limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
    async with httpx.AsyncClient(headers=headers, limits=limits, timeout=10) as client:

        async def one() -> None:
            nonlocal errors
            t = time.perf_counter()
            try:
                r = await client.get(url)
                ok = r.status_code == 200
            except httpx.HTTPError:
                ok = False
            if ok:
                lat.append(time.perf_counter() - t)
            else:
                errors += 1

        for _ in range(20):  # warm-up, not counted
            await client.get(url)
        start = time.perf_counter()
        tasks = []
        for i in range(n):
            delay = start + i / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one()))
        await asyncio.gather(*tasks)
        wall = time.perf_counter() - start
    return lat, errors, wall


def bench_get(rate: float, seconds: float, serve: bool) -> None:
    d = Path(tempfile.mkdtemp(prefix="gm-bench-"))
    ray = None
    api = None
    try:
        if serve:
            ray = RayHead(d, num_cpus=2).start()
            env = api_env(d, ray, None, GREENMIM_RECONCILER_ENABLED="false")
            port = free_port()
            serve_deploy(env, port, d / "logs" / "serve.log")
            url = f"http://127.0.0.1:{port}"
            label = "Ray Serve (1 replica, 0.1 CPU)"
        else:
            from service.stack.local import secret_file

            env = {
                "GREENMIM_DATA_DIR": str(d),
                "GREENMIM_SCHEDULER": "none",
                "GREENMIM_RECONCILER_ENABLED": "false",
                "GREENMIM_KEY_PEPPER": secret_file(d / "secrets" / "pepper"),
            }
            api = ApiServer(d, env).start()
            url = api.url
            label = "uvicorn (1 process), no scheduler"
        key = make_key(env, "bench")
        job_id = _insert_jobs(env, 50)  # a tenant with some history; GET the newest
        lat, errors, wall = asyncio.run(
            open_loop(f"{url}/v1/jobs/{job_id}", {"Authorization": f"Bearer {key}"}, rate, seconds)
        )
        ms = [x * 1000 for x in lat]
        table(
            f"GET /v1/jobs/{{id}} at {rate:g} req/s for {seconds:g}s — {label}, SQLite",
            [
                ("requests sent", str(len(ms) + errors)),
                ("achieved rate (req/s)", f"{(len(ms) + errors) / wall:.1f}"),
                ("errors", str(errors)),
                ("p50 (ms)", f"{statistics.median(ms):.2f}"),
                ("p90 (ms)", f"{pct(ms, 90):.2f}"),
                ("p99 (ms)", f"{pct(ms, 99):.2f}"),
                ("max (ms)", f"{max(ms):.2f}"),
            ],
        )
    finally:
        if api:
            api.stop()
        if ray:
            ray.stop()


def _insert_jobs(env: dict[str, str], n: int) -> str:
    """``n`` queued job rows for the tenant 'bench' (nothing is scheduled); the last id."""
    import os

    saved = dict(os.environ)
    os.environ.update(env)
    try:
        from service.server.adapters.ray_jobs import NullScheduler
        from service.server.app import build_context
        from service.server.config import Settings
        from workers.spec import JobSpec

        ctx = build_context(Settings(scheduler="none"), scheduler=NullScheduler())
        spec = JobSpec.model_validate(SPEC)
        ids = [ctx.jobs.submit("bench", spec, None)[0].id for _ in range(n)]
        return str(ids[-1])
    finally:
        os.environ.clear()
        os.environ.update(saved)


def bench_latency(n_jobs: int) -> None:
    d = Path(tempfile.mkdtemp(prefix="gm-bench-lat-"))
    t0 = time.perf_counter()
    state, env = start_stack(d, port=free_port(), serve=True, num_cpus=2)
    up_s = time.perf_counter() - t0
    try:
        key = make_key(env, "bench")
        to_starting: list[float] = []
        to_running: list[float] = []
        with Client(state.api_url, key) as c:
            for _ in range(n_jobs):
                t = time.perf_counter()
                job = c.submit(SPEC)
                seen: dict[str, float] = {}
                while "running" not in seen:
                    s = c.get(job.id).state.value
                    seen.setdefault(s, time.perf_counter() - t)
                    if s in ("failed", "succeeded", "cancelled"):
                        raise RuntimeError(f"job {job.id} ended {s} before running")
                    time.sleep(0.05)
                to_starting.append(seen.get("starting", seen["running"]))
                to_running.append(seen["running"])
                c.cancel(job.id)
                c.wait(job.id, timeout=120)
        rows: list[tuple[str, str]] = [("stack start (s)", f"{up_s:.1f}"), ("jobs", str(n_jobs))]
        rows += [
            ("submit -> starting p50 (s)", f"{statistics.median(to_starting):.2f}"),
            ("submit -> running p50 (s)", f"{statistics.median(to_running):.2f}"),
            ("submit -> running max (s)", f"{max(to_running):.2f}"),
        ]
        table(
            "Job submit -> running over HTTP (API under Serve, real Ray job, reconcile 1 s)", rows
        )
    finally:
        stop_stack(d)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    p.add_argument("what", choices=["get", "latency", "all"])
    p.add_argument("--rate", type=float, default=100.0)
    p.add_argument("--seconds", type=float, default=20.0)
    p.add_argument(
        "--serve", action="store_true", help="GET benchmark against the API under Ray Serve"
    )
    p.add_argument("--jobs", type=int, default=3)
    args = p.parse_args(argv)
    if args.what in ("get", "all"):
        bench_get(args.rate, args.seconds, args.serve)
    if args.what in ("latency", "all"):
        bench_latency(args.jobs)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
