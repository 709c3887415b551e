"""Real components on loopback shared by every test package: one Ray head with token auth,
one S3-compatible server (moto_server), one PostgreSQL server, one cache folder for built-in
datasets. They are the
local stack's own launchers (``service.stack.local``), started once per session and stopped by
killing the process groups they started.

Run the suite inside ``../shared/tools/loopback-only`` so nothing can leave lo.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from service.stack.local import RayHead, S3Server
from service.stack.postgres import PostgresServer, server_bindir


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """``GREENMIM_CACHE_DIR`` (built-in datasets) for this process and the Ray head's workers."""
    d = tmp_path_factory.mktemp("cache")
    old = os.environ.get("GREENMIM_CACHE_DIR")
    os.environ["GREENMIM_CACHE_DIR"] = str(d)
    yield d
    if old is None:
        os.environ.pop("GREENMIM_CACHE_DIR", None)
    else:
        os.environ["GREENMIM_CACHE_DIR"] = old


@pytest.fixture(scope="session")
def ray_head(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path) -> Iterator[RayHead]:
    """A 2-CPU Ray head on 127.0.0.1 with token auth. This process never connects to it:
    drivers are separate processes with ``ray_head.client_env()``."""
    head = RayHead(
        tmp_path_factory.mktemp("ray"),
        num_cpus=2,
        extra_env={"GREENMIM_CACHE_DIR": str(cache_dir)},
    ).start()
    try:
        yield head
    finally:
        head.stop()


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """``moto_server`` on a free loopback port with the bucket ``greenmim``."""
    srv = S3Server(tmp_path_factory.mktemp("s3")).start()
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="session")
def postgres_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PostgresServer]:
    """A PostgreSQL server on a free loopback port (Debian's ``postgresql`` binaries, which
    ``scripts/test.sh`` installs). Missing binaries skip the PostgreSQL cases, or fail them
    where ``GREENMIM_REQUIRE_POSTGRES=1`` (CI)."""
    if server_bindir() is None:
        why = "no PostgreSQL server binaries (initdb); scripts/test.sh installs Debian's postgresql"
        if os.environ.get("GREENMIM_REQUIRE_POSTGRES") == "1":
            pytest.fail(why + " (GREENMIM_REQUIRE_POSTGRES=1)")
        pytest.skip(why)
    pg = PostgresServer(tmp_path_factory.mktemp("postgres")).start()
    try:
        yield pg
    finally:
        pg.destroy()
