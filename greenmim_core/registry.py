"""Registry of GreenMIM architectures: ``register_model``, ``create_model``, ``list_models``.

Each registered name maps to a function returning a frozen config; ``create_model`` builds the
model from it, with keyword overrides checked by the config itself.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

_REGISTRY: dict[str, Callable[[], Any]] = {}


def register(name: str, factory: Callable[[], Any]) -> None:
    """Register ``factory`` (no arguments, returns a frozen config) under ``name``."""
    if name in _REGISTRY:
        raise ValueError(f"model {name!r} is already registered")
    _REGISTRY[name] = factory


def register_model(fn: Callable[[], Any]) -> Callable[[], Any]:
    """Decorator form of ``register``: the function's name is the model's name."""
    register(fn.__name__, fn)
    return fn


def list_models() -> list[str]:
    """Names of all registered architectures, sorted."""
    return sorted(_REGISTRY)


def get_config(name: str, **overrides: Any) -> Any:
    """The frozen config of ``name`` with ``overrides`` applied (validated by the config)."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; valid names: {', '.join(list_models())}")
    cfg = _REGISTRY[name]()
    fields = {f.name for f in dataclasses.fields(cfg)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(
            f"unknown option(s) {unknown} for model {name!r}; valid options: {sorted(fields)}"
        )
    return dataclasses.replace(cfg, **overrides)


def create_model(name: str, **overrides: Any) -> Any:
    """Build the encoder registered as ``name`` (see ``get_config`` for ``overrides``)."""
    return get_config(name, **overrides).build()
