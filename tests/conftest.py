"""Test-session setup shared by every test folder."""

from __future__ import annotations

import pytest


def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items: list[pytest.Item]) -> None:
    """Run the Prefect smoke tests (tests/flows) last.

    Their harness starts a server subprocess and background threads in this process; forking
    worker processes after that can deadlock on Linux (PrefectHQ/prefect#19112), so every test
    that starts processes runs before it.
    """
    items.sort(key=lambda item: "tests/flows/" in item.nodeid.replace("\\", "/"))
