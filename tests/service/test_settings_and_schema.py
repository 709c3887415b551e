"""Settings refuse unsafe defaults outside development; the schema is versioned."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError
from sqlalchemy import text

from service.server.adapters.db import (
    SchemaTooNew,
    current_revision,
    head_revision,
    make_engine,
    migrate,
)
from service.server.config import Settings
from workers.storage import S3Settings

pytestmark = pytest.mark.unit

SAFE = {
    "key_pepper": "p" * 40,
    "ray_auth_token": "t" * 32,
    "allowed_data_prefixes": ["s3://datasets/"],
}


def test_development_defaults_work(tmp_path: Path) -> None:
    s = Settings(data_dir=tmp_path)
    assert s.resolved_database_url == f"sqlite:///{tmp_path / 'greenmim.db'}"
    assert s.resolved_storage_root == str(tmp_path / "artifacts")


@pytest.mark.parametrize("missing", ["key_pepper", "ray_auth_token", "allowed_data_prefixes"])
def test_production_refuses_placeholders(monkeypatch: pytest.MonkeyPatch, missing: str) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "a-real-secret-value")
    Settings(env="production", **SAFE)  # all set: fine
    fields = {k: v for k, v in SAFE.items() if k != missing}
    with pytest.raises(ValidationError, match="unsafe settings"):
        Settings(env="production", **fields)


def test_production_refuses_placeholder_storage_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "minioadmin")
    with pytest.raises(ValidationError, match="AWS_SECRET_ACCESS_KEY"):
        Settings(env="production", **SAFE)


def test_settings_from_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("GREENMIM_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("GREENMIM_TENANT_MAX_ACTIVE_JOBS", "7")
    monkeypatch.setenv("GREENMIM_ALLOWED_DATA_PREFIXES", '["s3://a/", "/data/"]')
    s = Settings()
    assert s.tenant_max_active_jobs == 7 and s.allowed_data_prefixes == ["s3://a/", "/data/"]


def test_the_api_fails_fast_on_storage_while_jobs_get_the_patient_retries(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A request handler gives up after a few tries (the user gets an error in seconds); the
    workers keep their own retry budget, which the API forwards to every Ray job unchanged."""
    monkeypatch.setenv("GREENMIM_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("GREENMIM_S3_MAX_ATTEMPTS", "20")
    s = Settings()
    client = s.s3().boto3_client("http://127.0.0.1:9")
    assert client.meta.config.retries["total_max_attempts"] == 3
    assert S3Settings.from_env().max_attempts == 20
    assert s.forwarded_env()["GREENMIM_S3_MAX_ATTEMPTS"] == "20"


def test_migrations_reach_head_once_and_refuse_a_newer_database(database_url: str) -> None:
    engine = make_engine(database_url)
    assert current_revision(engine) is None
    assert migrate(engine) is None
    assert current_revision(engine) == head_revision()
    assert migrate(engine) == head_revision()  # nothing to do the second time
    with engine.begin() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = '9999'"))
    with pytest.raises(SchemaTooNew, match="newer"):
        migrate(engine)
    engine.dispose()


def test_the_revisions_build_exactly_the_models(database_url: str) -> None:
    """Alembic's own comparison of the migrated database with the models finds no difference
    (a model changed without a revision fails here)."""
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    from service.server.adapters.db import Base

    engine = make_engine(database_url)
    migrate(engine)
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    engine.dispose()
    assert diff == []


LEGACY_V1 = """
CREATE TABLE schema_version (version INTEGER PRIMARY KEY, applied_at DATETIME);
INSERT INTO schema_version VALUES (1, '2026-11-01 00:00:00');
CREATE TABLE tenants (name VARCHAR(64) PRIMARY KEY, max_active_jobs INTEGER, max_gpus FLOAT,
  created_at DATETIME NOT NULL);
CREATE TABLE api_keys (id VARCHAR(32) PRIMARY KEY, tenant VARCHAR(64) NOT NULL REFERENCES
  tenants(name), name VARCHAR(128) NOT NULL, secret_hash VARCHAR(64) NOT NULL,
  created_at DATETIME NOT NULL, revoked_at DATETIME);
CREATE INDEX ix_api_keys_tenant ON api_keys (tenant);
CREATE TABLE jobs (id VARCHAR(40) PRIMARY KEY, tenant VARCHAR(64) NOT NULL REFERENCES
  tenants(name), kind VARCHAR(16) NOT NULL, model VARCHAR(128) NOT NULL, state VARCHAR(16)
  NOT NULL, spec JSON NOT NULL, spec_sha256 VARCHAR(64) NOT NULL, idempotency_key VARCHAR(255),
  gpus FLOAT NOT NULL, cpus FLOAT NOT NULL, created_at DATETIME NOT NULL, updated_at DATETIME
  NOT NULL, submitted_at DATETIME, started_at DATETIME, ended_at DATETIME, failure_type
  VARCHAR(64), failure_message TEXT, cancel_requested BOOLEAN NOT NULL, epoch INTEGER,
  step INTEGER, latest_metrics JSON, ray_status VARCHAR(32),
  CONSTRAINT uq_jobs_tenant_idem UNIQUE (tenant, idempotency_key));
CREATE INDEX ix_jobs_tenant_created ON jobs (tenant, created_at, id);
CREATE INDEX ix_jobs_state ON jobs (state);
CREATE TABLE job_events (id INTEGER PRIMARY KEY AUTOINCREMENT, job_id VARCHAR(40) NOT NULL
  REFERENCES jobs(id), from_state VARCHAR(16), to_state VARCHAR(16) NOT NULL, at DATETIME
  NOT NULL, reason TEXT);
CREATE INDEX ix_job_events_job_id ON job_events (job_id);
INSERT INTO tenants VALUES ('acme', NULL, NULL, '2026-11-01 00:00:00');
INSERT INTO jobs (id, tenant, kind, model, state, spec, spec_sha256, gpus, cpus, created_at,
  updated_at, cancel_requested) VALUES ('gm-old', 'acme', 'pretrain', 'm', 'running', '{}',
  'x', 0, 1, '2026-11-01 00:00:00', '2026-11-01 00:00:00', 0);
"""


def test_a_database_from_the_numbered_history_is_upgraded_in_place(tmp_path: Path) -> None:
    """The schema the numbered migrator wrote (version 1) continues as revision 0001, data kept."""
    import sqlite3

    path = tmp_path / "db.sqlite"
    with sqlite3.connect(path) as raw:
        raw.executescript(LEGACY_V1)
    engine = make_engine(f"sqlite:///{path}")
    assert current_revision(engine) == "0001"
    assert migrate(engine) == "0001"
    assert current_revision(engine) == head_revision()
    with engine.connect() as conn:
        assert conn.execute(text("SELECT name FROM tenants")).scalars().all() == ["acme"]
        # 0002: a job from before attempts is its attempt 1, run under its own id
        row = conn.execute(text("SELECT attempt, ray_submission_id FROM jobs")).one()
        assert tuple(row) == (1, None)
