"""GreenMIM core: masked image modeling on visible tokens for hierarchical ViTs (pure torch + timm)."""

from . import swin as _swin  # noqa: F401  (registers the Swin architectures)
from . import twins as _twins  # noqa: F401  (registers the Twins architectures)
from .masking import random_mask
from .registry import create_model, get_config, list_models

__all__ = ["create_model", "get_config", "list_models", "random_mask"]
