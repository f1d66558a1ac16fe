"""Re-spending the ρ of measurements that invariants fix exactly (``dptab budget --respend``):
the same total ρ, every other query's ρ scaled by one exact factor, and a run with the derived
strategy publishes a release that verifies."""

from __future__ import annotations

import json
from fractions import Fraction
from pathlib import Path

import pytest
from run_helpers import make_inputs, write_config
from typer.testing import CliRunner

from dptab.cli import app
from pipeline.job import stages
from pipeline.model.strategy import StrategyError, load_strategy, respend_invariant_rho
from pipeline.release.verify import verify_release


def test_respent_strategy_keeps_total_rho_and_scales_the_rest_exactly() -> None:
    base = load_strategy("census2020_pl94")
    new = respend_invariant_rho(base, {"state": ("total",)})
    assert new.total_rho == base.total_rho
    old, now = base.rho_by_level_query(), new.rho_by_level_query()
    assert ("state", "total") not in now and set(now) == set(old) - {("state", "total")}
    freed = old[("state", "total")]
    scale = base.total_rho / (base.total_rho - freed)
    assert all(now[k] == old[k] * scale for k in now)
    assert Fraction(1, 1) - 1 / scale == freed / base.total_rho  # ~32% of the persons ρ
    assert 0.32 < float(freed / base.total_rho) < 0.33


def test_shipped_respent_strategy_is_the_transform() -> None:
    shipped = load_strategy("census2020_pl94_respent")
    derived = respend_invariant_rho(load_strategy("census2020_pl94"), {"state": ("total",)},
                                    name="census2020_pl94_respent")
    assert shipped.levels == derived.levels and shipped.rho == derived.rho
    assert shipped.multipass_levels == derived.multipass_levels


def test_cli_writes_a_loadable_strategy_and_refuses_unknown_queries(tmp_path: Path) -> None:
    out = tmp_path / "mine.yaml"
    r = CliRunner().invoke(app, ["budget", "census2020_pl94", "--respend", "state:total", "--write", str(out),
                                 "--no-pld"])
    assert r.exit_code == 0, r.output
    assert load_strategy(out).rho_by_level_query() == respend_invariant_rho(
        load_strategy("census2020_pl94"), {"state": ("total",)}).rho_by_level_query()
    r = CliRunner().invoke(app, ["budget", "census2020_pl94", "--respend", "nation:total", "--no-pld"])
    assert r.exit_code == 2 and "nation:total" in r.output
    with pytest.raises(StrategyError):
        respend_invariant_rho(load_strategy("census2020_units"),
                              {lv: ("detailed",) for lv in load_strategy("census2020_units").levels})


def test_run_with_respent_strategy_verifies(tmp_path: Path) -> None:
    inputs = make_inputs(tmp_path, persons=3000, seed=4)
    out = stages.run(write_config(tmp_path, inputs, release_id="respent", postprocess={"estimator": "full"},
                                  privacy={"strategy": "census2020_pl94_respent"}), progress=False)
    release = Path(out["release_path"])
    manifest = json.loads((release / "manifest.json").read_text())
    assert manifest["privacy"]["runs"]["persons"]["strategy"] == "census2020_pl94_respent"
    assert "state" not in manifest["privacy"]["runs"]["persons"]["rho_by_level_query"] or \
        "total" not in manifest["privacy"]["runs"]["persons"]["rho_by_level_query"]["state"]
    assert verify_release(release) == []
