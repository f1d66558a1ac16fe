"""The shared data kept beside the repository (``../shared``, see README "What is where").

Tests that need a real-data file call :func:`shared_file`: the path is found from the
repository root (not from an absolute path of one machine; ``DPTAB_SHARED_DIR`` overrides it).
A missing file skips the test on a developer machine, and fails it loudly in CI
(``CI=true``), where a silently skipped real-data test would hide a broken checkout.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


def shared_dir() -> Path:
    """``$DPTAB_SHARED_DIR`` if set, else ``../shared`` beside the repository root."""
    env = os.environ.get("DPTAB_SHARED_DIR")
    return Path(env) if env else REPO_ROOT.parent / "shared"


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


def shared_file(relative: str) -> Path:
    """The path of ``relative`` under the shared directory; skips (or, in CI, fails) if missing."""
    path = shared_dir() / relative
    if not path.is_file():
        msg = (f"shared data file {path} is missing (looked in {shared_dir()}: ../shared beside the repository, "
               "or $DPTAB_SHARED_DIR)")
        if in_ci():
            pytest.fail(msg + "; CI=true, so this real-data test fails instead of being skipped", pytrace=False)
        pytest.skip(msg)
    return path
