"""Geographic hierarchy as flat arrays: per level, sorted unit GEOIDs, parent index, CSR children.

A block GEOID is 15 digits (state 2 + county 3 + tract 6 + block 4, whose first digit is the
block group); the unit of a level is identified by the GEOID prefix of that level's length
(``schemas/geolevels.yaml``). Because GEOIDs sort by prefix, the children of every unit are a
contiguous range of the next level down, so the whole hierarchy is a handful of int64 arrays:
no per-unit Python objects, about 25 bytes per block (185 MiB for 7.7 M blocks) plus the
GEOID strings.

Internally each unit is also held as its GEOID read as an integer (``codes``, int64): numeric
order equals string order for fixed-length digit strings, and integer searches are fast.
The ``geoids`` strings (numpy ``<U{digits}``) are materialised on first use only — at national
scale (8.2 M blocks) they are the largest array (60 bytes per block).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import polars as pl

from pipeline.errors import InputError
from pipeline.model.schemas import SCHEMAS_DIR, load_yaml, schema_path

GEOLEVELS_PATH = SCHEMAS_DIR / "geolevels.yaml"


class GeographyError(InputError):
    """Block GEOIDs or a level definition are malformed (message names the problem and examples)."""


@dataclass(frozen=True)
class GeoLevel:
    """A level definition: its ``name`` and the GEOID prefix length ``digits`` that identifies a
    unit, or ``digits = LOOKUP`` (-1) for a level whose codes come from a lookup file."""

    name: str
    digits: int


#: ``digits`` of a level whose units are named by a lookup file (any code strings), not by prefixes
LOOKUP = -1


def lookup_levels(names: Sequence[str]) -> tuple[GeoLevel, ...]:
    """The levels of a lookup-file hierarchy, top to bottom (GeographyError on bad names)."""
    levels = tuple(GeoLevel(str(n), LOOKUP) for n in names)
    if len(levels) < 2:
        raise GeographyError(f"a lookup geography needs at least two levels (top to bottom), got {list(names)}")
    if len({lv.name for lv in levels}) != len(levels):
        raise GeographyError(f"duplicate level names {list(names)}")
    return levels


def load_geolevels(path: str | Path = GEOLEVELS_PATH) -> tuple[GeoLevel, ...]:
    """Levels top to bottom (strictly increasing ``digits``) from a geolevels YAML file or a
    bare name in ``schemas/`` (default ``schemas/geolevels.yaml``)."""
    p = schema_path(path)
    raw = load_yaml(p, GeographyError, "geolevels")
    try:
        levels = tuple(GeoLevel(str(d["name"]), int(d["digits"])) for d in raw["levels"])
    except (KeyError, TypeError, ValueError) as exc:
        raise GeographyError(f"{p}: malformed geolevels ({exc!r})") from exc
    _check_levels(levels, str(p))
    return levels


def _check_levels(levels: Sequence[GeoLevel], where: str) -> None:
    if levels and all(lv.digits == LOOKUP for lv in levels):
        return
    if not levels:
        raise GeographyError(f"{where}: no levels")
    digits = [lv.digits for lv in levels]
    if digits[0] < 0 or any(b <= a for a, b in zip(digits, digits[1:])) or digits[-1] > 18:
        raise GeographyError(f"{where}: level digits must increase strictly within 0..18, got {digits}")
    names = [lv.name for lv in levels]
    if len(set(names)) != len(names):
        raise GeographyError(f"{where}: duplicate level names {names}")


@dataclass(frozen=True, eq=False)
class LevelIndex:
    """The units of one level.

    ``codes``: int64 ``(n_units,)``, the GEOID prefixes read as integers, sorted, unique.
    ``parent``: int64 ``(n_units,)``, index of each unit's parent in the level above (``-1``
    at the top level); non-decreasing.
    ``child_ptr``: int64 ``(n_units + 1,)`` CSR offsets: the children of unit ``i`` are units
    ``child_ptr[i]:child_ptr[i+1]`` of the level below (for the bottom level all children
    ranges are empty).
    ``names``: for a lookup level (``digits == LOOKUP``), the unit codes as given in the lookup
    file, numpy ``<U`` ``(n_units,)``, in unit order (sorted by parent, then code); ``codes`` is
    then ``arange(n_units)``.
    """

    name: str
    digits: int
    codes: np.ndarray
    parent: np.ndarray
    child_ptr: np.ndarray
    names: np.ndarray | None = None
    #: readable names of a lookup level's units (its ``<level>_name`` column), else None
    display: np.ndarray | None = None

    @property
    def n_units(self) -> int:
        return int(self.codes.shape[0])

    @property
    def is_lookup(self) -> bool:
        """True for a level whose codes come from a lookup file (any strings, not digit prefixes)."""
        return self.names is not None

    @cached_property
    def _name_order(self) -> np.ndarray:
        assert self.names is not None
        return np.argsort(self.names, kind="stable")

    @cached_property
    def _sorted_names(self) -> np.ndarray:
        assert self.names is not None
        return self.names[self._name_order]

    @cached_property
    def geoids(self) -> np.ndarray:
        """The unit codes, numpy ``<U`` ``(n_units,)``: sorted unique GEOID prefixes (nation:
        ``[""]``), or a lookup level's codes in unit order."""
        if self.names is not None:
            return self.names
        return format_geoids(self.codes, self.digits)

    def geoids_of(self, start: int, stop: int) -> np.ndarray:
        """``geoids[start:stop]``, made from the codes if the level's ``geoids`` were never asked
        for (a process that needs a range at a time then holds 8 bytes a unit, not ~60)."""
        if self.names is not None or "geoids" in self.__dict__:
            return self.geoids[start:stop]
        return format_geoids(self.codes[start:stop], self.digits)

    def n_children(self) -> np.ndarray:
        """int64 ``(n_units,)``: number of children of each unit in the level below."""
        return np.diff(self.child_ptr)

    def children(self, i: int) -> slice:
        """The index range of unit ``i``'s children in the level below."""
        return slice(int(self.child_ptr[i]), int(self.child_ptr[i + 1]))

    def index_of(self, geoids: Iterable[str] | np.ndarray | pl.Series) -> np.ndarray:
        """int64 unit index of each GEOID prefix (all must exist; otherwise GeographyError)."""
        return self.index_of_codes(self.codes_of(geoids))

    def codes_of(self, geoids: Iterable[str] | np.ndarray | pl.Series) -> np.ndarray:
        """int64 ``codes`` of GEOID strings: the prefix read as an integer, or for a lookup level the
        unit index (GeographyError naming examples if malformed or, for a lookup level, unknown)."""
        if self.names is None:
            return geoid_codes(geoids, self.digits, what=f"{self.name} GEOIDs")
        g = np.asarray(geoids.to_numpy() if isinstance(geoids, pl.Series) else
                       (geoids if isinstance(geoids, np.ndarray) else list(geoids))).astype(str)
        srt = self._sorted_names
        pos = np.searchsorted(srt, g)
        pos_c = np.minimum(pos, max(self.n_units - 1, 0))
        bad = (pos >= self.n_units) | (srt[pos_c] != g) if self.n_units else np.ones(g.shape, bool)
        if bad.any():
            raise GeographyError(f"{int(bad.sum())} {self.name} code(s) not in the geography, e.g. "
                                 f"{sorted_examples(g[bad])}")
        return self._name_order[pos_c].astype(np.int64)

    def index_of_codes(self, codes: np.ndarray) -> np.ndarray:
        """int64 unit index of each integer GEOID prefix (all must exist; otherwise GeographyError)."""
        codes = np.asarray(codes, dtype=np.int64)
        pos = np.searchsorted(self.codes, codes)
        pos_c = np.minimum(pos, max(self.n_units - 1, 0))
        bad = (pos >= self.n_units) | (self.codes[pos_c] != codes) if self.n_units else np.ones(codes.shape, bool)
        if bad.any():
            examples = [str(int(c)) if self.names is not None else format_geoid(int(c), self.digits)
                        for c in sorted_examples(codes[bad])]
            raise GeographyError(
                f"{int(bad.sum())} {self.name} GEOID(s) not in the geography, e.g. {examples}")
        return pos.astype(np.int64)

    def parent_geoids(self, parent: "LevelIndex | None") -> np.ndarray:
        """The code of each unit's parent ``(n_units,)`` (the top level: empty strings)."""
        if parent is None:
            return np.full(self.n_units, "", dtype="<U1")
        return parent.geoids[self.parent]

    @property
    def nbytes(self) -> int:
        """Bytes held by the integer arrays (excluding the lazily built ``geoids`` strings)."""
        return int(self.codes.nbytes + self.parent.nbytes + self.child_ptr.nbytes)


def format_geoids(codes: np.ndarray, digits: int) -> np.ndarray:
    """numpy ``<U{digits}`` ``(n,)``: integer GEOID prefixes as zero-padded strings (``digits`` 0:
    empty strings), by integer arithmetic on ASCII digits, with no Python objects."""
    codes = np.asarray(codes, dtype=np.int64)
    if digits == 0:
        return np.full(codes.size, "", dtype="<U1")
    ascii_digits = np.empty((codes.size, digits), dtype=np.uint8)
    rest = codes.copy()
    for j in range(digits - 1, -1, -1):
        ascii_digits[:, j] = rest % 10
        rest //= 10
    ascii_digits += ord("0")
    return ascii_digits.view(f"S{digits}").reshape(-1).astype(f"<U{digits}")


def format_geoid(code: int, digits: int) -> str:
    """The GEOID string of an integer prefix (zero-padded to ``digits``)."""
    return str(code).zfill(digits) if digits else ""


def sorted_examples(values: pl.Series | np.ndarray, n: int = 5) -> list[Any]:
    """The first ``n`` distinct ``values`` in sorted order: error messages name the same examples
    whatever order the values came in (a polars group_by's output order varies between runs)."""
    if isinstance(values, np.ndarray):
        return np.unique(values)[:n].tolist()
    return values.unique().sort().head(n).to_list()


def geoid_codes(geoids: Iterable[str] | np.ndarray | pl.Series, digits: int, what: str = "GEOIDs") -> np.ndarray:
    """Parse GEOID strings of exactly ``digits`` decimal digits into int64 codes, ``(n,)``.

    Raises GeographyError naming the count and first examples of malformed values.
    """
    if isinstance(geoids, pl.Series):
        s = geoids
    else:
        arr = geoids if isinstance(geoids, np.ndarray) else np.asarray(list(geoids), dtype=object)
        s = pl.Series("geoid", arr.astype(str) if arr.dtype.kind not in "UO" else arr)
    if s.dtype != pl.Utf8:
        raise GeographyError(f"{what} must be strings, got dtype {s.dtype}")
    codes, bad = _parsed(s, digits)
    if bad.any():
        kind = "empty strings" if digits == 0 else f"{digits}-digit strings"
        raise GeographyError(f"{int(bad.sum())} {what} are not {kind}, e.g. {sorted_examples(s.filter(bad))}")
    return codes.fill_null(0).cast(pl.Int64).to_numpy().astype(np.int64, copy=False)


def parse_geoids(geoids: np.ndarray, digits: int) -> tuple[np.ndarray, np.ndarray]:
    """``(codes, valid)`` of GEOID strings ``geoids`` ``(n,)``: int64 codes as
    :func:`geoid_codes` reads them, and whether each is a ``digits``-digit GEOID at all (its
    code is 0 where not) — for lookups where a malformed string is simply not found."""
    s = pl.Series("geoid", np.asarray(geoids).astype(str, copy=False), dtype=pl.Utf8)
    codes, bad = _parsed(s, digits)
    return codes.fill_null(0).cast(pl.Int64).to_numpy().astype(np.int64, copy=False), ~bad.to_numpy()


def _parsed(s: pl.Series, digits: int) -> tuple[pl.Series, pl.Series]:
    """``(codes, bad)`` of a Utf8 series: the unsigned parse (null where it fails) and where a
    value is not a ``digits``-digit string (``digits`` 0: not empty)."""
    if digits == 0:
        return pl.Series("geoid", np.zeros(s.len(), np.uint64)), s.is_null() | (s.str.len_chars() != 0)
    # fast exact check: right byte length, and an unsigned integer parse that succeeds; the
    # parse accepts a leading '+', which the length would otherwise let through
    codes = s.cast(pl.UInt64, strict=False)
    bad = (codes.is_null() | (s.str.len_bytes() != digits) | s.str.starts_with("+")).fill_null(True)
    return codes, bad


def sum_children(y: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """Sums of the consecutive row groups of ``y`` ``(n, k)`` starting at ``starts`` ``(g,)``
    (e.g. each parent's children, ``child_ptr[:-1]``) -> ``(g, k)``, rows added in order. A
    sparse 0/1 product: ~10x faster than ``np.add.reduceat`` along axis 0 on wide rows."""
    import scipy.sparse as sp

    n = y.shape[0]
    S = sp.csr_matrix((np.ones(n), np.arange(n), np.append(starts, n)), shape=(starts.size, n))
    return np.asarray(S @ y)


def _run_starts(x: np.ndarray) -> np.ndarray:
    """bool ``(n,)``: True where a sorted array starts a new run of equal values."""
    keep = np.empty(x.size, dtype=bool)
    if x.size:
        keep[0] = True
        np.not_equal(x[1:], x[:-1], out=keep[1:])
    return keep


class Geography:
    """All levels of a hierarchy, top to bottom, built from the block GEOIDs.

    ``levels``: tuple of :class:`LevelIndex`, top (``nation``) to bottom (``block``).
    """

    def __init__(self, levels: Sequence[LevelIndex]) -> None:
        self.levels: tuple[LevelIndex, ...] = tuple(levels)
        self._by_name = {lv.name: lv for lv in self.levels}

    @classmethod
    def from_block_geoids(cls, block_geoids: Iterable[str] | np.ndarray | pl.Series,
                          levels: Sequence[GeoLevel] | None = None) -> "Geography":
        """Build the hierarchy from block GEOIDs (any order, duplicates allowed).

        ``levels`` defaults to ``schemas/geolevels.yaml``; the bottom level's ``digits`` is
        the required GEOID length. Raises GeographyError on malformed GEOIDs.
        """
        levels = tuple(levels) if levels is not None else load_geolevels()
        _check_levels(levels, "levels")
        codes = geoid_codes(block_geoids, levels[-1].digits, what="block GEOIDs")
        return cls.from_block_codes(codes, levels)

    @classmethod
    def from_block_codes(cls, block_codes: np.ndarray, levels: Sequence[GeoLevel] | None = None) -> "Geography":
        """Like :meth:`from_block_geoids` for integer block codes (int64, any order)."""
        levels = tuple(levels) if levels is not None else load_geolevels()
        _check_levels(levels, "levels")
        bottom = levels[-1].digits
        # sort + run boundaries: numpy's hash-based np.unique is far slower on millions of int64
        codes = np.sort(np.asarray(block_codes, dtype=np.int64))
        codes = codes[_run_starts(codes)]
        if codes.size and (codes[0] < 0 or codes[-1] >= 10**bottom):
            raise GeographyError(f"block codes must lie in [0, 10**{bottom})")
        # walk up: each level's units are the runs of equal prefixes of the level below, so the
        # parent index is a running count of run starts and child_ptr lists the run starts
        per_level: list[np.ndarray] = [codes]
        parents: list[np.ndarray] = []
        ptrs: list[np.ndarray] = [np.zeros(codes.size + 1, dtype=np.int64)]
        for k in range(len(levels) - 1, 0, -1):
            up = per_level[0] // (10 ** (levels[k].digits - levels[k - 1].digits))
            starts = _run_starts(up)
            parents.insert(0, np.cumsum(starts, dtype=np.int64) - 1)
            first = np.flatnonzero(starts)
            if levels[k - 1].digits == 0 and first.size == 0:  # no blocks: the nation still exists
                per_level.insert(0, np.zeros(1, dtype=np.int64))
                ptrs.insert(0, np.zeros(2, dtype=np.int64))
                continue
            per_level.insert(0, up[first])
            ptrs.insert(0, np.append(first, up.size).astype(np.int64))
        parents.insert(0, np.full(per_level[0].size, -1, dtype=np.int64))
        out = [LevelIndex(lv.name, lv.digits, per_level[k], parents[k], ptrs[k]) for k, lv in enumerate(levels)]
        return cls(out)

    @classmethod
    def from_lookup(cls, lookup: pl.DataFrame, levels: Sequence[GeoLevel]) -> "Geography":
        """Build a lookup-file hierarchy: ``lookup`` has one Utf8 column per level (top to bottom),
        one row per bottom unit, naming its ancestor at every level; it must nest (validated by
        :func:`pipeline.inputs.lookup.read_lookup`; GeographyError if it does not).

        Units of the top level are sorted by code; those of every lower level by (parent, code),
        so a unit's children are contiguous, as the engine needs."""
        names = [lv.name for lv in levels]
        df = lookup.select([pl.col(n).cast(pl.Utf8) for n in names])
        displays: list[np.ndarray | None] = []
        per_level: list[tuple[np.ndarray, np.ndarray]] = []
        prev_map: pl.DataFrame | None = None
        for k, n in enumerate(names):
            if k == 0:
                units = df.select(pl.col(n).alias("code")).unique().sort("code")
                units = units.with_columns(pl.lit(-1, pl.Int64).alias("parent"))
            else:
                pairs = df.select(pl.col(names[k - 1]).alias("p"), pl.col(n).alias("code")).unique()
                if pairs.select(pl.col("code").n_unique()).item() != pairs.height:
                    raise GeographyError(f"level {n}: a code is under two parents")
                assert prev_map is not None
                units = (pairs.join(prev_map, left_on="p", right_on="code", how="left")
                         .select("code", pl.col("pos").alias("parent")).sort(["parent", "code"]))
            if k == 0 and units.height != 1:
                raise GeographyError(f"level {n}: the top level must have exactly one unit, "
                                     f"found {units.height}: {units['code'].head(5).to_list()}")
            codes = units["code"].to_numpy().astype(str)
            parent_pos = units["parent"].to_numpy().astype(np.int64)
            per_level.append((codes, parent_pos))
            if f"{n}_name" in lookup.columns:
                named = lookup.select(pl.col(n).cast(pl.Utf8).alias("code"),
                                      pl.col(f"{n}_name").cast(pl.Utf8).alias("nm")).unique("code")
                displays.append(units.select("code").join(named, on="code", how="left")["nm"]
                                .fill_null("").to_numpy().astype(str))
            else:
                displays.append(None)
            prev_map = units.select("code").with_row_index("pos").with_columns(pl.col("pos").cast(pl.Int64))
        out = []
        for k, lv in enumerate(levels):
            codes, parent = per_level[k]
            size = codes.size
            if k + 1 < len(levels):
                child_parent = per_level[k + 1][1]
                ptr = np.searchsorted(child_parent, np.arange(size + 1)).astype(np.int64)
            else:
                ptr = np.zeros(size + 1, dtype=np.int64)
            out.append(LevelIndex(lv.name, LOOKUP, np.arange(size, dtype=np.int64), parent, ptr, names=codes,
                                  display=displays[k]))
        return cls(out)

    @property
    def is_lookup(self) -> bool:
        """True when the units are named by a lookup file (any code strings), not digit prefixes."""
        return self.levels[-1].is_lookup

    def lookup_frame(self) -> pl.DataFrame:
        """One row per bottom unit (in unit order) with its code at every level, columns named
        by the levels: the lookup file this geography is built from (re-read by ``from_lookup``)."""
        cols = {}
        for lv in self.levels:
            idx = self.ancestor_index(lv.name, np.arange(self.blocks.n_units))
            cols[lv.name] = pl.Series(lv.name, lv.geoids[idx].astype(str), dtype=pl.Utf8)
        for lv in self.levels:
            if lv.display is not None:
                idx = self.ancestor_index(lv.name, np.arange(self.blocks.n_units))
                cols[f"{lv.name}_name"] = pl.Series(f"{lv.name}_name", lv.display[idx].astype(str), dtype=pl.Utf8)
        return pl.DataFrame(cols)

    def units_frame(self) -> pl.DataFrame:
        """Every unit of every level, top to bottom in unit order: ``level``, ``geoid`` and the
        ``parent`` code (empty at the top level) — what a release publishes as its geography."""
        parts = []
        for k, lv in enumerate(self.levels):
            up = self.levels[k - 1] if k else None
            parts.append(pl.DataFrame({"level": pl.Series([lv.name] * lv.n_units, dtype=pl.Utf8),
                                       "geoid": pl.Series(lv.geoids.astype(str), dtype=pl.Utf8),
                                       "parent": pl.Series(lv.parent_geoids(up).astype(str), dtype=pl.Utf8)}))
        return pl.concat(parts)

    def level(self, name: str) -> LevelIndex:
        """The :class:`LevelIndex` named ``name`` (GeographyError if unknown)."""
        try:
            return self._by_name[name]
        except KeyError:
            raise GeographyError(f"no level {name!r}; levels are {[lv.name for lv in self.levels]}") from None

    @property
    def level_names(self) -> tuple[str, ...]:
        return tuple(lv.name for lv in self.levels)

    @property
    def blocks(self) -> LevelIndex:
        """The bottom level."""
        return self.levels[-1]

    def parent_level(self, name: str) -> LevelIndex | None:
        """The level above ``name`` (None for the top level)."""
        i = self.level_names.index(self.level(name).name)
        return self.levels[i - 1] if i else None

    def ancestor_index(self, name: str, block_index: np.ndarray) -> np.ndarray:
        """int64 index in level ``name`` of the ancestor of each block index ``(n,)``."""
        target = self.level(name)
        idx = np.asarray(block_index, dtype=np.int64)
        for lv in reversed(self.levels):
            if lv is target:
                return idx
            idx = lv.parent[idx]
        raise GeographyError(f"no level {name!r}")

    @property
    def nbytes(self) -> int:
        """Bytes held by the integer arrays of every level."""
        return sum(lv.nbytes for lv in self.levels)

    def __repr__(self) -> str:
        sizes = ", ".join(f"{lv.name}={lv.n_units}" for lv in self.levels)
        return f"Geography({sizes})"
