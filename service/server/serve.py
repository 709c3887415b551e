"""The API under Ray Serve: the plain FastAPI app of ``service.server.app`` as a Serve ingress.

    python -m service.server.serve --port 8000   # deploy to the cluster at $RAY_ADDRESS, then exit

Settings reach the replica as ``GREENMIM_*`` variables in its runtime environment (copied from
the deploying process), so the replica builds the same app ``uvicorn`` would. The proxy binds
127.0.0.1 unless ``--host`` says otherwise; the Ray dashboard is never proxied.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from ray import serve

from service.server.app import create_app

APP_NAME = "greenmim"
# Requests one replica takes at once. Serve's default (5) is far too low for this API: its routes
# are short synchronous reads that run in FastAPI's threadpool, and a replica at its limit makes
# the proxy reject, back off and re-probe every further request, which under steady load burns
# the CPU the replica needs and collapses throughput (minutes of queueing at 100 req/s).
DEFAULT_MAX_ONGOING_REQUESTS = 100


def _forwarded_env() -> dict[str, str]:
    keep = ("GREENMIM_", "AWS_", "RAY_AUTH_")
    return {k: v for k, v in os.environ.items() if k.startswith(keep)}


def build(
    num_cpus: float = 0.1,
    replicas: int = 1,
    max_ongoing_requests: int = DEFAULT_MAX_ONGOING_REQUESTS,
) -> serve.Application:
    """The Serve application; ``create_app`` runs on each replica (a builder, not a pickled app)."""

    @serve.deployment(
        name="greenmim-api",
        num_replicas=replicas,
        ray_actor_options={"num_cpus": num_cpus, "runtime_env": {"env_vars": _forwarded_env()}},
        health_check_period_s=10,
        max_ongoing_requests=max_ongoing_requests,
    )
    @serve.ingress(create_app)
    class GreenMIMAPI:
        pass

    return GreenMIMAPI.bind()  # type: ignore[attr-defined,no-any-return]


def app_builder(args: dict[str, str]) -> serve.Application:
    """For Serve config files / KubeRay RayService: ``import_path: service.server.serve:app_builder``
    with optional ``args: {num_cpus: "0.5", replicas: "2", max_ongoing_requests: "100"}``."""
    return build(
        float(args.get("num_cpus", 0.1)),
        int(args.get("replicas", 1)),
        int(args.get("max_ongoing_requests", DEFAULT_MAX_ONGOING_REQUESTS)),
    )


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m service.server.serve")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--num-cpus", type=float, default=0.1, help="CPUs per replica")
    p.add_argument("--replicas", type=int, default=1)
    p.add_argument(
        "--max-ongoing-requests",
        type=int,
        default=DEFAULT_MAX_ONGOING_REQUESTS,
        help="concurrent requests per replica",
    )
    p.add_argument(
        "--restart",
        action="store_true",
        help="delete the running application first, so its replicas start afresh",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    import ray

    ray.init(address=os.environ.get("RAY_ADDRESS", "auto"), log_to_driver=False)
    serve.start(http_options={"host": args.host, "port": args.port})
    if args.restart:
        serve.delete(APP_NAME)
    app = build(args.num_cpus, args.replicas, args.max_ongoing_requests)
    serve.run(app, name=APP_NAME, route_prefix="/", blocking=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
