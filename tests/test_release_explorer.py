"""The area explorer of a release's index.html (``pipeline.release.html.write_explorer``).

The browser tests open ``index.html`` from the release folder as ``file://`` in headless
Chromium and drive it through the DevTools protocol: they type into the search box, click the
results, and compare what the page shows with the release's own ``tables/*.parquet``. Without
Chromium they skip locally and FAIL under ``CI=true``.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
import polars as pl
import pytest

import pipeline.release.html as html_mod
from pipeline.release.verify import verify_release

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or (
    "/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)
TABLES = ["P1", "P2", "P3", "P4", "P5", "H1"]


def need_chromium() -> str:
    if CHROMIUM is None:
        if os.environ.get("CI") == "true":
            pytest.fail("CI=true but headless Chromium is not installed (apt-get install -y chromium)")
        pytest.skip("headless Chromium not installed (apt-get install -y chromium)")
    return CHROMIUM


# ----------------------------------------------------------------------------------------------
# a release of two counties (Alaska: 02013 has 1 tract, 02016 has 2), block files split small
# ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def release(tmp_path_factory) -> Path:
    from run_helpers import write_config

    from pipeline.inputs.synth import synthesize
    from pipeline.job.stages import run

    tmp = tmp_path_factory.mktemp("explorer")
    synthesize(8000, 11, tmp / "inputs", states=["02"])
    cfg = write_config(tmp, tmp / "inputs", release_id="EX1")
    with pytest.MonkeyPatch.context() as mp:
        # a county with more blocks than this is split at block-group boundaries: exercised here
        mp.setattr(html_mod, "BLOCK_CHUNK_UNITS", 30)
        return Path(run(cfg, progress=False)["release_path"])


@pytest.fixture(scope="module")
def tables(release: Path) -> pl.DataFrame:
    return pl.concat([pl.read_parquet(release / "tables" / f"{t}.parquet") for t in TABLES])


def area_rows(tables: pl.DataFrame, geoid: str) -> pl.DataFrame:
    return tables.filter(pl.col("geoid") == geoid)


def geoids_at(tables: pl.DataFrame, level: str, prefix: str = "") -> list[str]:
    return sorted(tables.filter((pl.col("geolevel") == level) & pl.col("geoid").str.starts_with(prefix))["geoid"]
                  .unique().to_list())


def load_js(path: Path) -> tuple[str, dict]:
    m = re.fullmatch(r'dptabExplorer\.load\(("[^"]*"),(.*)\);\n', path.read_text(), re.S)
    assert m, path
    return json.loads(m.group(1)), json.loads(m.group(2))


def test_explorer_script_is_package_data() -> None:
    """``templates/explorer.js`` is copied into every release: a non-editable install must carry it."""
    import fnmatch
    import tomllib

    root = Path(html_mod.__file__).resolve().parents[2]
    patterns = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["pipeline.release"]
    pkg = Path(html_mod.__file__).parent
    files = [p.relative_to(pkg).as_posix() for p in (pkg / html_mod.TEMPLATES).rglob("*") if p.is_file()]
    assert "templates/explorer.js" in files
    assert all(any(fnmatch.fnmatchcase(f, pat) and f.count("/") == pat.count("/") for pat in patterns) for f in files)


def decode(text: str) -> list[int]:
    out: list[int] = []
    for t in text.split(",") if text else []:
        out += [0] * int(t[1:]) if t.startswith("~") else [int(t)]
    return out


def _encode_one(row: list[int]) -> str:
    """The format, one row at a time, as explorer.js reads it: the reference for the vectorised encoder."""
    out: list[str] = []
    zeros = 0
    for x in row:
        if x == 0:
            zeros += 1
            continue
        if zeros:
            out.append("0" if zeros == 1 else f"~{zeros}")
            zeros = 0
        out.append(str(x))
    if zeros:
        out.append("0" if zeros == 1 else f"~{zeros}")
    return ",".join(out)


def test_counts_encoding_round_trips() -> None:
    assert html_mod.encode_counts(np.array([[5, 0, 0, 0, 2, 0], [0, 0, 0, 0, 0, 0]])) == ["5,~3,2,0", "~6"]
    assert html_mod.encode_counts(np.zeros((2, 0), np.int64)) == ["", ""]
    assert html_mod.encode_counts(np.zeros((0, 3), np.int64)) == []
    rng = np.random.default_rng(1)
    for _ in range(200):
        shape = (int(rng.integers(0, 30)), int(rng.integers(1, 80)))
        m = np.where(rng.random(shape) < 0.3, rng.integers(-1, 1000, shape), 0)  # -1: a per-area margin's "none"
        got = html_mod.encode_counts(m)
        assert got == [_encode_one(r) for r in m.tolist()]
        assert [decode(t) for t in got] == m.tolist()


def test_distinct_rows_in_order_of_first_appearance() -> None:
    """Per-area margins are listed once per block file: the distinct rows in order of first
    appearance and each row's index, also when two different rows share the 64-bit hash (the
    exact fallback)."""
    rng = np.random.default_rng(3)
    for _ in range(50):
        m = rng.integers(-1, 4, (int(rng.integers(0, 40)), int(rng.integers(1, 6))))
        distinct, which = html_mod.distinct_rows(m)
        seen: dict = {}
        for r in map(tuple, m.tolist()):
            seen.setdefault(r, len(seen))
        assert list(map(tuple, distinct.tolist())) == list(seen) and which.tolist() == [seen[r] for r in map(tuple, m.tolist())]
    w = html_mod._row_hash_weights(3).astype(object)
    a, b = [int(w[1]), 0, 7], [0, int(w[0]), 7]  # a·w = b·w (mod 2^64): one hash, two rows
    m = np.array([a, b, a, [1, 2, 3]], dtype=np.int64)
    distinct, which = html_mod.distinct_rows(m)
    assert distinct.tolist() == [a, b, [1, 2, 3]] and which.tolist() == [0, 1, 0, 2]


def test_explorer_files_are_listed_checksummed_and_hold_the_tables(release: Path, tables: pl.DataFrame) -> None:
    m = json.loads((release / "manifest.json").read_text())
    listed = {f["path"] for f in m["files"]}
    on_disk = {p.relative_to(release).as_posix() for p in (release / "explorer").rglob("*") if p.is_file()}
    assert on_disk and on_disk <= listed
    assert {"explorer/explorer.js", "explorer/areas.js", "explorer/areas/02013.js", "explorer/areas/02016.js"} <= on_disk
    assert verify_release(release) == []
    _, index = load_js(release / "explorer/areas.js")
    above = tables.filter(pl.col("geolevel") != "block").select("geolevel", "geoid", "name").unique()
    assert sorted((index["levels"][a[0]]["name"], a[1], a[2]) for a in index["areas"]) == sorted(above.iter_rows())
    offsets = np.cumsum([0] + [len(t["lines"]) for t in index["tables"]])
    assert [t["name"] for t in index["tables"]] == TABLES
    # every block is in exactly one block file, whole block groups per file, with every count of every table
    blocks: dict[str, list[int]] = {}
    for county, parts in index["block_chunks"].items():
        for first, key in parts:
            k, data = load_js(release / "explorer" / f"{key}.js")
            assert k == key and all(b[0].startswith(county) for b in data["blocks"])
            assert data["blocks"][0][0].startswith(first)
            assert len(data["blocks"]) <= 30 or len({b[0][:12] for b in data["blocks"]}) == 1
            for b in data["blocks"]:
                assert b[0] not in blocks
                # per-area margins (full estimator): the index of the block's row among the file's
                # distinct margin rows, which follow its counts when read
                assert (len(b) == 4) == (index["moe"][-1] is None) == ("moes" in data)
                blocks[b[0]] = decode(b[2]) + (decode(data["moes"][b[3]]) if len(b) == 4 else [])
            if "moes" in data:  # each distinct, and each used
                assert len({tuple(decode(t)) for t in data["moes"]}) == len(data["moes"])
                assert {b[3] for b in data["blocks"]} == set(range(len(data["moes"])))
    assert len(index["block_chunks"]["02016"]) > 1  # split: more blocks than the (patched) limit
    bgs_per_file = [{b[0][:12] for b in load_js(release / "explorer" / f"{key}.js")[1]["blocks"]}
                    for parts in index["block_chunks"].values() for _, key in parts]
    assert sum(len(s) for s in bgs_per_file) == len(set().union(*bgs_per_file))  # no block group in two files
    assert sorted(blocks) == geoids_at(tables, "block")
    # every area above block: its counts in areas.js (nation, state) or in its county's file
    chunks = {k: load_js(release / "explorer" / f"{v}.js")[1]["counts"] for k, v in index["area_chunks"].items()}
    assert sorted(index["area_chunks"]) == ["02013", "02016"]
    for _level, g, _name, total in index["areas"]:
        text = index["counts"][g] if len(g) < 5 else chunks[g[:5]][g]
        rows = tables.filter(pl.col("geoid") == g).sort("table", "line")
        want_row = [c for t in TABLES for c in rows.filter(pl.col("table") == t)["count"].to_list()]
        got = decode(text)
        if index["moe"][_level] is None:  # per-area margins (full estimator) follow the counts, in hundredths
            moe = [m for t in TABLES for m in rows.filter(pl.col("table") == t)["moe90"].to_list()]
            assert got[len(want_row):] == [-1 if m is None else round(m * 100) for m in moe]
            got = got[:len(want_row)]
        assert got == want_row and total == want_row[0]
    want = tables.filter(pl.col("geolevel") == "block").sort("geoid", "table", "line")
    for g in geoids_at(tables, "block"):
        rows = want.filter(pl.col("geoid") == g)
        for i, t in enumerate(TABLES):
            got = blocks[g][offsets[i]:offsets[i + 1]]
            assert got == rows.filter(pl.col("table") == t).sort("line")["count"].to_list()
        if index["moe"][-1] is None:
            moe = [m for t in TABLES for m in rows.filter(pl.col("table") == t).sort("line")["moe90"].to_list()]
            assert blocks[g][offsets[-1]:] == [-1 if m is None else round(m * 100) for m in moe]


# ----------------------------------------------------------------------------------------------
# a small DevTools-protocol client
# ----------------------------------------------------------------------------------------------

class Browser:
    """Headless Chromium with one page, driven over the DevTools protocol (websockets)."""

    def __init__(self, chromium: str, profile: Path, width: int = 1200, height: int = 1600) -> None:
        from websockets.sync.client import connect

        profile.mkdir(parents=True, exist_ok=True)
        self.log = open(profile.parent / "chromium.log", "w")
        self.proc = subprocess.Popen(
            [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--no-first-run", "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
             "--remote-debugging-port=0", f"--user-data-dir={profile}", f"--window-size={width},{height}",
             "about:blank"], stdout=subprocess.DEVNULL, stderr=self.log)
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 60
        while not (port_file.is_file() and port_file.read_text().strip()):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"Chromium did not start (exit {self.proc.poll()})")
            time.sleep(0.1)
        port = int(port_file.read_text().split()[0])
        targets = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=30))
        page = next(t for t in targets if t["type"] == "page")
        self.ws = connect(page["webSocketDebuggerUrl"], max_size=None, open_timeout=30)
        self.n = 0
        self.events: list[dict] = []
        for domain in ("Page", "Runtime", "Log", "Network"):
            self.send(f"{domain}.enable")

    def send(self, method: str, **params):
        self.n += 1
        ident = self.n
        self.ws.send(json.dumps({"id": ident, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv(timeout=60))
            if msg.get("id") == ident:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})
            self.events.append(msg)

    def js(self, expression: str):
        r = self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in r:
            raise RuntimeError(f"{expression}: {r['exceptionDetails']}")
        return r["result"].get("value")

    def wait(self, expression: str, timeout: float = 30):
        deadline = time.monotonic() + timeout
        while True:
            value = self.js(expression)
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {expression}")
            time.sleep(0.05)

    def open(self, url: str, ready: bool = True) -> None:
        self.send("Page.navigate", url=url)
        self.wait("document.readyState === 'complete'" +
                  (" && document.documentElement.dataset.explorer === 'ready'" if ready else ""))

    def type(self, selector: str, text: str) -> None:
        """Clear an input the way a user does (select all, delete), then type ``text``."""
        self.js(f"document.querySelector({json.dumps(selector)}).focus()")
        self.js(f"document.querySelector({json.dumps(selector)}).select()")
        for kind in ("rawKeyDown", "keyUp"):
            self.send("Input.dispatchKeyEvent", type=kind, key="Backspace", code="Backspace", windowsVirtualKeyCode=8)
        assert self.js(f"document.querySelector({json.dumps(selector)}).value") == ""
        self.send("Input.insertText", text=text)

    def press_enter(self) -> None:
        for kind in ("rawKeyDown", "char", "keyUp"):
            extra = {"text": "\r"} if kind == "char" else {}
            self.send("Input.dispatchKeyEvent", type=kind, key="Enter", code="Enter", windowsVirtualKeyCode=13, **extra)

    def click(self, element_js: str) -> None:
        """A real mouse click at the centre of the element ``element_js`` evaluates to."""
        x, y = self.wait(f"(() => {{ const e = {element_js}; if (!e) return null; e.scrollIntoView({{block: 'center'}});"
                         "const r = e.getBoundingClientRect(); return [r.x + r.width / 2, r.y + r.height / 2]; })()")
        for kind in ("mouseMoved", "mousePressed", "mouseReleased"):
            self.send("Input.dispatchMouseEvent", type=kind, x=x, y=y, button="left", clickCount=1)

    def screenshot(self, path: Path) -> Path:
        path.write_bytes(base64.b64decode(self.send("Page.captureScreenshot", format="png")["data"]))
        return path

    def problems(self) -> list[str]:
        """Uncaught exceptions, console errors and failed loads seen so far."""
        out = []
        for e in self.events:
            p = e.get("params", {})
            if e.get("method") == "Runtime.exceptionThrown":
                out.append(json.dumps(p["exceptionDetails"])[:500])
            elif e.get("method") == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
                out.append(json.dumps(p["args"])[:500])
            elif e.get("method") == "Log.entryAdded" and p["entry"]["level"] == "error":
                out.append(p["entry"]["text"])
            elif e.get("method") == "Network.loadingFailed":
                out.append(f"load failed: {p.get('errorText')}")
        return out

    def requested(self) -> list[str]:
        return [e["params"]["request"]["url"] for e in self.events if e.get("method") == "Network.requestWillBeSent"]

    def close(self) -> None:
        try:
            self.ws.close()
        finally:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.log.close()


@pytest.fixture
def browser(tmp_path):
    b = Browser(need_chromium(), tmp_path / "profile")
    yield b
    b.close()


# ----------------------------------------------------------------------------------------------
# what the page shows
# ----------------------------------------------------------------------------------------------

SHOWN_TABLE = """[...document.querySelectorAll('#explorer-area details[data-table]')].map(d => [d.dataset.table,
  [...d.querySelectorAll('tbody tr')].map(tr => [Number(tr.dataset.line), tr.cells[1].textContent,
   tr.cells[2].textContent, tr.cells[3].textContent])])"""


def moe_text(v: float | None) -> str:
    if v is None:
        return ""
    return "exact" if v == 0 else "± " + f"{v:,.2f}".rstrip("0").rstrip(".")


def expected_tables(tables: pl.DataFrame, geoid: str) -> list:
    rows = area_rows(tables, geoid)
    return [[t, [[ln, lab, f"{c:,}", moe_text(m)] for ln, lab, c, m in
                 rows.filter(pl.col("table") == t).sort("line").select("line", "label", "count", "moe90").iter_rows()]]
            for t in TABLES]


def shown(b: Browser) -> dict:
    return b.js("""({name: document.querySelector('#explorer-name') && document.querySelector('#explorer-name').textContent,
      geoid: document.querySelector('#explorer-geoid') && document.querySelector('#explorer-geoid').textContent,
      parents: [...document.querySelectorAll('#explorer-parents button')].map(x => x.dataset.geoid),
      children: [...document.querySelectorAll('#explorer-children button')].map(x => x.dataset.geoid),
      blockFiles: [...document.querySelectorAll('script[data-explorer]')].map(s => s.dataset.explorer).sort()})""")


def wait_area(b: Browser, geoid: str) -> dict:
    b.wait(f"document.querySelector('#explorer-geoid') && document.querySelector('#explorer-geoid').textContent === "
           f"{json.dumps(geoid)} && document.querySelector('#explorer-area details[data-table]') !== null")
    return shown(b)


def result_buttons(b: Browser) -> list[str]:
    return b.js("[...document.querySelectorAll('#explorer-results button')].map(x => x.textContent)")


@pytest.mark.browser
def test_search_county_tract_and_blocks_in_chromium(release: Path, tables: pl.DataFrame, browser: Browser,
                                                     tmp_path: Path) -> None:
    b = browser
    b.open((release / "index.html").as_uri())
    assert "13 areas above block" in b.js("document.getElementById('explorer-status').textContent")
    assert shown(b)["blockFiles"] == []  # nothing beyond the index before an area is asked for

    # a county by (part of) its name
    b.type("#explorer-q", "aleutians west")
    b.wait("document.querySelectorAll('#explorer-results button').length > 0")
    # the county first; then its tracts and block groups (a name search also matches the areas a name is part of)
    inside = len(geoids_at(tables, "tract", "02016")) + len(geoids_at(tables, "block_group", "02016"))
    assert result_buttons(b)[0] == "Aleutians West Census Area, Alaska" and len(result_buttons(b)) == 1 + inside
    b.click("document.querySelector('#explorer-results button')")
    s = wait_area(b, "02016")
    assert s["name"] == "Aleutians West Census Area, Alaska"
    assert b.js(SHOWN_TABLE) == expected_tables(tables, "02016")  # every table, count and margin of error
    p1_total = area_rows(tables, "02016").filter((pl.col("table") == "P1") & (pl.col("line") == 1))["count"].item()
    assert b.js("document.querySelector('details[data-table=P1] tr[data-line=\"1\"] td.count').textContent") == f"{p1_total:,}"
    assert s["parents"] == ["", "02"]
    assert s["children"] == geoids_at(tables, "tract", "02016") and len(s["children"]) == 2
    assert "#area=0500000US02016" in b.js("location.hash")

    # a tract by name: query words begin words of the name (or of the areas above), so "3" is not
    # found inside a code, and the area named so comes first
    b.type("#explorer-q", "tract 3")
    b.wait("document.querySelectorAll('#explorer-results button').length > 0")
    names = result_buttons(b)
    assert names[0] == "Census Tract 3" and "Census Tract 2" not in names and "Census Tract 1" not in names
    assert "in Aleutians West Census Area, Alaska ·" in b.js("document.querySelector('#explorer-results li').textContent")

    # a tract by its code, chosen with Enter
    tract = "02016000300"
    b.type("#explorer-q", tract)
    b.wait("document.querySelectorAll('#explorer-results button').length > 0")
    assert result_buttons(b)[0] == "Census Tract 3"
    b.press_enter()
    s = wait_area(b, tract)
    assert b.js(SHOWN_TABLE) == expected_tables(tables, tract)
    assert s["parents"] == ["", "02", "02016"] and s["children"] == geoids_at(tables, "block_group", tract)
    assert s["blockFiles"] == ["areas/02016"]  # the county's counts, loaded on demand; no block yet

    # a block group: its blocks come from the county's block file, loaded now
    bg = s["children"][0]
    b.click(f"document.querySelector('#explorer-children button[data-geoid=\"{bg}\"]')")
    b.wait(f"document.querySelector('#explorer-geoid').textContent === '{bg}' && "
           "document.querySelectorAll('#explorer-children button').length > 0")
    s = shown(b)
    want_blocks = geoids_at(tables, "block", bg)
    assert s["children"] == want_blocks
    assert [f for f in s["blockFiles"] if f.startswith("blocks/")] and all(
        f.startswith("blocks/02016") for f in s["blockFiles"] if f.startswith("blocks/"))
    p1 = tables.filter((pl.col("table") == "P1") & (pl.col("line") == 1) & pl.col("geoid").is_in(want_blocks))
    biggest = p1.sort("count", descending=True)["geoid"][0]
    shown_totals = b.js("[...document.querySelectorAll('#explorer-children tbody tr')].map(tr => "
                        "[tr.querySelector('button').dataset.geoid, tr.cells[2].textContent])")
    assert shown_totals == [[g, f"{c:,}"] for g, c in p1.sort("geoid").select("geoid", "count").iter_rows()]
    b.click(f"document.querySelector('#explorer-children button[data-geoid=\"{biggest}\"]')")
    s = wait_area(b, biggest)
    assert s["name"] == area_rows(tables, biggest)["name"][0] and s["parents"] == ["", "02", "02016", tract, bg]
    assert b.js(SHOWN_TABLE) == expected_tables(tables, biggest) and s["children"] == []

    # a block of the other county by its code: that county's block file is loaded on demand
    block = geoids_at(tables, "block", "02013")[-1]
    assert not any(f.startswith("blocks/02013") for f in s["blockFiles"])
    b.type("#explorer-q", "1000000US" + block)
    b.wait("document.querySelectorAll('#explorer-results button').length > 0")
    assert result_buttons(b)[0] == f"Block {block}"
    b.click("document.querySelector('#explorer-results button')")
    s = wait_area(b, block)
    assert any(f.startswith("blocks/02013") for f in s["blockFiles"])
    assert b.js(SHOWN_TABLE) == expected_tables(tables, block)

    # the area's own CSV: the release's rows of that block, every table
    href = b.js("document.getElementById('explorer-csv').href")
    assert href.startswith("data:text/csv")
    csv = pl.read_csv(urllib.parse.unquote(href.split(",", 1)[1]).encode(), schema_overrides={"moe90": pl.Float64})
    want = area_rows(tables, block).with_columns(pl.lit("1000000US" + block).alias("GEO_ID"))
    assert csv.columns == ["GEO_ID", "geolevel", "name", "table", "line", "label", "count", "moe90"]
    assert csv.select(pl.exclude("line")).equals(want.select(csv.columns).drop("line"))
    assert csv["line"].to_list() == want["line"].to_list()
    # every link of the download list points at a file of the release
    for h in b.js("[...document.querySelectorAll('#explorer-downloads a')].map(a => a.getAttribute('href'))")[1:]:
        assert (release / h).is_file(), h

    # a code that is not in the release says so
    b.type("#explorer-q", "99999")
    b.wait("document.getElementById('explorer-count').textContent === 'No area matches.'")

    # back to the county (deep link), then a picture of it
    b.js("location.hash = '#area=0500000US02016'")
    wait_area(b, "02016")
    shot = b.screenshot(tmp_path / "explorer.png")
    import matplotlib.image as mpimg

    img = mpimg.imread(shot)
    assert img.shape[0] >= 1000 and img.shape[1] >= 1000
    assert float(img[..., :3].std()) > 0.05  # not blank
    top = b.js("document.getElementById('explorer-name').getBoundingClientRect().top")
    assert 0 < top < img.shape[0]  # the area's heading is on the picture
    if os.environ.get("DPTAB_KEEP_SCREENSHOT"):
        shutil.copyfile(shot, os.environ["DPTAB_KEEP_SCREENSHOT"])

    assert b.problems() == []
    assert all(u.startswith(("file://", "data:")) for u in b.requested()), b.requested()
    assert any(u.endswith("/explorer/blocks/02016-1.js") or "/explorer/blocks/02016" in u for u in b.requested())


@pytest.mark.browser
def test_missing_data_files_say_so_in_chromium(release: Path, browser: Browser, tmp_path: Path) -> None:
    """A block file or the index that cannot be loaded gives a message, not a page that waits forever."""
    copy = tmp_path / "copy"
    shutil.copytree(release, copy)
    (copy / "explorer/blocks/02016-3.js").unlink()
    b = browser
    b.open((copy / "index.html").as_uri() + "#area=1500000US020160003001")
    b.wait("document.querySelector('#explorer-children') !== null && "
           "document.querySelector('#explorer-children').textContent.indexOf('could not load') >= 0")
    assert "explorer/blocks/02016-3.js" in b.js("document.getElementById('explorer-children').textContent")
    assert b.js("document.querySelector('details[data-table=P1]') !== null")  # the block group itself is shown
    (copy / "explorer/areas.js").unlink()
    b.open((copy / "index.html").as_uri(), ready=False)
    assert b.js("document.getElementById('explorer-status').textContent") == \
        "The area index explorer/areas.js could not be loaded."
    assert b.js("document.getElementById('explorer-q').disabled") is True


# ----------------------------------------------------------------------------------------------
# escaping: a name and a label carrying markup are shown as text and never run
# ----------------------------------------------------------------------------------------------

EVIL_NAME = '<img src=x onerror="window.__pwned=1"><script>window.__pwned=2</script>County'
EVIL_LABEL = 'Total: <script>window.__pwned=3</script><b onmouseover="window.__pwned=4">x</b>'


@pytest.fixture(scope="module")
def evil_release(tmp_path_factory):
    """A release whose county names (as if from an edited geography-names file) and a P1 label
    carry markup; the names stay patched while the tests verify it (verify regenerates names)."""
    import yaml
    from test_release import PRIVACY, meta
    from test_tables_cases import make_case

    import pipeline.release.verify_data as verify_mod
    import pipeline.release.writer as writer_mod
    from pipeline.model.schemas import SCHEMAS_DIR

    tmp = tmp_path_factory.mktemp("evil")
    raw = yaml.safe_load((SCHEMAS_DIR / "tables" / "pl94.yaml").read_text())
    raw["tables"]["P1"]["lines"][0]["label"] = EVIL_LABEL
    defs = tmp / "defs.yaml"
    defs.write_text(yaml.safe_dump(raw, sort_keys=False))
    real = writer_mod.unit_names

    def names(level, geoids, lookup=False):
        out = real(level, geoids, lookup)
        return np.array([EVIL_NAME] * len(out), dtype=object) if level == "county" else out

    c = make_case(3, n_blocks=30)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(writer_mod, "unit_names", names)
        mp.setattr(verify_mod, "unit_names", names)
        yield write_release_(tmp, c, meta("evil"), defs, PRIVACY)


def write_release_(tmp, c, m, defs, privacy) -> Path:
    from pipeline.release.writer import write_release

    return write_release(tmp / "r", m, c.geography, c.persons, c.units, c.invariants, privacy, tables=defs, csv=False)


def test_evil_values_are_data_in_the_files(evil_release: Path) -> None:
    assert verify_release(evil_release) == []
    _, index = load_js(evil_release / "explorer/areas.js")
    assert EVIL_NAME in [a[2] for a in index["areas"]]
    assert EVIL_LABEL == index["tables"][0]["labels"][0]
    for p in (evil_release / "explorer").rglob("*.js"):
        if p.name != "explorer.js":
            assert "<" not in p.read_text(), p  # json with ensure_ascii: no raw markup at all
    page = (evil_release / "index.html").read_text()
    assert re.findall(r"<script\b[^>]*>", page) == ['<script src="explorer/explorer.js">', '<script src="explorer/areas.js">']


@pytest.mark.browser
def test_evil_name_and_label_never_run_in_chromium(evil_release: Path, browser: Browser) -> None:
    b = browser
    b.open((evil_release / "index.html").as_uri())
    b.type("#explorer-q", "onerror")
    b.wait("document.querySelectorAll('#explorer-results button').length > 0")
    assert result_buttons(b)[0] == EVIL_NAME  # the county; then the areas inside it
    b.click("document.querySelector('#explorer-results button')")
    b.wait("document.querySelector('#explorer-name') !== null && document.querySelector('details[data-table=P1]') !== null")
    assert b.js("document.getElementById('explorer-name').textContent") == EVIL_NAME
    assert b.js("document.querySelector('details[data-table=P1] tr[data-line=\"1\"]').cells[1].textContent") == EVIL_LABEL
    b.click("document.querySelector('details[data-table=P1] tr[data-line=\"1\"]').cells[1]")  # hover and click the label
    # a tract's parent list names the county as text too
    b.click("document.querySelector('#explorer-children button')")
    b.wait("document.querySelectorAll('#explorer-parents button').length >= 3")
    assert EVIL_NAME in b.js("document.getElementById('explorer-parents').textContent")
    time.sleep(0.3)  # an <img onerror> would have fired by now
    assert b.js("typeof window.__pwned") == "undefined"
    assert b.js("document.querySelectorAll('#explorer img, #explorer-area script, #explorer b').length") == 0
    assert b.problems() == []
