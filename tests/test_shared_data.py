"""Real-data tests find ../shared from the repository root, and fail in CI when it is missing."""

from __future__ import annotations

import pytest
from shared_data import REPO_ROOT, shared_dir, shared_file

PERRY = "data/real/ppmf_20210428_eps12-2_P_01105_perry_al.csv"


def test_shared_dir_is_beside_the_repository(monkeypatch) -> None:
    monkeypatch.delenv("DPTAB_SHARED_DIR", raising=False)
    assert shared_dir() == REPO_ROOT.parent / "shared"
    assert (REPO_ROOT / "pyproject.toml").is_file()


def test_missing_shared_file_skips_locally_and_fails_in_ci(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("DPTAB_SHARED_DIR", str(tmp_path))
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception):
        shared_file(PERRY)
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI=true"):
        shared_file(PERRY)
    (tmp_path / PERRY).parent.mkdir(parents=True)
    (tmp_path / PERRY).write_text("x")
    assert shared_file(PERRY) == tmp_path / PERRY
