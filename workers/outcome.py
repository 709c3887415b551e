"""A run's terminal result, always recorded, and what counts as a storage failure.

``result.json`` is written under the job prefix with the store's own retries, then the whole
write is tried a few times more. Whether or not that worked, the driver prints the same record
as one line of its log (``GREENMIM_RESULT {...}``): the Ray job's log outlives any store outage
and the service already reads it through Ray, so ``read_result_line`` gives it the outcome even
when ``result.json`` could not be written. (A file on the driver's machine would not do: the
service runs elsewhere.)

Storage failures of the run itself (Ray Train's controller failing to write its run snapshot
once the store's retries are spent) are not retried by Ray Train; ``storage_cause`` recognises
them so the driver can restart the run after a backoff, charged to the spec's
``resources.max_failures`` (``workers.run.fit_within_budget``).
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from collections.abc import Callable
from typing import Any

import pyarrow.fs as pafs

from .artifacts import RESULT, write_json

logger = logging.getLogger(__name__)

RESULT_LINE = "GREENMIM_RESULT "
# the last line of a traceback that Ray kept only as text (an actor that failed in __init__)
_STORAGE_LINE = re.compile(r"^\s*(?:OSError|ConnectionError|botocore\.\S+): .*$", re.MULTILINE)


def result_line(result: dict[str, Any]) -> str:
    return RESULT_LINE + json.dumps(result, sort_keys=True, separators=(",", ":"), default=str)


def read_result_line(log_text: str | None) -> dict[str, Any] | None:
    """The last result record printed in a driver's log, or None."""
    for line in reversed((log_text or "").splitlines()):
        at = line.find(RESULT_LINE)
        if at < 0:
            continue
        try:
            record = json.loads(line[at + len(RESULT_LINE) :])
        except ValueError:
            continue
        if isinstance(record, dict) and record.get("status"):
            return record
    return None


def record_result(
    fs: pafs.FileSystem,
    job_prefix: str,
    result: dict[str, Any],
    tries: int = 3,
    backoff_s: float = 2.0,
    sleep: Callable[[float], None] = time.sleep,
) -> bool:
    """Write ``result.json`` (retrying), then print the result line; True if the file was written.

    Never raises for a storage error: the run's own outcome must not be replaced by it."""
    stored = False
    for i in range(tries):
        try:
            write_json(fs, f"{job_prefix}/{RESULT}", result)
            stored = True
            break
        except OSError as e:
            logger.warning("cannot write %s (try %d of %d): %s", RESULT, i + 1, tries, e)
            if i + 1 < tries:
                sleep(backoff_s * 2**i)
    if not stored:
        logger.error("%s not stored; the result is the %s line below", RESULT, RESULT_LINE.strip())
    print(result_line({**result, "result_json": stored}), flush=True, file=sys.stdout)
    return stored


def error_record(error: BaseException, limit: int = 4000) -> dict[str, str]:
    """``{"type", "message"[, "storage"]}`` of a failed run; a long message keeps its head and
    its tail (where a traceback names the error that started it)."""
    text = str(error)
    if len(text) > limit:
        text = f"{text[: limit // 4]}\n[...]\n{text[-(limit - limit // 4) :]}"
    record = {"type": type(error).__name__, "message": text}
    if (cause := storage_cause(error)) is not None:
        record["storage"] = f"{type(cause).__name__}: {cause}"[:2000]
    return record


def storage_cause(error: BaseException) -> BaseException | None:
    """The storage error (``OSError`` from pyarrow, a botocore error) behind ``error``, following
    exception causes and Ray's wrappers (``controller_failure``, ``worker_failures``, a
    worker's exception with its traceback, a task's ``cause``)."""
    seen: set[int] = set()
    todo: list[Any] = [error]
    texts: list[str] = []
    while todo:
        e = todo.pop()
        if not isinstance(e, BaseException) or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError) or type(e).__module__.startswith(("botocore", "s3transfer")):
            return e
        if type(e).__module__.startswith("ray"):
            texts.append(str(e))
        # Ray Train wraps a worker's exception with its traceback text (``_base_exc``)
        wrapped = [getattr(e, a, None) for a in ("controller_failure", "_base_exc", "cause")]
        todo += [e.__cause__, e.__context__, *wrapped]
        todo += list((getattr(e, "worker_failures", None) or {}).values())
    for text in texts:  # an actor that failed in __init__ reaches us as text only
        if found := _STORAGE_LINE.findall(text):
            return OSError(found[-1].split(": ", 1)[1].strip())
    return None
