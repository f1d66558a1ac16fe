"""The release's ``index.html``: a static, self-contained page for researchers.

No external assets and no link outside the release folder (the files table links to each file
by its relative path): the page is readable offline and from an archive. Its only scripts are the
area explorer's (:func:`write_explorer`), loaded by relative paths from ``explorer/``; without
them the page reads as before. The page is
the Jinja2 template ``templates/index.html.j2`` with autoescaping, so every value (a config
title, a table label, a code list) is escaped. It says what is in the release, how the data were protected
(plain language and the ρ/ε table), how to read margins of error, what was checked, how to
cite, and lists every file with its size and sha256. Everything the HTML shows comes from the
manifest, so the page never carries anything the manifest does not; the explorer shows the
published tables through files the manifest lists.
"""

from __future__ import annotations

import json
import re
from fractions import Fraction
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence
from urllib.parse import quote

import jinja2
import numpy as np
import polars as pl
from markupsafe import Markup

TEMPLATES = "templates"

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:72rem;margin:2rem auto;padding:0 1rem;
color:#1b1b1b;line-height:1.5}
h1{font-size:1.6rem;margin-bottom:.2rem} h2{font-size:1.25rem;margin-top:2rem;border-bottom:1px solid #ccc}
table{border-collapse:collapse;margin:.5rem 0 1rem} td,th{border:1px solid #ccc;padding:.25rem .5rem;text-align:left;
vertical-align:top} th{background:#f3f3f3} td.num{text-align:right;font-variant-numeric:tabular-nums}
code,.mono{font-family:ui-monospace,SFMono-Regular,Menlo,monospace;font-size:.85em;word-break:break-all}
.meta{color:#555} .note{background:#f7f7f0;border-left:4px solid #c9b458;padding:.5rem 1rem}
#explorer{background:#f6f8fb;border:1px solid #d5dde8;border-radius:6px;padding:0 1rem 1rem;margin-top:1.5rem}
#explorer h2{border:0} #explorer-q{font-size:1rem;padding:.35rem .5rem;width:min(28rem,90%)}
#explorer-results{list-style:none;padding-left:0;max-height:18rem;overflow-y:auto} #explorer-results li{margin:.15rem 0}
button.area-link{background:none;border:0;padding:0;color:#0645ad;text-decoration:underline;cursor:pointer;font:inherit}
#explorer-area h3{margin-bottom:0} #explorer-area table{background:#fff} #explorer-area summary{cursor:pointer;margin:.4rem 0}
td.moe{color:#555;white-space:nowrap} #explorer-area th{white-space:nowrap} #explorer .scroll{max-height:16rem;overflow-y:auto;display:inline-block}
#explorer .scroll table{margin:0}
"""


def _dec(frac: str, digits: int = 4) -> str:
    return f"{float(Fraction(frac)):.{digits}g}"


def _eps(frac: str) -> str:
    """ε is already rounded *up* to the 1e-4 reporting grid: show exactly that value."""
    return f"{float(Fraction(frac)):.4f}"


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


@lru_cache(maxsize=1)
def template_env() -> jinja2.Environment:
    """The Jinja2 environment of the release's HTML (``pipeline/release/templates/``).

    Autoescaping is on: every value from a config, a spec or a code list is escaped, so a
    title such as ``<script>`` shows as text. Undefined names raise instead of rendering empty.
    (The README's Markdown has its own environment: ``pipeline.release.codebook``.)
    """
    return jinja2.Environment(loader=jinja2.FileSystemLoader(Path(__file__).parent / TEMPLATES), autoescape=True,
                              undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True,
                              keep_trailing_newline=True)


def link(path: str, text: str | None = None) -> Markup:
    """``<a href="path"><code>text</code></a>`` for a file inside the release (relative link, escaped;
    ``=`` is a legal path character and stays, as in the measurement parts' ``run=persons/``)."""
    return Markup('<a href="{}"><code>{}</code></a>').format(quote(path, safe="/="), path if text is None else text)


def _privacy_context(p: Mapping[str, Any]) -> dict[str, Any]:
    runs, detail = [], []
    for kind, run in p["runs"].items():
        runs.append({"kind": kind, "strategy": run["strategy"], "rho": run["rho"], "rho_dec": _dec(run["rho"]),
                     "eps": _eps(run["epsilon"]["cks2020"]), "eps_loose": _eps(run["epsilon"]["loose"])})
        by = run["rho_by_level_query"]
        queries: list[str] = []
        for qs in sorted(by.values(), key=len, reverse=True):  # the fullest level sets the order
            queries += [q for q in qs if q not in queries]
        detail.append({
            "kind": kind, "strategy": run["strategy"], "levels": list(by),
            "rows": [{"query": q, "cells": [{"exact": by[lv][q], "dec": _dec(by[lv][q])} if q in by[lv] else None
                                            for lv in by]} for q in queries],
            "totals": [_dec(str(sum((Fraction(v) for v in by[lv].values()), Fraction(0)))) for lv in by],
        })
    return {"runs": runs, "detail": detail, "rho_dec": _dec(p["rho"]), "eps": _eps(p["epsilon"]["cks2020"]),
            "eps_loose": _eps(p["epsilon"]["loose"])}


def default_citation(m: Mapping[str, Any]) -> str:
    """The citation of a release whose manifest carries none (releases before ``manifest.citation``)."""
    from pipeline.release.codebook import release_citation

    sw = m["software"]
    return release_citation(m["title"], m["release_id"], m["created"], m["dataset_id"], sw["version"],
                            sw.get("git_commit"), m["privacy"])


def render_index(manifest: Mapping[str, Any]) -> str:
    """The full HTML text of ``index.html`` from a manifest (its ``files`` list as it stands)."""
    from pipeline.release.tables import geo_id_prefix

    m = manifest
    paths = [f["path"] for f in m["files"]]
    spec_files = [q for q in paths if q.startswith("tables/") and q.endswith(".yaml") and q != m["table_definitions"]]
    files = [{"path": f["path"], "size": _size(f["bytes"]), "rows": "" if "rows" not in f else format(f["rows"], ","),
              "sha256": f["sha256"]} for f in m["files"]]
    levels = [{**g, "prefix": geo_id_prefix(g["name"], g["digits"])} for g in m["geolevels"]]
    return template_env().get_template("index.html.j2").render(
        m=m, sw=m["software"], commit=m["software"].get("git_commit") or "unknown", css=Markup(_CSS),
        explorer=f"{EXPLORER}/areas.js" in paths,
        has={"csv": any(q.startswith("csv/") for q in paths), "readme": "README.md" in paths,
             "measurements": any(q.startswith("measurements/") for q in paths)},
        spec_files=spec_files, levels=levels, p=m["privacy"], privacy=_privacy_context(m["privacy"]),
        inv=m["invariants"], citation=m.get("citation") or default_citation(m), files=files, link=link)


def write_index(root: Path, manifest: Mapping[str, Any]) -> Path:
    """Write ``root/index.html`` for ``manifest`` and return its path."""
    path = Path(root) / "index.html"
    path.write_text(render_index(manifest), encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------------------
# The area explorer: data files for the search on index.html (explorer/*.js)
# ---------------------------------------------------------------------------------------------

EXPLORER = "explorer"
#: at most this many blocks in one block file: a larger county is split at block-group boundaries
BLOCK_CHUNK_UNITS = 2000
_KEY = re.compile(r"[0-9A-Za-z]+")


class ExplorerError(ValueError):
    """The release's tables do not have the layout the explorer reads (a bug upstream)."""


def _js_call(key: str, payload: Any) -> str:
    """``dptabExplorer.load("key", {...});``: JSON is a JavaScript expression. ``ensure_ascii`` and
    ``<``, ``>``, ``&`` as ``\\u`` escapes leave no character that could end a script element or
    be read as markup, should the text ever be inlined into a page."""
    body = json.dumps(payload, ensure_ascii=True, separators=(",", ":"), allow_nan=False)
    body = body.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
    return f"dptabExplorer.load({json.dumps(key)},{body});\n"


def encode_counts(counts: np.ndarray) -> list[str]:
    """Each row of an int matrix ``(n_rows, n)`` as text, runs of zeros shortened:
    ``[5, 0, 0, 0, 2, 0]`` -> ``"5,~3,2,0"`` (a lone zero stays ``0``; an empty row is ``""``).

    Most block counts are 0 (about 90% on the demo release), so this makes the block files
    about six times smaller than a JSON list; ``explorer.js`` expands it (``decodeCounts``).
    Vectorised over the whole matrix (the tokens, then one join per row in polars): a
    national release has millions of block rows of ~100 counts, too many for a Python loop.
    """
    counts = np.asarray(counts, dtype=np.int64)
    n_rows, n = counts.shape
    if n_rows == 0 or n == 0:
        return [""] * n_rows
    zero = counts == 0
    after_zero = np.zeros_like(zero)
    after_zero[:, 1:] = zero[:, :-1]
    # a token starts at every non-zero and at the first zero of every run of zeros
    starts = np.flatnonzero(~zero | ~after_zero)
    row = starts // n
    # a token ends where the next one starts, or at the end of its row
    end = np.minimum(np.append(starts[1:], n_rows * n), (row + 1) * n)
    v, run = pl.col("v"), pl.col("run")
    token = (pl.when(v != 0).then(v.cast(pl.Utf8)).when(run == 1).then(pl.lit("0"))
             .otherwise(pl.lit("~") + run.cast(pl.Utf8)))
    joined = (pl.DataFrame({"row": row, "v": counts.reshape(-1)[starts], "run": end - starts})
              .group_by("row", maintain_order=True).agg(token.str.join(",")))
    return joined["v"].to_list()


def _row_hash_weights(k: int) -> np.ndarray:
    """``k`` fixed odd 64-bit multipliers (uint64) of :func:`distinct_rows`' row hash."""
    return np.random.default_rng(0x5EED).integers(1, 2**62, k, dtype=np.uint64) | np.uint64(1)


def distinct_rows(m: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The distinct rows of an int matrix ``(n, k)`` in order of first appearance, and the index
    of each row among them (int64 ``(n,)``): ``distinct[which] == m``.

    Rows are told apart by a 64-bit hash (a fixed odd multiplier per column, wrapping sums), then
    checked against their representative; only if two different rows shared a hash does it fall
    back to numpy's row sort (exact, ~20x slower on a county's block margins). The result is the
    same either way."""
    m = np.asarray(m)
    n = m.shape[0]
    if n == 0:
        return m[:0], np.zeros(0, np.int64)
    key = (m.astype(np.int64).view(np.uint64) * _row_hash_weights(m.shape[1])).sum(axis=1, dtype=np.uint64)
    _, first, inverse = np.unique(key, return_index=True, return_inverse=True)
    if not np.array_equal(m[first[inverse.reshape(-1)]], m):  # a collision: exact
        _, first, inverse = np.unique(m, axis=0, return_index=True, return_inverse=True)
    inverse = inverse.reshape(-1)
    order = np.argsort(first, kind="stable")
    rank = np.empty_like(order)
    rank[order] = np.arange(order.size)
    return m[first[order]], rank[inverse].astype(np.int64)


#: areas read back from the tables at a time (the explorer never holds a whole level's rows). It
#: reads three levels' six tables side by side (county, tract, block group), each a polars frame
#: of this many areas x the table's lines: the explorer alone at 30 M persons peaked at 1.1 GB
#: with 10,000, 0.67 GB with 2,500 (0.60 with 1,000), and was no slower (BENCHMARKS.md, session 31)
READ_UNITS = 2_500


def _open_level(root: Path, tables: list[dict[str, Any]], runs: dict[str, Any], level: str,
                index: dict[str, Any]) -> "_LevelRows":
    """A level's rows read back from ``tables/``; records its margins in ``index["moe"]`` and,
    from the first level with rows, the table shells in ``index["tables"]``."""
    rows = _LevelRows(root, tables, level, runs.get(level, {}))
    index["moe"].append(rows.moes)
    if not index["tables"] and rows.n:
        index["tables"] = [{"name": t["name"], "title": t.get("title", ""), "universe": t.get("universe", ""), **s}
                           for t, s in zip(tables, rows.shells)]
    return rows


class _LevelRows:
    """One level read back from ``tables/*.parquet`` (rows in the order written), a chunk of
    areas at a time: :meth:`chunks` yields geoids, names and counts ``(n_areas, all lines)`` (the
    tables side by side). ``moes``: each table's margins of error and ``shells`` its line numbers
    and labels. Where margins differ between areas (the full estimator; ``moes`` is then
    ``None``), each row of counts is followed by the area's margins in hundredths (``-1``: none).
    ``runs[table]``: ``(first row, rows)`` of the level in the table's file."""

    def __init__(self, root: Path, tables: Sequence[Mapping[str, Any]], level: str,
                 runs: Mapping[str, tuple[int, int]]) -> None:
        from pipeline.release.tables import RowStream

        self.root, self.tables, self.level, self.runs = root, tables, level, runs
        self.n = 0
        self.shells: list[dict[str, Any]] = []
        moes: list[list[float | None]] = []
        per_area = False
        for k, t in enumerate(tables):
            n_lines = int(t["lines"])
            start, rows = runs.get(t["name"], (0, 0))
            if rows % n_lines or (k and rows // n_lines != self.n):
                raise ExplorerError(f"tables/{t['name']}.parquet at {level}: rows are not every area x {n_lines} lines")
            self.n = rows // n_lines
            path = root / "tables" / f"{t['name']}.parquet"
            head = RowStream(path, ["line", "label", "moe90"], start).take(min(n_lines, rows))
            self.shells.append({"lines": head["line"].to_list() if rows else [],
                                "labels": head["label"].to_list() if rows else []})
            first = head["moe90"].to_numpy().astype(np.float64) if rows else np.full(n_lines, np.nan)
            moes.append([None if np.isnan(v) else float(v) for v in first])
            # the full estimator's margins differ between areas: then they travel with each area's counts
            stream = RowStream(path, ["moe90"], start)
            for s in range(0, self.n, READ_UNITS):
                m = stream.take((min(s + READ_UNITS, self.n) - s) * n_lines)["moe90"].to_numpy().astype(np.float64)
                if not np.array_equal(m.reshape(-1, n_lines), np.broadcast_to(first, (m.size // n_lines, n_lines)),
                                      equal_nan=True):
                    per_area = True
                    break
        self.per_area = per_area
        self.moes = None if per_area else moes

    def chunks(self) -> Iterator[tuple[list[str], list[str], np.ndarray]]:
        """``(geoids, names, counts)`` of consecutive chunks of :data:`READ_UNITS` areas."""
        from pipeline.release.tables import RowStream

        # the names from the first table; margins only where they differ between areas
        streams = [RowStream(self.root / "tables" / f"{t['name']}.parquet",
                             ["geoid", "line", "count"] + (["name"] if k == 0 else []) + (["moe90"] if self.per_area else []),
                             self.runs.get(t["name"], (0, 0))[0], categorical=True) for k, t in enumerate(self.tables)]
        for s in range(0, self.n, READ_UNITS):
            k = min(s + READ_UNITS, self.n) - s
            geoids: list[str] | None = None
            names: list[str] = []
            # each area's row: every count, then (per-area margins) every margin in hundredths
            # (-1: none), same line order; filled table by table in place
            width = sum(int(t["lines"]) for t in self.tables)
            counts = np.empty((k, 2 * width if self.per_area else width), dtype=np.int64)
            moe = np.empty((k, width)) if self.per_area else None
            off = 0
            for t, stream, shell in zip(self.tables, streams, self.shells):
                n_lines = int(t["lines"])
                df = stream.take(k * n_lines)
                if df.height != k * n_lines or not np.array_equal(df["line"].to_numpy(), np.tile(shell["lines"], k)):
                    raise ExplorerError(f"tables/{t['name']}.parquet at {self.level}: rows are not every area x "
                                        f"{n_lines} lines")
                g = df["geoid"].gather_every(n_lines).to_list()
                if geoids is None:
                    geoids, names = g, df["name"].gather_every(n_lines).to_list()
                elif g != geoids:
                    raise ExplorerError(f"tables/{t['name']}.parquet at {self.level}: areas differ from the other tables")
                counts[:, off:off + n_lines] = df["count"].to_numpy().reshape(k, n_lines)
                if moe is not None:
                    moe[:, off:off + n_lines] = df["moe90"].to_numpy().reshape(k, n_lines)  # as float64
                off += n_lines
            if moe is not None:
                moe *= 100
                np.rint(moe, out=moe)
                moe[np.isnan(moe)] = -1
                np.copyto(counts[:, width:], moe, casting="unsafe")  # whole numbers by now
            yield geoids or [], names, counts


def _table_runs(root: Path, tables: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, tuple[int, int]]]:
    """``{level: {table: (first row, rows)}}``: where each level's rows are in each table file."""
    from pipeline.release.tables import level_runs

    out: dict[str, dict[str, tuple[int, int]]] = {}
    for t in tables:
        offset = 0
        for level, rows in level_runs(root / "tables" / f"{t['name']}.parquet"):
            if t["name"] in out.setdefault(level, {}):
                raise ExplorerError(f"tables/{t['name']}.parquet: the rows of level {level} are not together")
            out[level][t["name"]] = (offset, rows)
            offset += rows
    return out


def _chunk_name(key: str, taken: dict[str, str]) -> str:
    """A file-name-safe, unique chunk name for a GEOID prefix (GEOIDs are digits; anything else is numbered)."""
    name = key if _KEY.fullmatch(key) else f"n{len(taken)}"
    taken[key] = name
    return name


def write_explorer(root: Path, manifest: Mapping[str, Any]) -> list[Path]:
    """Write the area explorer's data under ``root/explorer/`` and return every file written.

    Read back from the release's own ``tables/*.parquet`` (so the explorer shows exactly the
    published rows):

    - ``explorer/explorer.js``: the page's script (``templates/explorer.js``, copied);
    - ``explorer/areas.js``: every area above block (level, code, name, total population), the
      table shells, each level's margins of error (the same for every area of a level), the
      counts of the levels above county, and which file holds which counts;
    - ``explorer/areas/<county>.js``: the counts of a county, its tracts and block groups;
    - ``explorer/blocks/<county>.js`` (``<county>-<k>.js`` when a county has more than
      ``manifest["explorer"]["block_chunk_units"]`` blocks (default :data:`BLOCK_CHUNK_UNITS`),
      split at block-group boundaries): its blocks, loaded only when a block or a block group's
      blocks are shown; with per-area margins (the full estimator) the file's distinct margin
      rows once (``moes``) and each block the index of its own (:func:`_write_blocks`).

    Counts are rows of every line of every table side by side, as :func:`encode_counts` text;
    where a level's margins differ between areas, each area's margins (hundredths) follow.

    The files are JavaScript (``dptabExplorer.load(key, data)``), because a page opened from
    ``file://`` may load scripts but not fetch files. Every value is JSON-encoded; the page
    inserts them as text, never as HTML.
    """
    chunk_units = int((manifest.get("explorer") or {}).get("block_chunk_units", BLOCK_CHUNK_UNITS))
    return _write_explorer(root, manifest, chunk_units)


def _write_explorer(root: Path, manifest: Mapping[str, Any], chunk_units: int) -> list[Path]:
    import shutil

    from pipeline.release.tables import summary_level

    root = Path(root)
    out_dir = root / EXPLORER
    (out_dir / "areas").mkdir(parents=True, exist_ok=True)
    written: list[Path] = []

    def emit(key: str, payload: Any, into: list[Path] | None = None) -> None:
        path = out_dir / f"{key}.js"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(_js_call(key, payload), encoding="ascii")
        (written if into is None else into).append(path)

    script = out_dir / "explorer.js"
    shutil.copyfile(Path(__file__).parent / TEMPLATES / "explorer.js", script)
    written.append(script)

    tables = list(manifest["tables"])
    levels = list(manifest["geolevels"])
    if manifest.get("geography"):
        _write_lookup_areas(root, manifest, tables, levels, emit)
        return written
    tables = list(manifest["tables"])
    levels = list(manifest["geolevels"])
    paths = {f["path"] for f in manifest["files"]}
    above = levels[:-1] if len(levels) > 1 else levels
    # counts are split by the county (or, in another geography, the third level from the top)
    chunk = next((g for g in above if g["name"] == "county"), above[min(2, len(above) - 1)])
    chunk_digits = int(chunk["digits"])
    total_of = next((i for i, t in enumerate(tables) if t["name"] == "P1"), 0)

    index, offset = _index_head(tables, levels, paths, total_of, chunk_digits,
                                lambda g: f"{summary_level(int(g['digits']))}0000US")
    taken: dict[str, str] = {}
    runs = _table_runs(root, tables)
    # The levels from the chunk level down to the one above the blocks (county, tract, block
    # group) go to one file per county: they are read side by side and a county's file written
    # as soon as its areas of every level are read (a level's rows are in GEOID order, so a
    # county's areas come in the same order in each), never holding the nation's texts. The
    # index still lists every area above block, level by level.
    deep = [(li, g) for li, g in enumerate(levels) if (g is not levels[-1] or len(levels) == 1)
            and int(g["digits"]) >= chunk_digits]
    areas: dict[int, list[list[Any]]] = {li: [] for li, _ in deep}
    area_files: list[Path] = []  # listed after the block files, where they have always been

    def emit_area(key: str, payload: Any) -> None:
        emit(key, payload, area_files)

    streams: list[Iterator[tuple[str, str, int, str]]] = []
    for li, g in enumerate(levels):
        rows = _open_level(root, tables, runs, g["name"], index)
        if g is levels[-1] and len(levels) > 1:
            if deep:
                _write_area_chunks(emit_area, index, taken, chunk_digits, streams, list(areas), list(areas.values()))
            _write_level_blocks(emit, index, taken, levels, chunk_digits, rows, chunk_units)
            continue
        if li in areas:
            streams.append(_areas_of(rows, offset[total_of] if tables else None))
            continue
        for geoids, area_names, counts in rows.chunks():
            totals = counts[:, offset[total_of]].tolist() if tables and len(geoids) else [0] * len(geoids)
            for geoid, name, total, text in zip(geoids, area_names, totals, encode_counts(counts)):
                index["areas"].append([li, geoid, name, total])
                index["counts"][geoid] = text
    if deep and len(levels) == 1:
        _write_area_chunks(emit_area, index, taken, chunk_digits, streams, list(areas), list(areas.values()))
    for li, _ in deep:
        index["areas"] += areas.pop(li)
    written += area_files
    emit("areas", index)
    return written


def _areas_of(rows: "_LevelRows", total_col: int | None) -> Iterator[tuple[str, str, int, str]]:
    """``(geoid, name, total, counts text)`` of each area of a level, in order, read a chunk at a time."""
    for geoids, area_names, counts in rows.chunks():
        totals = counts[:, total_col].tolist() if total_col is not None and len(geoids) else [0] * len(geoids)
        yield from zip(geoids, area_names, totals, encode_counts(counts))


def _write_area_chunks(emit: Callable[[str, Any], None], index: dict[str, Any], taken: dict[str, str],
                       chunk_digits: int, streams: Sequence[Iterator[tuple[str, str, int, str]]],
                       level_of: Sequence[int], areas: Sequence[list[list[Any]]]) -> None:
    """``areas/<county>.js`` for every county from the levels' area streams (the county level
    and those below it above the blocks, each in GEOID order; ``level_of[k]``: stream ``k``'s
    level index), a county at a time: its areas of each level in turn. Each area's index entry
    ``[level, geoid, name, total]`` goes to its stream's list in ``areas``."""
    heads: list[tuple[str, str, int, str] | None] = [next(it, None) for it in streams]
    while True:
        keys = [h[0][:chunk_digits] for h in heads if h is not None]
        if not keys:
            return
        key = min(keys)
        texts: dict[str, str] = {}
        for k, it in enumerate(streams):
            while (h := heads[k]) is not None and h[0][:chunk_digits] == key:
                geoid, name, total, text = h
                areas[k].append([level_of[k], geoid, name, total])
                texts[geoid] = text
                heads[k] = next(it, None)
        name = "areas/" + _chunk_name(key, taken)
        index["area_chunks"][key] = name
        emit(name, {"counts": texts})


def _write_level_blocks(emit: Callable[[str, Any], None], index: dict[str, Any], taken: dict[str, str],
                        levels: Sequence[Mapping[str, Any]], chunk_digits: int, rows: "_LevelRows",
                        chunk_units: int) -> None:
    """:func:`_write_blocks` over the bottom level read a chunk at a time, each time for the
    parts whose blocks are all read (a county's blocks are contiguous; where a part ends is known
    once the blocks after its end are read). Memory: a read chunk plus the blocks of a part not
    yet complete (at most ``chunk_units`` and a block group), whatever a county's size — a
    county's blocks are no longer gathered whole (the US-shaped Los Angeles: 155 k blocks of
    ~600 numbers each with the full estimator's margins, ~0.74 GB and its copy)."""
    geoids: list[str] = []
    names: list[str] = []
    parts: list[np.ndarray] = []
    county = _County()
    for g, n, c in rows.chunks():
        geoids += g
        names += n
        parts.append(c)
        counts = np.concatenate(parts) if len(parts) > 1 else parts[0]
        used = _write_blocks(emit, index, taken, levels, chunk_digits, geoids, names, counts, chunk_units,
                             rows.per_area, county, final=False)
        # (a copy of what is left, so the rows written are freed; nothing written: kept as it is)
        geoids, names, parts = geoids[used:], names[used:], [counts[used:].copy() if used else counts]
    if geoids:
        _write_blocks(emit, index, taken, levels, chunk_digits, geoids, names, np.concatenate(parts), chunk_units,
                      rows.per_area, county, final=True)


def _index_head(tables: list[Any], levels: list[Any], paths: set[str], total_of: int, chunk_digits: int,
                geo_id: Callable[[Mapping[str, Any]], str], lookup: bool = False) -> tuple[dict[str, Any], list[int]]:
    """The explorer index's fixed part (levels, total line, empty collections, Parquet files) and
    each table's first column in a row of counts (``offset``, tables side by side)."""
    index: dict[str, Any] = {
        "format": 1, **({"lookup": True} if lookup else {}),
        "levels": [{"name": g["name"], "digits": int(g["digits"]), "geo_id": geo_id(g),
                    "csv": [t["name"] for t in tables if f"csv/{g['name']}/{t['name']}.csv" in paths]} for g in levels],
        "tables": [], "total": {"table": tables[total_of]["name"] if tables else None,
                                "universe": tables[total_of].get("universe") if tables else None},
        "chunk_digits": chunk_digits, "moe": [], "areas": [], "counts": {}, "area_chunks": {}, "block_chunks": {},
        "parquet": [f"tables/{t['name']}.parquet" for t in tables if f"tables/{t['name']}.parquet" in paths],
    }
    offset = [0]
    for t in tables:
        offset.append(offset[-1] + int(t["lines"]))
    return index, offset


def _write_lookup_areas(root: Path, manifest: Mapping[str, Any], tables: list[Any], levels: list[Any],
                        emit: Callable[[str, Any], None]) -> None:
    """The explorer of a lookup geography (``geography.parquet``): every level's units are areas,
    keyed ``<level>:<code>`` (their CSV ``GEO_ID``, unique across levels), each with its parent's
    key; counts of the top two levels in ``areas.js``, the others in one file per unit of the
    third level from the top (``area_chunk_of`` names each area's file)."""
    from pipeline.release.tree import read_tree

    tree = read_tree(root, manifest)
    names = [g["name"] for g in levels]
    chunk_level = names[min(2, len(names) - 1)]
    total_of = next((i for i, t in enumerate(tables) if t["name"] == "P1"), 0)
    index, offset = _index_head(tables, levels, {f["path"] for f in manifest["files"]}, total_of, 0, lambda g: "",
                                lookup=True)
    index["area_chunk_of"] = {}
    taken: dict[str, str] = {}
    by_chunk: dict[str, dict[str, str]] = {}
    runs = _table_runs(root, tables)
    for li, g in enumerate(levels):
        rows = _open_level(root, tables, runs, g["name"], index)
        # a lookup geography (a user's list of areas) keeps its levels whole: every area is in the index
        read = list(rows.chunks())
        geoids = [x for c in read for x in c[0]]
        area_names = [x for c in read for x in c[1]]
        counts = (np.concatenate([c[2] for c in read]) if read
                  else np.zeros((0, sum(int(t["lines"]) for t in tables)), dtype=np.int64))
        totals = counts[:, offset[total_of]].tolist() if tables and len(geoids) else [0] * len(geoids)
        parents = (tree.ancestors(np.asarray(geoids), g["name"], names[li - 1]).tolist() if li else [None] * len(geoids))
        chunks = (tree.ancestors(np.asarray(geoids), g["name"], chunk_level).tolist()
                  if li >= names.index(chunk_level) else [None] * len(geoids))
        for geoid, name, total, text, parent, ck in zip(geoids, area_names, totals, encode_counts(counts), parents,
                                                        chunks):
            key = f"{g['name']}:{geoid}"
            index["areas"].append([li, key, name, total, None if parent is None else f"{names[li - 1]}:{parent}"])
            if ck is None:
                index["counts"][key] = text
            else:
                by_chunk.setdefault(ck, {})[key] = text
                index["area_chunk_of"][key] = ck
    for ck, texts in by_chunk.items():
        name = "areas/" + _chunk_name(ck, taken)
        index["area_chunks"][ck] = name
        emit(name, {"counts": texts})
    emit("areas", index)


class _County:
    """The county whose block files :func:`_write_blocks` is writing: its key (GEOID prefix), its
    files' base name, and its entry of the explorer index (``[first block group, file]`` per
    part, listed as each part is written)."""

    def __init__(self) -> None:
        self.key: str | None = None
        self.base = ""
        self.parts: list[list[str]] = []


def _block_parts(geoids: Sequence[str], chunk_digits: int, parent_digits: int, chunk_units: int,
                 final: bool) -> list[tuple[str, int, int, bool]]:
    """``(county key, start, end, ends the county)`` of each block file whose blocks ``geoids``
    (the next blocks of the level, in order) hold whole: a county's blocks in parts of at most
    ``chunk_units``, each cut where the parent (block group) changes, never inside one (a block
    group of more blocks than a part is one part). ``final``: no block follows ``geoids``;
    otherwise a part whose end depends on blocks not yet read is left for the next call."""
    out: list[tuple[str, int, int, bool]] = []
    n = len(geoids)
    start = 0
    while start < n:
        key = geoids[start][:chunk_digits]
        end = start
        while end < n and geoids[end][:chunk_digits] == key:
            end += 1
        known = end < n or final  # the county's end is read (else it may go on after the buffer)
        s = start
        while s < end:
            e = s + chunk_units
            if e >= end:
                if not known:
                    return out
                out.append((key, s, end, True))
                break
            back = e  # the county goes on past e: cut where the parent changes
            while back > s and geoids[back - 1][:parent_digits] == geoids[back][:parent_digits]:
                back -= 1
            if back > s:
                e = back
            else:  # one block group holds more blocks than a part: keep it whole
                while e < end and geoids[e][:parent_digits] == geoids[e - 1][:parent_digits]:
                    e += 1
                if e == end and not known:
                    return out
            out.append((key, s, e, e == end and known))
            s = e
        start = end
    return out


def _write_blocks(emit: Callable[[str, Any], None], index: dict[str, Any], taken: dict[str, str],
                  levels: Sequence[Mapping[str, Any]], chunk_digits: int, geoids: list[str], names: list[str],
                  counts: np.ndarray, chunk_units: int, per_area: bool, county: _County, final: bool) -> int:
    """Write the block files (``blocks/<county>.js``, ``blocks/<county>-<k>.js`` when a county has
    more than ``chunk_units`` blocks: :func:`_block_parts`) whose blocks are all among ``geoids``
    (the next blocks of the level; ``county``: the county in progress, carried between calls;
    ``final``: the level's last blocks), and return how many of the blocks they hold (a prefix).
    ``per_area``: each row of ``counts`` is the counts, then as many margins (hundredths,
    :class:`_LevelRows`); a file then lists its distinct margin rows once (``moes``) and each block
    the index of its own — the margins of the full estimator depend on the geography and the
    invariants, so a county's thousands of blocks share a few hundred rows, and the margins no
    longer double the files and their encoding time."""
    parent_digits = int(levels[-2]["digits"])
    files: list[tuple[str, int, int]] = []  # (file, first block, end), in the order they are written
    for key, s, e, last in _block_parts(geoids, chunk_digits, parent_digits, chunk_units, final):
        if key != county.key:  # the county's first part: its name and index entry
            county.key, county.base, county.parts = key, "blocks/" + _chunk_name(key, taken), []
            index["block_chunks"][key] = county.parts
        # a county of one part is <county>, else its parts are <county>-1, -2, ... (a part written
        # before the county's end is never its only one)
        name = county.base if last and not county.parts else f"{county.base}-{len(county.parts) + 1}"
        county.parts.append([geoids[s][:parent_digits], name])
        files.append((name, s, e))
    used = files[-1][2] if files else 0
    moes = None
    if per_area:
        width = counts.shape[1] // 2
        counts, moes = counts[:used, :width], counts[:used, width:]
    rows = encode_counts(counts[:used])
    if moes is None:
        for name, s, e in files:
            emit(name, {"blocks": [[geoids[i], names[i], rows[i]] for i in range(s, e)]})
        return used
    # every file's distinct margin rows as text in one call (a row's text depends on that row
    # alone): one call per file cost more in setting up than in encoding
    distinct = [distinct_rows(moes[s:e]) for _, s, e in files]
    texts = encode_counts(np.concatenate([d for d, _ in distinct])) if files else []
    at = 0
    for (name, s, e), (d, which) in zip(files, distinct):
        emit(name, {"blocks": [[geoids[i], names[i], rows[i], int(which[i - s])] for i in range(s, e)],
                    "moes": texts[at:at + len(d)]})
        at += len(d)
    return used
