"""What `pip install .` needs to build: mypyc type-checks the compiled modules against
the dependencies' types, in pip's isolated build environment."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

PYPROJECT = Path(__file__).resolve().parents[2] / "pyproject.toml"


def _names(requirements: list[str]) -> dict[str, str]:
    return {re.split(r"[<>=!~ \[;]", r, maxsplit=1)[0].lower(): r for r in requirements}


def test_the_build_environment_holds_every_dependency_mypyc_checks_against() -> None:
    meta = tomllib.loads(PYPROJECT.read_text())
    build = _names(meta["build-system"]["requires"])
    runtime = _names(meta["project"]["dependencies"])
    assert {name: build.get(name) for name in runtime} == runtime
    assert "types-psutil" in build  # psutil ships no types of its own
    dev = _names(meta["project"]["optional-dependencies"]["dev"])
    assert build["mypy"] == dev["mypy"]  # the compiled build is checked as `make typecheck`
