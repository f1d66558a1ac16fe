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
from typing import Iterable, Sequence

import numpy as np
import polars as pl

from pipeline.errors import InputError
from pipeline.model.schemas import SCHEMAS_DIR, load_yaml, schema_path

GEOLEVELS_PATH = SCHEMAS_DIR / "geolevels.yaml"


class GeographyError(InputError):
    """Block GEOIDs or a level definition are malformed (message names the problem and examples)."""


@dataclass(frozen=True)
class GeoLevel:
    """A level definition: its ``name`` and the GEOID prefix length ``digits`` that identifies a unit."""

    name: str
    digits: int


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
    """

    name: str
    digits: int
    codes: np.ndarray
    parent: np.ndarray
    child_ptr: np.ndarray

    @property
    def n_units(self) -> int:
        return int(self.codes.shape[0])

    @cached_property
    def geoids(self) -> np.ndarray:
        """Sorted unique GEOID prefixes, numpy ``<U{digits}`` ``(n_units,)`` (nation: ``[""]``)."""
        if self.digits == 0:
            return np.full(self.n_units, "", dtype="<U1")
        # ASCII digits by integer arithmetic, viewed as fixed-width bytes: no Python objects
        ascii_digits = np.empty((self.n_units, self.digits), dtype=np.uint8)
        rest = self.codes.copy()
        for j in range(self.digits - 1, -1, -1):
            ascii_digits[:, j] = rest % 10
            rest //= 10
        ascii_digits += ord("0")
        return ascii_digits.view(f"S{self.digits}").reshape(-1).astype(f"<U{self.digits}")

    def n_children(self) -> np.ndarray:
        """int64 ``(n_units,)``: number of children of each unit in the level below."""
        return np.diff(self.child_ptr)

    def children(self, i: int) -> slice:
        """The index range of unit ``i``'s children in the level below."""
        return slice(int(self.child_ptr[i]), int(self.child_ptr[i + 1]))

    def index_of(self, geoids: Iterable[str] | np.ndarray | pl.Series) -> np.ndarray:
        """int64 unit index of each GEOID prefix (all must exist; otherwise GeographyError)."""
        codes = geoid_codes(geoids, self.digits, what=f"{self.name} GEOIDs")
        return self.index_of_codes(codes)

    def index_of_codes(self, codes: np.ndarray) -> np.ndarray:
        """int64 unit index of each integer GEOID prefix (all must exist; otherwise GeographyError)."""
        codes = np.asarray(codes, dtype=np.int64)
        pos = np.searchsorted(self.codes, codes)
        pos_c = np.minimum(pos, max(self.n_units - 1, 0))
        bad = (pos >= self.n_units) | (self.codes[pos_c] != codes) if self.n_units else np.ones(codes.shape, bool)
        if bad.any():
            examples = [format_geoid(int(c), self.digits) for c in codes[bad][:5]]
            raise GeographyError(
                f"{int(bad.sum())} {self.name} GEOID(s) not in the geography, e.g. {examples}")
        return pos.astype(np.int64)

    @property
    def nbytes(self) -> int:
        """Bytes held by the integer arrays (excluding the lazily built ``geoids`` strings)."""
        return int(self.codes.nbytes + self.parent.nbytes + self.child_ptr.nbytes)


def format_geoid(code: int, digits: int) -> str:
    """The GEOID string of an integer prefix (zero-padded to ``digits``)."""
    return str(code).zfill(digits) if digits else ""


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
    if digits == 0:
        bad = s.is_null() | (s.str.len_chars() != 0)
        if bad.any():
            raise GeographyError(f"{int(bad.sum())} {what} are not empty strings, e.g. {s.filter(bad).head(5).to_list()}")
        return np.zeros(s.len(), dtype=np.int64)
    # fast exact check: right byte length, and an unsigned integer parse that succeeds; the
    # parse accepts a leading '+', which the length would otherwise let through
    codes = s.cast(pl.UInt64, strict=False)
    bad = codes.is_null() | (s.str.len_bytes() != digits) | s.str.starts_with("+")
    if bad.any():
        examples = s.filter(bad).head(5).to_list()
        raise GeographyError(f"{int(bad.sum())} {what} are not {digits}-digit strings, e.g. {examples}")
    return codes.cast(pl.Int64).to_numpy().astype(np.int64, copy=False)


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
