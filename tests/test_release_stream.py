"""Publishing streams (issue 16): the writer, the verifier and the explorer hold a chunk of a
level's units at a time, and the chunk size never changes a byte of the release."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from test_release import PRIVACY
from test_tables_cases import make_case

import pipeline.release.html as html_mod
import pipeline.release.tables as tables_mod
import pipeline.release.writer as writer_mod
from pipeline.release.manifest import ReleaseMetadata
from pipeline.release.verify import verify_release
from pipeline.release.writer import write_release


def _digests(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _write(tmp: Path, case) -> Path:
    meta = ReleaseMetadata("S1", "synthetic-test", "0.1.0", "ab" * 32, git_commit="0123abc", seed=7,
                           created="2026-01-01T00:00:00+00:00")
    return write_release(tmp / "releases", meta, case.geography, case.persons, case.units, case.invariants, PRIVACY)


def test_chunk_size_changes_no_byte(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Row groups cut every 7 units and every 100 rows (as the format cuts them every 50,000 units
    and 1 Mi rows): streaming 3 units at a time (reading the explorer's areas 2 at a time) writes
    exactly the files one big chunk per level writes, the writer tabulates and expands at most 3
    units at a time, and the verifier checks at most 3 at a time and finds the release clean."""
    case = make_case(1, n_blocks=30)
    monkeypatch.setattr(writer_mod, "CHUNK_UNITS", 7)
    monkeypatch.setattr(writer_mod, "ROW_GROUP_ROWS", 100)
    big = _digests(_write(tmp_path / "big", case))

    seen: dict[str, int] = {"tabulate": 0, "microdata": 0, "checks": 0, "take": 0}
    tabulate, micro = tables_mod.tabulate_units, writer_mod.microdata_from_blocks
    take, add = tables_mod.RowStream.take, writer_mod.ReleaseChecks.add

    def spy_tabulate(ts, level, geoids, *a, **k):
        seen["tabulate"] = max(seen["tabulate"], len(geoids))
        return tabulate(ts, level, geoids, *a, **k)

    def spy_micro(geoids, *a, **k):
        seen["microdata"] = max(seen["microdata"], len(geoids))
        return micro(geoids, *a, **k)

    def spy_take(self, n):
        seen["take"] = max(seen["take"], n)
        return take(self, n)

    def spy_add(self, lt):
        seen["checks"] = max(seen["checks"], len(lt.geoids))
        return add(self, lt)

    monkeypatch.setattr(writer_mod, "STREAM_UNITS", 3)
    monkeypatch.setattr(html_mod, "READ_UNITS", 2)
    monkeypatch.setattr(writer_mod, "tabulate_units", spy_tabulate)
    monkeypatch.setattr(writer_mod, "microdata_from_blocks", spy_micro)
    monkeypatch.setattr(tables_mod.RowStream, "take", spy_take)
    monkeypatch.setattr(writer_mod.ReleaseChecks, "add", spy_add)
    path = _write(tmp_path / "small", case)
    assert _digests(path) == big
    assert seen["tabulate"] == 3 and seen["microdata"] == 3 and seen["checks"] == 3
    # the longest read: 3 units x the longest table (73 lines); never a level's rows
    assert 0 < seen["take"] <= 3 * 73
    # the cuts are there: a row group per 7 units of each level, split at 100 rows
    p1 = pq.ParquetFile(path / "tables" / "P1.parquet").metadata
    assert p1.num_row_groups > 7 and max(p1.row_group(i).num_rows for i in range(p1.num_row_groups)) <= 100
    assert verify_release(path) == []
    assert seen["checks"] == 3
