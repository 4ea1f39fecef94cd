"""The code stays ruff-clean (lint and format), checked with the suite."""

import importlib.util
import subprocess
import sys

import pytest

from tests.conftest import ROOT


def _ruff(*args: str) -> subprocess.CompletedProcess:
    # The interpreter running the tests, not PATH: CI calls .venv/bin/python directly.
    if importlib.util.find_spec("ruff") is None:
        pytest.fail("ruff is not installed: pip install -e '.[test]'")
    cmd = [sys.executable, "-m", "ruff", *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_ruff_check_is_clean():
    result = _ruff("check", ".")
    assert result.returncode == 0, result.stdout + result.stderr


def test_ruff_format_is_clean():
    result = _ruff("format", "--check", ".")
    assert result.returncode == 0, result.stdout + result.stderr + ("\nRun `ruff format .` to fix.")


def test_python_version_supported():
    assert sys.version_info >= (3, 11)


def test_installed_jax_is_in_the_pinned_range():
    """The replay front end reads jaxprs; only the pinned JAX series is supported."""
    import re
    import tomllib

    import jax

    with open(f"{ROOT}/pyproject.toml", "rb") as f:
        deps = tomllib.load(f)["project"]["dependencies"]
    spec = next(d for d in deps if d.startswith("jax>="))
    low, high = re.fullmatch(r"jax>=([\d.]+),<([\d.]+)", spec).groups()
    version = lambda s: tuple(int(p) for p in re.findall(r"\d+", s)[:3])
    assert version(low) <= version(jax.__version__) < version(high), (jax.__version__, spec)
