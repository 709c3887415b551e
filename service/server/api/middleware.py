"""ASGI middleware: a request body limit (413 before the app reads anything) and Prometheus
request metrics labelled by route template (not raw path, so ids do not explode cardinality)."""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Histogram
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.server.api.problems import problem


class RequestMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter(
            "greenmim_http_requests",
            "HTTP requests",
            ["method", "route", "status"],
            registry=registry,
        )
        self.latency = Histogram(
            "greenmim_http_request_seconds",
            "HTTP request latency",
            ["method", "route"],
            buckets=(0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=registry,
        )


class BodyLimitAndMetrics:
    def __init__(self, app: ASGIApp, max_body_bytes: int, metrics: RequestMetrics) -> None:
        self.app = app
        self.max = max_body_bytes
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = {"code": 500}

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            if scope["method"] in ("POST", "PUT", "PATCH"):
                limited = await self._limited(scope, receive, send_wrapper)
                if limited is None:
                    return
                receive = limited
            await self.app(scope, receive, send_wrapper)
        finally:
            route = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            self.metrics.requests.labels(scope["method"], template, str(status["code"])).inc()
            self.metrics.latency.labels(scope["method"], template).observe(
                time.perf_counter() - start
            )

    async def _limited(self, scope: Scope, receive: Receive, send: Send) -> Receive | None:
        """Read the whole body (at most ``max`` bytes) and replay it; None if 413 was sent."""
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max):
            await self._too_large(scope, receive, send)
            return None
        chunks: list[bytes] = []
        size = 0
        more = True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return receive
            body = message.get("body", b"")
            size += len(body)
            if size > self.max:
                await self._too_large(scope, receive, send)
                return None
            chunks.append(body)
            more = message.get("more_body", False)
        data = b"".join(chunks)
        sent = False

        async def replay() -> Message:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": data, "more_body": False}
            return await receive()

        return replay

    async def _too_large(self, scope: Scope, receive: Receive, send: Send) -> None:
        resp = problem(
            413,
            "Request body too large",
            f"the body exceeds {self.max} bytes; job specs are small JSON documents",
            "body-too-large",
            scope.get("path"),
        )
        resp.headers["Connection"] = "close"
        await resp(scope, receive, send)
