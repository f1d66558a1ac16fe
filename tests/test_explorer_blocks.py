"""The explorer's block files written as the blocks are read (``pipeline.release.html``): a
county's blocks are never gathered whole, and the files are exactly those the whole county
gives — parts of at most ``chunk_units`` blocks cut where the block group changes, a block
group larger than a part kept whole, ``<county>.js`` for a county of one part."""

from __future__ import annotations

from typing import Any

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

import pipeline.release.html as html_mod

LEVELS = [{"name": "county", "digits": 5}, {"name": "block_group", "digits": 12}, {"name": "block", "digits": 15}]


def _geoids(sizes: list[list[int]]) -> list[str]:
    """Block GEOIDs: county c (``sizes[c]``: its block groups' block counts), in order."""
    out = []
    for c, bgs in enumerate(sizes):
        for b, n in enumerate(bgs):
            out += [f"{c + 1:05d}{b:06d}1{i:03d}" for i in range(n)]
    return out


def _whole(geoids: list[str], chunk_units: int) -> list[tuple[str, list[str]]]:
    """The files the whole county gives: (name, its blocks), counties in order (the rule as
    written before the blocks were streamed)."""
    out = []
    start = 0
    while start < len(geoids):
        key = geoids[start][:5]
        end = start
        while end < len(geoids) and geoids[end][:5] == key:
            end += 1
        cuts, s = [], start
        while s < end:
            e = min(s + chunk_units, end)
            if e < end:
                back = e
                while back > s and geoids[back - 1][:12] == geoids[back][:12]:
                    back -= 1
                if back > s:
                    e = back
                else:
                    while e < end and geoids[e][:12] == geoids[e - 1][:12]:
                        e += 1
            cuts.append((s, e))
            s = e
        for k, (s, e) in enumerate(cuts):
            out.append((f"blocks/{key}" + ("" if len(cuts) == 1 else f"-{k + 1}"), geoids[s:e]))
        start = end
    return out


class _Rows:
    """A level's rows read ``reads[i]`` blocks at a time (as ``_LevelRows.chunks`` yields them)."""

    def __init__(self, geoids: list[str], counts: np.ndarray, reads: list[int], per_area: bool) -> None:
        self.geoids, self.counts, self.reads, self.per_area = geoids, counts, reads, per_area

    def chunks(self):
        s = 0
        for k in self.reads:
            yield self.geoids[s:s + k], [f"Block {g[-4:]}" for g in self.geoids[s:s + k]], self.counts[s:s + k]
            s += k


def _write(geoids: list[str], counts: np.ndarray, reads: list[int], chunk_units: int,
           per_area: bool) -> tuple[dict[str, Any], dict[str, Any]]:
    files: dict[str, Any] = {}

    def emit(name: str, payload: Any) -> None:
        assert name not in files
        files[name] = payload

    index: dict[str, Any] = {"block_chunks": {}}
    html_mod._write_level_blocks(emit, index, {}, LEVELS, 5, _Rows(geoids, counts, reads, per_area), chunk_units)
    return files, index


@settings(max_examples=150, deadline=None)
@given(sizes=st.lists(st.lists(st.integers(1, 9), min_size=1, max_size=6), min_size=1, max_size=4),
       chunk_units=st.integers(1, 12), read=st.integers(1, 15), per_area=st.booleans(), seed=st.integers(0, 2**16))
def test_block_files_read_in_chunks_are_the_whole_countys(sizes, chunk_units, read, per_area, seed) -> None:
    geoids = _geoids(sizes)
    rng = np.random.default_rng(seed)
    # counts, then (per-area margins) as many margins: a few distinct margin rows
    width = 3
    counts = rng.integers(0, 5, (len(geoids), 2 * width if per_area else width))
    if per_area:
        counts[:, width:] = rng.integers(0, 2, (len(geoids), 1)) * 100
    reads = [read] * (-(-len(geoids) // read))
    files, index = _write(geoids, counts, reads, chunk_units, per_area)
    one_read, one_index = _write(geoids, counts, [len(geoids)], chunk_units, per_area)
    assert files == one_read and index == one_index  # (dicts compare their order too: below)
    assert list(files) == [name for name, _ in _whole(geoids, chunk_units)]
    assert [[b[0] for b in files[name]["blocks"]] for name in files] == [bl for _, bl in _whole(geoids, chunk_units)]
    assert list(index["block_chunks"]) == list(dict.fromkeys(g[:5] for g in geoids))
    assert [name for parts in index["block_chunks"].values() for _, name in parts] == list(files)


def test_a_county_is_never_held_whole(monkeypatch) -> None:
    """One county of 40 block groups of 5 blocks, read 7 blocks at a time, parts of 10: the
    writer encodes at most a read plus a part's blocks at a time."""
    geoids = _geoids([[5] * 40])
    counts = np.arange(len(geoids) * 2).reshape(-1, 2)
    seen: list[int] = []
    encode = html_mod.encode_counts

    def spy(m):
        seen.append(len(m))
        return encode(m)

    monkeypatch.setattr(html_mod, "encode_counts", spy)
    files, index = _write(geoids, counts, [7] * 29, 10, False)
    assert len(files) == 20 and list(files)[0] == "blocks/00001-1"
    assert max(seen) <= 7 + 10
