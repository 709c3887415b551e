"""Job spec files: a JSON or YAML (by suffix) mapping. Reading only; ``workers.spec``
validates. Light on purpose (no torch), so the client reads spec files with the same code."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def read_spec_file(path: str | Path) -> dict[str, Any]:
    """The mapping in a ``.json``, ``.yaml`` or ``.yml`` file; ``ValueError`` if it is none."""
    text = Path(path).read_text()
    if str(path).endswith((".yaml", ".yml")):
        import yaml

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ValueError(f"{path}: not valid YAML: {e}") from e
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a job spec is a mapping, got {type(data).__name__}")
    return data
