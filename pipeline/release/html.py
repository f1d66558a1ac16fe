"""The release's ``index.html``: a static, self-contained page for researchers.

No external assets, no script, no link outside the release folder (the files table links to
each file by its relative path): the page is readable offline and from an archive. The page is
the Jinja2 template ``templates/index.html.j2`` with autoescaping, so every value (a config
title, a table label, a code list) is escaped. It says what is in the release, how the data were protected
(plain language and the ρ/ε table), how to read margins of error, what was checked, how to
cite, and lists every file with its size and sha256. Everything shown comes from the
manifest, so the page never carries anything the manifest does not.
"""

from __future__ import annotations

from fractions import Fraction
from functools import lru_cache
from pathlib import Path
from typing import Any, Mapping
from urllib.parse import quote

import jinja2
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
    """``<a href="path"><code>text</code></a>`` for a file inside the release (relative link, escaped)."""
    return Markup('<a href="{}"><code>{}</code></a>').format(quote(path), path if text is None else text)


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
    from pipeline.release.tables import summary_level

    m = manifest
    paths = [f["path"] for f in m["files"]]
    spec_files = [q for q in paths if q.startswith("tables/") and q.endswith(".yaml") and q != m["table_definitions"]]
    files = [{"path": f["path"], "size": _size(f["bytes"]), "rows": "" if "rows" not in f else format(f["rows"], ","),
              "sha256": f["sha256"]} for f in m["files"]]
    levels = [{**g, "prefix": f"{summary_level(g['digits'])}0000US"} for g in m["geolevels"]]
    return template_env().get_template("index.html.j2").render(
        m=m, sw=m["software"], commit=m["software"].get("git_commit") or "unknown", css=Markup(_CSS),
        has={"csv": any(q.startswith("csv/") for q in paths), "readme": "README.md" in paths,
             "measurements": any(q.startswith("measurements/") for q in paths)},
        spec_files=spec_files, levels=levels, p=m["privacy"], privacy=_privacy_context(m["privacy"]),
        inv=m["invariants"], citation=m.get("citation") or default_citation(m), files=files, link=link)


def write_index(root: Path, manifest: Mapping[str, Any]) -> Path:
    """Write ``root/index.html`` for ``manifest`` and return its path."""
    path = Path(root) / "index.html"
    path.write_text(render_index(manifest), encoding="utf-8")
    return path
