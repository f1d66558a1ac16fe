"""Shared helpers for the end-to-end run tests: tiny synthetic inputs and configs."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import yaml

from pipeline.inputs.synth import synthesize


def make_inputs(tmp: Path, persons: int = 3000, seed: int = 11) -> Path:
    """A tiny synthetic state under ``tmp/inputs`` (persons.parquet, units.parquet)."""
    out = tmp / "inputs"
    synthesize(persons, seed, out)
    return out


def write_config(tmp: Path, input_dir: Path, name: str = "config.yaml", **overrides) -> Path:
    """A run config under ``tmp`` with seeded noise and a private ledger; ``overrides`` merge in."""
    cfg = {
        "dataset_id": "test-ds",
        "confidential": False,
        "inputs": {"persons": str(input_dir / "persons.parquet"), "units": str(input_dir / "units.parquet")},
        "privacy": {"randomness": "seeded", "seed": 5, "ledger": str(tmp / "ledger.sqlite"), "lifetime_rho": "100"},
        "output": {"runs_dir": str(tmp / "runs"), "releases_dir": str(tmp / "releases")},
        "execution": {"workers": 1},
    }
    for key, value in overrides.items():
        if isinstance(value, dict):
            cfg.setdefault(key, {}).update(value)
        else:
            cfg[key] = value
    path = tmp / name
    path.write_text(yaml.safe_dump(cfg))
    return path


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (for test servers: Prefect, Dask)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def needs_tool(path: str | None, what: str, install: str) -> pytest.MarkDecorator:
    """Skip a test that needs an external program when it is missing — except in CI
    (``CI=true``), where ``.ci/run`` installs it, so a missing program fails the test loudly."""
    in_ci = os.environ.get("CI", "").lower() == "true"
    return pytest.mark.skipif(path is None and not in_ci, reason=f"{what} not installed ({install})")
