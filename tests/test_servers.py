"""The server fixtures: an unreachable PostgreSQL skips locally and fails under CI."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
UNREACHABLE = "postgresql://postgres@127.0.0.1:9/nowhere"  # the discard port: nothing listens


def _run(ci: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "CI": ci, "STATEMANAGER_TEST_POSTGRES_URL": UNREACHABLE}
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-p",
            "no:cacheprovider",
            "-q",
            "-rs",
            "tests/test_cli.py",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.slow
def test_unreachable_postgres_fails_under_ci() -> None:
    result = _run("true")
    assert result.returncode != 0
    assert "PostgreSQL is not reachable" in result.stdout
    assert "skipped" not in result.stdout.splitlines()[-1]


@pytest.mark.slow
def test_unreachable_postgres_skips_outside_ci() -> None:
    result = _run("false")
    assert result.returncode == 0, result.stdout
    assert "1 skipped" in result.stdout.splitlines()[-1]
