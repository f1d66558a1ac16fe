"""The review of a run directory: metrics.parquet, the HTML report, the confidentiality rule,
and the report in a real headless Chromium.

The run directory is built by hand in the layout of pipeline/run.py (true histograms,
solved histograms, measurements), so the review is tested independently of the engine.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import yaml
from run_helpers import needs_tool

from pipeline.inputs.histograms import build_person_histograms
from pipeline.model.geography import Geography
from pipeline.model.histogram import SparseHistogram
from pipeline.model.spec import load_spec
from pipeline.review.runner import ConfidentialityError, export_review, review_run_dir

CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)


def _persons(rng: np.random.Generator) -> pl.DataFrame:
    blocks = [f"44{c:03d}{t:06d}{b:04d}" for c in (1, 3) for t in (100, 200, 300)
              for b in (1001, 1002, 1003, 2001, 2002)]
    sizes = rng.integers(0, 160, size=len(blocks))
    sizes[0] = 900  # one big block so the >= 500 rules have a unit at block level too
    geoid = np.repeat(blocks, sizes)
    n = geoid.size
    return pl.DataFrame({
        "geoid": geoid,
        "hhgq": np.where(rng.random(n) < 0.05, 5, 0),
        "voting_age": (rng.random(n) < 0.75).astype(np.int64),
        "hispanic": (rng.random(n) < 0.2).astype(np.int64),
        "cenrace": rng.choice([1, 2, 4, 6, 7, 9, 11], p=[.6, .12, .06, .1, .04, .04, .04], size=n),
    })


def make_run(root: Path, confidential: bool, seed: int = 7) -> Path:
    """A finished-looking run directory: truth, 'published' = truth + small noise, measurements."""
    rng = np.random.default_rng(seed)
    spec = load_spec("pl94")
    run = root / "runs" / "test-run"
    (run / "histograms").mkdir(parents=True)
    (run / "solved").mkdir()
    cfg = {"dataset_id": "test", "title": "review test run", "confidential": confidential, "spec": "pl94",
           "privacy": {"strategy": "census2020_pl94", "units_strategy": "census2020_units",
                       "delta": 1e-10, "randomness": "seeded", "seed": 1}}
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    (run / "state.json").write_text('{"run_id": "test-run", "done": {}}')
    persons = _persons(rng)
    geo = Geography.from_block_geoids(persons["geoid"].unique().sort().to_numpy())
    hists = build_person_histograms(persons, geo, spec)
    for level, h in hists.items():
        h.to_parquet(run / "histograms" / f"persons_{level}.parquet")
        dense = h.dense()
        pub = np.maximum(dense + rng.integers(-1, 2, size=dense.shape) * (dense > 0), 0)
        SparseHistogram.from_dense(level, pub).to_parquet(run / "solved" / f"persons_{level}.parquet")
        rows = []
        for q, var in (("total", 4.0), ("cenrace", 9.0), ("detailed", 9.0)):
            ans = spec.query(q).answer(dense)
            noisy = ans + np.rint(rng.normal(0, np.sqrt(var), size=ans.shape)).astype(np.int64)
            u, a = np.nonzero(np.ones_like(ans))
            rows.append(pl.DataFrame({"unit": u.astype(np.int64), "query": q, "answer": a.astype(np.int32),
                                      "value": noisy[u, a].astype(np.int64), "variance": var,
                                      "sigma2": str(int(var))}))
        mdir = run / "measurements" / "persons" / level
        mdir.mkdir(parents=True)
        pl.concat(rows).write_parquet(mdir / "shard-00000.parquet")
    return run


@pytest.fixture(scope="module")
def reviewed(tmp_path_factory) -> dict[str, Path]:
    out = {}
    for conf in (True, False):
        root = tmp_path_factory.mktemp("conf" if conf else "public")
        run = make_run(root, confidential=conf)
        out["confidential" if conf else "public"] = review_run_dir(run)
    return out


def test_review_writes_metrics_and_report(reviewed):
    report = reviewed["confidential"]
    m = pl.read_parquet(report.parent / "metrics.parquet")
    assert m.columns == ["level", "statistic", "metric", "size_bin", "estimator", "value"]
    assert set(m["level"]) == {"nation", "state", "county", "tract", "block_group", "block"}
    assert set(m["estimator"]) == {"published", "noisy_clipped", "wls"}
    assert {"P1_071", "P4_073", "total", "gq_college", "largest_group", "detailed"} <= set(m["statistic"])
    # 'published' is truth + {-1, 0, 1} on non-zero cells: no true-zero cell is published non-zero
    fnz = m.filter((pl.col("statistic") == "detailed") & (pl.col("metric") == "false_nonzero_share")
                   & (pl.col("estimator") == "published"))
    assert fnz.height == 6 and fnz["value"].max() == 0
    text = report.read_text()
    assert "CONFIDENTIAL" in text and "Redistricting target" in text
    assert "http://" not in text and "https://" not in text  # self-contained: no external assets
    assert len(re.findall(r'<img src="data:image/png;base64,', text)) >= 4


def test_markdown_summary_quotes_the_metrics(reviewed):
    d = reviewed["confidential"].parent
    m = pl.read_parquet(d / "metrics.parquet")
    mae = m.filter((pl.col("level") == "block") & (pl.col("statistic") == "total") & (pl.col("metric") == "mae")
                   & (pl.col("size_bin") == "all") & (pl.col("estimator") == "published"))["value"][0]
    text = (d / "summary.md").read_text()
    row = next(ln for ln in text.splitlines() if ln.startswith("| Total population |"))  # first table: MAE
    assert row.rstrip(" |").split(" | ")[-1] == f"{mae:.2f}"
    assert "Redistricting target" in text and "| block |" in text


def test_review_files_are_private(reviewed):
    report = reviewed["confidential"]
    assert stat.S_IMODE(os.stat(report.parent).st_mode) == 0o700
    for f in ("report.html", "metrics.parquet", "summary.md"):
        assert stat.S_IMODE(os.stat(report.parent / f).st_mode) == 0o600


def test_confidential_review_cannot_leave_the_run_directory(reviewed, tmp_path):
    run = reviewed["confidential"].parent.parent
    with pytest.raises(ConfidentialityError):
        export_review(run, tmp_path / "release" / "review")
    assert not (tmp_path / "release").exists()
    # a run marked non-confidential may export its review, and its report says so
    pub_run = reviewed["public"].parent.parent
    dest = export_review(pub_run, tmp_path / "shared")
    assert (dest / "report.html").is_file()
    assert "CONFIDENTIAL" not in (dest / "report.html").read_text()


def test_review_returns_only_a_path_and_logs_no_values(tmp_path, caplog):
    run = make_run(tmp_path, confidential=True, seed=11)
    with caplog.at_level("DEBUG"):
        out = review_run_dir(run)
    assert isinstance(out, Path) and out == run / "review" / "report.html"
    m = pl.read_parquet(out.parent / "metrics.parquet")
    values = {f"{v:.3f}" for v in m["value"].drop_nans().to_list() if v not in (0.0, 1.0)}
    logged = " ".join(r.getMessage() for r in caplog.records)
    assert not any(v in logged for v in values)


@pytest.mark.browser
@needs_tool(CHROMIUM, "headless Chromium", "apt-get install -y chromium")
def test_report_renders_in_headless_chromium(reviewed, tmp_path):
    assert CHROMIUM is not None, "chromium is missing: .ci/run installs it"
    report = reviewed["confidential"]
    shot = tmp_path / "shot.png"
    base = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--no-first-run", "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
            f"--user-data-dir={tmp_path / 'profile'}", "--enable-logging=stderr", "--v=0"]
    url = report.as_uri()
    dom = subprocess.run(base + ["--virtual-time-budget=5000", "--dump-dom", url],
                         capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    console_errors = [ln for ln in dom.stderr.splitlines() if "CONSOLE" in ln and ("ERROR" in ln or "Uncaught" in ln)]
    assert not console_errors, console_errors
    n_figs = len(re.findall(r"<img\b", dom.stdout)) + len(re.findall(r"<svg\b", dom.stdout))
    assert n_figs >= 4
    # the redistricting-target section renders, and states plainly whether a level falls short
    assert "Redistricting target and sparsity" in dom.stdout
    assert ('class="alert">Below the target' in dom.stdout) or ("meets the target" in dom.stdout)
    # every figure decodes: an <img> whose data URI is broken renders with naturalWidth 0,
    # which the page reports through a title that the DOM dump shows
    probe = tmp_path / "probe.html"
    probe.write_text(report.read_text().replace(
        "</body>", "<script>window.addEventListener('load',()=>{const i=[...document.images];"
        "document.title='figs:'+i.length+':broken:'+i.filter(x=>!x.complete||x.naturalWidth===0).length;});"
        "</script></body>"))
    dom2 = subprocess.run(base + ["--virtual-time-budget=5000", "--dump-dom", probe.as_uri()],
                          capture_output=True, text=True, timeout=120)
    m = re.search(r"<title>figs:(\d+):broken:(\d+)</title>", dom2.stdout)
    assert m and int(m.group(1)) >= 4 and int(m.group(2)) == 0, dom2.stdout[:300]
    shot_run = subprocess.run(base + ["--window-size=1200,2000", f"--screenshot={shot}", url],
                              capture_output=True, text=True, timeout=120)
    assert shot_run.returncode == 0 and shot.is_file(), shot_run.stderr[-2000:]
    import matplotlib.image as mpimg

    img = mpimg.imread(shot)
    assert img.shape[0] > 100 and img.shape[1] > 100
    assert float(img[..., :3].std()) > 0.02  # not a blank page


def test_cli_review_prints_paths_only(tmp_path):
    from typer.testing import CliRunner

    from dptab.cli import app

    run = make_run(tmp_path, confidential=True, seed=13)
    res = CliRunner().invoke(app, ["review", str(run)])
    assert res.exit_code == 0, res.output
    lines = res.stdout.strip().splitlines()
    assert lines == [f"metrics: {run / 'review' / 'metrics.parquet'}", f"report:  {run / 'review' / 'report.html'}"]
    # progress (stderr) names stages and counts only: no figure from the truth
    progress = res.stderr.strip().splitlines()
    assert progress and all("review: levels:" in ln and "/6" in ln for ln in progress), progress
    bad = CliRunner().invoke(app, ["review", str(tmp_path / "nowhere")])
    assert bad.exit_code == 2 and "not a dptab run directory" in bad.output
