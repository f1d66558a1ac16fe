/* dptab area explorer: search every area of the release by name or code and show its tables.
 *
 * Works from the release folder opened as a file (no server, nothing from outside): the data are
 * JavaScript files next to this one (explorer/areas.js, explorer/areas/<county>.js,
 * explorer/blocks/<county>.js), each calling dptabExplorer.load(key, data); a county's blocks
 * are loaded only when they are shown. Every value from the data is inserted as text
 * (textContent, createTextNode), never as HTML.
 */
(function () {
  "use strict";

  var loaded = {};   // key -> data
  var pending = {};  // key -> {promise, resolve, reject}
  var X = null;      // the index (explorer/areas.js) with areas linked to parents and children
  var current = 0;   // the request number of the area being shown (late loads of older ones are dropped)
  var MAX_RESULTS = 50;

  function load(key, data) {
    loaded[key] = data;
    if (key === "areas") { init(data); }
    var p = pending[key];
    if (p) { delete pending[key]; p.resolve(data); }
  }

  /* The data file explorer/<key>.js, inserted as a script tag once. */
  function need(key) {
    if (loaded[key]) { return Promise.resolve(loaded[key]); }
    if (pending[key]) { return pending[key].promise; }
    var p = {};
    p.promise = new Promise(function (resolve, reject) { p.resolve = resolve; p.reject = reject; });
    pending[key] = p;
    var s = document.createElement("script");
    s.src = "explorer/" + key + ".js";
    s.setAttribute("data-explorer", key);
    s.onerror = function () {
      delete pending[key];
      s.parentNode.removeChild(s);
      p.reject(new Error("could not load explorer/" + key + ".js"));
    };
    document.head.appendChild(s);
    return p.promise;
  }

  /* el("td", {className: "num"}, "text", node, ...): an element with text children as text nodes. */
  function el(tag, props) {
    var e = document.createElement(tag);
    var k;
    if (props) { for (k in props) { if (Object.prototype.hasOwnProperty.call(props, k)) { e[k] = props[k]; } } }
    for (var i = 2; i < arguments.length; i++) {
      var c = arguments[i];
      if (c === null || c === undefined) { continue; }
      e.appendChild(typeof c === "object" ? c : document.createTextNode(String(c)));
    }
    return e;
  }

  /* "5,~3,2,0" -> [5, 0, 0, 0, 2, 0]: a row of counts with runs of zeros shortened (html.encode_counts). */
  function decodeCounts(text) {
    var out = [];
    if (text === "") { return out; }
    text.split(",").forEach(function (t) {
      if (t.charAt(0) === "~") {
        for (var i = Number(t.slice(1)); i > 0; i--) { out.push(0); }
      } else {
        out.push(Number(t));
      }
    });
    return out;
  }

  function fmt(n) { return Number(n).toLocaleString("en-US"); }

  function $(id) { return document.getElementById(id); }

  function init(index) {
    X = {index: index, levels: index.levels, areas: [], byGeoid: {}, tables: index.tables, offsets: [0]};
    index.tables.forEach(function (t) { X.offsets.push(X.offsets[X.offsets.length - 1] + t.lines.length); });
    index.areas.forEach(function (r) {
      var a = {level: r[0], geoid: r[1], name: r[2], total: r[3], parent: null, children: [], up: r[4]};
      X.areas.push(a);
      X.byGeoid[a.geoid] = a;
    });
    X.areas.forEach(function (a) {
      if (a.level > 0) {
        // a lookup geography names each area's parent; GEOIDs nest by prefix
        var p = index.lookup ? X.byGeoid[a.up] : X.byGeoid[a.geoid.slice(0, X.levels[a.level - 1].digits)];
        if (p && p.level === a.level - 1) { a.parent = p; p.children.push(a); }
      }
    });
    X.areas.forEach(function (a) {
      var words = [a.name, levelName(a.level), a.geoid];
      for (var p = a.parent; p && p.level > 0; p = p.parent) { words.push(p.name); }
      // the words a query word may begin: of the name, the level, the code and the areas above
      a.words = words.join(" ").toLowerCase().split(/[\s,;()|]+/).filter(function (w) { return w !== ""; });
    });
    if (document.readyState === "loading") {
      document.addEventListener("DOMContentLoaded", start);
    } else {
      start();
    }
  }

  function levelName(i) { return X.levels[i].name.replace(/_/g, " "); }

  function geoId(level, geoid) { return X.levels[level].geo_id + geoid; }

  function blockLevel() { return X.levels.length - 1; }

  function hasBlocks() { return X.levels.length > 1 && Object.keys(X.index.block_chunks).length > 0; }

  function start() {
    var q = $("explorer-q");
    if (!q) { return; }
    q.disabled = false;
    q.addEventListener("input", function () { search(q.value); });
    q.addEventListener("keydown", function (ev) {
      if (ev.key === "Enter") {
        ev.preventDefault();
        var first = $("explorer-results").querySelector("button");
        if (first) { first.click(); }
      }
    });
    $("explorer-status").textContent = fmt(X.areas.length) + (hasBlocks() ? " areas above block" : " areas") +
      (hasBlocks() ? "; a " + levelName(blockLevel()) + " is found by its " + X.levels[blockLevel()].digits +
        "-digit code or from the " + levelName(blockLevel() - 1) + " it is in." : ".");
    window.addEventListener("hashchange", fromHash);
    fromHash();
    document.documentElement.setAttribute("data-explorer", "ready");
  }

  /* ---- search ------------------------------------------------------------------------------ */

  function codeOf(query) {
    var q = query.trim().toUpperCase();
    var m = /^[0-9A-Z]{7}US([0-9A-Z]*)$/.exec(q);  // a Census GEO_ID
    if (m) { return m[1]; }
    return /^[0-9]+$/.test(q) ? q : null;
  }

  function search(query) {
    var list = $("explorer-results");
    list.textContent = "";
    var q = query.trim().toLowerCase();
    if (!q) { $("explorer-count").textContent = ""; return; }
    var code = codeOf(query);
    var hits = [];
    if (code !== null && hasBlocks() && code.length === X.levels[blockLevel()].digits) {
      hits.push({block: code});
    }
    var words = q.split(/[\s,;()|]+/).filter(function (w) { return w !== ""; });
    X.areas.forEach(function (a) {
      var rank;
      if (code !== null && a.geoid.indexOf(code) === 0) {
        rank = a.geoid === code ? 0 : 2;
      } else if (words.every(function (w) { return a.words.some(function (x) { return x.indexOf(w) === 0; }); })) {
        // the name itself first: equal or ending in the query, then beginning a word of it with it
        var n = a.name.toLowerCase();
        var end = n.length - q.length;
        rank = n === q || (end > 0 && n.lastIndexOf(" " + q) === end - 1) ? 0 :
          (n.indexOf(q) === 0 || n.indexOf(" " + q) >= 0 ? 1 : 3);
      } else {
        return;
      }
      hits.push({area: a, rank: rank});
    });
    hits.sort(function (x, y) {
      if (x.block || y.block) { return x.block ? -1 : 1; }
      return x.rank - y.rank || x.area.level - y.area.level || (x.area.geoid < y.area.geoid ? -1 : 1);
    });
    hits.slice(0, MAX_RESULTS).forEach(function (h) {
      if (h.block) {
        list.appendChild(el("li", null, linkButton("Block " + h.block, function () { go(blockLevel(), h.block); }),
                            el("span", {className: "meta"}, " block · load its county's blocks")));
        return;
      }
      var a = h.area;
      list.appendChild(el("li", null, linkButton(a.name, function () { go(a.level, a.geoid); }),
                          el("span", {className: "meta"}, " " + describe(a))));
    });
    $("explorer-count").textContent = hits.length === 0 ? "No area matches." :
      (hits.length > MAX_RESULTS ? "First " + MAX_RESULTS + " of " + fmt(hits.length) + " matches: type more to narrow." :
        fmt(hits.length) + (hits.length === 1 ? " match." : " matches."));
  }

  function describe(a) {
    var parts = [levelName(a.level), a.geoid || "(no code)"];
    var up = [];
    for (var p = a.parent; p && p.level > 0; p = p.parent) {
      // "Bristol County, Rhode Island" already names its state
      var named = up.some(function (u) { return u.slice(-(p.name.length + 2)) === ", " + p.name; });
      if (!named) { up.push(p.name); }
    }
    if (up.length) { parts.push("in " + up.join(", ")); }
    if (a.total !== null && a.total !== undefined) { parts.push(totalLabel() + " " + fmt(a.total)); }
    return "· " + parts.join(" · ");
  }

  function totalLabel() { return (X.index.total.universe || "total").toLowerCase(); }

  function linkButton(text, onclick) {
    var b = el("button", {type: "button", className: "area-link"}, text);
    b.addEventListener("click", onclick);
    return b;
  }

  /* ---- showing an area ------------------------------------------------------------------- */

  function go(level, geoid) {
    var h = "#area=" + geoId(level, geoid);
    if (location.hash === h) { show(level, geoid); } else { location.hash = h; }
  }

  function fromHash() {
    if (X.index.lookup) {
      var k = location.hash.indexOf("#area=") === 0 ? decodeURIComponent(location.hash.slice(6)) : "";
      if (Object.prototype.hasOwnProperty.call(X.byGeoid, k)) { show(X.byGeoid[k].level, k); }
      return;
    }
    var m = /^#area=([0-9A-Za-z]{7}US)([0-9A-Za-z]*)$/.exec(location.hash);
    if (!m) { return; }
    for (var i = 0; i < X.levels.length; i++) {
      if (X.levels[i].geo_id === m[1] && X.levels[i].digits === m[2].length) { show(i, m[2]); return; }
    }
  }

  function areaChunk(geoid) {
    if (X.index.lookup) { return X.index.area_chunks[X.index.area_chunk_of[geoid]]; }
    return X.index.area_chunks[geoid.slice(0, X.index.chunk_digits)];
  }

  /* The block file holding the blocks of the block group `parent` (a GEOID prefix). */
  function blockChunk(parentGeoid) {
    var parts = X.index.block_chunks[parentGeoid.slice(0, X.index.chunk_digits)] || [];
    var name = null;
    parts.forEach(function (p) { if (p[0] <= parentGeoid) { name = p[1]; } });
    return name;
  }

  function blocksOf(data) {
    if (!data.byGeoid) {
      data.byGeoid = {};
      data.blocks.forEach(function (b) { data.byGeoid[b[0]] = b; });
    }
    return data.byGeoid;
  }

  function countsOf(level, geoid) {
    if (hasBlocks() && level === blockLevel()) {
      var key = blockChunk(geoid.slice(0, X.levels[level - 1].digits));
      if (!key) { return Promise.reject(new Error("No block file of this release holds a block " + geoid + ".")); }
      return need(key).then(function (d) {
        var b = blocksOf(d)[geoid];
        if (!b) { throw new Error("No block with the code " + geoid + " in this release."); }
        /* per-area margins (full estimator): the file lists its distinct margin rows once */
        return b.length > 3 ? decodeCounts(b[2]).concat(decodeCounts(d.moes[b[3]])) : decodeCounts(b[2]);
      });
    }
    if (Object.prototype.hasOwnProperty.call(X.index.counts, geoid)) { return Promise.resolve(decodeCounts(X.index.counts[geoid])); }
    var k = areaChunk(geoid);
    if (!k) { return Promise.reject(new Error("no data file holds " + geoid)); }
    return need(k).then(function (d) {
      if (!Object.prototype.hasOwnProperty.call(d.counts, geoid)) { throw new Error("no area " + geoid); }
      return decodeCounts(d.counts[geoid]);
    });
  }

  function show(level, geoid) {
    var req = ++current;
    var box = $("explorer-area");
    box.textContent = "";
    var area = level < blockLevel() || !hasBlocks() ? X.byGeoid[geoid] : null;
    if ((level < blockLevel() || !hasBlocks()) && (!area || area.level !== level)) {
      box.appendChild(el("p", {className: "note"}, "No " + levelName(level) + " with the code " + geoid + " in this release."));
      return;
    }
    box.appendChild(el("p", {className: "meta"}, "Loading " + (geoid || "the nation") + " …"));
    countsOf(level, geoid).then(function (counts) {
      if (req !== current) { return; }
      var name = area ? area.name : null;
      if (!area) {
        var d = loaded[blockChunk(geoid.slice(0, X.levels[level - 1].digits))];
        name = blocksOf(d)[geoid][1];
      }
      render(box, level, geoid, name, counts);
    }).catch(function (err) {
      if (req !== current) { return; }
      box.textContent = "";
      box.appendChild(el("p", {className: "note"}, String(err.message || err)));
    });
  }

  function parentOf(level, geoid) {
    if (X.index.lookup) { return X.byGeoid[geoid] ? X.byGeoid[geoid].parent : null; }
    return level > 0 ? X.byGeoid[geoid.slice(0, X.levels[level - 1].digits)] || null : null;
  }

  function render(box, level, geoid, name, counts) {
    box.textContent = "";
    var code = geoId(level, geoid);
    box.appendChild(el("h3", {id: "explorer-name"}, name));
    box.appendChild(el("p", {className: "meta"}, levelName(level), " · GEOID ", el("code", {id: "explorer-geoid"}, geoid || "(none)"),
                       " · GEO_ID ", el("code", null, code)));
    // parents, top down
    var up = [];
    for (var p = parentOf(level, geoid); p; p = p.parent) { up.unshift(p); }
    var parents = el("p", {id: "explorer-parents"}, "Part of: ");
    if (!up.length) { parents.appendChild(document.createTextNode("— (the top level)")); }
    up.forEach(function (a, i) {
      if (i) { parents.appendChild(document.createTextNode(" › ")); }
      var b = linkButton(a.name, function () { go(a.level, a.geoid); });
      b.setAttribute("data-geoid", a.geoid);
      b.setAttribute("data-level", X.levels[a.level].name);
      parents.appendChild(b);
    });
    box.appendChild(parents);
    // children
    var kids = el("div", {id: "explorer-children"});
    box.appendChild(kids);
    if (level < blockLevel()) {
      var area = X.byGeoid[geoid];
      if (level === blockLevel() - 1 && hasBlocks()) {
        kids.appendChild(el("p", {className: "meta"}, "Loading the blocks …"));
        var key = blockChunk(geoid);
        (key ? need(key) : Promise.reject(new Error("no block file for " + geoid))).then(function (d) {
          var list = d.blocks.filter(function (b) { return b[0].slice(0, geoid.length) === geoid; }).map(function (b) {
            return {level: blockLevel(), geoid: b[0], name: b[1], total: decodeCounts(b[2])[X.offsets[totalIndex()]]};
          });
          childTable(kids, list);
        }).catch(function (err) { kids.textContent = String(err.message || err); });
      } else {
        childTable(kids, area.children);
      }
    }
    box.appendChild(downloads(level, geoid, name, counts));
    X.tables.forEach(function (t, ti) { box.appendChild(tableOf(t, ti, level, counts)); });
  }

  function totalIndex() {
    for (var i = 0; i < X.tables.length; i++) { if (X.tables[i].name === X.index.total.table) { return i; } }
    return 0;
  }

  function childTable(box, list) {
    box.textContent = "";
    if (!list.length) { box.appendChild(el("p", {className: "meta"}, "Contains no areas.")); return; }
    box.appendChild(el("h4", null, "Contains " + fmt(list.length) + " " + levelName(list[0].level) +
                       (list.length === 1 ? "" : "s")));
    var tb = el("tbody");
    list.forEach(function (c) {
      var b = linkButton(c.name, function () { go(c.level, c.geoid); });
      b.setAttribute("data-geoid", c.geoid);
      tb.appendChild(el("tr", null, el("td", null, b), el("td", null, el("code", null, c.geoid)),
                        el("td", {className: "num"}, fmt(c.total))));
    });
    var head = el("tr", null, el("th", null, "name"), el("th", null, "GEOID"), el("th", null, totalLabel()));
    box.appendChild(el("div", {className: "scroll"}, el("table", {className: "children"}, el("thead", null, head), tb)));
  }

  function moeText(m) { return m === null || m === undefined ? "" : "± " + fmt(m); }

  /* A line's margin of error: the level's (the same for every area), or, where the level has none
     (null: margins differ between areas), the area's own, stored after its counts in hundredths. */
  function moeOf(level, ti, i, counts) {
    var lv = X.index.moe[level];
    if (lv) { return lv[ti][i]; }
    var v = counts[X.offsets[X.offsets.length - 1] + X.offsets[ti] + i];
    return v === undefined || v < 0 ? null : v / 100;
  }

  function tableOf(t, ti, level, counts) {
    var tb = el("tbody");
    var off = X.offsets[ti];
    t.lines.forEach(function (line, i) {
      var m = moeOf(level, ti, i, counts);
      var tr = el("tr", null, el("td", {className: "num"}, line), el("td", null, t.labels[i]),
                  el("td", {className: "num count"}, fmt(counts[off + i])),
                  el("td", {className: "num moe", title: m === null ? "not determined by this level's measurements" :
                    (m === 0 ? "exact (an invariant)" : "90% margin of error")}, m === 0 ? "exact" : moeText(m)));
      tr.setAttribute("data-line", line);
      tb.appendChild(tr);
    });
    var head = el("tr", null, el("th", null, "line"), el("th", null, "label"), el("th", null, "count"),
                  el("th", {title: "90% margin of error"}, "± MOE (90%)"));
    var d = el("details", {className: "explorer-table"},
               el("summary", null, el("strong", null, t.name), " — " + t.title + " (universe: " + t.universe + ")"),
               el("table", null, el("thead", null, head), tb));
    d.setAttribute("data-table", t.name);
    if (ti === 0) { d.open = true; }
    return d;
  }

  function csvField(v) {
    var s = v === null || v === undefined ? "" : String(v);
    return /[",\n\r]/.test(s) ? '"' + s.replace(/"/g, '""') + '"' : s;
  }

  function areaCsv(level, geoid, name, counts) {
    var rows = ["GEO_ID,geolevel,name,table,line,label,count,moe90"];
    X.tables.forEach(function (t, ti) {
      t.lines.forEach(function (line, i) {
        rows.push([geoId(level, geoid), X.levels[level].name, name, t.name, line, t.labels[i],
                   counts[X.offsets[ti] + i], moeOf(level, ti, i, counts)].map(csvField).join(","));
      });
    });
    return rows.join("\n") + "\n";
  }

  function downloads(level, geoid, name, counts) {
    var box = el("div", {id: "explorer-downloads"}, el("h4", null, "Download"));
    var ul = el("ul");
    var a = el("a", {href: "data:text/csv;charset=utf-8," + encodeURIComponent(areaCsv(level, geoid, name, counts)),
                     id: "explorer-csv"}, "this area's tables (CSV, every table and line)");
    a.setAttribute("download", geoId(level, geoid) + ".csv");
    ul.appendChild(el("li", null, a));
    var lv = X.levels[level];
    if (lv.csv.length) {
      var li = el("li", null, "every " + levelName(level) + " of the release: ");
      lv.csv.forEach(function (t, i) {
        if (i) { li.appendChild(document.createTextNode(", ")); }
        li.appendChild(el("a", {href: "csv/" + lv.name + "/" + t + ".csv"}, el("code", null, "csv/" + lv.name + "/" + t + ".csv")));
      });
      ul.appendChild(li);
    }
    if (X.index.parquet.length) {
      var lp = el("li", null, "every level (Parquet): ");
      X.index.parquet.forEach(function (p, i) {
        if (i) { lp.appendChild(document.createTextNode(", ")); }
        lp.appendChild(el("a", {href: p}, el("code", null, p)));
      });
      ul.appendChild(lp);
    }
    box.appendChild(ul);
    return box;
  }

  window.addEventListener("load", function () {
    var status = $("explorer-status");
    if (!X && status) { status.textContent = "The area index explorer/areas.js could not be loaded."; }
  });

  window.dptabExplorer = {load: load, need: need};
}());
