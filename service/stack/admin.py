"""Administration of a service's own database: API keys, with the settings of a local stack."""

from __future__ import annotations

import os
from pathlib import Path

from service.server.adapters.db import make_engine, make_sessionmaker, migrate
from service.server.config import Settings
from service.server.domain.keys import KeyService


def stack_settings(data_dir: Path, *, stack_pepper: bool = True) -> Settings:
    """Settings for the database of the stack under ``data_dir``. Its key pepper (the file
    ``greenmim up`` made) is used when ``stack_pepper``, or when none is configured."""
    settings = Settings(data_dir=data_dir)
    pepper = data_dir / "secrets" / "pepper"
    if pepper.exists() and (stack_pepper or "key_pepper" not in settings.model_fields_set):
        settings = Settings(data_dir=data_dir, key_pepper=pepper.read_text().strip())
    return settings


def key_service(settings: Settings) -> KeyService:
    engine = make_engine(settings.resolved_database_url)
    migrate(engine)
    return KeyService(make_sessionmaker(engine), settings.key_pepper.get_secret_value().encode())


def ensure_local_key(data_dir: Path) -> str:
    """The local stack's key for tenant ``default``, created (and saved, 0600) the first time."""
    path = data_dir / "api_key"
    if path.exists():
        return path.read_text().strip()
    key = str(key_service(stack_settings(data_dir)).create("default", name="local").key)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(key)
    return key
