"""Settings refuse unsafe defaults outside development; the schema is versioned."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError
from sqlalchemy import text

from service.core.config import Settings
from service.db import SCHEMA_VERSION, SchemaTooNew, current_version, make_engine, migrate

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


def test_schema_is_versioned_and_migrations_idempotent(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'db.sqlite'}")
    assert current_version(engine) == 0
    assert migrate(engine) == 0
    assert current_version(engine) == SCHEMA_VERSION
    assert migrate(engine) == SCHEMA_VERSION  # nothing to do the second time
    with engine.begin() as conn:
        conn.execute(
            text("INSERT INTO schema_version (version, applied_at) VALUES (:v, '2030-01-01')"),
            {"v": SCHEMA_VERSION + 1},
        )
    with pytest.raises(SchemaTooNew, match="newer"):
        migrate(engine)
