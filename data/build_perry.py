"""Build data/perry_al_ppmf_persons.parquet and data/perry_al_units.parquet from the CSV in
../shared/data/real/ (see data/README.md). Run from the repository root:

    .venv/bin/python data/build_perry.py [PATH/TO/ppmf_20210428_eps12-2_P_01105_perry_al.csv]
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # run as a script from a checkout, installed or not

import polars as pl  # noqa: E402

from pipeline.inputs.readers import read_persons  # noqa: E402
from pipeline.inputs.synth import units_from_persons  # noqa: E402

DEFAULT_CSV = HERE.parent.parent / "shared" / "data" / "real" / "ppmf_20210428_eps12-2_P_01105_perry_al.csv"


def main(csv: Path) -> None:
    # keep the PPMF columns and codes; geography components stay text (leading zeros)
    text = {c: pl.Utf8 for c in ("VINTAGE", "TABBLKST", "TABBLKCOU", "TABTRACTCE", "TABBLKGRPCE", "TABBLK")}
    small = {c: pl.Int8 for c in ("RTYPE", "GQTYPE_PL", "VOTING_AGE", "CENHISP", "CENRACE")}
    df = pl.read_csv(csv, schema_overrides={**text, **small})
    persons = HERE / "perry_al_ppmf_persons.parquet"
    df.write_parquet(persons, compression="zstd", statistics=True)
    units = units_from_persons(read_persons(persons))
    units.write_parquet(HERE / "perry_al_units.parquet", compression="zstd")
    print(f"{persons.name}: {df.height} persons; perry_al_units.parquet: {units.height} units")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_CSV)
