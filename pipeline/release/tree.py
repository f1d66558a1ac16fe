"""How the units of a release's levels nest: by GEOID prefix, or by published parent codes.

A US release names its units by GEOIDs whose prefixes are the units above (``digits`` per
level, ``schemas/geolevels.yaml``); every level's units sort by GEOID. A release of a
lookup-file geography (any code strings) instead publishes ``geography.parquet``: every unit
of every level with its ``level`` and its ``parent`` code, top to bottom, each level in the
geography's unit order (by parent, then code) — which is also the order of the units in the
tables — and its readable ``name`` (the lookup's ``<level>_name``, else ``<level> <code>``). :class:`GeoTree` answers the questions the writer, ``dptab verify`` and the explorer
ask of either kind: the ancestor of a unit at a level above, where a code sits in a level, and
the expected order of a level's units.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np
import polars as pl

from pipeline.model.geography import format_geoid, format_geoids, parse_geoids

if TYPE_CHECKING:
    from pipeline.model.geography import Geography

#: the release file of a lookup geography (every unit, its level and parent code)
GEOGRAPHY_FILE = "geography.parquet"

#: units whose GEOID strings (and their ancestors') are made at a time where a check goes through
#: a whole level (~60 bytes a block as numpy strings: 0.5 GB for the US blocks at once)
BLOCK_RANGE = 1 << 16


class CodedGeoids:
    """A digit-prefix level's published GEOIDs, held as their int64 codes (the GEOIDs read as
    integers, sorted): 8 bytes a unit instead of numpy ``<U``'s 4 a digit (60 for a US block).

    Sliced like the array it stands for: ``g[a:b]`` (or an index array) is numpy ``<U{digits}``,
    ``g[i]`` a ``str``; ``len(g)`` its units. ``np.asarray(g)`` makes every string at once — what
    the checks of a release's bottom level avoid by taking ranges (:data:`BLOCK_RANGE`)."""

    __slots__ = ("codes", "digits")

    def __init__(self, codes: np.ndarray, digits: int) -> None:
        self.codes = np.asarray(codes, dtype=np.int64)
        self.digits = int(digits)

    def __len__(self) -> int:
        return int(self.codes.shape[0])

    def __getitem__(self, key: Any) -> Any:
        if isinstance(key, (int, np.integer)):
            return format_geoid(int(self.codes[key]), self.digits)
        return format_geoids(self.codes[key], self.digits)

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        out = self[:]
        return out if dtype is None else out.astype(dtype)

    def locate(self, geoids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(pos, found)`` of GEOID strings ``geoids`` among these units (``pos`` clipped into
        range where not found); a string that is not a ``digits``-digit GEOID is not found."""
        codes, valid = parse_geoids(geoids, self.digits)
        if not len(self):
            return np.zeros(codes.shape, np.int64), np.zeros(codes.shape, bool)
        pos = np.clip(np.searchsorted(self.codes, codes), 0, len(self) - 1).astype(np.int64)
        return pos, valid & (self.codes[pos] == codes)


def find_units(units: "np.ndarray | CodedGeoids", keys: np.ndarray, in_order: bool = True
               ) -> tuple[np.ndarray, np.ndarray]:
    """``(pos, found)``: where each code of ``keys`` (str ``(n,)``) sits among ``units`` — codes
    in sorted order (``in_order``; else in any order), or a digit-prefix level's
    :class:`CodedGeoids` — and whether it is there at all (``pos`` clipped into range where not)."""
    if isinstance(units, CodedGeoids):
        return units.locate(keys)
    g = np.asarray(units).astype(str, copy=False)  # (a sorted str array is not copied)
    c = np.asarray(keys).astype(str, copy=False)
    if len(g) == 0:
        return np.zeros(c.shape, np.int64), np.zeros(c.shape, bool)
    order = None if in_order else np.argsort(g, kind="stable")
    srt = g if order is None else g[order]
    p = np.clip(np.searchsorted(srt, c), 0, len(g) - 1)
    return (p if order is None else order[p]).astype(np.int64), srt[p] == c


class GeoTree:
    """The nesting of a release's levels (top to bottom).

    ``digits[level]``: the GEOID prefix length of a prefix level (``-1`` for a lookup level);
    ``units``: for a lookup geography, ``{level: (codes in unit order, parent codes)}``.
    """

    def __init__(self, levels: Sequence[str], digits: Mapping[str, int],
                 units: Mapping[str, tuple[np.ndarray, np.ndarray]] | None = None,
                 names: Mapping[str, np.ndarray] | None = None) -> None:
        self.levels = list(levels)
        self.digits = dict(digits)
        self.units = dict(units) if units else None
        self.names = dict(names) if names else {}
        self._parent_maps: dict[str, dict[str, str]] = {}
        self._order: dict[str, dict[str, int]] = {}

    @property
    def is_lookup(self) -> bool:
        return self.units is not None

    @classmethod
    def of(cls, tree_or_digits: "GeoTree | Mapping[str, int]", levels: Sequence[str] | None = None) -> "GeoTree":
        """A GeoTree, or one made from a ``{level: digits}`` mapping (prefix levels)."""
        if isinstance(tree_or_digits, GeoTree):
            return tree_or_digits
        return cls(levels if levels is not None else list(tree_or_digits), tree_or_digits)

    @classmethod
    def from_geography(cls, geo: "Geography") -> "GeoTree":
        digits = {lv.name: lv.digits for lv in geo.levels}
        if not geo.is_lookup:
            return cls([lv.name for lv in geo.levels], digits)
        units, names = {}, {}
        for k, lv in enumerate(geo.levels):
            units[lv.name] = (lv.geoids.astype(str), lv.parent_geoids(geo.levels[k - 1] if k else None).astype(str))
            codes = lv.geoids.astype(str)
            names[lv.name] = (np.where(lv.display != "", lv.display, np.char.add(f"{lv.name} ", codes))
                              if lv.display is not None else np.char.add(f"{lv.name} ", codes)).astype(str)
        return cls([lv.name for lv in geo.levels], digits, units, names)

    @classmethod
    def from_frame(cls, levels: Sequence[str], frame: pl.DataFrame) -> "GeoTree":
        """From a release's ``geography.parquet`` (columns ``level``, ``geoid``, ``parent``)."""
        units, names = {}, {}
        for lv in levels:
            sub = frame.filter(pl.col("level") == lv)
            units[lv] = (sub["geoid"].to_numpy().astype(str), sub["parent"].to_numpy().astype(str))
            if "name" in sub.columns:
                names[lv] = sub["name"].to_numpy().astype(str)
        return cls(levels, {lv: -1 for lv in levels}, units, names)

    def frame(self) -> pl.DataFrame:
        """The ``geography.parquet`` rows of a lookup geography (top to bottom, unit order)."""
        assert self.units is not None
        return pl.concat([pl.DataFrame({"level": pl.Series([lv] * len(self.units[lv][0]), dtype=pl.Utf8),
                                        "geoid": pl.Series(self.units[lv][0], dtype=pl.Utf8),
                                        "parent": pl.Series(self.units[lv][1], dtype=pl.Utf8),
                                        "name": pl.Series(self.names[lv], dtype=pl.Utf8)})
                          for lv in self.levels])

    def unit_names(self, level: str, geoids: np.ndarray) -> np.ndarray:
        """Readable names of units ``geoids`` of ``level`` (object array): a lookup's published
        names, else the US names of :func:`pipeline.model.geonames.unit_names`."""
        from pipeline.model.geonames import unit_names

        if not self.is_lookup:
            return unit_names(level, geoids)
        g = np.asarray(geoids).astype(str, copy=False)
        if level not in self.names:
            return unit_names(level, g, True)
        pos = self.position(level, g)
        known = np.asarray(self.names[level], dtype=object)
        out = np.array([f"{level} {x}" for x in g.tolist()], dtype=object)
        ok = pos >= 0
        out[ok] = known[pos[ok]]
        return out

    def _parent_map(self, level: str) -> dict[str, str]:
        if level not in self._parent_maps:
            assert self.units is not None
            codes, parents = self.units[level]
            self._parent_maps[level] = dict(zip(codes.tolist(), parents.tolist()))
        return self._parent_maps[level]

    def ancestors(self, geoids: np.ndarray, level: str, up: str) -> np.ndarray:
        """The code at level ``up`` (above ``level``, or ``level`` itself) of each unit ``geoids``
        of ``level``; ``""`` where a lookup unit has no known parent."""
        g = np.asarray(geoids).astype(str, copy=False)
        if not self.is_lookup:
            d = self.digits[up]
            return g.astype(f"<U{d}") if d > 0 else np.full(g.shape, "", dtype="<U1")
        i, j = self.levels.index(level), self.levels.index(up)
        out = g
        for k in range(i, j, -1):
            m = self._parent_map(self.levels[k])
            out = np.array([m.get(x, "\x00") for x in out.tolist()], dtype=str) if out.size else out
        return out

    def position(self, level: str, geoids: np.ndarray) -> np.ndarray:
        """int64 position of each code in ``level``'s published unit order (-1 if unknown); for a
        prefix level the order is the sorted order of ``geoids`` themselves."""
        g = np.asarray(geoids).astype(str, copy=False)
        if not self.is_lookup:
            return np.argsort(np.argsort(g, kind="stable"), kind="stable").astype(np.int64)
        if level not in self._order:
            assert self.units is not None
            self._order[level] = {c: i for i, c in enumerate(self.units[level][0].tolist())}
        o = self._order[level]
        return np.array([o.get(x, -1) for x in g.tolist()], dtype=np.int64)

    def in_order(self, level: str, geoids: np.ndarray) -> bool:
        """Are ``geoids`` unique and in the level's published order (sorted, for prefix levels)?"""
        g = np.asarray(geoids).astype(str, copy=False)
        if g.size <= 1:
            return True
        if not self.is_lookup:
            return bool(np.all(g[1:] > g[:-1]))
        p = self.position(level, g)
        return bool(np.all(p >= 0) and np.all(p[1:] > p[:-1]))

    def locate(self, level: str, codes: np.ndarray, geoids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(pos, found)``: where each of ``codes`` sits among the units ``geoids`` of ``level``
        (in published order; sorted for prefix levels), and whether it is there at all."""
        return find_units(geoids, codes, in_order=not self.is_lookup)

    def parent_positions(self, parent_level: str, parent_geoids: np.ndarray, child_level: str,
                         child_geoids: "np.ndarray | CodedGeoids") -> tuple[np.ndarray, np.ndarray]:
        """``(pos, found)`` of each child's parent among ``parent_geoids``; the children's (and
        their ancestors') GEOID strings are made :data:`BLOCK_RANGE` children at a time."""
        n, step = len(child_geoids), BLOCK_RANGE
        if n <= step and not isinstance(child_geoids, CodedGeoids):
            return self.locate(parent_level, self.ancestors(child_geoids, child_level, parent_level), parent_geoids)
        pos, found = np.zeros(n, np.int64), np.zeros(n, bool)
        for s in range(0, n, step):
            up = self.ancestors(child_geoids[s:s + step], child_level, parent_level)
            pos[s:s + step], found[s:s + step] = self.locate(parent_level, up, parent_geoids)
        return pos, found


def read_tree(root: Path, manifest: Mapping[str, Any]) -> GeoTree:
    """The release's tree: from ``geography.parquet`` when the manifest names one, else by prefix."""
    levels = [g["name"] for g in manifest["geolevels"]]
    geo = manifest.get("geography")
    if geo:
        return GeoTree.from_frame(levels, pl.read_parquet(root / geo["file"]))
    return GeoTree(levels, {g["name"]: int(g["digits"]) for g in manifest["geolevels"]})
