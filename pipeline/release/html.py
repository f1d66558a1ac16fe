"""The release's ``index.html``: a static, self-contained page for researchers.

No external assets, no script, no link outside the release folder: the page is readable
offline and from an archive. It says what is in the release, how the data were protected
(plain language and the ρ/ε table), how to read margins of error, what was checked, how to
cite, and lists every file with its size and sha256. Everything shown comes from the
manifest, so the page never carries anything the manifest does not.
"""

from __future__ import annotations

from fractions import Fraction
from html import escape
from pathlib import Path
from typing import Any, Mapping

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:72rem;margin:2rem auto;padding:0 1rem;
color:#1b1b1b;line-height:1.5}
h1{font-size:1.6rem;margin-bottom:.2rem} h2{font-size:1.25rem;margin-top:2rem;border-bottom:1px solid #ccc}
table{border-collapse:collapse;margin:.5rem 0 1rem} td,th{border:1px solid #ccc;padding:.25rem .5rem;text-align:left;
vertical-align:top} th{background:#f3f3f3} td.num{text-align:right;font-variant-numeric:tabular-nums}
code,.mono{font-family:ui-monospace,SFMono-Regular,Menlo,monospace;font-size:.85em;word-break:break-all}
.meta{color:#555} .note{background:#f7f7f0;border-left:4px solid #c9b458;padding:.5rem 1rem}
"""


def _e(x: Any) -> str:
    return escape(str(x), quote=True)


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


def _privacy_section(p: Mapping[str, Any]) -> str:
    rows = []
    for kind, run in p["runs"].items():
        rows.append(f"<tr><td>{_e(kind)}</td><td>{_e(run['strategy'])}</td><td class=num><code>{_e(run['rho'])}</code> "
                    f"(≈ {_dec(run['rho'])})</td><td class=num>{_eps(run['epsilon']['cks2020'])}</td>"
                    f"<td class=num>{_eps(run['epsilon']['loose'])}</td></tr>")
    rows.append(f"<tr><th>all (composed)</th><th></th><th class=num><code>{_e(p['rho'])}</code> (≈ {_dec(p['rho'])})</th>"
                f"<th class=num>{_eps(p['epsilon']['cks2020'])}</th><th class=num>{_eps(p['epsilon']['loose'])}</th></tr>")
    detail = []
    for kind, run in p["runs"].items():
        by = run["rho_by_level_query"]
        queries: list[str] = []
        for qs in sorted(by.values(), key=len, reverse=True):  # the fullest level sets the order
            queries += [q for q in qs if q not in queries]
        head = "".join(f"<th>{_e(lv)}</th>" for lv in by)
        body = "".join(
            f"<tr><td>{_e(q)}</td>" + "".join(
                f"<td class=num title='{_e(by[lv][q])}'>{_dec(by[lv][q])}</td>" if q in by[lv] else "<td>—</td>"
                for lv in by) + "</tr>" for q in queries)
        level_tot = "".join(
            f"<th class=num>{_dec(str(sum((Fraction(v) for v in by[lv].values()), Fraction(0))))}</th>" for lv in by)
        detail.append(f"<h3>ρ by level and query: {_e(kind)} ({_e(run['strategy'])})</h3><table><tr><th>query</th>{head}</tr>"
                      f"{body}<tr><th>level total</th>{level_tot}</tr></table>")
    return f"""
<h2>How the data were protected</h2>
<p>Every number in this release was computed from confidential census records to which random
noise was added, following the design of the US Census Bureau's 2020 Disclosure Avoidance
System. The noise is calibrated so that the release reveals almost nothing about whether any
one person's record was in the data: this is <em>differential privacy</em>. A fixed set of
counts (<em>measurements</em>) was drawn for every geographic unit with exact discrete Gaussian
noise; everything else — the tables, the microdata — was computed from those noisy
measurements alone (post-processing), so it adds no privacy loss. Post-processing makes the
numbers whole, non-negative and consistent: every area adds up to the area above it.</p>
<p>The privacy loss is measured by ρ (zero-concentrated differential privacy; {_e(p['neighbouring'])}).
Budgets add up over all measurements. ρ converts to the more familiar (ε, δ) with δ = {_e(p['delta'])};
we report the tight conversion of Canonne, Kamath &amp; Steinke (2020) and, for comparison, the
textbook bound ρ + 2√(ρ ln 1/δ). Smaller is more private. Exact values are fractions; hover a
number in the detailed tables to see it.</p>
<table><tr><th>run</th><th>strategy</th><th>ρ</th><th>ε (CKS 2020)</th><th>ε (textbook bound)</th></tr>
{''.join(rows)}</table>
{''.join(detail)}"""


def _invariants_section(inv: Mapping[str, Any]) -> str:
    items = []
    if inv.get("state_totals") is not None:
        items.append(f"<li>The total population of the nation and of each state ({len(inv['state_totals'])} "
                     "state(s)) is published exactly, as in the 2020 Census.</li>")
    if inv.get("block_housing_units") is not None:
        b = inv["block_housing_units"]
        items.append(f"<li>The number of housing units in every block ({b['blocks']:,} blocks, {b['total']:,} units) "
                     f"is exact; the declared values are in <code>{_e(b['file'])}</code>. Occupied and vacant are noisy.</li>")
    items.append("<li>No persons under 18 live in nursing facilities (a structural zero).</li>")
    return ("<h2>What is exact (invariants)</h2><p>These counts were declared public before any noise was drawn "
            "and are published without noise:</p><ul>" + "".join(items) + "</ul>")


def render_index(manifest: Mapping[str, Any]) -> str:
    """The full HTML text of ``index.html`` from a manifest (its ``files`` list as it stands)."""
    m = manifest
    sw = m["software"]
    tables = "".join(
        f"<tr><td><code>{_e(t['name'])}</code></td><td>{_e(t['title'])}</td><td>{_e(t['universe'])}</td>"
        f"<td class=num>{t['lines']}</td></tr>" for t in m["tables"])
    levels = "".join(f"<tr><td>{_e(g['name'])}</td><td class=num>{g['units']:,}</td><td class=num>{g['digits']}</td></tr>"
                     for g in m["geolevels"])
    file_rows = "".join(
        f"<tr><td><code>{_e(f['path'])}</code></td><td class=num>{_size(f['bytes'])}</td>"
        f"<td class=num>{'' if 'rows' not in f else format(f['rows'], ',')}</td>"
        f"<td class=mono>{_e(f['sha256'])}</td></tr>" for f in m["files"])
    csv_note = (" The same rows as CSV in <code>csv/&lt;geolevel&gt;/&lt;table&gt;.csv</code>."
                if any(f["path"].startswith("csv/") for f in m["files"]) else "")
    has_meas = any(f["path"].startswith("measurements/") for f in m["files"])
    commit = sw.get("git_commit") or "unknown"
    seed = "" if m.get("seed") is None else (f"<p class=note>This release was made with a fixed random seed "
                                             f"({_e(m['seed'])}) for testing or experiments: it is <strong>not</strong> "
                                             "protected and must not be used as an official release.</p>")
    citation = m.get("citation") or (
        f"{m['title']} (release {m['release_id']}, {m['created'][:10]}). Differentially private P.L. 94-171 style "
        f"tables produced with dptab {sw['version']} (commit {commit}), dataset {m['dataset_id']}, "
        f"privacy-loss budget ρ = {m['privacy']['rho']} (ε = {_eps(m['privacy']['epsilon']['cks2020'])} at "
        f"δ = {m['privacy']['delta']}). Files and checksums: manifest.json of the release.")
    meas = ("<li><code>measurements/noisy_measurements.parquet</code>: every noisy measurement that was drawn "
            "(run, geolevel, geoid, query, answer index and label, noisy value, exact noise variance, σ² as a "
            "fraction). Researchers can build their own estimators from it.</li>" if has_meas else "")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>{_e(m['title'])} — {_e(m['release_id'])}</title><style>{_CSS}</style></head>
<body>
<h1>{_e(m['title'])}</h1>
<p class=meta>Release <code>{_e(m['release_id'])}</code> · created {_e(m['created'])} · dataset
<code>{_e(m['dataset_id'])}</code> · dptab {_e(sw['version'])} (commit <code>{_e(commit)}</code>) · config sha256
<code>{_e(m['config_hash'])}</code> · {m['persons']:,} persons</p>
{seed}
<h2>What is here</h2>
<ul>
<li><code>tables/&lt;table&gt;.parquet</code>: each table for every geographic level, one row per area and
table line: <code>geoid, geolevel, name, table, line, label, count, moe90</code>.{csv_note}</li>
<li><code>microdata/persons.parquet</code>: privacy-protected microdata, one row per person, in the
Census Bureau's PPMF layout (TABBLKST, TABBLKCOU, TABTRACTCE, TABBLKGRPCE, TABBLK, EPNUM, RTYPE,
GQTYPE_PL, VOTING_AGE, CENHISP, CENRACE). Tabulating it gives exactly the block tables. The rows are
not real people: they are the protected block counts written out one person per row.</li>
{meas}
<li><code>tables/definitions.yaml</code>: how every table line is defined (a filter over the
histogram's attributes) and which lines must add up.</li>
<li><code>manifest.json</code>: machine-readable description of this release with the checksum of every file.</li>
</ul>
<h3>Tables (line numbers and labels follow the 2020 P.L. 94-171 table shells)</h3>
<table><tr><th>table</th><th>title</th><th>universe</th><th>lines</th></tr>{tables}</table>
<h3>Geographic levels</h3>
<table><tr><th>level</th><th>areas</th><th>GEOID digits</th></tr>{levels}</table>
{_privacy_section(m['privacy'])}
{_invariants_section(m['invariants'])}
<h2>How to read margins of error</h2>
<p>The column <code>moe90</code> is a 90% margin of error <em>m</em> that describes the noise: the
estimate of that table line computed from the level's own noisy measurements alone (weighted least
squares, before post-processing) lies within ± <em>m</em> of the confidential count in 90% of draws of
the noise. It is computed from the noise design alone — the same for every area of a level, so it
reveals nothing about the data — as {m['uncertainty']['z']} times that estimate's standard error; the
standard error is <em>m</em> / {m['uncertainty']['z']}. Read a published count <em>c</em> as
"<em>c</em> ± <em>m</em>, give or take the post-processing effects below".</p>
<ul>
<li>A margin of 0 marks a count that is exact (an invariant).</li>
<li>An empty margin means the level's measurements do not determine that line on their own.</li>
<li>Post-processing (whole, non-negative, consistent numbers) can shift small counts, mostly upward
from zero; that bias is not in the margin of error. Treat small counts with extra caution, and
prefer sums over several areas or lines: their relative error is smaller.</li>
<li>The margin uses only the level's own measurements. Post-processing also makes every area add up
to the area above it, which usually makes published counts more accurate than the margin says — most
visibly for blocks, where the 2020 design spends little of the budget and the margins are wide. The
margin is a guide to the noise, not a bound on the published count's error.</li>
<li>For the sum of several areas at the same level, the standard errors add in quadrature.</li>
</ul>
<h2>What was checked</h2>
<p>Before this release was published, and again by <code>dptab verify</code> on the folder: every line of
every area equals the sum of that line over the areas inside it; the lines of each table add up as the
table shell says (e.g. P1 total = one race + two or more races); the same totals agree across tables
(P1 total = P2 total = P5 group-quarters total + household population); the population 18 and over never
exceeds the total population; the invariants above hold exactly; no count is negative; the microdata
reproduce the block tables; and every file matches its checksum. Run
<code>dptab verify &lt;this folder&gt;</code> to check it yourself.</p>
<h2>How to cite</h2>
<p class=note>{_e(citation)}</p>
<h2>Files</h2>
<table><tr><th>file</th><th>size</th><th>rows</th><th>sha256</th></tr>{file_rows}</table>
<p class=meta><code>index.html</code> and <code>manifest.json</code> are listed in the manifest itself.</p>
</body></html>
"""


def write_index(root: Path, manifest: Mapping[str, Any]) -> Path:
    """Write ``root/index.html`` for ``manifest`` and return its path."""
    path = Path(root) / "index.html"
    path.write_text(render_index(manifest), encoding="utf-8")
    return path
