"""What can go wrong in the service layer, said in the domain's words.

These carry no HTTP status: the API layer (``service.server.api.problems``) maps each to a status
code and an RFC 9457 problem body. Every message is one a person can act on.
"""

from __future__ import annotations

from typing import Any


class ServiceError(Exception):
    def __init__(self, detail: str, **extra: Any) -> None:
        super().__init__(detail)
        self.detail = detail
        self.extra = extra


class NotFound(ServiceError):
    """No such job (or checkpoint, or file) in the caller's tenant."""


class Unauthorized(ServiceError):
    """No key, an unknown key or a revoked one."""


class InvalidSpec(ServiceError):
    """A spec that parses but cannot run (cluster too small, unknown source job, ...)."""

    def __init__(self, detail: str, errors: list[dict[str, Any]] | None = None) -> None:
        super().__init__(detail, errors=errors or [])


class IdempotencyConflict(ServiceError):
    """An Idempotency-Key reused with a different body."""


class Conflict(ServiceError):
    """The request does not fit the job's state (cancelling a finished job)."""


class BadRequest(ServiceError):
    """A request the API cannot interpret (a cursor it did not issue)."""


class Unavailable(ServiceError):
    """A dependency (Ray, storage, the database) cannot be reached; nothing was changed."""
