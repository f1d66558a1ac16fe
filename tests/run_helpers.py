"""Shared helpers for the end-to-end run tests: tiny synthetic inputs and configs."""

from __future__ import annotations

import os
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


def scale_module():
    """``benchmarks/scale.py`` (a script, not a package): its ``dask_cluster`` and
    ``prefect_server`` are the one local cluster and the one standing Prefect server."""
    import importlib.util

    root = Path(__file__).resolve().parent.parent
    spec = importlib.util.spec_from_file_location("dptab_benchmark_scale", root / "benchmarks" / "scale.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def needs_tool(path: str | None, what: str, install: str) -> pytest.MarkDecorator:
    """Skip a test that needs an external program when it is missing — except in CI
    (``CI=true``), where ``.ci/run`` installs it, so a missing program fails the test loudly."""
    in_ci = os.environ.get("CI", "").lower() == "true"
    return pytest.mark.skipif(path is None and not in_ci, reason=f"{what} not installed ({install})")


def measurement_parts(release: Path) -> list[Path]:
    """A release's noisy measurement parts in draw order: runs by name, levels top down (the
    order of ``measurements/units.parquet``), shards ascending."""
    import polars as pl

    levels = pl.read_parquet(release / "measurements" / "units.parquet")["geolevel"].unique(maintain_order=True)
    order = {lv: i for i, lv in enumerate(levels.to_list())}
    parts = (release / "measurements" / "noisy").glob("run=*/geolevel=*/*.parquet")
    return sorted(parts, key=lambda p: (p.parent.parent.name, order.get(p.parent.name.split("=", 1)[1], 99), p.name))


def read_noisy(release: Path):
    """Every noisy measurement row of a release in draw order, with its part's run and level as
    columns: ``run, geolevel, query, unit, answer, value, variance, sigma2, part`` (``part``: the
    release path of the row's file)."""
    import polars as pl

    frames = [pl.read_parquet(p).with_columns(
        pl.lit(p.parent.parent.name.split("=", 1)[1]).alias("run"), pl.lit(p.parent.name.split("=", 1)[1]).alias("geolevel"),
        pl.lit(p.relative_to(release).as_posix()).alias("part")) for p in measurement_parts(release)]
    cols = ["run", "geolevel", "query", "unit", "answer", "value", "variance", "sigma2", "part"]
    return pl.concat(frames).select(cols) if frames else pl.DataFrame(schema={c: pl.Utf8 for c in cols})


def write_run_measurements(path: Path, rows, level: str, units: tuple[int, int],
                           queries: list[tuple[str, str, float]], full: bool = True) -> Path:
    """A run measurement file as ``pipeline.privacy.measure`` writes it (docs/contracts.md):
    ``rows`` (a polars frame of ``unit, query, answer, value, variance, sigma2``) with the file's
    metadata — its level, unit range ``units``, and ``queries`` as ``(query, σ² text, variance)``."""
    import json

    from pipeline.privacy.measure import SCHEMA

    meta = {"dptab.level": level, "dptab.units": f"{units[0]}:{units[1]}", "dptab.full": str(bool(full)),
            "dptab.strategy": "test", "dptab.queries": json.dumps([list(q) for q in queries])}
    table = rows.select(SCHEMA.names).to_arrow().cast(SCHEMA)
    write_parquet_with_metadata(path, table, {k.encode(): v.encode() for k, v in meta.items()})
    return path


def write_parquet_with_metadata(path: Path, table, meta) -> None:
    """``table`` (Arrow) to ``path`` with exactly the key-value metadata ``meta`` (bytes to
    bytes) and no stored Arrow schema, as the run's measurement files are written."""
    import pyarrow.parquet as pq

    with pq.ParquetWriter(path, table.schema, store_schema=False) as writer:
        writer.add_key_value_metadata(meta or {})
        writer.write_table(table)
