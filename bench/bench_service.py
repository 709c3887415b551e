"""Service benchmarks on this machine; prints tables (not a test).

    python bench/bench_service.py get     [--rate 100] [--seconds 20] [--serve | --uvicorn]
    python bench/bench_service.py latency [--jobs 3]
    python bench/bench_service.py all

``get``: open-loop load of ``GET /v1/jobs/{id}`` and ``GET /v1/jobs/{id}/metrics``
(alternating) at a fixed rate (requests are sent on a schedule, not after the previous answer,
so a slow server shows up as latency) against the API on a real SQLite file, once under Ray Serve
on a local Ray head (``service.server.serve`` defaults, as deployed) and once under uvicorn with no
scheduler, printed side by side; ``--serve`` or ``--uvicorn`` runs only one.
``--max-ongoing-requests 5`` reproduces Serve's own default.

``latency``: the local stack (Ray head with token auth, the API under Serve), a tiny real
pretrain job submitted over HTTP, and the time from the 202 to the job's ``starting`` and
``running`` states; each job is cancelled once running.
On a shared host, run it in a network namespace with only loopback (Serve binds all interfaces).
"""

from __future__ import annotations

import argparse
import asyncio
import shlex
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from service.client.sdk import Client
from service.stack.local import (
    ApiServer,
    RayHead,
    api_env,
    serve_deploy,
    start_stack,
    stop_stack,
)
from service.stack.processes import free_port

SPEC = {
    "kind": "pretrain",
    "model": "swin_micro_patch2_window4_64",
    "data": {"uri": "builtin:digits", "max_samples": 64, "loader_workers": 0},
    "train": {"epochs": 50, "global_batch_size": 16},
    "resources": {"num_workers": 1, "cpus_per_worker": 1},
}


GET_ROUTES = ("/v1/jobs/{id}", "/v1/jobs/{id}/metrics")


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


def table(title: str, rows: list[tuple[str, str]]) -> None:
    width = max(len(k) for k, _ in rows)
    print(f"\n{title}\n" + "-" * (width + 22))
    for k, v in rows:
        print(f"{k:<{width}}  {v:>18}")


def make_key(env: dict[str, str], tenant: str) -> str:
    """``greenmim keys create`` against the stack's database."""
    from service.stack.admin import key_service, stack_settings

    return str(key_service(stack_settings(Path(env["GREENMIM_DATA_DIR"]))).create(tenant).key)


async def open_loop(
    urls: list[str], headers: dict[str, str], rate: float, seconds: float
) -> tuple[dict[str, list[float]], dict[str, int], float]:
    """Send ``rate`` requests per second for ``seconds`` on a fixed schedule, cycling through
    ``urls``; per URL: latencies of the 200s and the count of everything else."""
    lat: dict[str, list[float]] = {u: [] for u in urls}
    errors = dict.fromkeys(urls, 0)
    n = int(rate * seconds)
    limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
    async with httpx.AsyncClient(headers=headers, limits=limits, timeout=10) as client:

        async def one(url: str) -> None:
            t = time.perf_counter()
            try:
                r = await client.get(url)
                ok = r.status_code == 200
            except httpx.HTTPError:
                ok = False
            if ok:
                lat[url].append(time.perf_counter() - t)
            else:
                errors[url] += 1

        for url in urls:  # warm-up, not counted
            for _ in range(20):
                await client.get(url)
        start = time.perf_counter()
        tasks = []
        for i in range(n):
            delay = start + i / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(urls[i % len(urls)])))
        await asyncio.gather(*tasks)
        wall = time.perf_counter() - start
    return lat, errors, wall


@dataclass
class GetResult:
    label: str
    sent: int
    wall: float
    errors: int
    ms: list[float]  # successful requests, all routes
    by_route: dict[str, tuple[int, list[float]]]  # route -> (errors, ms)


def run_get(server: str, rate: float, seconds: float, max_ongoing: int | None = None) -> GetResult:
    """One open-loop GET run against a fresh API (``server``: 'serve' or 'uvicorn')."""
    d = Path(tempfile.mkdtemp(prefix="gm-bench-"))
    ray = None
    api = None
    try:
        if server == "serve":
            from service.server.serve import DEFAULT_MAX_ONGOING_REQUESTS

            ray = RayHead(d, num_cpus=2).start()
            env = api_env(d, ray, None, GREENMIM_RECONCILER_ENABLED="false")
            port = free_port()
            mor = max_ongoing or DEFAULT_MAX_ONGOING_REQUESTS
            serve_deploy(
                env, port, d / "logs" / "serve.log", extra_args=("--max-ongoing-requests", str(mor))
            )
            url = f"http://127.0.0.1:{port}"
            label = f"Ray Serve (1 replica, max_ongoing_requests={mor})"
        else:
            from service.stack.processes import secret_file

            env = {
                "GREENMIM_DATA_DIR": str(d),
                "GREENMIM_SCHEDULER": "none",
                "GREENMIM_RECONCILER_ENABLED": "false",
                "GREENMIM_KEY_PEPPER": secret_file(d / "secrets" / "pepper"),
            }
            api = ApiServer(d, env).start()
            url = api.url
            label = "uvicorn (1 process, no scheduler)"
        key = make_key(env, "bench")
        job_id = _insert_jobs(env, 50)  # a tenant with some history; GET the newest
        routes = {
            f"{url}/v1/jobs/{job_id}": GET_ROUTES[0],
            f"{url}/v1/jobs/{job_id}/metrics": GET_ROUTES[1],
        }
        lat, errors, wall = asyncio.run(
            open_loop(list(routes), {"Authorization": f"Bearer {key}"}, rate, seconds)
        )
        by_route = {routes[u]: (errors[u], [x * 1000 for x in lat[u]]) for u in routes}
        ms = [x for _, xs in by_route.values() for x in xs]
        n_err = sum(errors.values())
        return GetResult(label, len(ms) + n_err, wall, n_err, ms, by_route)
    finally:
        if api:
            api.stop()
        if ray:
            ray.stop()


def _stats(ms: list[float]) -> list[str]:
    if not ms:
        return ["-"] * 4
    return [
        f"{statistics.median(ms):.1f}",
        f"{pct(ms, 95):.1f}",
        f"{pct(ms, 99):.1f}",
        f"{max(ms):.1f}",
    ]


def bench_get(
    rate: float, seconds: float, servers: list[str], max_ongoing: int | None = None
) -> None:
    results = [run_get(s, rate, seconds, max_ongoing) for s in servers]
    print(
        f"\nGET {' + '.join(GET_ROUTES)} (alternating) at {rate:g} req/s for {seconds:g}s, "
        f"open loop, SQLite"
    )
    head = ["", "sent", "req/s", "errors", "p50 ms", "p95 ms", "p99 ms", "max ms"]
    rows = []
    for r in results:
        rows.append([r.label, str(r.sent), f"{r.sent / r.wall:.1f}", str(r.errors), *_stats(r.ms)])
        for route, (err, ms) in r.by_route.items():
            rows.append([f"  {route}", str(len(ms) + err), "", str(err), *_stats(ms)])
    widths = [max(len(row[i]) for row in [head, *rows]) for i in range(len(head))]
    for row in [head, *rows]:
        print(
            row[0].ljust(widths[0])
            + "".join("  " + c.rjust(w) for c, w in zip(row[1:], widths[1:], strict=True))
        )


def _insert_jobs(env: dict[str, str], n: int) -> str:
    """``n`` queued job rows for the tenant 'bench' (nothing is scheduled); the last id."""
    from service.server.adapters.ray_jobs import NullScheduler
    from service.server.app import build_context
    from service.stack.admin import stack_settings
    from workers.spec import JobSpec

    settings = stack_settings(Path(env["GREENMIM_DATA_DIR"])).model_copy(
        update={"scheduler": "none"}
    )
    ctx = build_context(settings, scheduler=NullScheduler())
    spec = JobSpec.model_validate(SPEC)
    return str([ctx.jobs.submit("bench", spec, None)[0].id for _ in range(n)][-1])


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
    only = p.add_mutually_exclusive_group()
    only.add_argument("--serve", action="store_true", help="get: only the API under Ray Serve")
    only.add_argument("--uvicorn", action="store_true", help="get: only the API under uvicorn")
    p.add_argument(
        "--max-ongoing-requests",
        type=int,
        default=None,
        help="get: override the Serve replica's limit (default: service.server.serve's)",
    )
    p.add_argument("--jobs", type=int, default=3)
    args = p.parse_args(argv)
    print("$ python bench/bench_service.py " + shlex.join(sys.argv[1:] if argv is None else argv))
    if args.what in ("get", "all"):
        servers = ["serve"] if args.serve else ["uvicorn"] if args.uvicorn else ["serve", "uvicorn"]
        bench_get(args.rate, args.seconds, servers, args.max_ongoing_requests)
    if args.what in ("latency", "all"):
        bench_latency(args.jobs)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
