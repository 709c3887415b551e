"""The job store's tables, engine and schema migrations.

SQLite file by default, PostgreSQL by URL. The schema's history is Alembic's
(``service/migrations/versions``): ``migrate`` upgrades a database to the newest revision and
refuses one that a newer service already migrated. Databases made before that history (the
numbered ``schema_version`` table, version 1) are recognised as revision 0001 and continue from
there. To change the schema: edit the models here, then add a revision file beside 0001 (never
edit an applied one); ``tests/service/test_settings_and_schema.py`` checks that the revisions
build exactly these models.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import (
    JSON,
    Boolean,
    Connection,
    DateTime,
    Engine,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
    create_engine,
    event,
    inspect,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker

log = logging.getLogger(__name__)


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on every backend (SQLite drops the zone)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is not None and value.tzinfo is None:
            raise ValueError("naive datetime")
        return value.astimezone(UTC) if value is not None else None

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is not None and value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value


class Base(DeclarativeBase):
    pass


class Tenant(Base):
    __tablename__ = "tenants"
    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    max_active_jobs: Mapped[int | None] = mapped_column(Integer)
    max_gpus: Mapped[float | None] = mapped_column(Float)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class ApiKey(Base):
    __tablename__ = "api_keys"
    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    tenant: Mapped[str] = mapped_column(ForeignKey("tenants.name"), index=True)
    name: Mapped[str] = mapped_column(String(128), default="")
    secret_hash: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class Job(Base):
    __tablename__ = "jobs"
    __table_args__ = (
        UniqueConstraint("tenant", "idempotency_key", name="uq_jobs_tenant_idem"),
        Index("ix_jobs_tenant_created", "tenant", "created_at", "id"),
        Index("ix_jobs_state", "state"),
    )
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tenant: Mapped[str] = mapped_column(ForeignKey("tenants.name"))
    kind: Mapped[str] = mapped_column(String(16))
    model: Mapped[str] = mapped_column(String(128))
    state: Mapped[str] = mapped_column(String(16))
    spec: Mapped[dict[str, Any]] = mapped_column(JSON)
    spec_sha256: Mapped[str] = mapped_column(String(64))
    idempotency_key: Mapped[str | None] = mapped_column(String(255))
    gpus: Mapped[float] = mapped_column(Float, default=0.0)
    cpus: Mapped[float] = mapped_column(Float, default=0.0)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    submitted_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    ended_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    failure_type: Mapped[str | None] = mapped_column(String(64))
    failure_message: Mapped[str | None] = mapped_column(Text)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    epoch: Mapped[int | None] = mapped_column(Integer)
    step: Mapped[int | None] = mapped_column(Integer)
    latest_metrics: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    ray_status: Mapped[str | None] = mapped_column(String(32))
    # Ray submission ids are unique for ever, so attempt N > 1 runs as "<id>-a<N>" (the job id
    # and its artifacts stay); None = the job id itself (attempt 1).
    attempt: Mapped[int] = mapped_column(Integer, default=1, server_default="1")
    ray_submission_id: Mapped[str | None] = mapped_column(String(64))

    @property
    def submission_id(self) -> str:
        """The Ray submission id of the current attempt."""
        return self.ray_submission_id or self.id


class JobEvent(Base):
    """Every state change, for the audit trail and for tests of the state machine."""

    __tablename__ = "job_events"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id"), index=True)
    from_state: Mapped[str | None] = mapped_column(String(16))
    to_state: Mapped[str] = mapped_column(String(16))
    at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    reason: Mapped[str | None] = mapped_column(Text)
    attempt: Mapped[int | None] = mapped_column(Integer)


MIGRATIONS = Path(__file__).parent / "migrations"
_LEGACY_TABLE = "schema_version"  # the numbered history before Alembic; version 1 == "0001"


class SchemaTooNew(RuntimeError):
    pass


def _alembic(connection: Connection) -> tuple[Config, ScriptDirectory]:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.attributes["connection"] = connection
    return cfg, ScriptDirectory.from_config(cfg)


def current_revision(engine: Engine) -> str | None:
    """The database's Alembic revision (legacy version 1 reads as "0001"); None if empty."""
    with engine.connect() as conn:
        return _revision(conn)


def _revision(conn: Connection) -> str | None:
    rev = MigrationContext.configure(conn).get_current_revision()
    if rev is None and inspect(conn).has_table(_LEGACY_TABLE):
        legacy = conn.execute(text(f"SELECT MAX(version) FROM {_LEGACY_TABLE}")).scalar()
        if legacy is not None:
            return f"{int(legacy):04d}"
    return rev


def head_revision() -> str:
    with create_engine("sqlite://").connect() as conn:
        head = _alembic(conn)[1].get_current_head()
    if head is None:
        raise RuntimeError(f"no migrations under {MIGRATIONS}")
    return head


def migrate(engine: Engine) -> str | None:
    """Bring the schema to the newest revision; return the revision found (None: empty)."""
    with engine.begin() as conn:
        cfg, script = _alembic(conn)
        before = _revision(conn)
        known = {r.revision for r in script.walk_revisions()}
        if before is not None and before not in known:
            raise SchemaTooNew(
                f"database schema revision {before} is newer than this service's "
                f"{script.get_current_head()}; upgrade the service"
            )
        if before is not None and MigrationContext.configure(conn).get_current_revision() is None:
            command.stamp(cfg, before)  # a pre-Alembic database: record where it stands
        if before != script.get_current_head():
            log.info("migrating the database schema from %s to head", before or "empty")
            command.upgrade(cfg, "head")
    return before


def make_engine(url: str) -> Engine:
    if url.startswith("sqlite:///"):
        path = url.removeprefix("sqlite:///")
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.close()

        return engine
    # A dead server must cost a request seconds, not minutes: connections are checked before
    # use (a server restarted meanwhile), refused after 5 s, and recycled after 30 min.
    connect_args = {"connect_timeout": 5} if url.startswith("postgresql") else {}
    return create_engine(url, pool_pre_ping=True, pool_recycle=1800, connect_args=connect_args)


def make_sessionmaker(engine: Engine) -> sessionmaker[Any]:
    return sessionmaker(engine, expire_on_commit=False)
