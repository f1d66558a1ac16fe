"""No behaviour change: a seeded run on a fixed synthetic input gives the same release contents.

``tests/golden/seeded_20k.json`` holds content digests of every data file of a release made by
commit ab543c8 (before the wings were rebuilt) from ``make_inputs(persons=20000, seed=11)`` with
``randomness: seeded, seed: 5`` and two workers. A change that alters any published count,
margin of error, microdata row or noisy measurement fails here. Parquet files are compared by
their contents (rows in file order, as CSV text), so a writer-library upgrade that changes only
the bytes of the file framing does not fail the test; CSV files are compared byte for byte.

Regenerate (only for an intended change of results, saying why in the commit):
``python tests/test_golden_release.py OUT_JSON``.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import polars as pl

GOLDEN = Path(__file__).parent / "golden" / "seeded_20k.json"


def measurements_long(release: Path) -> pl.DataFrame:
    """The release's noisy measurements joined with their lookups into the one long table the
    golden digest was taken of (``run, geolevel, geoid, query, answer, answer_label, value,
    variance, sigma2`` per drawn answer, in draw order): the layout of
    ``pipeline.release.measurements`` must carry exactly the same information."""
    from run_helpers import read_noisy

    m = release / "measurements"
    return (read_noisy(release).drop("variance", "sigma2", "part")
            .join(pl.read_parquet(m / "units.parquet"), on=["geolevel", "unit"], how="left", maintain_order="left")
            .join(pl.read_parquet(m / "answers.parquet"), on=["run", "query", "answer"], how="left",
                  maintain_order="left")
            .join(pl.read_parquet(m / "queries.parquet").select("run", "geolevel", "query", "variance", "sigma2"),
                  on=["run", "geolevel", "query"], how="left", maintain_order="left")
            .select("run", "geolevel", "geoid", "query", "answer", "answer_label", "value", "variance", "sigma2"))


def release_digest(release: Path) -> dict[str, str]:
    """``{relative path: sha256}`` of every data file of a release (not manifest, HTML or the
    codebook — README.md, codebook.json — which carry dates, versions and paths — nor the area
    explorer's ``explorer/``, the page's copy of the tables, which tests/test_release_explorer.py
    compares with the tables). The measurement files count as one: their long view
    (:func:`measurements_long`) under ``measurements/noisy_measurements.parquet``, the name of
    the one file they were when the digests were taken (now a partitioned dataset, same rows)."""
    out = {}
    for p in sorted(release.rglob("*")):
        rel = p.relative_to(release)
        if (not p.is_file() or p.name in ("manifest.json", "README.md", "codebook.json") or p.suffix == ".html"
                or rel.parts[0] == "explorer" or rel.parts[0] == "measurements"):
            continue
        if p.suffix == ".parquet":
            data = pl.read_parquet(p).write_csv().encode()
        else:
            data = p.read_bytes()
        out[p.relative_to(release).as_posix()] = hashlib.sha256(data).hexdigest()
    if (release / "measurements").is_dir():
        data = measurements_long(release).write_csv().encode()
        out["measurements/noisy_measurements.parquet"] = hashlib.sha256(data).hexdigest()
    return out


def _make_release(tmp: Path) -> Path:
    from run_helpers import make_inputs, write_config

    from pipeline.job.stages import run

    inputs = make_inputs(tmp, persons=20000, seed=11)
    # the 2020 TopDown estimator, as when the digests were taken (the default is now `full`)
    cfg = write_config(tmp, inputs, release_id="G1", execution={"workers": 2}, postprocess={"estimator": "topdown"})
    return Path(run(cfg, progress=False)["release_path"])


def test_seeded_release_is_unchanged(tmp_path: Path) -> None:
    want = json.loads(GOLDEN.read_text())
    got = release_digest(_make_release(tmp_path))
    assert sorted(got) == sorted(want), "the release holds other files than before"
    changed = [k for k in want if got[k] != want[k]]
    assert not changed, f"contents changed: {changed}"


if __name__ == "__main__":
    print(json.dumps(release_digest(Path(sys.argv[1])), indent=1, sort_keys=True))
