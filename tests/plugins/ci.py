"""What a test does when this machine cannot run it: skip here, fail under ``CI=true``."""

from __future__ import annotations

from typing import NoReturn

import pytest

from fabric import env


def cannot_run(reason: str) -> NoReturn:
    """Skip the test (``reason``), or fail it under ``CI=true``: CI runs as root on a machine
    built for the whole suite, so a test it cannot run there is a broken set-up that a skip
    would hide among the passes."""
    if (env.CI.get() or "").lower() == "true":
        pytest.fail(f"{reason}; under CI=true this test must run")
    pytest.skip(reason)
