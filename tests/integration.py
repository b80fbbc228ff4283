"""
Integration tests use the real thing. When a service is missing they may skip
locally, but with VSC_REQUIRE_INTEGRATION=1 (set by .ci/run) they fail.
"""

from __future__ import annotations

import os
import shutil

import pytest

REQUIRED = os.environ.get("VSC_REQUIRE_INTEGRATION") == "1"


def missing(reason: str) -> None:
    """Skip (locally) or fail (VSC_REQUIRE_INTEGRATION=1) because ``reason``."""
    if REQUIRED:
        pytest.fail(f"integration prerequisite missing and VSC_REQUIRE_INTEGRATION=1: {reason}")
    pytest.skip(reason)  # VSC_REQUIRE_INTEGRATION unset: local run without the service


def need_program(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        missing(f"{name} is not installed")
    return path


def wait_for(predicate, timeout: float, what: str, step: float = 0.05):
    """Poll ``predicate`` until it returns something true (returned), or fail after ``timeout`` seconds."""
    import time

    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(step)
