"""Which locations a job may read: URIs canonicalised, then one policy decides.

A spec names two things to read, ``data.uri`` and ``finetune.init_from``. Both are hostile
until canonicalised, because the same object has many spellings: ``s3://b/./x``,
``S3://b//x``, ``/data/../data/x``, a symlink, ``/proc/self/root/data/x``. ``canonical_uri``
reduces each to one form, and ``ReadPolicy.check`` (the only policy function) decides on that
form. The service calls it at submit; the workers call it again, with the same policy, right
before they open data or initial weights, and then open the canonical location.

Canonical forms:
- ``builtin:<name>`` unchanged;
- ``s3://bucket/key``: scheme and bucket lower-cased, empty and ``.`` segments dropped, no
  trailing ``/``; ``..`` segments are refused (S3 keys are not paths, so there is no safe
  meaning to give them);
- local (``/abs/path`` or ``file:///abs/path``): ``os.path.realpath`` (``..``, ``.``, ``//``
  and symlinks resolved, ``/proc/self/root`` included).

The policy: nothing under the storage root (the artifacts of every tenant) and nothing that
contains it is readable by URI; a tenant's own finished jobs are reached through
``job:<id>``. Pseudo file systems (``/proc``, ``/sys``, ``/dev``) and the ``protected``
locations (the service's data directory) are refused too. With ``allowed_prefixes`` set, a
location must also lie under one of them.
"""

from __future__ import annotations

import os
import posixpath
import re
from collections.abc import Iterable
from dataclasses import dataclass, field

_PSEUDO_FS = ("/proc", "/sys", "/dev")
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.\-_]{1,62}$")


class LocationRefused(ValueError):
    """A URI the policy does not let this job read; the message says why and what to use."""


def lexical_uri(uri: str) -> str:
    """The canonical form as far as it follows from the text alone (local paths normalised,
    symlinks not resolved). Raises ``ValueError`` for URIs that have no canonical form
    (relative paths, other schemes, control characters, ``..`` in S3 keys)."""
    if uri != uri.strip() or any(ord(c) < 32 or ord(c) == 127 for c in uri) or "\\" in uri:
        raise ValueError("URIs may not contain control characters, backslashes or edge spaces")
    if uri.startswith("builtin:"):
        return uri
    scheme, sep, rest = uri.partition("://")
    scheme = scheme.lower() if sep else ""
    if scheme == "s3":
        bucket, _, key = rest.partition("/")
        bucket = bucket.lower()
        if not _BUCKET.match(bucket):
            raise ValueError(f"{bucket!r} is not an S3 bucket name: s3://bucket/prefix")
        parts = [p for p in key.split("/") if p not in ("", ".")]
        if ".." in parts:
            raise ValueError("'..' segments are not allowed in s3:// URIs")
        return "/".join([f"s3://{bucket}", *parts])
    path = rest if scheme == "file" else uri
    if (scheme and scheme != "file") or not path.startswith("/"):
        raise ValueError(f"{uri!r} is not an absolute path, file:///abs/path or s3://bucket/prefix")
    return posixpath.normpath("/" + path.lstrip("/"))


def canonical_uri(uri: str) -> str:
    """The canonical form of a dataset or weights URI (see the module docstring): the
    lexical one, with local paths resolved through the file system (symlinks, /proc)."""
    lexical = lexical_uri(uri)
    if not lexical.startswith("/"):
        return lexical
    real = os.path.realpath(lexical)
    for p in (lexical, real):
        if _is_under(p, _PSEUDO_FS):
            raise LocationRefused(f"{p} is on a pseudo file system; name the data itself")
    return real


def _is_under(location: str, prefixes: Iterable[str]) -> bool:
    return any(location == p or location.startswith(p.rstrip("/") + "/") for p in prefixes)


@dataclass(frozen=True)
class ReadPolicy:
    """Where jobs may read. Build it with ``ReadPolicy.of(...)`` so every entry is canonical."""

    storage_root: str
    protected: tuple[str, ...] = ()
    allowed_prefixes: tuple[str, ...] = field(default=())

    @classmethod
    def of(
        cls,
        storage_root: str,
        protected: Iterable[str] = (),
        allowed_prefixes: Iterable[str] = (),
    ) -> ReadPolicy:
        return cls(
            canonical_uri(storage_root),
            tuple(canonical_uri(p) for p in protected),
            tuple(canonical_uri(p) for p in allowed_prefixes),
        )

    def check(self, uri: str, field_name: str) -> str:
        """The canonical form of ``uri`` if this policy lets a job read it.

        Raises ``LocationRefused`` (a ``ValueError``) naming ``field_name`` otherwise;
        ``job:<id>`` references are resolved by the caller, not here."""
        try:
            where = canonical_uri(uri)
        except ValueError as e:
            raise LocationRefused(f"{field_name}: {e}") from e
        if where.startswith("builtin:"):
            return where
        for guarded in (self.storage_root, *self.protected):
            if _is_under(where, [guarded]) or _is_under(guarded, [where]):
                raise LocationRefused(
                    f"{field_name}: {uri!r} is inside (or contains) the service's storage; "
                    "a finished job of yours is read through 'job:<id>'"
                )
        if self.allowed_prefixes and not _is_under(where, self.allowed_prefixes):
            raise LocationRefused(
                f"{field_name}: {uri!r} is not under an allowed location "
                f"({', '.join(self.allowed_prefixes)})"
            )
        return where

    def to_args(self) -> list[str]:
        """Command-line arguments for ``python -m workers.run`` that rebuild this policy."""
        args = [f"--protected={p}" for p in self.protected]
        return args + [f"--allowed-prefix={p}" for p in self.allowed_prefixes]
