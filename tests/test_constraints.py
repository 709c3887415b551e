"""Installs are reproducible: every dependency, direct or transitive, of every extra is pinned
in constraints.txt, and the environment running the tests is exactly the pinned one."""

from __future__ import annotations

import re
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

pytestmark = pytest.mark.unit
ROOT = Path(__file__).resolve().parents[1]


def pins() -> dict[str, str]:
    out = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            m = re.fullmatch(r"([A-Za-z0-9_.\-]+)==([^\s;]+)", line)
            assert m, f"constraints.txt: {line!r} is not an exact pin"
            out[canonicalize_name(m[1])] = m[2]
    return out


def test_every_declared_dependency_is_pinned() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = list(project["dependencies"])
    for extra in project["optional-dependencies"].values():
        declared += extra
    pinned = pins()
    missing = [r for r in declared if canonicalize_name(Requirement(r).name) not in pinned]
    assert not missing, f"not in constraints.txt (run bash scripts/lock.sh): {missing}"
    for r in map(Requirement, declared):
        version = pinned[canonicalize_name(r.name)]
        assert r.specifier.contains(version, prereleases=True), (str(r), version)


def test_the_installed_environment_is_the_pinned_one() -> None:
    """What the test run imports is what constraints.txt says (transitive packages included)."""
    pinned = pins()
    installed = {
        canonicalize_name(d.metadata["Name"]): d.version
        for d in metadata.distributions()
        if d.metadata["Name"]
    }
    wrong = {
        name: (installed[name], version)
        for name, version in pinned.items()
        if name in installed and installed[name] != version
    }
    assert not wrong, f"installed != pinned: {wrong}"
    assert installed["torch"] == pinned["torch"] and installed["fastapi"] == pinned["fastapi"]
