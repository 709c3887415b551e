"""A PostgreSQL server of the local stack: Debian's server binaries, one cluster on 127.0.0.1.

The job store's production database, started for the tests (``tests/conftest.py``) and for
anyone who wants the service on PostgreSQL locally::

    pg = PostgresServer(Path("/tmp/pg")).start()
    url = pg.create_database("greenmim")   # postgresql+psycopg://greenmim:...@127.0.0.1:PORT/greenmim
    pg.stop(); pg.start()                  # same cluster, same port (an outage and its end)

PostgreSQL refuses to run as root: as root the cluster belongs to an unprivileged user
(``postgres`` where it exists, else ``nobody``) and lives in a folder of its own under the
system temp dir (the caller's folder may not be reachable for that user); its commands run
through ``runuser``. Only TCP on 127.0.0.1 (no Unix socket), password authentication.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import secrets
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from service.stack.processes import free_port

USER = "greenmim"


def server_bindir() -> Path | None:
    """The newest ``/usr/lib/postgresql/<version>/bin`` holding ``initdb``, else ``pg_ctl``'s
    folder on the PATH; None when no server is installed (Debian: ``apt-get install postgresql``)."""
    found = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/initdb"),
        key=lambda p: int(p.split("/")[4]) if p.split("/")[4].isdigit() else 0,
    )
    if found:
        return Path(found[-1]).parent
    pg_ctl = shutil.which("pg_ctl")
    return Path(pg_ctl).parent if pg_ctl and Path(pg_ctl).with_name("initdb").exists() else None


def _run_as() -> str | None:
    """The unprivileged user the server runs as when we are root; None when we are not."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        with contextlib.suppress(KeyError):
            pwd.getpwnam(name)
            return name
    raise RuntimeError("running as root and no unprivileged user (postgres, nobody) to run as")


@dataclass
class PostgresServer:
    data_dir: Path
    port: int = 0
    password: str = ""
    bindir: Path | None = None
    cluster: Path | None = None
    user: str | None = None

    def _cmd(self, tool: str, *args: str) -> list[str]:
        assert self.bindir is not None
        cmd = [str(self.bindir / tool), *args]
        return ["runuser", "-u", self.user, "--", *cmd] if self.user else cmd

    def _check(self, cmd: list[str], timeout: float = 120) -> None:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        if r.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd[-6:])} failed ({r.returncode}): {r.stderr[-2000:]}")

    def init(self) -> PostgresServer:
        """``initdb`` once (UTF-8, password auth, superuser ``greenmim``)."""
        self.bindir = self.bindir or server_bindir()
        if self.bindir is None:
            raise FileNotFoundError(
                "no PostgreSQL server binaries (initdb) found; on Debian: apt-get install postgresql"
            )
        self.user = _run_as()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        base = Path(tempfile.mkdtemp(prefix="gm-pg-")) if self.user else self.data_dir
        self.cluster = base / "cluster"
        self.password = self.password or secrets.token_hex(16)
        pwfile = base / "pwfile"
        pwfile.write_text(self.password + "\n")
        if self.user:
            u = pwd.getpwnam(self.user)
            os.chown(base, u.pw_uid, u.pw_gid)
            os.chown(pwfile, u.pw_uid, u.pw_gid)
        pwfile.chmod(0o600)
        self._check(
            self._cmd(
                "initdb",
                "-D",
                str(self.cluster),
                "-U",
                USER,
                "--pwfile",
                str(pwfile),
                "--auth",
                "scram-sha-256",
                "-E",
                "UTF8",
                "--locale",
                "C",
                "--no-sync",
            )
        )
        pwfile.unlink()
        return self

    def start(self, timeout: float = 60) -> PostgresServer:
        if self.cluster is None:
            self.init()
        self.port = self.port or free_port()
        opts = (
            f"-h 127.0.0.1 -p {self.port} -c unix_socket_directories='' "
            "-c fsync=off -c max_connections=200"
        )
        log = self.cluster.parent / "postgres.log"  # type: ignore[union-attr]
        self._check(
            self._cmd(
                "pg_ctl",
                "-D",
                str(self.cluster),
                "-l",
                str(log),
                "-o",
                opts,
                "-w",
                "-t",
                str(int(timeout)),
                "start",
            ),
            timeout + 10,
        )
        return self

    def stop(self, timeout: float = 60) -> None:
        """Fast shutdown: open connections are cut, as a crash or a failover would."""
        if self.cluster is not None and (self.cluster / "postmaster.pid").exists():
            self._check(
                self._cmd(
                    "pg_ctl",
                    "-D",
                    str(self.cluster),
                    "-m",
                    "fast",
                    "-w",
                    "-t",
                    str(int(timeout)),
                    "stop",
                ),
                timeout + 10,
            )

    def destroy(self) -> None:
        """Stop and remove the cluster's files."""
        self.stop()
        if self.cluster is not None:
            shutil.rmtree(self.cluster.parent if self.user else self.cluster, ignore_errors=True)
            self.cluster = None

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+psycopg://{USER}:{self.password}@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        """A new empty database; its SQLAlchemy URL."""
        import psycopg

        dsn = (
            f"host=127.0.0.1 port={self.port} user={USER} password={self.password} dbname=postgres"
        )
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)
