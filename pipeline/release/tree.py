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

if TYPE_CHECKING:
    from pipeline.model.geography import Geography

#: the release file of a lookup geography (every unit, its level and parent code)
GEOGRAPHY_FILE = "geography.parquet"


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
        g = np.asarray(geoids).astype(str, copy=False)
        c = np.asarray(codes).astype(str, copy=False)
        if len(g) == 0:
            return np.zeros(c.shape, np.int64), np.zeros(c.shape, bool)
        if self.is_lookup:
            order = np.argsort(g, kind="stable")
            srt = g[order]
            p = np.clip(np.searchsorted(srt, c), 0, len(g) - 1)
            return order[p].astype(np.int64), srt[p] == c
        p = np.clip(np.searchsorted(g, c), 0, len(g) - 1)
        return p.astype(np.int64), g[p] == c

    def parent_positions(self, parent_level: str, parent_geoids: np.ndarray, child_level: str,
                         child_geoids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(pos, found)`` of each child's parent among ``parent_geoids``."""
        return self.locate(parent_level, self.ancestors(child_geoids, child_level, parent_level), parent_geoids)


def read_tree(root: Path, manifest: Mapping[str, Any]) -> GeoTree:
    """The release's tree: from ``geography.parquet`` when the manifest names one, else by prefix."""
    levels = [g["name"] for g in manifest["geolevels"]]
    geo = manifest.get("geography")
    if geo:
        return GeoTree.from_frame(levels, pl.read_parquet(root / geo["file"]))
    return GeoTree(levels, {g["name"]: int(g["digits"]) for g in manifest["geolevels"]})
