"""Privacy-protected microdata: one row per person, expanded from the published block histograms.

The layout is the Census Bureau's privacy-protected microdata file (PPMF) for P.L. 94-171
(ARCHITECTURE §8; ``notes/census2020-das.md`` §5.6), so tools built for the Census files read it:

=============  ======  =====================================================================
column         type    meaning
=============  ======  =====================================================================
TABBLKST       Utf8    state FIPS, 2 digits
TABBLKCOU      Utf8    county FIPS, 3 digits
TABTRACTCE     Utf8    census tract, 6 digits
TABBLKGRPCE    Utf8    block group, 1 digit (the first digit of the block)
TABBLK         Utf8    block, 4 digits
EPNUM          Int64   person number, 1..N in file order
RTYPE          Utf8    "3" person in a housing unit, "5" person in group quarters
GQTYPE_PL      Int64   0 household, 1..7 major group-quarters type (the ``hhgq`` code)
VOTING_AGE     Int64   1 under 18, 2 18 and over
CENHISP        Int64   1 not Hispanic or Latino, 2 Hispanic or Latino
CENRACE        Utf8    "01".."63", Census race combination code
=============  ======  =====================================================================

Rows are sorted by geography (the 15-digit block GEOID) then EPNUM. The file is a pure
function of the block histogram: the persons of a block are its cells, each repeated by its
count (``np.repeat``), in cell order; nothing else about a person is published.

The PPMF layout needs the PL94 attributes and 15-digit block GEOIDs (:func:`is_ppmf`). Any other
spec or geography gets the generic layout: ``geoid`` (Utf8, the bottom unit's code), ``EPNUM``,
then one Int64 column per spec attribute, named like it, holding its codes — rows in the
geography's unit order, then EPNUM.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import polars as pl

from pipeline.errors import DptabError
from pipeline.model.spec import HistogramSpec
from pipeline.release.tables import HistogramLike, as_sparse_arrays
from pipeline.release.tree import find_units

if TYPE_CHECKING:
    import scipy.sparse as sp

    from pipeline.release.tree import CodedGeoids

PPMF_COLUMNS = ("TABBLKST", "TABBLKCOU", "TABTRACTCE", "TABBLKGRPCE", "TABBLK", "EPNUM", "RTYPE",
                "GQTYPE_PL", "VOTING_AGE", "CENHISP", "CENRACE")


#: the spec attributes the PPMF layout carries (GQTYPE_PL, VOTING_AGE, CENHISP, CENRACE)
PPMF_ATTRIBUTES = ("hhgq", "voting_age", "hispanic", "cenrace")


class MicrodataError(DptabError, ValueError):
    """The block histogram or the block GEOIDs do not fit the PPMF layout."""


def is_ppmf(spec: HistogramSpec, lookup: bool = False) -> bool:
    """Does a release of ``spec`` carry the Census PPMF layout (the PL94 attributes, US GEOIDs)?"""
    return not lookup and tuple(a.name for a in spec.attributes) == PPMF_ATTRIBUTES


def _entries(hist: "HistogramLike | np.ndarray | sp.csr_matrix", n_units_given: int, spec: HistogramSpec,
             what: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The published histogram's ``(unit, cell, count)`` entries, checked against the units given
    and the spec, sorted by (unit, cell) so persons come out in geography order."""
    n_units, n_cells, unit, cell, count = as_sparse_arrays(hist)
    if n_units != n_units_given:
        raise MicrodataError(f"histogram has {n_units} {what} but {n_units_given} codes were given")
    if n_cells != spec.n_cells:
        raise MicrodataError(f"histogram has {n_cells} cells, spec {spec.name!r} has {spec.n_cells}")
    if count.size and (count.min() < 0):
        raise MicrodataError("a published histogram cannot have negative counts")
    order = np.lexsort((cell, unit))
    return unit[order], cell[order], count[order]


def generic_microdata(unit_codes: np.ndarray, hist: "HistogramLike | np.ndarray | sp.csr_matrix", spec: HistogramSpec,
                      first_epnum: int = 1) -> pl.DataFrame:
    """One row per person in the generic layout (module doc): ``geoid``, ``EPNUM`` (from
    ``first_epnum``), one column per spec attribute; ``unit_codes``: the bottom units' codes in
    unit order ``(n_units,)``."""
    unit, cell, count = _entries(hist, len(unit_codes), spec, "units")
    codes = spec.cell_codes(cell)
    rep = np.repeat(np.arange(unit.size), count)
    cols: dict[str, pl.Series] = {
        "geoid": pl.Series("geoid", np.asarray(unit_codes).astype(str, copy=False)[unit[rep]] if rep.size else [], dtype=pl.Utf8),
        "EPNUM": pl.Series("EPNUM", np.arange(first_epnum, first_epnum + rep.size, dtype=np.int64)),
    }
    for a in spec.attributes:
        cols[a.name] = pl.Series(a.name, codes[a.name][rep] if rep.size else [], dtype=pl.Int64)
    return pl.DataFrame(cols)


def _counted(persons: pl.DataFrame, keys: list[str], attributes: list[str]) -> pl.DataFrame:
    """The rows counted by (unit key columns, attribute codes): the attributes, ``_n`` and
    ``_key`` (the key columns, strings or categories, concatenated as text), in order of first
    appearance. A block's persons share a few cells, so what is left for the per-row work below
    (the key strings, lookups, cell indices) is ~10x smaller than the persons."""
    return persons.group_by([*keys, *attributes], maintain_order=True).agg(pl.len().alias("_n")).with_columns(
        pl.concat_str([pl.col(c).cast(pl.Utf8) for c in keys]).alias("_key"))


def _tabulated(unit: np.ndarray, cells: np.ndarray, n: np.ndarray, n_cells: int
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(unit, cell, count)`` int64 sorted by (unit, cell), the counts ``n`` of equal pairs added."""
    flat = unit.astype(np.int64) * n_cells + cells
    uniq, inv = np.unique(flat, return_inverse=True)
    cnt = np.bincount(inv.reshape(-1), weights=n, minlength=uniq.size).astype(np.int64)
    return uniq // n_cells, uniq % n_cells, cnt


def generic_histogram(persons: pl.DataFrame, unit_codes: "np.ndarray | CodedGeoids",
                      spec: HistogramSpec) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Re-tabulate generic-layout rows into ``(unit, cell, count)`` (``unit`` indexes ``unit_codes``)."""
    missing = [a.name for a in spec.attributes if a.name not in persons.columns]
    if missing:
        raise MicrodataError(f"microdata lacks the spec's attribute columns {missing}")
    rows = _counted(persons, ["geoid"], [a.name for a in spec.attributes])
    keys = rows["_key"].to_numpy().astype(str)
    unit, found = find_units(unit_codes, keys, in_order=False)
    if not found.all():
        raise MicrodataError(f"microdata rows in units that are not published, e.g. {keys[~found][:3].tolist()}")
    for a in spec.attributes:
        bad_codes = ~np.isin(rows[a.name].to_numpy(), np.asarray(a.codes))
        if bad_codes.any():
            raise MicrodataError(f"microdata column {a.name}: codes outside the spec, e.g. "
                                 f"{rows[a.name].to_numpy()[bad_codes][:3].tolist()}")
    cells = spec.cell_index(**{a.name: rows[a.name].to_numpy() for a in spec.attributes})
    return _tabulated(unit, cells, rows["_n"].to_numpy(), spec.n_cells)


def block_geography_frame(block_geoids: np.ndarray) -> pl.DataFrame:
    """The five PPMF geography columns of each block GEOID (15 digits), ``(n_blocks,)`` rows."""
    g = pl.Series("geoid", np.asarray(block_geoids).astype(str, copy=False), dtype=pl.Utf8)
    bad = g.str.len_chars() != 15
    if bad.any():
        raise MicrodataError(f"block GEOIDs must have 15 digits; e.g. {g.filter(bad).head(3).to_list()}")
    return pl.DataFrame({
        "TABBLKST": g.str.slice(0, 2), "TABBLKCOU": g.str.slice(2, 3), "TABTRACTCE": g.str.slice(5, 6),
        "TABBLKGRPCE": g.str.slice(11, 1), "TABBLK": g.str.slice(11, 4),
    })


def microdata_from_blocks(block_geoids: np.ndarray, hist: "HistogramLike | np.ndarray | sp.csr_matrix",
                          spec: HistogramSpec, lookup: bool = False, first_epnum: int = 1) -> pl.DataFrame:
    """Expand a block-level persons histogram into one PPMF row per person.

    ``block_geoids``: sorted 15-digit block GEOIDs ``(n_blocks,)``; ``hist``: the published
    integer block histogram of ``spec`` (a SparseHistogram, dense ``(n_blocks, n_cells)`` or csr).
    Returns a DataFrame with :data:`PPMF_COLUMNS`, ``hist.count.sum()`` rows, EPNUM counting from
    ``first_epnum`` (a chunk of the blocks continues the numbering of the chunks before it). A
    spec without the PL94 attributes gets the generic layout (:func:`generic_microdata`).
    """
    if not is_ppmf(spec, lookup):
        return generic_microdata(block_geoids, hist, spec, first_epnum)
    unit, cell, count = _entries(hist, len(block_geoids), spec, "blocks")
    # one row per non-zero histogram entry, then a single gather repeats each by its count
    codes = spec.cell_codes(cell)
    geo = block_geography_frame(block_geoids)
    race_text = pl.Series([f"{c:02d}" for c in spec.attribute("cenrace").codes], dtype=pl.Utf8)
    entries = geo[pl.Series(unit, dtype=pl.UInt32)].with_columns(
        pl.Series("RTYPE", ["3", "5"], dtype=pl.Utf8)[pl.Series((codes["hhgq"] > 0).astype(np.uint32))],
        pl.Series("GQTYPE_PL", codes["hhgq"], dtype=pl.Int64),
        pl.Series("VOTING_AGE", codes["voting_age"] + 1, dtype=pl.Int64),
        pl.Series("CENHISP", codes["hispanic"] + 1, dtype=pl.Int64),
        race_text[pl.Series(spec.attribute("cenrace").index_of(codes["cenrace"]).astype(np.uint32))].alias("CENRACE"),
    )
    n = int(count.sum())
    persons = entries[pl.Series(np.repeat(np.arange(unit.size, dtype=np.uint32), count))]
    return persons.with_columns(pl.Series("EPNUM", np.arange(first_epnum, first_epnum + n, dtype=np.int64))
                                ).select(PPMF_COLUMNS)


def histogram_from_microdata(persons: pl.DataFrame, block_geoids: "np.ndarray | CodedGeoids",
                             spec: HistogramSpec) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Re-tabulate PPMF rows into a block histogram: ``(unit, cell, count)`` int64, sorted.

    ``unit`` indexes ``block_geoids`` (sorted); a row whose block is not listed raises
    :class:`MicrodataError`. Used by ``dptab verify`` and the round-trip tests. Rows of the
    generic layout (a ``geoid`` column) are re-tabulated by :func:`generic_histogram`.
    """
    if "geoid" in persons.columns:
        return generic_histogram(persons, block_geoids, spec)
    # counted by the geography columns themselves: the block key is built once per group
    rows = _counted(persons, ["TABBLKST", "TABBLKCOU", "TABTRACTCE", "TABBLK"],
                    ["GQTYPE_PL", "VOTING_AGE", "CENHISP", "CENRACE"])
    keys = rows["_key"].to_numpy().astype(str)
    unit_c, found = find_units(block_geoids, keys)
    if not found.all():
        raise MicrodataError(f"microdata rows in blocks that are not published, e.g. {keys[~found][:3].tolist()}")
    cells = spec.cell_index(
        hhgq=rows["GQTYPE_PL"].to_numpy(), voting_age=rows["VOTING_AGE"].to_numpy() - 1,
        hispanic=rows["CENHISP"].to_numpy() - 1, cenrace=rows["CENRACE"].cast(pl.Utf8).cast(pl.Int64).to_numpy(),
    )
    return _tabulated(unit_c, cells, rows["_n"].to_numpy(), spec.n_cells)
