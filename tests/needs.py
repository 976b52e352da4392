"""A test that needs a program this machine lacks: skipped on a developer's machine, a failure
in CI (CI must run every test: a missing server there is a missing install step)."""

from __future__ import annotations

import os

import pytest


def missing(what: str, *, module: bool = False) -> None:
    """Skip (a developer's machine) or fail (CI=true) because ``what`` is not installed."""
    reason = f"{what} (scripts/bootstrap installs it: `make bootstrap`)"
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"CI must not skip: {reason}", pytrace=False)
    pytest.skip(reason, allow_module_level=module)
