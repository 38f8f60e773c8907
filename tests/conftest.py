"""Shared test helpers.

Tests import the three scripts as modules (the repository root is put on
sys.path here) and run them as programs with `run_script`.

`require(condition, why)` guards a test that needs a real component (a
Docker engine, Compose v2, OpenRC): on a laptop without it the test skips,
under CI=true it fails, so CI can never go green by skipping.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

IN_CI = os.environ.get("CI", "").lower() == "true"


def require(condition, why):
    """Skip (or, under CI=true, fail) the calling test unless `condition`."""
    if condition:
        return
    if IN_CI:
        pytest.fail(f"required component missing under CI=true: {why}")
    pytest.skip(why)


def docker_engine_available():
    """True when a Docker engine answers and Compose v2 is installed."""
    if not shutil.which("docker"):
        return False
    for argv in (["docker", "info"], ["docker", "compose", "version"]):
        try:
            result = subprocess.run(argv, capture_output=True, timeout=20)
        except (OSError, subprocess.TimeoutExpired):
            return False
        if result.returncode != 0:
            return False
    return True


def openrc_available():
    """True when OpenRC's openrc-run and supervise-daemon are installed."""
    return bool(shutil.which("openrc-run") and shutil.which("supervise-daemon"))


def git(*args, cwd, check=True, env=None):
    """Run git in `cwd` with a fixed identity; returns stdout, stripped."""
    full_env = dict(os.environ, **GIT_IDENTITY)
    if env:
        full_env.update(env)
    result = subprocess.run(
        ["git", *args], cwd=cwd, env=full_env, capture_output=True, text=True
    )
    if check and result.returncode != 0:
        raise AssertionError(f"git {' '.join(args)} failed: {result.stderr}")
    return result.stdout.strip()


GIT_IDENTITY = {
    "GIT_AUTHOR_NAME": "Test",
    "GIT_AUTHOR_EMAIL": "test@example.invalid",
    "GIT_COMMITTER_NAME": "Test",
    "GIT_COMMITTER_EMAIL": "test@example.invalid",
    "GIT_CONFIG_NOSYSTEM": "1",
}


def run_script(name, *args, env=None, timeout=120, **kwargs):
    """Run one of the project's scripts with this Python; returns the result."""
    return subprocess.run(
        [sys.executable, str(ROOT / name), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        **kwargs,
    )
