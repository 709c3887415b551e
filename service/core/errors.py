"""Domain errors and their RFC 9457 problem+json rendering.

The service layer raises ``ServiceError`` subclasses; the app maps each to a status code and a
``application/problem+json`` body ``{type, title, status, detail, instance, ...}`` with a message
a person can act on. Validation errors add ``errors: [{loc, msg}]``.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger(__name__)

PROBLEM_MEDIA_TYPE = "application/problem+json"
TYPE_BASE = "https://greenmim.dev/problems/"


class ServiceError(Exception):
    status = 500
    slug = "internal"
    title = "Internal error"

    def __init__(self, detail: str, **extra: Any) -> None:
        super().__init__(detail)
        self.detail = detail
        self.extra = extra


class NotFound(ServiceError):
    status, slug, title = 404, "not-found", "Not found"


class Unauthorized(ServiceError):
    status, slug, title = 401, "unauthorized", "Missing or invalid API key"


class InvalidSpec(ServiceError):
    """A spec that parses but cannot run (cluster too small, unknown source job, ...)."""

    status, slug, title = 422, "invalid-spec", "Invalid job spec"

    def __init__(self, detail: str, errors: list[dict[str, Any]] | None = None) -> None:
        super().__init__(detail, errors=errors or [])


class IdempotencyConflict(ServiceError):
    status, slug, title = (
        422,
        "idempotency-key-reused",
        "Idempotency-Key reused with a different body",
    )


class Conflict(ServiceError):
    status, slug, title = 409, "conflict", "Conflict"


class BadRequest(ServiceError):
    status, slug, title = 400, "bad-request", "Bad request"


class Unavailable(ServiceError):
    status, slug, title = 503, "unavailable", "Dependency unavailable"


def problem(
    status: int, title: str, detail: str, slug: str, instance: str | None = None, **extra: Any
) -> JSONResponse:
    body: dict[str, Any] = {
        "type": TYPE_BASE + slug,
        "title": title,
        "status": status,
        "detail": detail,
    }
    if instance:
        body["instance"] = instance
    body.update(extra)
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return JSONResponse(body, status_code=status, media_type=PROBLEM_MEDIA_TYPE, headers=headers)


def validation_errors(errors: list[Any]) -> list[dict[str, Any]]:
    """``[{loc: "train.epochs", msg}]`` from pydantic errors, dropping FastAPI's 'body' prefix."""
    out = []
    for e in errors:
        loc = [str(p) for p in e.get("loc", ()) if p != "body"]
        out.append(
            {"loc": ".".join(loc) or "body", "msg": e.get("msg", "invalid"), "type": e.get("type")}
        )
    return out


def summarize(errors: list[dict[str, Any]]) -> str:
    parts = [f"{e['loc']}: {e['msg']}" for e in errors[:5]]
    more = f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""
    return "; ".join(parts) + more


_HTTP_SLUGS = {
    400: ("bad-request", "Bad request"),
    401: ("unauthorized", "Missing or invalid API key"),
    404: ("not-found", "Not found"),
    405: ("method-not-allowed", "Method not allowed"),
    406: ("not-acceptable", "Not acceptable"),
    413: ("body-too-large", "Request body too large"),
    415: ("unsupported-media-type", "Unsupported media type"),
}


def install_handlers(app: FastAPI) -> None:
    @app.exception_handler(ServiceError)
    async def _service_error(request: Request, exc: ServiceError) -> JSONResponse:
        return problem(exc.status, exc.title, exc.detail, exc.slug, request.url.path, **exc.extra)

    @app.exception_handler(RequestValidationError)
    async def _request_validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        errs = list(exc.errors())
        if any(e.get("type") == "json_invalid" for e in errs):
            msg = errs[0].get("ctx", {}).get("error", "") if errs else ""
            return problem(
                400,
                "Malformed JSON",
                f"the request body is not valid JSON: {msg}".rstrip(": "),
                "malformed-json",
                request.url.path,
            )
        errors = validation_errors(errs)
        return problem(
            422, "Invalid request", summarize(errors), "validation", request.url.path, errors=errors
        )

    @app.exception_handler(ValidationError)
    async def _pydantic_validation(request: Request, exc: ValidationError) -> JSONResponse:
        errors = validation_errors(list(exc.errors()))
        return problem(
            422,
            "Invalid job spec",
            summarize(errors),
            "invalid-spec",
            request.url.path,
            errors=errors,
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        slug, title = _HTTP_SLUGS.get(exc.status_code, ("http-error", "HTTP error"))
        detail = exc.detail if isinstance(exc.detail, str) else title
        if exc.status_code == 404 and detail == "Not Found":
            detail = f"no route {request.method} {request.url.path}; see /docs"
        resp = problem(exc.status_code, title, detail, slug, request.url.path)
        for k, v in (exc.headers or {}).items():
            resp.headers[k] = v
        return resp

    @app.exception_handler(Exception)
    async def _unhandled(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return problem(
            500,
            "Internal error",
            "an unexpected error occurred; it has been logged",
            "internal",
            request.url.path,
        )
