"""Waiting in tests: poll a condition with a deadline, never a blind sleep."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def until(
    pred: Callable[[], T], timeout: float = 60, every: float = 0.3, what: str = "condition"
) -> T:
    """Call ``pred`` every ``every`` seconds until it returns something truthy (returned);
    ``TimeoutError`` naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if got := pred():
            return got
        time.sleep(every)
    raise TimeoutError(f"gave up after {timeout:.0f}s waiting for {what}")
