"""Service settings, read from the environment (prefix ``GREENMIM_``) by pydantic-settings.

Every value has a development default so ``greenmim up`` works on a laptop; outside
development (``GREENMIM_ENV=production``) the placeholder secrets are refused at start-up.
"""

from __future__ import annotations

import os
import sys
from functools import cached_property
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from workers.storage import S3Settings
from workers.uri_policy import ReadPolicy

PLACEHOLDER_SECRETS = frozenset(
    {
        "",
        "change-me",
        "changeme",
        "dev-pepper-change-me",
        "minioadmin",
        "secret",
        "password",
        "testing",
    }
)
DEV_PEPPER = "dev-pepper-change-me"


API_S3_MAX_ATTEMPTS = 3


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="GREENMIM_", extra="ignore")

    env: Literal["development", "test", "production"] = "development"
    data_dir: Path = Field(Path.home() / ".greenmim", description="root of the local stack's files")
    database_url: str | None = Field(
        None, description="SQLAlchemy URL; default: SQLite in data_dir"
    )
    storage_root: str | None = Field(
        None,
        description="artifact root: /path, file:///path or s3://bucket/prefix; default data_dir/artifacts",
    )
    s3_endpoint_url: str | None = Field(
        None, description="S3-compatible endpoint (MinIO, moto); None = AWS"
    )
    s3_region: str | None = None
    s3_public_endpoint_url: str | None = Field(
        None, description="endpoint users reach for presigned downloads; default s3_endpoint_url"
    )
    presign_ttl_s: int = Field(
        300, ge=10, le=3600, description="lifetime of checkpoint download URLs"
    )

    ray_dashboard_url: str = Field(
        "http://127.0.0.1:8265", description="Ray Jobs API (never exposed)"
    )
    ray_auth_token: SecretStr | None = Field(None, description="Ray token; None = Ray's own lookup")
    scheduler: Literal["ray", "none"] = Field(
        "ray", description="'none' accepts jobs but never runs them"
    )
    worker_python: str = Field(
        sys.executable, description="interpreter for the workers' entry point"
    )
    entrypoint_num_cpus: float = Field(
        0.1, ge=0.0, description="CPUs reserved for each job's driver"
    )
    forward_env: list[str] = Field(
        default_factory=lambda: [
            "GREENMIM_S3_ENDPOINT_URL",
            "AWS_ACCESS_KEY_ID",
            "AWS_SECRET_ACCESS_KEY",
            "AWS_REGION",
            "GREENMIM_S3_MAX_ATTEMPTS",
        ],
        description="environment variables passed to each Ray job (storage credentials, retries)",
    )

    key_pepper: SecretStr = Field(SecretStr(DEV_PEPPER), description="HMAC key for API key hashes")
    max_body_bytes: int = Field(256 * 1024, ge=1024)
    tenant_max_active_jobs: int = Field(2, ge=1, description="default per-tenant concurrent jobs")
    tenant_max_gpus: float = Field(8.0, ge=0.0, description="default per-tenant concurrent GPUs")
    allowed_data_prefixes: list[str] = Field(
        default_factory=list,
        description="dataset/checkpoint URIs a spec may name besides the tenant's own artifacts "
        "and built-in datasets; empty = any (development only)",
    )

    max_attempts: int = Field(
        3, ge=1, le=100, description="Ray jobs per job: a vanished one is submitted again"
    )
    reconciler_enabled: bool = True
    reconcile_interval_s: float = Field(2.0, gt=0.0)
    sse_poll_interval_s: float = Field(1.0, gt=0.0)
    cluster_resources_ttl_s: float = Field(30.0, ge=0.0)

    @model_validator(mode="after")
    def _refuse_unsafe_defaults(self) -> Settings:
        if self.env == "development":
            return self
        problems = []
        if self.key_pepper.get_secret_value() in PLACEHOLDER_SECRETS:
            problems.append("GREENMIM_KEY_PEPPER is a placeholder; set a random secret")
        if self.ray_auth_token is None or len(self.ray_auth_token.get_secret_value()) < 16:
            problems.append(
                "GREENMIM_RAY_AUTH_TOKEN must be set (16+ characters) so Ray enforces auth"
            )
        if os.environ.get("AWS_SECRET_ACCESS_KEY", "x") in PLACEHOLDER_SECRETS:
            problems.append("AWS_SECRET_ACCESS_KEY is a placeholder")
        if self.env == "production" and not self.allowed_data_prefixes:
            problems.append(
                "GREENMIM_ALLOWED_DATA_PREFIXES must list the dataset locations users may read"
            )
        if problems:
            raise ValueError(f"unsafe settings for env={self.env}: " + "; ".join(problems))
        return self

    def s3(self) -> S3Settings:
        """Storage credentials: the endpoint/region here, keys from AWS_* (as the workers read them).
        The API tries a request ``API_S3_MAX_ATTEMPTS`` times, not the workers' patient default:
        a user waiting on a listing is better served by a quick error than by minutes of
        backoff (the workers ride out outages; the API answers again once the store is back)."""
        env = S3Settings.from_env()
        return S3Settings(
            endpoint_url=self.s3_endpoint_url or env.endpoint_url,
            region=self.s3_region or env.region,
            access_key=env.access_key,
            secret_key=env.secret_key,
            max_attempts=API_S3_MAX_ATTEMPTS,
        )

    @cached_property
    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{self.data_dir / 'greenmim.db'}"

    @cached_property
    def resolved_storage_root(self) -> str:
        return self.storage_root or str(self.data_dir / "artifacts")

    def forwarded_env(self) -> dict[str, str]:
        """The ``forward_env`` variables that are set, for each Ray job's runtime environment."""
        return {k: v for k in self.forward_env if (v := os.environ.get(k))}

    @cached_property
    def read_policy(self) -> ReadPolicy:
        """What jobs may read: never the artifacts root or the data directory by URI, and only
        under ``allowed_data_prefixes`` when those are set (the workers enforce it again)."""
        return ReadPolicy.of(
            self.resolved_storage_root, [str(self.data_dir)], self.allowed_data_prefixes
        )
