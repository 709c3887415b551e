"""RFC 9457 problem+json rendering of every error the app answers with.

The service layer raises ``service.server.domain.errors.ServiceError`` subclasses (no HTTP in them);
this maps each to a status code and an ``application/problem+json`` body ``{type, title,
status, detail, instance, ...}``. Validation errors add ``errors: [{loc, msg}]``.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.server.domain.errors import (
    BadRequest,
    Conflict,
    IdempotencyConflict,
    InvalidSpec,
    NotFound,
    ServiceError,
    Unauthorized,
    Unavailable,
)

log = logging.getLogger(__name__)

PROBLEM_MEDIA_TYPE = "application/problem+json"
TYPE_BASE = "https://greenmim.dev/problems/"


# domain error -> (status, slug, title)
_DOMAIN: dict[type[ServiceError], tuple[int, str, str]] = {
    NotFound: (404, "not-found", "Not found"),
    Unauthorized: (401, "unauthorized", "Missing or invalid API key"),
    InvalidSpec: (422, "invalid-spec", "Invalid job spec"),
    IdempotencyConflict: (
        422,
        "idempotency-key-reused",
        "Idempotency-Key reused with a different body",
    ),
    Conflict: (409, "conflict", "Conflict"),
    BadRequest: (400, "bad-request", "Bad request"),
    Unavailable: (503, "unavailable", "Dependency unavailable"),
}


def status_of(exc: ServiceError) -> tuple[int, str, str]:
    """(status, slug, title) of a domain error; an unmapped one is an internal error."""
    for cls in type(exc).__mro__:
        if cls in _DOMAIN:
            return _DOMAIN[cls]
    return 500, "internal", "Internal error"


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


DATABASE_RETRY_AFTER_S = 5


def database_unavailable(exc: DBAPIError) -> bool:
    """A lost or refused connection, a server shutting down, a locked SQLite file: a 503 (the
    request changed nothing, a retry may succeed), not a 500. Other database errors (a bug in a
    statement, a constraint) stay internal errors."""
    return exc.connection_invalidated or isinstance(exc, OperationalError | InterfaceError)


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
        status, slug, title = status_of(exc)
        return problem(status, title, exc.detail, slug, request.url.path, **exc.extra)

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

    @app.exception_handler(DBAPIError)
    async def _database_error(request: Request, exc: DBAPIError) -> JSONResponse:
        if not database_unavailable(exc):
            return await _unhandled(request, exc)
        log.warning("database unavailable on %s %s: %s", request.method, request.url.path, exc.orig)
        resp = problem(
            503,
            "Dependency unavailable",
            "the job database cannot be reached; nothing was changed. Retry shortly",
            "unavailable",
            request.url.path,
        )
        resp.headers["Retry-After"] = str(DATABASE_RETRY_AFTER_S)
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
