"""Simulated margins of error (``output.margins: simulated``, the approximate Monte Carlo
method): the post-processing re-run on fresh noise around the published counts; per-cell
margins that are 0 where the invariants fix a count, published with their lookup table and
checked by ``dptab verify``."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from run_helpers import make_inputs, write_config

from pipeline.job import stages
from pipeline.job.context import RunContext
from pipeline.release.uncertainty import SIZE_BIN_LABELS, size_bin
from pipeline.release.verify import verify_release


@pytest.fixture(scope="module")
def simulated_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mc")
    inputs = make_inputs(tmp, persons=3000, seed=8)
    out = stages.run(write_config(tmp, inputs, release_id="mc-1", output={"margins": "simulated", "margin_trials": 3}),
                     progress=False)
    return tmp, out


def test_release_carries_simulated_margins_and_verifies(simulated_run) -> None:
    _, out = simulated_run
    release = Path(out["release_path"])
    m = json.loads((release / "manifest.json").read_text())
    assert m["uncertainty"]["trials"] == 3 and m["uncertainty"]["file"] == "margins/simulated.parquet"
    assert "Monte Carlo" in m["uncertainty"]["method"]
    assert verify_release(release) == []
    lookup = pl.read_parquet(release / "margins" / "simulated.parquet")
    assert set(lookup["size_bin"].unique()) <= set(SIZE_BIN_LABELS)
    assert (lookup["moe90"] >= 0).all()
    # a (line, bin) group holds every rerun's error of each of its cells (>= 3 for 3 reruns),
    # except the zero bin's where a rerun hid a count: the hidden counts, possibly only one
    zeros = lookup["size_bin"] == SIZE_BIN_LABELS[0]
    assert (lookup.filter(~zeros)["errors"] >= 3).all() and (lookup.filter(zeros)["errors"] >= 1).all()


def test_a_seeded_run_derives_its_margin_seed() -> None:
    """A seeded run's reruns are seeded from the run's seed (its release is reproducible); an
    unseeded run draws a fresh 62-bit seed."""
    from pipeline.job.margins import margins_seed

    assert margins_seed(5) == margins_seed(5) != margins_seed(6)
    assert 0 <= margins_seed(5) < 2**62
    assert margins_seed(None) != margins_seed(None)  # 2^-62 false-failure rate


def test_margins_are_per_cell_zero_where_fixed_and_follow_the_lookup(simulated_run) -> None:
    _, out = simulated_run
    release = Path(out["release_path"])
    p1 = pl.read_parquet(release / "tables" / "P1.parquet")
    assert (p1.filter(pl.col("geolevel").is_in(["nation", "state"]) & (pl.col("line") == 1))["moe90"] == 0).all()
    h1 = pl.read_parquet(release / "tables" / "H1.parquet")
    assert (h1.filter(pl.col("line") == 1)["moe90"] == 0).all()  # housing units: invariant everywhere
    lookup = pl.read_parquet(release / "margins" / "simulated.parquet")
    tract = p1.filter(pl.col("geolevel") == "tract")
    look = {(r["line"], r["size_bin"]): r["moe90"] for r in lookup.filter(
        (pl.col("table") == "P1") & (pl.col("geolevel") == "tract")).iter_rows(named=True)}
    bins = size_bin(tract["count"].to_numpy())
    for line, count_bin, moe in zip(tract["line"].to_list(), bins, tract["moe90"].to_list()):
        assert moe == 0 or moe == look[(line, SIZE_BIN_LABELS[count_bin])]
    assert tract["moe90"].n_unique() > 1


def test_margin_reruns_leave_nothing_behind_and_resume_reuses(simulated_run) -> None:
    _, out = simulated_run
    ctx = RunContext.load(out["run_dir"])
    assert ctx.rd.is_done("margins")
    assert not any(p.name.startswith("trial-") for p in (ctx.rd.root / "margins").iterdir())
    info = stages.stage_publish(out["run_dir"])  # already published: nothing is redone
    assert info["release_path"] == out["release_path"]


def test_tampered_margin_is_caught(simulated_run, tmp_path) -> None:
    _, out = simulated_run
    copy = tmp_path / "mc-1"
    shutil.copytree(out["release_path"], copy)
    path = copy / "tables" / "P2.parquet"
    df = pl.read_parquet(path)
    i = int(np.flatnonzero(df["moe90"].to_numpy() > 0)[0])
    df = df.with_columns(pl.when(pl.int_range(pl.len()) == i).then(pl.col("moe90") + 1.0)
                         .otherwise(pl.col("moe90")).alias("moe90"))
    df.write_parquet(path)
    problems = verify_release(copy)
    assert any(p.check == "table_rows" and "moe90" in str(p) for p in problems), problems


def test_line_margins_give_published_zeros_the_counts_a_zero_hides() -> None:
    """Per (line, size bin): |rerun - plug-in| quantiles, except published zeros, whose margin is
    the 90th percentile of the plug-in counts some rerun published as 0 — given to every zero
    the invariants do not force, moved by a rerun or not."""
    from pipeline.job.margins import line_margins

    counts = np.array([[0], [0], [5], [20], [0]])
    reruns = np.array([[[0], [0], [0], [18], [0]],       # rerun 1 hides unit 2's 5
                       [[0], [1], [4], [22], [0]]])
    forced = np.array([[True], [False], [False], [False], [False]])  # unit 0: the invariants say 0
    groups, moving = line_margins(counts, reruns, lambda: forced)
    assert moving[:, 0].tolist() == [False, True, True, True, True]  # unit 4 never moved: still has a margin
    # (line, bin, moe90, values): zeros get 5 (the one hidden count), 1-9 the 90% of |0-5|, |4-5|, 10-49 of 2, 2
    assert [g[:4] for g in groups] == [(0, 0, 5, 1), (0, 1, 5, 2), (0, 2, 2, 2)]
    assert all(np.isnan(g[4]) for g in groups)  # no GLS estimates given: no bias shift


def test_line_margins_without_hidden_counts_keep_the_rerun_rule() -> None:
    from pipeline.job.margins import line_margins

    counts = np.array([[0, 3], [0, 7]])
    reruns = np.array([[[0, 2], [2, 7]], [[0, 4], [0, 9]]])

    def never() -> np.ndarray:
        raise AssertionError("forced zeros are only needed when a rerun hid a count")

    groups, moving = line_margins(counts, reruns, never)
    assert moving.tolist() == [[False, True], [True, True]]
    assert [g[:4] for g in groups] == [(0, 0, 2, 2), (1, 1, 2, 4)]  # zeros: |2-0|, |0-0| of the unit that moved


def test_forced_zero_lines_follow_the_invariants(simulated_run) -> None:
    """Lines the invariants force to 0 are 0 in every published table (the engine obeys the same
    constraints); at block level some are forced (no facility of a type, no housing unit) and
    others not; every such cell has margin 0, and the other published zeros carry their group's."""
    from pipeline.job.margins import forced_zero_lines
    from pipeline.model.histogram import SparseHistogram
    from pipeline.release.tables import load_tables, tabulate

    _, out = simulated_run
    ctx = RunContext.load(out["run_dir"])
    ts = load_tables(ctx.cfg.tables)
    release = Path(out["release_path"])
    some_forced = some_free = 0
    for t in ts.of_kind("persons"):
        for lv in ctx.level_names:
            counts = tabulate(SparseHistogram.from_parquet(ctx.rd.solved_path("persons", lv)), t)
            forced = forced_zero_lines(ctx, "persons", lv, t)
            assert forced.shape == counts.shape and (counts[forced] == 0).all()
            if lv == "block":
                some_forced += int(forced.any(axis=0).sum())
                some_free += int((~forced & (counts == 0)).sum())
                moe = (pl.read_parquet(release / "tables" / f"{t.name}.parquet")
                       .filter(pl.col("geolevel") == "block")["moe90"].to_numpy().reshape(counts.shape))
                assert (moe[forced] == 0).all()
    assert some_forced > 0 and some_free > 0
    lookup = pl.read_parquet(release / "margins" / "simulated.parquet")
    zeros = lookup.filter((pl.col("geolevel") == "block") & (pl.col("size_bin") == "0"))
    assert zeros.height > 0 and (zeros["moe90"] > 0).any()


def test_line_margins_shift_the_errors_to_the_bias_measured_against_the_gls() -> None:
    """With the unbiased (GLS) estimates, a non-zero group's rerun errors are moved so that their
    mean is the group's bias: mean(published - GLS) plus the GLS noise the size bin selects
    (mean(rerun GLS - plug-in) over the reruns' counts in the bin); a line with fewer than
    MIN_BIAS_CELLS cells takes the bias of every line in its bin; zeros keep their rule."""
    from pipeline.job.margins import MIN_BIAS_CELLS, line_margins

    n = MIN_BIAS_CELLS
    counts = np.zeros((n, 3), np.int64)
    counts[:, 0] = 300                                   # line 0: n cells of 250-999
    counts[:10, 1] = 400                                 # line 1: 10 cells of 250-999, the rest 0
    reruns = np.stack([counts + 1, counts - 1])          # rerun errors +-1: mean 0
    reruns[:, 10:, 1] = 0
    reruns[0, :, 2] = 1                                  # line 2: published 0, a rerun makes 1
    blue = counts + np.array([10.0, 40.0, 0.0])          # published - GLS: -10 on line 0, -40 on line 1
    rerun_blue = reruns + np.array([3.0, 3.0, 0.0])      # the bin's GLS noise: rerun GLS - plug-in = +3 +- 1
    rerun_blue -= (reruns - counts[None])
    groups, _ = line_margins(counts, reruns, lambda: np.zeros(counts.shape, bool), blue, rerun_blue)
    got = {(j, b): (q, bias) for j, b, q, _, bias in groups}
    # line 0: bias -10 + 3 = -7; errors +-1 moved by -7: |-6|, |-8| -> 8
    assert got[(0, 4)] == (8, -7.0)
    # line 1 (10 cells): the bin's pooled bias, (n * -10 + 10 * -40) / (n + 10) + 3
    pooled = (n * -10 + 10 * -40) / (n + 10) + 3
    q, bias = got[(1, 4)]
    assert bias == pytest.approx(pooled) and q == round(-pooled) + 1
    q0, bias0 = got[(2, 0)]
    assert q0 == 1 and np.isnan(bias0)                   # zeros: their own rule, no shift
    plain, _ = line_margins(counts, reruns, lambda: np.zeros(counts.shape, bool))
    assert {(j, b): q for j, b, q, _, _ in plain}[(0, 4)] == 1
