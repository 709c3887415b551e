"""The OpenAPI document, made to say what the app really answers.

FastAPI documents every response as ``application/json`` and adds a ``422`` with its own
validation-error schema. Our errors are RFC 9457 ``application/problem+json`` bodies
(``service.server.api.problems``), and a few statuses come from layers no route declares: ``401`` from
the key check on every ``/v1`` route, ``503`` while the database is down, ``413`` from the body-limit middleware on every ``POST``.
``truthful_openapi`` rewrites FastAPI's document once, so each operation lists every status
code it can return with the media type it is sent with. ``503`` comes from the database-error
handler on every ``/v1`` route (``service.server.api.problems``). Routes declare only their own codes
(``responses={409: {"model": Problem}}``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

PROBLEM_MEDIA = "application/problem+json"
_PROBLEM_REF = "#/components/schemas/Problem"
_FASTAPI_VALIDATION = ("HTTPValidationError", "ValidationError")

# statuses added by layers below the routes: (applies to, status, description)
_LAYERED: list[tuple[Callable[[str, str], bool], int, str]] = [
    (lambda path, _m: path.startswith("/v1/"), 401, "missing, invalid or revoked API key"),
    (lambda _p, method: method == "post", 413, "request body over the size limit"),
    (
        lambda path, _m: path.startswith("/v1/"),
        503,
        "a dependency (the job database) is unavailable; nothing was changed, retry",
    ),
]


def truthful_openapi(app: FastAPI) -> Callable[[], dict[str, Any]]:
    """A replacement for ``app.openapi`` (FastAPI's document, corrected as described above)."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            doc = get_openapi(
                title=app.title,
                version=app.version,
                description=app.description,
                routes=app.routes,
            )
            app.openapi_schema = correct(doc)
        return app.openapi_schema

    return openapi


def correct(doc: dict[str, Any]) -> dict[str, Any]:
    """Problem media types, layered statuses, the bearer scheme; FastAPI's 422 schema dropped."""
    components = doc.setdefault("components", {})
    components.setdefault("securitySchemes", {})["bearer"] = {
        "type": "http",
        "scheme": "bearer",
        "description": "an API key from `greenmim keys create` (gmk_...)",
    }
    for path, ops in doc.get("paths", {}).items():
        for method, op in ops.items():
            responses = op.setdefault("responses", {})
            for applies, status, description in _LAYERED:
                if applies(path, method):
                    responses.setdefault(str(status), {"description": description})
            for status, resp in responses.items():
                if int(status) >= 400 and _is_error_body(resp):
                    resp["content"] = {PROBLEM_MEDIA: {"schema": {"$ref": _PROBLEM_REF}}}
            if path.startswith("/v1/"):
                op["security"] = [{"bearer": []}]
    schemas = components.get("schemas", {})
    for name in _FASTAPI_VALIDATION:
        schemas.pop(name, None)
    return doc


def _is_error_body(resp: dict[str, Any]) -> bool:
    """A response documented with no body, with ours (Problem) or with FastAPI's 422 schema."""
    content = resp.get("content")
    if not content:
        return True
    schema = content.get("application/json", {}).get("schema", {})
    ref = schema.get("$ref", "")
    return ref == _PROBLEM_REF or ref.rsplit("/", 1)[-1] in _FASTAPI_VALIDATION
