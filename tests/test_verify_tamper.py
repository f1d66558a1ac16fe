"""A tamper suite for ``dptab verify``: every edit of a release folder must be reported.

One small seeded release is built per module (3,000 synthetic persons, the 2020 strategies,
CSV and measurements on); each case copies it (the copy keeps the folder name, which is the
release id), applies one tampering and asserts that :func:`verify_release` reports at least one
failure of the expected check that names the expected file or item. Most tamperings also
rewrite the manifest's checksum, byte count and row count of the files they touch, as a hostile
editor would, so the checksums alone cannot catch them. The untampered copy must verify clean.

A rehashed edit of a noisy measurement's *value* is not in the suite: the release alone cannot
tell it from the drawn value (the check would need the confidential invariants and a re-run of
post-processing); an edit without rehashing is (``measurement_value_no_rehash``).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable

import numpy as np
import polars as pl
import pytest

from pipeline.files import sha256_file
from pipeline.release.verify import verify_release

RID = "T1"


@pytest.fixture(scope="module")
def release(tmp_path_factory) -> Path:
    """The untampered release ``releases/T1`` (seeded, built once)."""
    from run_helpers import make_inputs, write_config

    from pipeline.job.stages import run

    tmp = tmp_path_factory.mktemp("tamper")
    cfg = write_config(tmp, make_inputs(tmp, persons=3000), release_id=RID)
    return Path(run(cfg, progress=False)["release_path"])


# -- editing helpers -----------------------------------------------------------------------

def manifest(root: Path) -> dict:
    return json.loads((root / "manifest.json").read_text())


def save(root: Path, m: dict) -> None:
    (root / "manifest.json").write_text(json.dumps(m, indent=2, sort_keys=True))


def edit_manifest(root: Path, fn: Callable[[dict], None]) -> None:
    m = manifest(root)
    fn(m)
    save(root, m)


def rehash(root: Path, *rels: str) -> None:
    """Update the manifest's sha256, bytes and (Parquet) rows of ``rels`` to the files as they are."""
    import pyarrow.parquet as pq

    m = manifest(root)
    for f in m["files"]:
        if f["path"] in rels:
            p = root / f["path"]
            f["sha256"], f["bytes"] = sha256_file(p), p.stat().st_size
            if p.suffix == ".parquet":
                f["rows"] = pq.ParquetFile(p).metadata.num_rows
    save(root, m)


def drop(root: Path, *rels: str) -> None:
    """Delete files together with their manifest entries."""
    for rel in rels:
        (root / rel).unlink()
    edit_manifest(root, lambda m: m.update(files=[f for f in m["files"] if f["path"] not in rels]))


def edit_parquet(root: Path, rel: str, fn: Callable[[pl.DataFrame], pl.DataFrame], *, hashed: bool = True) -> None:
    p = root / rel
    fn(pl.read_parquet(p)).write_parquet(p)
    if hashed:
        rehash(root, rel)


def edit_csv(root: Path, rel: str, fn: Callable[[pl.DataFrame], pl.DataFrame], *, hashed: bool = True) -> None:
    from pipeline.release.tables import CSV_SCHEMA

    p = root / rel
    fn(pl.read_csv(p, schema=CSV_SCHEMA)).write_csv(p)
    if hashed:
        rehash(root, rel)


def set_at(df: pl.DataFrame, row: int, col: str, value) -> pl.DataFrame:
    """``df`` with ``df[row, col] = value`` (same dtype)."""
    return df.with_columns(pl.when(pl.int_range(pl.len()) == row).then(pl.lit(value, dtype=df[col].dtype))
                           .otherwise(pl.col(col)).alias(col))


def first_row(df: pl.DataFrame, **eq) -> int:
    cond = pl.lit(True)
    for k, v in eq.items():
        cond = cond & (pl.col(k) == v)
    return int(df.with_row_index().filter(cond)["index"][0])


def swap_rows(df: pl.DataFrame, i: int, j: int) -> pl.DataFrame:
    order = list(range(df.height))
    order[i], order[j] = order[j], order[i]
    return df[order]


def bump_fraction(text: str) -> str:
    """A different (smaller) exact fraction."""
    from fractions import Fraction

    f = Fraction(text) * Fraction(9, 10)
    return f"{f.numerator}/{f.denominator}"


# -- the tamperings ---------------------------------------------------------------------------

def t_epsilon_total(r: Path) -> None:
    edit_manifest(r, lambda m: m["privacy"]["epsilon"].update(cks2020=bump_fraction(m["privacy"]["epsilon"]["cks2020"])))


def t_epsilon_run_pld(r: Path) -> None:
    def f(m):
        e = m["privacy"]["runs"]["persons"]["epsilon"]
        e["pld"] = bump_fraction(e["pld"])
    edit_manifest(r, f)


def t_rho_total(r: Path) -> None:
    edit_manifest(r, lambda m: m["privacy"].update(rho=bump_fraction(m["privacy"]["rho"])))


def t_rho_level_query(r: Path) -> None:
    def f(m):
        by = m["privacy"]["runs"]["persons"]["rho_by_level_query"]["county"]
        by["total"] = bump_fraction(by["total"])
    edit_manifest(r, f)


def t_delta(r: Path) -> None:
    edit_manifest(r, lambda m: m["privacy"].update(delta="1e-05"))


def t_seed_changed(r: Path) -> None:
    edit_manifest(r, lambda m: m.update(seed=m["seed"] + 1))


def t_seed_removed(r: Path) -> None:
    edit_manifest(r, lambda m: m.update(seed=None))


def t_randomness_claims_secure(r: Path) -> None:
    edit_manifest(r, lambda m: m.update(randomness="secure"))


def t_release_id(r: Path) -> None:
    edit_manifest(r, lambda m: m.update(release_id="T2"))


def t_strategy_name(r: Path) -> None:
    edit_manifest(r, lambda m: m["privacy"]["runs"]["units"].update(strategy="uniform"))


def t_strategy_file_edited(r: Path) -> None:
    """Budget moved from the nation to the state level in the units strategy copy (still valid)."""
    p = r / "privacy" / "units.yaml"
    text = p.read_text()
    assert "nation: {share: 20/4100" in text and "state: {share: 20/4100" in text
    p.write_text(text.replace("nation: {share: 20/4100", "nation: {share: 10/4100")
                 .replace("state: {share: 20/4100", "state: {share: 30/4100"))
    rehash(r, "privacy/units.yaml")


def t_strategy_file_deleted(r: Path) -> None:
    drop(r, "privacy/units.yaml")


def t_csv_value(r: Path) -> None:
    edit_csv(r, "csv/tract/P1.csv", lambda df: set_at(df, 5, "count", int(df["count"][5]) + 1))


def t_csv_rows_swapped(r: Path) -> None:
    edit_csv(r, "csv/block/P3.csv", lambda df: swap_rows(df, 3, 4))


def t_csv_rows_swapped_no_rehash(r: Path) -> None:
    edit_csv(r, "csv/block/P4.csv", lambda df: swap_rows(df, 10, 11), hashed=False)


def t_parquet_name(r: Path) -> None:
    edit_parquet(r, "tables/P2.parquet", lambda df: set_at(df, first_row(df, geolevel="county"), "name", "Atlantis"))


def t_parquet_rows_swapped(r: Path) -> None:
    edit_parquet(r, "tables/H1.parquet", lambda df: swap_rows(df, first_row(df, geolevel="block"),
                                                             first_row(df, geolevel="block") + 3))


def t_moe(r: Path) -> None:
    """The margin of error of P1 line 3 at county, in the Parquet table and its CSV alike."""
    def f(df):
        i = first_row(df, geolevel="county", line=3)
        return set_at(df, i, "moe90", float(df["moe90"][i]) / 2)
    edit_parquet(r, "tables/P1.parquet", f)
    edit_csv(r, "csv/county/P1.csv", f)


def t_moe_nulled(r: Path) -> None:
    def f(df):
        return set_at(df, first_row(df, geolevel="block", line=2), "moe90", None)
    edit_parquet(r, "tables/H1.parquet", f)
    edit_csv(r, "csv/block/H1.csv", f)


def t_table_count(r: Path) -> None:
    edit_parquet(r, "tables/P5.parquet", lambda df: set_at(df, first_row(df, geolevel="tract", line=8), "count", 99))


MEAS = "measurements/noisy/run=persons/geolevel=nation/shard-00000.parquet"  # the first part


def edit_measurements(root: Path, fn: Callable[[pl.DataFrame], pl.DataFrame], *, hashed: bool = True,
                      as_written: bool = False) -> None:
    """Edit the noisy measurement rows as one frame (``run_helpers.read_noisy``: with the
    ``run``, ``geolevel`` and ``part`` of each row); every row goes back to its ``part``, which
    keeps its key-value metadata (a part no row names is left with none). ``as_written``: each
    run of one query in its own row group with dictionary-encoded texts, as the measure step
    writes them (the verifier checks such row groups whole); otherwise all rows in one."""
    import pyarrow.parquet as pq
    from run_helpers import read_noisy, write_parquet_with_metadata

    if as_written:
        from pipeline.privacy.measure import _WRITE_SCHEMA

        def write_parquet_with_metadata(path, table, meta):  # noqa: F811 - the as-written layout
            rows = pl.from_arrow(table)
            runs = rows.with_columns(run=pl.col("query").rle_id())
            with pq.ParquetWriter(path, _WRITE_SCHEMA, store_schema=False) as writer:
                writer.add_key_value_metadata(meta or {})
                for part in runs.partition_by("run", maintain_order=True):
                    writer.write_table(part.drop("run").to_arrow().cast(_WRITE_SCHEMA))

    before = read_noisy(root)
    after = fn(before)
    rels = before["part"].unique(maintain_order=True).to_list()
    for rel in rels:
        path = root / rel
        meta = pq.read_metadata(path).metadata
        names = pq.read_schema(path).names  # the part's own column order, then any added column
        rows = after.filter(pl.col("part") == rel).drop("run", "geolevel", "part")
        rows = rows.select(names + [c for c in rows.columns if c not in names])
        write_parquet_with_metadata(path, rows.to_arrow(), meta)
    if hashed:
        rehash(root, *rels)


MEAS_Q = "measurements/queries.parquet"


def t_measurement_variance(r: Path) -> None:
    edit_parquet(r, MEAS_Q, lambda df: set_at(df, first_row(df, geolevel="county", query="total"), "variance", 1.0))


def t_measurement_sigma2(r: Path) -> None:
    edit_parquet(r, MEAS_Q, lambda df: df.with_columns(
        pl.when(pl.col("geolevel") == "tract").then(pl.lit("1/1")).otherwise(pl.col("sigma2")).alias("sigma2")))


def t_measurement_query_removed(r: Path) -> None:
    edit_measurements(r, lambda df: df.filter(~((pl.col("geolevel") == "state") & (pl.col("query") == "hhgq"))))


def t_measurement_query_removed_with_count(r: Path) -> None:
    """The rows of a query removed and its row count in queries.parquet set to 0 to match."""
    t_measurement_query_removed(r)
    edit_parquet(r, MEAS_Q, lambda df: set_at(df, first_row(df, run="persons", geolevel="state", query="hhgq"),
                                             "rows", 0))


def t_measurement_row_removed(r: Path) -> None:
    edit_measurements(r, lambda df: df.filter(pl.int_range(pl.len()) != first_row(df, geolevel="block", query="detailed")))


def t_measurement_units_row_removed(r: Path) -> None:
    """One drawn answer of the units run's block level left out and its row count lowered to
    match, as if it had been skipped under a published zero: its parent's units histogram
    (solved from the H1 tables) says it must be there."""
    edit_measurements(r, lambda df: df.filter(pl.int_range(pl.len()) != first_row(df, run="units", geolevel="block")))
    edit_parquet(r, MEAS_Q, lambda df: set_at(df, first_row(df, run="units", geolevel="block"), "rows",
                                             int(df.filter((pl.col("run") == "units") & (pl.col("geolevel") == "block"))
                                                 ["rows"][0]) - 1))


def t_measurement_rows_swapped(r: Path) -> None:
    """Two values of one block's detailed query exchanged by swapping their rows (same counts)."""
    def f(df):
        i = first_row(df, geolevel="block", query="detailed")
        return swap_rows(df, i, i + 1)
    edit_measurements(r, f)


def t_measurement_extra_query(r: Path) -> None:
    """Rows of a query the strategy does not measure at that level (units run, county, a copy)."""
    def f(df):
        extra = df.filter((pl.col("run") == "units") & (pl.col("geolevel") == "county")).with_columns(
            pl.lit("occupancy_copy").alias("query"))
        return pl.concat([df, extra])
    edit_measurements(r, f)


def t_measurement_extra_column(r: Path) -> None:
    """A column beyond the published measurement contract (e.g. a true answer)."""
    edit_measurements(r, lambda df: df.with_columns(pl.col("value").alias("true_value")))


def t_measurement_unit(r: Path) -> None:
    edit_measurements(r, lambda df: set_at(df, first_row(df, geolevel="block"), "unit", 999999))


def t_measurement_unit_geoid(r: Path) -> None:
    edit_parquet(r, "measurements/units.parquet",
                 lambda df: set_at(df, first_row(df, geolevel="block"), "geoid", "999999999999999"))


def t_measurement_label(r: Path) -> None:
    edit_parquet(r, "measurements/answers.parquet",
                 lambda df: set_at(df, first_row(df, run="persons", query="cenrace"), "answer_label", "Martian alone"))


def t_measurement_value_no_rehash(r: Path) -> None:
    edit_measurements(r, lambda df: set_at(df, 0, "value", int(df["value"][0]) + 7), hashed=False)


def t_deleted_csv_with_entry(r: Path) -> None:
    drop(r, "csv/block/P1.csv")


def t_deleted_measurements_with_entry(r: Path) -> None:
    drop(r, MEAS_Q)


def t_deleted_measurement_part_with_entry(r: Path) -> None:
    """A whole part gone with its manifest entry: the rows of queries.parquet say what is missing."""
    drop(r, "measurements/noisy/run=persons/geolevel=county/shard-00000.parquet")


def t_measurement_part_moved(r: Path) -> None:
    """A part filed under another level (its rows and metadata say county, its path tract)."""
    src = "measurements/noisy/run=units/geolevel=county/shard-00000.parquet"
    dst = "measurements/noisy/run=units/geolevel=tract/shard-00099.parquet"
    (r / dst).parent.mkdir(parents=True, exist_ok=True)
    (r / src).rename(r / dst)
    edit_manifest(r, lambda m: [f.update(path=dst) for f in m["files"] if f["path"] == src])


def t_measurement_part_metadata(r: Path) -> None:
    """A part whose metadata carries something beyond what was measured."""
    import pyarrow.parquet as pq
    from run_helpers import write_parquet_with_metadata

    meta = pq.read_metadata(r / MEAS).metadata
    write_parquet_with_metadata(r / MEAS, pq.read_table(r / MEAS), {**meta, b"secret": b"42"})
    rehash(r, MEAS)


def t_measurement_block_row_variance(r: Path) -> None:
    """One block row's variance changed, the part as written (a row group per query)."""
    edit_measurements(r, lambda df: set_at(df, first_row(df, geolevel="block", query="detailed"), "variance", 1.0),
                      as_written=True)


def t_measurement_block_row_sigma2(r: Path) -> None:
    """One block row's σ² text changed, the part as written: its row group has two texts."""
    edit_measurements(r, lambda df: set_at(df, first_row(df, geolevel="block", query="detailed"), "sigma2", "1/1"),
                      as_written=True)


def t_measurement_block_group_sigma2(r: Path) -> None:
    """Every σ² text of one block query changed, the part as written (one text per row group)."""
    edit_measurements(r, lambda df: df.with_columns(
        pl.when((pl.col("geolevel") == "block") & (pl.col("query") == "total")).then(pl.lit("1/1"))
        .otherwise(pl.col("sigma2")).alias("sigma2")), as_written=True)


def t_measurement_block_unit_as_written(r: Path) -> None:
    edit_measurements(r, lambda df: set_at(df, first_row(df, geolevel="block"), "unit", 999999), as_written=True)


def t_measurement_block_row_removed_as_written(r: Path) -> None:
    edit_measurements(r, lambda df: df.filter(pl.int_range(pl.len()) != first_row(df, geolevel="block", query="detailed")),
                      as_written=True)


def t_measurement_row_variance(r: Path) -> None:
    """One row's variance changed in a part (queries.parquet untouched)."""
    edit_measurements(r, lambda df: set_at(df, first_row(df, geolevel="tract", query="total"), "variance", 1.0))


def t_deleted_invariants_with_entry(r: Path) -> None:
    drop(r, "invariants/block_housing_units.parquet")


def t_deleted_index_with_entry(r: Path) -> None:
    drop(r, "index.html")


def t_deleted_microdata_with_entry(r: Path) -> None:
    drop(r, "microdata/persons.parquet")


def t_deleted_table_everywhere(r: Path) -> None:
    """P5 removed: its Parquet, its CSVs, their entries and its line in the manifest's tables."""
    drop(r, "tables/P5.parquet", *[f"csv/{lv}/P5.csv" for lv in
                                    ("nation", "state", "county", "tract", "block_group", "block")])
    edit_manifest(r, lambda m: m.update(tables=[t for t in m["tables"] if t["name"] != "P5"]))


def t_deleted_file(r: Path) -> None:
    (r / "tables" / "P4.parquet").unlink()


def t_checksum_edited(r: Path) -> None:
    def f(m):
        e = next(x for x in m["files"] if x["path"] == "tables/P3.parquet")
        e["sha256"] = "0" * 64
    edit_manifest(r, f)


def t_extra_file(r: Path) -> None:
    (r / "tables" / "P9.parquet").write_bytes(b"PAR1")


def t_extra_file_listed(r: Path) -> None:
    (r / "notes.txt").write_text("not part of a release")
    edit_manifest(r, lambda m: m["files"].append({"path": "notes.txt", "bytes": 21, "sha256": sha256_file(r / "notes.txt")}))


def t_invariant_file_value(r: Path) -> None:
    edit_parquet(r, "invariants/block_housing_units.parquet",
                 lambda df: set_at(df, 0, "housing_units", int(df["housing_units"][0]) + 1))


def t_invariant_state_total(r: Path) -> None:
    edit_manifest(r, lambda m: m["invariants"].update(state_totals={k: v + 1 for k, v in m["invariants"]["state_totals"].items()}))


def t_invariant_block_summary(r: Path) -> None:
    edit_manifest(r, lambda m: m["invariants"]["block_housing_units"].update(total=m["invariants"]["block_housing_units"]["total"] + 5))


def t_microdata_value(r: Path) -> None:
    def f(df):
        new = "02" if df["CENRACE"][0] != "02" else "03"
        return set_at(df, 0, "CENRACE", new)
    edit_parquet(r, "microdata/persons.parquet", f)


def t_microdata_row_dropped(r: Path) -> None:
    edit_parquet(r, "microdata/persons.parquet", lambda df: df.slice(1))


def t_truncated_parquet(r: Path) -> None:
    p = r / "tables" / "P2.parquet"
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


def t_truncated_parquet_rehashed(r: Path) -> None:
    p = r / "microdata" / "persons.parquet"
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    m = manifest(r)
    for f in m["files"]:
        if f["path"] == "microdata/persons.parquet":
            f["sha256"], f["bytes"] = sha256_file(p), p.stat().st_size
    save(r, m)


def t_persons_count(r: Path) -> None:
    edit_manifest(r, lambda m: m.update(persons=m["persons"] + 1))


def t_geolevel_units(r: Path) -> None:
    edit_manifest(r, lambda m: m["geolevels"][-1].update(units=m["geolevels"][-1]["units"] + 1))


def t_definitions_label(r: Path) -> None:
    p = r / "tables" / "definitions.yaml"
    text = p.read_text()
    assert "White alone" in text
    p.write_text(text.replace("White alone", "White only", 1))
    rehash(r, "tables/definitions.yaml")


def t_table_title(r: Path) -> None:
    edit_manifest(r, lambda m: m["tables"][0].update(title="SOMETHING ELSE"))


def t_index_edited(r: Path) -> None:
    p = r / "index.html"
    p.write_text(p.read_text().replace("How to cite", "How not to cite"))
    rehash(r, "index.html")


def t_config_hash(r: Path) -> None:
    edit_manifest(r, lambda m: m.update(config_hash="f" * 64))


def t_dataset_id(r: Path) -> None:
    edit_manifest(r, lambda m: m.update(dataset_id="another-dataset"))


def t_rows_entry(r: Path) -> None:
    def f(m):
        e = next(x for x in m["files"] if x["path"] == "tables/P1.parquet")
        e["rows"] += 71
    edit_manifest(r, f)


def t_invariant_file_outside(r: Path) -> None:
    """The declared invariant file moved out of the release, the manifest pointing at it."""
    shutil.move(r / "invariants" / "block_housing_units.parquet", r.parent / "bhu.parquet")
    edit_manifest(r, lambda m: m["invariants"]["block_housing_units"].update(file="../bhu.parquet"))


def t_csv_switched_off(r: Path) -> None:
    """The manifest claims a Parquet-only release but the CSVs are still there, unlisted."""
    def f(m):
        m["contents"]["csv"] = False
        m["files"] = [x for x in m["files"] if not x["path"].startswith("csv/")]
    edit_manifest(r, f)


#: (tampering, checks any of which must report it, text a reported failure must contain)
CASES: list[tuple[Callable[[Path], None], tuple[str, ...], str]] = [
    (t_epsilon_total, ("privacy",), "privacy.epsilon.cks2020"),
    (t_epsilon_run_pld, ("privacy",), "privacy.runs.persons.epsilon.pld"),
    (t_rho_total, ("privacy",), "privacy.rho"),
    (t_rho_level_query, ("privacy",), "rho_by_level_query.county.total"),
    (t_delta, ("privacy",), "epsilon"),
    (t_seed_changed, ("identity",), "index.html"),
    (t_seed_removed, ("identity",), "seed"),
    (t_randomness_claims_secure, ("identity",), "seed"),
    (t_release_id, ("identity",), "release_id"),
    (t_strategy_name, ("privacy",), "privacy.runs.units.strategy"),
    (t_strategy_file_edited, ("privacy",), "rho_by_level_query.nation.detailed"),
    (t_strategy_file_deleted, ("file_missing", "privacy"), "privacy/units.yaml"),
    (t_csv_value, ("table_rows",), "csv/tract/P1.csv"),
    (t_csv_rows_swapped, ("table_rows",), "csv/block/P3.csv"),
    (t_csv_rows_swapped_no_rehash, ("checksum",), "csv/block/P4.csv"),
    (t_parquet_name, ("table_rows",), "tables/P2.parquet: column name"),
    (t_parquet_rows_swapped, ("table_rows",), "tables/H1.parquet"),
    (t_moe, ("table_rows",), "tables/P1.parquet: column moe90"),
    (t_moe_nulled, ("table_rows",), "tables/H1.parquet: column moe90"),
    (t_table_count, ("hierarchy", "additivity"), "P5"),
    (t_measurement_variance, ("measurements",), "queries.parquet: column variance"),
    (t_measurement_sigma2, ("measurements",), "queries.parquet: column sigma2"),
    (t_measurement_query_removed, ("measurements",), "persons/state/hhgq"),
    (t_measurement_query_removed_with_count, ("measurements",), "persons/state/hhgq"),
    (t_measurement_row_removed, ("measurements",), "persons/block/detailed"),
    (t_measurement_rows_swapped, ("measurements",), "persons/block/detailed: (unit, answer) not strictly increasing"),
    (t_measurement_extra_query, ("measurements",), "units/county/occupancy_copy"),
    (t_measurement_extra_column, ("measurements",), "true_value"),
    (t_measurement_unit, ("measurements",), "unit outside"),
    (t_measurement_unit_geoid, ("measurements",), "units.parquet: column geoid"),
    (t_measurement_label, ("measurements",), "answers.parquet: column answer_label"),
    (t_measurement_value_no_rehash, ("checksum",), MEAS),
    (t_deleted_csv_with_entry, ("file_missing",), "csv/block/P1.csv"),
    (t_deleted_measurements_with_entry, ("file_missing",), MEAS_Q),
    (t_deleted_measurement_part_with_entry, ("measurements",), "persons/county/total says"),
    (t_measurement_part_moved, ("measurements",), "geolevel=tract/shard-00099.parquet: a measurement file of level 'county'"),
    (t_measurement_part_metadata, ("measurements",), "secret"),
    (t_measurement_row_variance, ("measurements",), "persons/tract/total: rows whose variance"),
    (t_measurement_block_row_variance, ("measurements",), "persons/block/detailed: rows whose variance"),
    (t_measurement_block_row_sigma2, ("measurements",), "persons/block/detailed: rows whose variance"),
    (t_measurement_block_group_sigma2, ("measurements",), "persons/block/total: rows whose variance"),
    (t_measurement_block_unit_as_written, ("measurements",), "unit outside"),
    (t_measurement_block_row_removed_as_written, ("measurements",), "persons/block/detailed"),
    (t_deleted_invariants_with_entry, ("file_missing",), "invariants/block_housing_units.parquet"),
    (t_deleted_index_with_entry, ("file_missing",), "index.html"),
    (t_deleted_microdata_with_entry, ("file_missing",), "microdata/persons.parquet"),
    (t_deleted_table_everywhere, ("tables",), "P5"),
    (t_deleted_file, ("file_missing",), "tables/P4.parquet"),
    (t_checksum_edited, ("checksum",), "tables/P3.parquet"),
    (t_extra_file, ("file_unlisted",), "tables/P9.parquet"),
    (t_extra_file_listed, ("file_unexpected",), "notes.txt"),
    (t_invariant_file_value, ("invariant",), "block housing units"),
    (t_invariant_state_total, ("invariant",), "state total"),
    (t_invariant_block_summary, ("invariant",), "invariants/block_housing_units.parquet"),
    (t_microdata_value, ("microdata",), "microdata"),
    (t_microdata_row_dropped, ("microdata",), "microdata"),
    (t_truncated_parquet, ("checksum",), "tables/P2.parquet"),
    (t_truncated_parquet_rehashed, ("microdata", "unreadable"), "microdata/persons.parquet"),
    (t_persons_count, ("microdata",), "manifest says"),
    (t_geolevel_units, ("table_layout",), "manifest says"),
    (t_definitions_label, ("table_layout",), "P1"),
    (t_table_title, ("tables",), "title"),
    (t_index_edited, ("identity",), "index.html"),
    (t_csv_switched_off, ("file_unlisted",), "csv/"),
    (t_config_hash, ("identity",), "index.html"),
    (t_dataset_id, ("identity",), "index.html"),
    (t_rows_entry, ("rows",), "tables/P1.parquet"),
    (t_invariant_file_outside, ("file_missing",), "invariants/block_housing_units.parquet"),
]


def test_untampered_release_verifies_clean(release: Path, tmp_path: Path) -> None:
    assert verify_release(release) == []
    copy = tmp_path / RID
    shutil.copytree(release, copy)
    assert verify_release(copy) == []


def test_release_copied_under_another_name_is_reported(release: Path, tmp_path: Path) -> None:
    copy = tmp_path / "T1-renamed"
    shutil.copytree(release, copy)
    fails = verify_release(copy)
    assert [f.check for f in fails] == ["identity"] and "T1-renamed" in fails[0].detail


@pytest.mark.parametrize("tamper, checks, needle", CASES, ids=[c[0].__name__[2:] for c in CASES])
def test_tampering_is_reported(release: Path, tmp_path: Path, tamper, checks, needle) -> None:
    copy = tmp_path / RID
    shutil.copytree(release, copy)
    tamper(copy)
    fails = verify_release(copy)
    assert fails, f"{tamper.__name__}: verify reported nothing"
    hits = [f for f in fails if f.check in checks and needle in str(f)]
    assert hits, f"{tamper.__name__}: no {checks} failure mentioning {needle!r}; got:\n" + "\n".join(map(str, fails[:15]))


def test_rows_are_compared_chunk_by_chunk(release: Path, tmp_path: Path, monkeypatch) -> None:
    """With 5 units per chunk the block level spans many chunks: a clean copy still verifies, and
    edits far into the block rows (a CSV count, then a margin of error in Parquet and CSV alike)
    are found in their chunk."""
    import pipeline.release.writer as writer

    monkeypatch.setattr(writer, "CHUNK_UNITS", 5)
    copy = tmp_path / RID
    shutil.copytree(release, copy)
    assert verify_release(copy) == []
    edit_csv(copy, "csv/block/P1.csv", lambda df: set_at(df, df.height - 2, "count", int(df["count"][df.height - 2]) + 1))
    fails = verify_release(copy)
    assert any(f.check == "table_rows" and "csv/block/P1.csv" in f.detail for f in fails), fails

    def half_moe(df):
        i = df.height - 70
        return set_at(df, i, "moe90", float(df["moe90"][i]) / 2)
    edit_parquet(copy, "tables/P3.parquet", half_moe)
    edit_csv(copy, "csv/block/P3.csv", half_moe)
    fails = verify_release(copy)
    assert any(f.check == "table_rows" and "tables/P3.parquet: column moe90" in f.detail and f.geolevel == "block"
               for f in fails), fails


def _tiny_run_file(path: Path, level: str, n_units: int, units: list[int]) -> Path:
    """A run measurement file (docs/contracts.md) of the persons ``total`` query (σ² = 1) for ``units``."""
    from run_helpers import write_run_measurements

    from pipeline.model.design import discrete_gaussian_variance

    var = discrete_gaussian_variance(1)
    rows = pl.DataFrame({"unit": pl.Series(units, dtype=pl.Int64), "query": ["total"] * len(units),
                         "answer": pl.Series([0] * len(units), dtype=pl.Int32),
                         "value": pl.Series([3] * len(units), dtype=pl.Int64),
                         "variance": pl.Series([var] * len(units), dtype=pl.Float64),
                         "sigma2": pl.Series(["1/1"] * len(units), dtype=pl.Utf8)})
    return write_run_measurements(path, rows, level, (0, n_units), [("total", "1/1", var)])


@pytest.mark.parametrize("nation_persons, state_units, ok", [
    (0, [], True),                                     # empty parent: every child answer skipped, no rows is right
    (5, [], False),                                    # a positive parent: the children's answers must be there
    (5, [0, 1], True),
    (0, [0, 1], True),                                 # a full measurement file draws them anyway
    (5, [0], False),                                   # one child's answer missing
])
def test_measurement_rows_follow_the_published_parent(tmp_path: Path, nation_persons, state_units, ok) -> None:
    """Which answers a run draws: all at the top; below, those whose parent answer is positive."""
    import numpy as np
    import scipy.sparse as sp

    from pipeline.model.design import design_from_rho
    from pipeline.model.spec import load_spec
    from pipeline.release.measurements import measurement_checks, subset_runs, write_measurements
    from pipeline.release.tables import LevelTables

    spec = load_spec("pl94")
    design = design_from_rho({"persons": {"nation": {"total": "1"}, "state": {"total": "1"}}})  # sigma2 = 1
    levels = [LevelTables("nation", np.array([""]), {}), LevelTables("state", np.array(["01", "02"]), {})]
    nation = sp.csr_matrix(np.eye(1, spec.n_cells, 0, dtype=np.int64) * nation_persons)
    (tmp_path / "n").mkdir()
    (tmp_path / "s").mkdir()
    files = {("persons", "nation"): [_tiny_run_file(tmp_path / "n" / "shard-00000.parquet", "nation", 1, [0])],
             ("persons", "state"): [_tiny_run_file(tmp_path / "s" / "shard-00000.parquet", "state", 2, state_units)]}
    write_measurements(tmp_path, ["nation", "state"], [lt.geoids for lt in levels], design, {"persons": spec}, files)
    fails = measurement_checks(tmp_path, design, {"persons": spec}, levels, {"nation": 0, "state": 2},
                               {"persons": {"nation": nation}})
    assert (fails == []) == ok, fails
    if not ok:
        assert all(f.check == "measurements" and "persons/state/total" in f.detail for f in fails)
    # only a run measured on fewer rows than every answer below the top needs the parents' supports
    assert subset_runs(tmp_path, {"persons": spec}, levels) == (set() if len(state_units) == 2 else {"persons"})


def test_measurement_rows_sorted_by_group_first(release: Path, tmp_path: Path, monkeypatch) -> None:
    """The verifier's path for a rows file in many short runs of groups (each row group sorted
    by group first, file order kept within a group) judges as the direct path does."""
    import pipeline.release.measurements as measurements

    monkeypatch.setattr(measurements, "_MAX_RUNS", 0)
    copy = tmp_path / RID
    shutil.copytree(release, copy)
    assert verify_release(copy) == []
    t_measurement_rows_swapped(copy)
    fails = verify_release(copy)
    assert any(f.check == "measurements" and "not strictly increasing" in f.detail for f in fails), fails


@pytest.mark.parametrize("seed", range(12))
def test_measurement_keys_compared_slice_by_slice_as_a_whole(seed: int) -> None:
    """The verifier compares a group's keys with the required ones slice by slice as they stream
    by (never holding the group): the counts of missing and unexpected keys and the first of
    them are those of comparing the whole sets, however the rows are cut into slices."""
    import numpy as np

    from pipeline.release.measurements import _GroupScan

    rng = np.random.default_rng(seed)
    n_units, n_answers = int(rng.integers(1, 60)), int(rng.integers(1, 5))
    required = np.flatnonzero(rng.random(n_units * n_answers) < 0.5)
    drawn = np.flatnonzero(rng.random(n_units * n_answers) < 0.5) if seed % 3 == 0 else required.copy()
    if seed % 3 == 1 and drawn.size:  # one key dropped, one added
        drawn = np.union1d(np.delete(drawn, rng.integers(drawn.size)), [int(rng.integers(n_units * n_answers))])

    def keys(u0: int, u1: int) -> np.ndarray:
        return required[(required >= u0 * n_answers) & (required < u1 * n_answers)]

    scan = _GroupScan(n_units, n_answers, keys)
    cuts = np.sort(rng.integers(0, drawn.size + 1, int(rng.integers(0, 6))))
    for piece in np.split(drawn, cuts):
        if piece.size:
            scan.add((piece // n_answers).astype(np.int32), (piece % n_answers).astype(np.int32))
    scan.finish(chunk_units=7)
    missing, extra = np.setdiff1d(required, drawn), np.setdiff1d(drawn, required)
    assert (scan.expected, scan.missing, scan.extra) == (required.size, missing.size, extra.size)
    first = min(missing[:1].tolist() + extra[:1].tolist(), default=None)
    assert scan.first_diff == first
    assert scan.rows == drawn.size and scan.broken is None


def _unit_row(df: pl.DataFrame, level: str, back: int) -> int:
    """The first row of the ``back``-th last unit of ``level`` in a table file."""
    rows = df.with_row_index("i").filter(pl.col("geolevel") == level)
    n_lines = rows["line"].n_unique()
    return int(rows["i"][rows.height - back * n_lines])


LAYOUT_CASES = [
    ("label", lambda df: set_at(df, _unit_row(df, "block", 2) + 1, "label", "Martian alone")),
    ("geoid", lambda df: set_at(df, _unit_row(df, "block", 3), "geoid", str(df["geoid"][_unit_row(df, "block", 4)]))),
    ("line", lambda df: set_at(df, _unit_row(df, "tract", 1) + 1, "line", -1)),
]


@pytest.mark.parametrize("column, tamper", LAYOUT_CASES, ids=[c[0] for c in LAYOUT_CASES])
@pytest.mark.parametrize("regenerate", [False, True])
def test_layout_tampering_is_found_by_the_data_check(release: Path, tmp_path: Path, column, tamper,
                                                     regenerate: bool) -> None:
    """The data-file check alone (the writer's self-check reads labels and GEOIDs as categories,
    ``regenerate=False``; ``dptab verify`` regenerates every row) finds a wrong label, a unit's
    GEOID or a line number deep in a table."""
    from pipeline.release.verify_data import verify_contents

    copy = tmp_path / RID
    shutil.copytree(release, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    assert verify_contents(copy, manifest, regenerate=regenerate) == []
    edit_parquet(copy, "tables/P3.parquet", tamper)
    fails = verify_contents(copy, manifest, regenerate=regenerate)
    assert any(f.table == "P3" and f.check in ("table_layout", "table_rows") for f in fails), fails


def test_content_checks_split_in_two_are_the_whole(release: Path, tmp_path: Path) -> None:
    """The release writer runs the measurement checks beside the other content checks: the two
    halves report exactly the failures of the whole, on a clean release and on one tampered in
    a table, a measurement part and the microdata."""
    from pipeline.release.verify_data import verify_contents

    copy = tmp_path / RID
    shutil.copytree(release, copy)
    m = manifest(copy)

    def halves() -> tuple[list, list]:
        whole = verify_contents(copy, m, regenerate=False)
        split = verify_contents(copy, m, regenerate=False, part="data") + \
            verify_contents(copy, m, regenerate=False, part="measurements")
        return sorted(map(repr, whole)), sorted(map(repr, split))

    assert halves() == ([], [])
    t_measurement_units_row_removed(copy)
    whole, split = halves()
    assert whole == split
    assert any("units/block" in f and "missing" in f for f in whole), whole
    t_table_count(copy)
    t_measurement_rows_swapped(copy)
    t_microdata_value(copy)
    whole, split = halves()
    assert whole == split
    assert {"measurements", "microdata"} <= {f.split("check='")[1].split("'")[0] for f in whole}, whole
    with pytest.raises(ValueError, match="part"):
        verify_contents(copy, m, part="tables")


def test_verify_checks_the_measurements_in_a_process_of_their_own(release: Path, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """``dptab verify --workers 2`` on a large release regenerates its explorer and checks its
    noisy measurements in child processes beside its other data files: the same failures as in
    one process, on a clean copy and on one tampered in a table and a measurement part."""
    from pipeline.release import streams
    from pipeline.release import writer as writer_mod

    copy = tmp_path / RID
    shutil.copytree(release, copy)
    started: list[tuple[str, str]] = []
    init = streams.Background.__init__

    def spy(self, what, fn, args, mode):
        init(self, what, fn, args, mode)
        started.append((what, mode))

    monkeypatch.setattr(streams.Background, "__init__", spy)
    assert verify_release(copy, workers=2) == []  # a small release: in one process
    assert started == [("explorer check", "inline")]
    started.clear()
    monkeypatch.setattr(writer_mod, "BACKGROUND_MIN_BLOCKS", 0)
    assert verify_release(copy, workers=2) == []
    assert started == [("explorer check", "process"), ("measurement check", "process")]
    t_table_count(copy)
    t_measurement_rows_swapped(copy)
    one, two = (sorted(map(repr, verify_release(copy, workers=w))) for w in (1, 2))
    assert one == two
    assert {"measurements", "additivity"} <= {f.split("check='")[1].split("'")[0] for f in two}, two


@pytest.mark.parametrize("ordered", [True, False])
def test_block_counts_from_the_scratch_file_equal_the_whole_matrix(ordered: bool) -> None:
    """The data check's block counts, kept batch by batch in a scratch file: any range of blocks
    (in any order) and each check line's per-block sums (made as the batches come) equal those of
    the whole csr (a block, even one cell of it, split between batches is added up), for batches
    in block order (the writer's) or shuffled; in block order a range reads only its batches."""
    import numpy as np
    import scipy.sparse as sp

    from pipeline.release.verify_data import BlockCounts

    rng = np.random.default_rng(7)
    n_blocks, n_cells = 60, 9
    dense = rng.integers(1, 4, (n_blocks, n_cells)) * (rng.random((n_blocks, n_cells)) < 0.4)
    dense[:, 0] += 2  # every block has persons; cell 0 holds at least 2
    unit, cell = np.nonzero(dense)
    count = dense[unit, cell].copy()
    cuts = np.sort(rng.choice(np.arange(1, unit.size), 7, replace=False))
    groups = [[unit[a:b], cell[a:b], count[a:b]] for a, b in zip([0, *cuts], [*cuts, unit.size])]
    # one cell split between two row groups: 1 person of the first group's last entry moved to
    # the start of the next (both stay sorted by (unit, cell))
    g, h = groups[2], groups[3]
    g[2] = g[2].copy()
    g[2][-1] -= 1
    if g[2][-1] == 0:
        g[2][-1] += 1
        dense[g[0][-1], g[1][-1]] += 1
    groups[3] = [np.r_[g[0][-1], h[0]], np.r_[g[1][-1], h[1]], np.r_[1, h[2]]]
    if not ordered:
        groups = [groups[k] for k in rng.permutation(len(groups))]
    v = (rng.random(n_cells) < 0.5).astype(np.int64)
    bc = BlockCounts(n_blocks, n_cells, {"v": v, "all": np.ones(n_cells, np.int64)})
    for u, c, n in groups:
        bc.add(u, c, n)
    assert bc.ordered == ordered
    whole = sp.csr_matrix(dense)
    np.testing.assert_array_equal(bc.lines["v"], whole @ v)
    np.testing.assert_array_equal(bc.lines["all"], dense.sum(axis=1))
    read = []
    real_read = bc._read
    bc._read = lambda a, b: read.append(real_read(a, b).size) or real_read(a, b)
    for s0, e0 in [(0, 1), (1, 5), (5, 17), (17, 18), (20, 20), (20, 30), (30, 59), (59, 60), (0, n_blocks), (10, 12)]:
        got = bc.rows(s0, e0)
        assert got.shape == (e0 - s0, n_cells) and (got != whole[s0:e0]).nnz == 0
    if ordered:  # each range read only the batches meeting it (a block split between two: both)
        assert read[0] < unit.size / 2 and read[-2] == unit.size + 1 and read[-1] < unit.size / 2
    else:  # the whole matrix, read once
        assert read == [unit.size + 1]
    bc.close()
    assert bc.file.closed


@pytest.mark.parametrize("seed", range(4))
def test_required_keys_per_range_equal_those_of_the_whole_parent_level(seed: int) -> None:
    """The answers a level must have drawn, made per range of units from its parents' rows
    alone, are those of the whole parent level's positive answers (the query's cell-to-answer
    sums) for any range of units, including ranges cutting a parent's children."""
    import numpy as np
    import scipy.sparse as sp

    from pipeline.model.spec import load_spec
    from pipeline.release.measurements import _Expected
    from pipeline.release.tables import LevelTables
    from pipeline.release.tree import GeoTree

    rng = np.random.default_rng(seed)
    spec = load_spec("pl94")
    n_cells = spec.n_cells
    counties = np.array([f"{c:05d}" for c in np.sort(rng.choice(99999, 5, replace=False))])
    tracts = np.array(sorted(c + f"{t:06d}" for c in counties for t in rng.choice(999999, int(rng.integers(1, 5)),
                                                                                 replace=False)))
    dense = (rng.random((counties.size, n_cells)) < 0.05) * rng.integers(1, 9, (counties.size, n_cells))
    parent = sp.csr_matrix(dense.astype(np.int8))
    by_level = {"county": LevelTables("county", counties, {}), "tract": LevelTables("tract", tracts, {})}
    exp = _Expected({"persons": spec}, ["county", "tract"], by_level, GeoTree.of({"county": 5, "tract": 11}),
                    {"persons": {"county": parent}})
    for query in list(spec.query_defs)[:4]:
        q = spec.query(query)
        a = np.zeros((n_cells, q.n_answers), np.int64)
        a[np.arange(n_cells), q.cell_to_answer] = 1
        positive = (dense @ a) > 0  # (counties, answers), the whole parent level
        ppos = np.searchsorted(counties, np.array([t[:5] for t in tracts]))
        want_all = np.flatnonzero(positive[ppos].reshape(-1))
        keys = exp.keys_of("persons", "tract", query)
        for u0, u1 in [(0, tracts.size), (0, 1), (1, 3), (2, tracts.size), (tracts.size, tracts.size)]:
            want = want_all[(want_all >= u0 * q.n_answers) & (want_all < u1 * q.n_answers)]
            np.testing.assert_array_equal(keys(u0, u1), want)


def test_units_lookup_written_and_checked_a_row_group_at_a_time(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``measurements/units.parquet`` written a row group at a time has the bytes of
    ``pq.write_table`` on the whole table (row groups of 4 rows here, cut inside levels), and
    the check compares it a row group at a time, naming the file's own row of a difference."""
    import numpy as np
    import pyarrow.parquet as pq

    import pipeline.files as files_mod
    import pipeline.release.measurements as mm

    monkeypatch.setattr(mm, "ROW_GROUP_ROWS", 4)
    monkeypatch.setattr(files_mod, "ROW_GROUP_ROWS", 4)
    levels = ["nation", "state", "county"]
    geoids = [np.array([""]), np.array(["01", "02", "05"]), np.array(["01001", "01003", "02001", "05001", "05007"])]
    whole = mm.units_rows(levels, geoids, 0, 9)
    assert whole.num_rows == 9 and whole.column("unit").to_pylist() == [0, 0, 1, 2, 0, 1, 2, 3, 4]
    pq.write_table(whole, tmp_path / "whole.parquet", compression="zstd", row_group_size=4)
    mm._write_units(tmp_path / "units.parquet", levels, geoids)
    assert (tmp_path / "units.parquet").read_bytes() == (tmp_path / "whole.parquet").read_bytes()
    assert mm._units_problem(tmp_path / "units.parquet", levels, geoids) is None
    bad = [g.copy() for g in geoids]
    bad[2][3] = "05003"  # the file's row 7, in its second row group
    problem = mm._units_problem(tmp_path / "units.parquet", levels, bad)
    assert problem is not None and "of rows 4..7; first at row 7" in problem and "05001" in problem
    assert "9 rows, expected 8" in mm._units_problem(tmp_path / "units.parquet", levels, [g[:-1] if k == 2 else g
                                                                                          for k, g in enumerate(geoids)])
    mm._write_units(tmp_path / "empty.parquet", [], [])
    assert pq.read_table(tmp_path / "empty.parquet").num_rows == 0


def test_block_ranges_change_no_finding(release: Path, tmp_path: Path, monkeypatch) -> None:
    """The data check goes through the blocks' GEOIDs a range at a time (the invariant file
    against the tables' blocks; each block's ancestors for the check lines and the parents'
    supports): with ranges of 7 blocks a clean copy still verifies, and a late block's housing
    units edited in the invariant file, or the invariant file's blocks out of order, are reported
    as with one range."""
    import pipeline.release.tree as geotree

    def found(root: Path) -> list[str]:
        return sorted(str(f) for f in verify_release(root))

    copy = tmp_path / RID
    shutil.copytree(release, copy)
    whole = found(copy)
    monkeypatch.setattr(geotree, "BLOCK_RANGE", 7)
    assert found(copy) == whole == []

    def late(df: pl.DataFrame) -> pl.DataFrame:
        i = df.height - 3
        return set_at(df, i, "housing_units", int(df["housing_units"][i]) + 1)
    edit_parquet(copy, "invariants/block_housing_units.parquet", late)
    ranged = found(copy)
    assert any("invariant" in f and "housing units" in f for f in ranged), ranged
    monkeypatch.setattr(geotree, "BLOCK_RANGE", 1 << 16)
    assert found(copy) == ranged
    edit_parquet(copy, "invariants/block_housing_units.parquet", lambda df: swap_rows(df, 1, df.height - 2))
    monkeypatch.setattr(geotree, "BLOCK_RANGE", 7)
    assert found(copy) == ranged  # the file's blocks are sorted before they are compared


@pytest.mark.parametrize("bad", ["4400102000A1000", "440010200010", "+44001020001000", "same-as-next"])
def test_block_geoids_held_as_codes_fall_back_to_strings(release: Path, tmp_path: Path, bad: str) -> None:
    """The data check keeps a digit-prefix release's blocks as their integer codes
    (``CodedGeoids``, the same GEOIDs as the tables'); a block GEOID that is not a 15-digit
    GEOID, or blocks out of order, keep the level's strings instead, and the check reports it
    rather than stopping."""
    from pipeline.release.tables import level_runs
    from pipeline.release.tree import CodedGeoids, read_tree
    from pipeline.release.verify_data import _first_geoids, verify_contents

    copy = tmp_path / RID
    shutil.copytree(release, copy)
    m = manifest(copy)
    ref = m["tables"][0]["name"]
    path = copy / "tables" / f"{ref}.parquet"

    def firsts() -> dict:
        runs = level_runs(path)
        n_lines = pl.read_parquet(path).filter(pl.col("geolevel") == "block")["line"].n_unique()
        return _first_geoids(path, runs, n_lines, read_tree(copy, m))

    def published_blocks() -> np.ndarray:
        df = pl.read_parquet(path, columns=["geoid", "geolevel", "line"]).filter(pl.col("geolevel") == "block")
        return df["geoid"].gather_every(df["line"].n_unique()).cast(pl.Utf8).to_numpy().astype(str)

    clean = firsts()["block"]
    assert isinstance(clean, CodedGeoids)
    assert np.array_equal(np.asarray(clean), published_blocks()) and clean[len(clean) - 1] == published_blocks()[-1]
    assert clean[3:5].tolist() == published_blocks()[3:5].tolist()

    def tamper(df: pl.DataFrame) -> pl.DataFrame:
        rows = df.with_row_index("i").filter(pl.col("geolevel") == "block")
        n_lines = rows["line"].n_unique()
        first = int(rows["i"][rows.height - 4 * n_lines])  # the 4th last block's rows
        value = str(rows["geoid"][rows.height - 3 * n_lines]) if bad == "same-as-next" else bad
        return df.with_columns(pl.when((pl.int_range(pl.len()) >= first) & (pl.int_range(pl.len()) < first + n_lines))
                               .then(pl.lit(value)).otherwise(pl.col("geoid")).cast(df["geoid"].dtype).alias("geoid"))
    edit_parquet(copy, f"tables/{ref}.parquet", tamper)
    got = firsts()["block"]
    assert isinstance(got, np.ndarray) and got.tolist() == published_blocks().tolist()
    fails = verify_contents(copy, m, regenerate=False)
    assert fails and not any("stopped" in (f.detail or "") for f in fails), fails
    assert verify_contents(copy, m)  # (regenerating: the design's margins need the blocks' parents)
