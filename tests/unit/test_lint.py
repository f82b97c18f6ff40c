"""Lint, format and type check with the settings in pyproject.toml ([tool.ruff], [tool.mypy]):
`ruff check` of distributed_bism/, tests/ and bench/; `ruff format --check` and `mypy` of
distributed_bism/; each run by this interpreter (`python -m TOOL`) so that mypy sees the packages
installed beside it. A tool that is not installed skips its test, saying how to install it (the
`dev` extra pins both)."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PACKAGE = "distributed_bism"
LINTED = (PACKAGE, "tests", "bench")  # ruff check; the format check covers the package only
# distributed_bism/ type-checks clean (61 errors when mypy was added, fixed in issue 14): keep it so.
MYPY_ERRORS_ALLOWED = 0


def run_tool(module: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """`python -m MODULE ARGS` from the repo root (where pyproject.toml is); skip if not installed."""
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"{module} is not installed here (pip install -e '.[dev]' installs the pinned version)")
    return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)


def test_ruff_check() -> None:
    done = run_tool("ruff", "check", "--no-fix", "--output-format", "concise", *LINTED)
    assert done.returncode == 0, f"ruff check {' '.join(LINTED)} (`ruff check --fix` repairs the [*] ones):\n" + (
        done.stdout[-6000:] + done.stderr[-2000:])


def test_ruff_format() -> None:
    done = run_tool("ruff", "format", "--check", "--output-format", "concise", PACKAGE)
    assert done.returncode == 0, f"ruff format --check {PACKAGE} (`ruff format {PACKAGE}` rewrites them):\n" + (
        done.stdout[-6000:] + done.stderr[-2000:])


def test_mypy() -> None:
    # packages = ["distributed_bism"] in [tool.mypy]; the cache (.mypy_cache/) makes later runs fast
    done = run_tool("mypy", timeout=600)
    found = re.search(r"Found (\d+) errors? in", done.stdout)
    errors = int(found.group(1)) if found else 0
    assert done.returncode in (0, 1) and (found or "Success" in done.stdout), done.stdout[-3000:] + done.stderr[-3000:]
    assert errors <= MYPY_ERRORS_ALLOWED, (
        f"mypy: {errors} errors, more than the {MYPY_ERRORS_ALLOWED} allowed:\n{done.stdout[-8000:]}")
