"""The second preset: sex x 23 age bands x Hispanic origin (DHC P12 style) on US blocks,
``dptab synth --spec dhc_p12`` + ``dptab run`` + ``dptab verify`` + ``dptab review``."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest
import yaml
from typer.testing import CliRunner

from dptab.cli import app

ROOT = Path(__file__).resolve().parent.parent


def _cli(*args: str) -> tuple[int, str]:
    r = CliRunner().invoke(app, list(args))
    return r.exit_code, r.output


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("p12")
    code, out = _cli("synth", "--spec", "dhc_p12", "--persons", "2500", "--seed", "4", "--out", str(tmp / "data"))
    assert code == 0, out
    cfg = yaml.safe_load((ROOT / "configs" / "dhc_p12.yaml").read_text())
    cfg["inputs"] = {"persons": str(tmp / "data" / "persons.parquet"), "units": str(tmp / "data" / "units.parquet")}
    cfg["privacy"].update({"ledger": str(tmp / "ledger.sqlite"), "randomness": "seeded", "seed": 9})
    cfg["output"] = {"runs_dir": str(tmp / "runs"), "releases_dir": str(tmp / "releases")}
    cfg["execution"] = {"workers": 1}
    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    code, out = _cli("run", "--quiet", str(path))
    assert code == 0, out
    return tmp, next((tmp / "releases").iterdir()), next(p for p in (tmp / "runs").iterdir() if p.is_dir())


def test_synth_draws_the_specs_attributes(released) -> None:
    tmp, _, _ = released
    persons = pl.read_parquet(tmp / "data" / "persons.parquet")
    assert persons.columns == ["geoid", "sex", "age", "hispanic"] and persons.height == 2500
    assert set(persons["sex"]) == {1, 2} and set(persons["age"]) <= set(range(23))
    assert persons["geoid"].str.len_chars().eq(15).all()


def test_release_verifies_with_p12_shells(released) -> None:
    _, release, _ = released
    code, out = _cli("verify", str(release))
    assert code == 0 and "every checksum and consistency check passes" in out, out
    m = json.loads((release / "manifest.json").read_text())
    assert {t["name"]: t["lines"] for t in m["tables"]} == {"P12": 49, "P12H": 49, "H1": 3}
    assert "geography" not in m  # US blocks: nesting by GEOID prefix, as before
    p12 = pl.read_parquet(release / "tables" / "P12.parquet")
    p12h = pl.read_parquet(release / "tables" / "P12H.parquet")
    assert p12["count"].min() >= 0 and p12h["count"].min() >= 0
    both = p12.join(p12h, on=["geolevel", "geoid", "line"], suffix="_h")
    assert (both["count_h"] <= both["count"]).all()
    wide = p12.pivot(on="line", index=["geolevel", "geoid"], values="count")
    assert (wide["1"] == wide["2"] + wide["26"]).all()
    assert (wide["2"] == sum(wide[str(k)] for k in range(3, 26))).all()
    assert int(p12.filter((pl.col("geolevel") == "nation") & (pl.col("line") == 1))["count"].item()) == 2500
    micro = pl.read_parquet(release / "microdata" / "persons.parquet")
    assert micro.columns == ["geoid", "EPNUM", "sex", "age", "hispanic"] and micro.height == 2500


def test_review_uses_the_p12_lines(released) -> None:
    _, _, run_dir = released
    code, out = _cli("review", str(run_dir))
    assert code == 0, out
    stats = set(pl.read_parquet(run_dir / "review" / "metrics.parquet")["statistic"])
    assert {"total", "P12_001", "P12_049", "P12H_026"} <= stats
