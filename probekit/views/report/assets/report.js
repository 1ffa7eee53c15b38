/* probekit report: every chart is drawn here from the JSON in #data (no library, no network). */
"use strict";
(function () {
  const D = JSON.parse(document.getElementById("data").textContent);
  const NS = "http://www.w3.org/2000/svg";
  const PALETTE = ["#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#F0E442", "#000000"];
  const state = { hidden: new Set(), byKind: false, summaryMetric: null };
  const tip = document.getElementById("tip");

  // -- small helpers ---------------------------------------------------------------------------
  function el(tag, attrs, parent, text) {
    const e = tag.startsWith("svg:") ? document.createElementNS(NS, tag.slice(4)) : document.createElement(tag);
    for (const k in attrs || {}) e.setAttribute(k, attrs[k]);
    if (text !== undefined) e.textContent = text;
    if (parent) parent.appendChild(e);
    return e;
  }
  function fmt(v, d) {
    if (v === null || v === undefined || Number.isNaN(v)) return "–";
    if (typeof v !== "number") return String(v);
    const a = Math.abs(v);
    if (d !== undefined) return v.toFixed(d);
    return a !== 0 && (a < 0.01 || a >= 1e5) ? v.toExponential(2) : v.toFixed(a < 10 ? 3 : 1);
  }
  function kindColour(kind) { return PALETTE[D.groups.indexOf(kind) % PALETTE.length]; }
  function name(mi) { return D.models[mi].display || D.models[mi].name; }  // "name (group)", the group once
  function modelKey(vis) { return vis.map((i) => ({ label: name(i), colour: colour(i), kind: "line" })); }
  function refKey(M, vis) {
    const has = vis.some((i) => M.refs[D.models[i].name] !== null && M.refs[D.models[i].name] !== undefined);
    return has ? [{ label: M.ref_key || "uniform attention (no locality)", colour: "#666", kind: "dash" }] : [];
  }
  function params(n) {  // 21628800 -> "21,628,800 (21.6 M)"
    if (n === null || n === undefined) return null;
    const s = Number(n).toLocaleString("en-US");
    return n >= 1e9 ? `${s} (${(n / 1e9).toFixed(2)} B)` : n >= 1e5 ? `${s} (${(n / 1e6).toFixed(1)} M)` : s;
  }
  function colour(mi) { return state.byKind ? kindColour(D.models[mi].group) : PALETTE[mi % PALETTE.length]; }
  function visible() {
    const idx = D.models.map((_, i) => i).filter((i) => !state.hidden.has(i));
    return state.byKind ? idx.sort((a, b) => D.groups.indexOf(D.models[a].group) - D.groups.indexOf(D.models[b].group) || a - b) : idx;
  }
  function showTip(evt, text) { tip.textContent = text; tip.style.display = "block";
    tip.style.left = (evt.clientX + 12) + "px"; tip.style.top = (evt.clientY + 12) + "px"; }
  function hideTip() { tip.style.display = "none"; }
  function hover(node, text) {
    node.addEventListener("mousemove", (e) => showTip(e, text));
    node.addEventListener("mouseleave", hideTip);
  }
  function extent(values) {
    let lo = Infinity, hi = -Infinity;
    for (const v of values) if (Number.isFinite(v)) { lo = Math.min(lo, v); hi = Math.max(hi, v); }
    if (!Number.isFinite(lo)) return [0, 1];
    if (lo === hi) { lo -= 1; hi += 1; }
    const pad = (hi - lo) * 0.05;
    return [lo - pad, hi + pad];
  }
  function ticks(lo, hi, n) {
    const step0 = (hi - lo) / n, mag = Math.pow(10, Math.floor(Math.log10(step0)));
    const step = [1, 2, 5, 10].map((m) => m * mag).find((s) => s >= step0) || step0;
    const out = [];
    for (let v = Math.ceil(lo / step) * step; v <= hi + 1e-9; v += step) out.push(+v.toPrecision(12));
    return out;
  }

  // A legend's layout: items ({label, colour, kind: dot|line|dash|band}) in rows that fit width w
  function legendLayout(items, w) {
    const rows = [[]];
    let x = 0;
    for (const it of items) {
      const iw = 22 + 6.1 * it.label.length + 12;
      if (x > 0 && x + iw > w) { rows.push([]); x = 0; }
      rows[rows.length - 1].push({ it, x });
      x += iw;
    }
    return rows;
  }
  // An x-y frame: returns {svg, x(), y(), plot}; ``legend``: items drawn in the chart, under its x axis
  function frame(parent, w, h, xdom, ydom, xlabel, ylabel, xint, legend) {
    const lrows = legend && legend.length ? legendLayout(legend, w - 52 - 10) : [];
    const m = { l: 52, r: 10, t: 8, b: 34 + 15 * lrows.length + (lrows.length ? 4 : 0) };
    h += 15 * lrows.length + (lrows.length ? 4 : 0);
    const svg = el("svg:svg", { width: w, height: h, viewBox: `0 0 ${w} ${h}` }, parent);
    const x = (v) => m.l + (v - xdom[0]) / (xdom[1] - xdom[0]) * (w - m.l - m.r);
    const y = (v) => h - m.b - (v - ydom[0]) / (ydom[1] - ydom[0]) * (h - m.t - m.b);
    const g = el("svg:g", { class: "grid" }, svg), ax = el("svg:g", { class: "axis" }, svg);
    for (const t of ticks(ydom[0], ydom[1], 5)) {
      el("svg:line", { x1: m.l, x2: w - m.r, y1: y(t), y2: y(t) }, g);
      el("svg:text", { x: m.l - 5, y: y(t) + 3.5, "text-anchor": "end" }, ax, String(+t.toPrecision(6)));
    }
    // layers are integers: every integer inside the domain (which is padded by half a layer each side)
    const xt = xint ? Array.from({ length: Math.max(0, Math.floor(xdom[1]) - Math.ceil(xdom[0]) + 1) }, (_, i) => Math.ceil(xdom[0]) + i)
                    : ticks(xdom[0], xdom[1], 6);
    const every = Math.max(1, Math.ceil(xt.length / 14));
    xt.forEach((t, i) => { if (i % every === 0) el("svg:text", { x: x(t), y: h - m.b + 14, "text-anchor": "middle", class: "xtick" }, ax, String(t)); });
    el("svg:line", { x1: m.l, x2: w - m.r, y1: h - m.b, y2: h - m.b }, ax);
    el("svg:line", { x1: m.l, x2: m.l, y1: m.t, y2: h - m.b }, ax);
    el("svg:text", { x: (m.l + w - m.r) / 2, y: h - m.b + 28, "text-anchor": "middle" }, ax, xlabel);
    if (lrows.length) {  // the key, inside the chart: it stays with the chart when the page scrolls
      const g = el("svg:g", { class: "legend" }, svg);
      lrows.forEach((row, r) => row.forEach(({ it, x: lx }) => {
        const gx = m.l + lx, gy = h - m.b + 34 + 15 * r + 8;
        if (it.kind === "dot") el("svg:circle", { cx: gx + 8, cy: gy - 3.5, r: 3.5, fill: it.colour }, g);
        else if (it.kind === "band") el("svg:rect", { x: gx, y: gy - 8, width: 16, height: 9, fill: it.colour, "fill-opacity": 0.25 }, g);
        else el("svg:line", { x1: gx, x2: gx + 16, y1: gy - 3.5, y2: gy - 3.5, stroke: it.colour, "stroke-width": it.kind === "dash" ? 1.2 : 2,
                               "stroke-dasharray": it.kind === "dash" ? "4 3" : "none" }, g);
        el("svg:text", { x: gx + 22, y: gy }, g, it.label);
      }));
    }
    el("svg:text", { x: 12, y: (m.t + h - m.b) / 2, "text-anchor": "middle",
                      transform: `rotate(-90 12 ${(m.t + h - m.b) / 2})` }, ax, ylabel);
    return { svg, x, y, m, w, h };
  }

  // -- controls ---------------------------------------------------------------------------------
  function controls() {
    const box = document.getElementById("controls");
    D.models.forEach((m, i) => {
      const lab = el("label", {}, box);
      const cb = el("input", { type: "checkbox", class: "model-toggle", "data-model": i }, lab);
      cb.checked = true;
      el("span", { class: "swatch", "data-model": i }, lab);
      lab.appendChild(document.createTextNode(name(i)));
      cb.addEventListener("change", () => { cb.checked ? state.hidden.delete(i) : state.hidden.add(i); render(); });
    });
    const lab = el("label", {}, box);
    const cb = el("input", { type: "checkbox", id: "group-kind" }, lab);
    lab.appendChild(document.createTextNode(` group by ${D.group_by}`));
    cb.addEventListener("change", () => { state.byKind = cb.checked; render(); });
  }

  // -- provenance ---------------------------------------------------------------------------------
  function kvTable(parent, rows) {
    const t = el("table", {}, parent);
    for (const [k, v] of rows) { const tr = el("tr", {}, t); el("th", {}, tr, k); el("td", {}, tr, v); }
    return t;
  }
  function provenance() {
    const s = document.getElementById("provenance"), P = D.provenance;
    kvTable(s, [["run", `${P.name} — ${P.status}`], ["started / finished", `${P.started} / ${P.finished || "–"}`],
                ["run time", `${fmt(P.seconds, 1)} s`], ["images", `${P.images.count} (fingerprint ${P.images.fingerprint})` +
                 (P.images.skipped && P.images.skipped.length ? `, ${P.images.skipped.length} skipped` : "")],
                ["metrics", D.metrics.map((m) => `${m.label} (${m.unit || "no unit"}) ${JSON.stringify(m.options)}`).join("; ")],
                ["group contrasts by", D.group_by]]);
    el("h3", {}, s, "Models");
    const t = el("table", { id: "models-table" }, el("div", { class: "scroll" }, s)), hr = el("tr", {}, t);
    for (const h of ["model", "training", "spec", "weights", "layout", "parameters", "load s", "probe s", "cached"]) el("th", {}, hr, h);
    // a model served from the cache was not loaded now: the seconds of the run that computed its parts
    const secs = (v, earlier) => (v !== null && v !== undefined ? fmt(v, 2)
                                  : earlier !== null && earlier !== undefined ? `${fmt(earlier, 2)} (when computed)` : null);
    D.models.forEach((m) => {
      const tr = el("tr", {}, t);
      for (const v of [m.name, m.training, m.spec, m.weights, m.layout, params(m.parameters), secs(m.load_s, m.load_s_cached),
                       secs(m.probe_s, m.probe_s_cached), m.cached])
        el("td", {}, tr, v === null || v === undefined ? "–" : String(v));
    });
    if (P.failures.length) {
      el("h3", { class: "bad" }, s, "Failures");
      const ul = el("ul", {}, s);
      for (const f of P.failures) el("li", { class: "bad" }, ul, `${f.model} (${f.stage}): ${f.error}: ${f.message}`);
    } else el("p", { class: "note" }, s, "No model failed.");
    for (const n of P.notes) el("p", { class: "note" }, s, n);
    el("h3", {}, s, "Library versions");
    el("pre", {}, s, Object.entries(P.versions || {}).map(([k, v]) => `${k} ${v}`).join("\n"));
    el("h3", {}, s, "Options (run file after command-line flags)");
    el("pre", {}, s, JSON.stringify(P.config, null, 1));
  }

  // -- per metric charts ----------------------------------------------------------------------------
  function depthProfile(parent, M) {
    const H = D.heads[M.label];
    const vis = visible(), rows = H.filter((r) => vis.includes(r[0]));
    const refs = vis.map((i) => M.refs[D.models[i].name]).filter((v) => v !== null && v !== undefined);
    const layers = rows.map((r) => r[1]);
    const xd = [Math.min(...layers, 0) - 0.5, Math.max(...layers, 0) + 0.5];
    const key = vis.map((i) => ({ label: name(i), colour: colour(i), kind: "dot" })).concat(refKey(M, vis));
    const f = frame(parent, 520, 300, xd, extent(rows.map((r) => r[3]).concat(refs)), "layer", M.axis, true, key);
    const seen = new Set();
    for (const i of vis) {
      const ref = M.refs[D.models[i].name];
      if (ref === null || ref === undefined || seen.has(ref.toFixed(6))) continue;
      seen.add(ref.toFixed(6));
      const line = el("svg:line", { x1: f.m.l, x2: f.w - f.m.r, y1: f.y(ref), y2: f.y(ref), stroke: "#666",
                                     "stroke-dasharray": "4 3", class: "ref" }, f.svg);
      hover(line, `${M.ref_label}: ${fmt(ref)} (${D.models[i].name})`);
    }
    const k = vis.length, width = 0.6;
    vis.forEach((i, j) => {
      const g = el("svg:g", { class: "series", "data-model": i }, f.svg);
      const off = k > 1 ? (j / (k - 1) - 0.5) * width : 0;
      for (const r of H) {
        if (r[0] !== i) continue;
        const c = el("svg:circle", { cx: f.x(r[1] + off), cy: f.y(r[3]), r: 3.2, fill: colour(i), "fill-opacity": 0.8 }, g);
        hover(c, `${D.models[i].name}\nlayer ${r[1]}, head ${r[2]}\n${M.label} ${fmt(r[3])} ${M.unit}\nn ${r[4]}, 95% CI [${fmt(r[5])}, ${fmt(r[6])}]`);
      }
    });
  }
  function ciOverlay(parent, M, w) {
    const L = D.layers[M.label], vis = visible(), rows = L.filter((r) => vis.includes(r[0]));
    const layers = rows.map((r) => r[1]);
    const xd = [Math.min(...layers, 0) - 0.3, Math.max(...layers, 1) + 0.3];
    const refs = vis.map((i) => M.refs[D.models[i].name]).filter((v) => v !== null && v !== undefined);
    const key = modelKey(vis).concat([{ label: "95% CI over images", colour: "#888", kind: "band" }], refKey(M, vis));
    const f = frame(parent, w || 520, 300, xd, extent(rows.flatMap((r) => [r[3], r[4], r[2]]).concat(refs)), "layer", M.axis, true, key);
    for (const ref of [...new Set(refs.map((v) => +v.toPrecision(6)))]) {
      const line = el("svg:line", { x1: f.m.l, x2: f.w - f.m.r, y1: f.y(ref), y2: f.y(ref), stroke: "#666",
                                     "stroke-dasharray": "4 3", class: "ref" }, f.svg);
      hover(line, `${M.ref_label}: ${fmt(ref)}`);
    }
    for (const i of vis) {
      const d = L.filter((r) => r[0] === i).sort((a, b) => a[1] - b[1]);
      const g = el("svg:g", { class: "series", "data-model": i }, f.svg);
      const lo = d.map((r) => `${f.x(r[1])},${f.y(Number.isFinite(r[3]) ? r[3] : r[2])}`);
      const hi = d.slice().reverse().map((r) => `${f.x(r[1])},${f.y(Number.isFinite(r[4]) ? r[4] : r[2])}`);
      el("svg:polygon", { points: lo.concat(hi).join(" "), fill: colour(i), "fill-opacity": 0.18 }, g);
      el("svg:polyline", { points: d.map((r) => `${f.x(r[1])},${f.y(r[2])}`).join(" "), fill: "none", stroke: colour(i), "stroke-width": 2 }, g);
      for (const r of d) {
        const c = el("svg:circle", { cx: f.x(r[1]), cy: f.y(r[2]), r: 3, fill: colour(i) }, g);
        hover(c, `${name(i)}, layer ${r[1]}\nmean over heads ${fmt(r[2])} ${M.unit}\n95% CI over images [${fmt(r[3])}, ${fmt(r[4])}], n ${r[5]}`);
      }
    }
  }
  function viridis(t) {
    const s = [[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]];
    t = Math.min(1, Math.max(0, t)) * (s.length - 1);
    const i = Math.min(s.length - 2, Math.floor(t)), u = t - i;
    return s[i].map((a, k) => Math.round(a + (s[i + 1][k] - a) * u));
  }
  function heatmaps(parent, M) {
    const H = D.heads[M.label], vis = visible(), rows = H.filter((r) => vis.includes(r[0]));
    const [lo, hi] = extent(rows.map((r) => r[3]));
    for (const i of vis) {
      const d = H.filter((r) => r[0] === i);
      if (!d.length) continue;
      const nl = Math.max(...d.map((r) => r[1])) + 1, nh = Math.max(...d.map((r) => r[2])) + 1;
      const cw = Math.max(6, Math.min(22, Math.floor(220 / nh))), ch = Math.max(6, Math.min(16, Math.floor(240 / nl)));
      const w = 40 + nh * cw + 8, h = 18 + nl * ch + 22;
      const box = el("div", { class: "chart" }, parent);
      el("div", { class: "title" }, box, name(i));
      const svg = el("svg:svg", { width: w, height: h, class: "heatmap" }, box);
      const g = el("svg:g", { class: "series", "data-model": i }, svg);
      for (const r of d) {
        const c = viridis((r[3] - lo) / (hi - lo));
        const rect = el("svg:rect", { x: 40 + r[2] * cw, y: 18 + r[1] * ch, width: cw - 1, height: ch - 1, fill: `rgb(${c})` }, g);
        hover(rect, `${D.models[i].name}\nlayer ${r[1]}, head ${r[2]}\n${fmt(r[3])} ${M.unit} (n ${r[4]})`);
      }
      for (let l = 0; l < nl; l += Math.ceil(nl / 12)) el("svg:text", { x: 34, y: 18 + l * ch + ch / 2 + 3, "text-anchor": "end" }, svg, String(l));
      for (let k = 0; k < nh; k += Math.ceil(nh / 8)) el("svg:text", { x: 40 + k * cw + cw / 2, y: 13, "text-anchor": "middle" }, svg, String(k));
      el("svg:text", { x: 40 + nh * cw / 2, y: h - 6, "text-anchor": "middle" }, svg, "head (rows: layer)");
    }
    colourScale(parent, lo, hi, viridis, M.axis, "one scale for all models");
  }
  // A vertical colour bar with ticks: what the colours of a map or heatmap stand for
  function colourScale(parent, lo, hi, cmap, label, note) {
    const box = el("div", { class: "colour-scale" }, parent);
    const H = 180, W = 150, x0 = 8, bw = 14;
    const svg = el("svg:svg", { width: W, height: H + 40 }, box);
    const id = "cs" + Math.random().toString(36).slice(2, 9);
    const grad = el("svg:linearGradient", { id, x1: 0, y1: 1, x2: 0, y2: 0 }, el("svg:defs", {}, svg));
    for (let k = 0; k <= 10; k++) el("svg:stop", { offset: k / 10, "stop-color": `rgb(${cmap(k / 10)})` }, grad);
    el("svg:rect", { x: x0, y: 12, width: bw, height: H, fill: `url(#${id})`, stroke: "#9aa4ad" }, svg);
    for (const t of ticks(lo, hi, 5)) {
      if (t < lo || t > hi) continue;
      const y = 12 + H - (t - lo) / (hi - lo) * H;
      el("svg:line", { x1: x0 + bw, x2: x0 + bw + 4, y1: y, y2: y, stroke: "#9aa4ad" }, svg);
      el("svg:text", { x: x0 + bw + 7, y: y + 3.5 }, svg, String(+t.toPrecision(6)));
    }
    el("svg:text", { x: 0, y: H + 28, class: "scale-label" }, svg, label);
    if (note) el("svg:text", { x: 0, y: H + 40, class: "scale-label" }, svg, note);
    return box;
  }
  // The page's opening: per metric, the sentence computed from the contrasts and the per-layer means
  function findingsSection() {
    const s = document.getElementById("findings-body");
    s.textContent = "";
    if (!D.metrics.length) { el("p", { class: "note" }, s, D.empty_note || "No metric with per-image values."); return; }
    D.metrics.forEach((M, k) => {
      const F = (D.findings || [])[k] || { sentences: [] };
      const card = el("div", { class: "finding", id: `finding-${M.id}` }, s);
      el("h3", {}, card, `${M.display}${M.unit ? " (" + M.unit + ")" : ""}`);
      for (const t of F.sentences) el("p", { class: "sentence" }, card, t);
      const b = el("div", { class: "chart overlay" }, card);
      el("div", { class: "title" }, b, "mean over heads per layer, 95% CI over images");
      ciOverlay(b, M, 560);
    });
  }
  // Difference of group means per layer (a contrast pair), with its CI and the zero line
  function differenceChart(parent, M, pair) {
    const rows = D.contrasts.filter((r) => r.metric === M.label && r.group_a === pair[0] && r.group_b === pair[1])
                            .sort((a, b) => a.layer - b.layer);
    if (!rows.length) return;
    const box = el("div", { class: "chart difference" }, parent);
    el("div", { class: "title" }, box, `difference of group means per layer: ${pair[0]} − ${pair[1]}, 95% CI`);
    const layers = rows.map((r) => r.layer);
    const key = [{ label: `${pair[0]} − ${pair[1]}`, colour: "#333", kind: "line" },
                 { label: "95% CI", colour: "#888", kind: "band" }, { label: "no difference", colour: "#666", kind: "dash" }];
    const f = frame(box, 520, 240, [Math.min(...layers) - 0.5, Math.max(...layers) + 0.5],
                    extent(rows.flatMap((r) => [r.diff, r.ci_low, r.ci_high]).concat([0])), "layer", `A − B (${M.unit || M.label})`, true, key);
    el("svg:line", { x1: f.m.l, x2: f.w - f.m.r, y1: f.y(0), y2: f.y(0), stroke: "#666", "stroke-dasharray": "4 3", class: "ref" }, f.svg);
    const ok = rows.filter((r) => Number.isFinite(r.ci_low) && Number.isFinite(r.ci_high));
    const g = el("svg:g", { class: "contrast" }, f.svg);
    if (ok.length) el("svg:polygon", { points: ok.map((r) => `${f.x(r.layer)},${f.y(r.ci_low)}`).concat(
      ok.slice().reverse().map((r) => `${f.x(r.layer)},${f.y(r.ci_high)}`)).join(" "), fill: "#888", "fill-opacity": 0.25 }, g);
    el("svg:polyline", { points: rows.map((r) => `${f.x(r.layer)},${f.y(r.diff)}`).join(" "), fill: "none", stroke: "#333", "stroke-width": 2 }, g);
    for (const r of rows) {
      const c = el("svg:circle", { cx: f.x(r.layer), cy: f.y(r.diff), r: 3, fill: "#333" }, g);
      hover(c, `layer ${r.layer}: ${pair[0]} − ${pair[1]} = ${fmt(r.diff)} ${M.unit}\n95% CI [${fmt(r.ci_low)}, ${fmt(r.ci_high)}]`);
    }
  }
  // Per label (class folders, a manifest's label column): a panel per model, a line per label
  function labelPanels(parent, M) {
    const Lb = D.labels[M.label], vis = visible();
    el("div", { class: "title wide" }, parent, "by image label: mean over heads per layer, 95% CI over each label's images" +
       (Lb.more ? ` (the ${Lb.names.length} most frequent labels; ${Lb.more} more not drawn)` : ""));
    const all = Lb.rows.filter((r) => vis.includes(r[0]));
    const yd = extent(all.flatMap((r) => [r[3], r[4], r[5]]));
    const key = Lb.names.map(([n, c], k) => ({ label: `${n} (${c})`, colour: D.label_colours[k % D.label_colours.length], kind: "line" }));
    for (const i of vis) {
      const d = Lb.rows.filter((r) => r[0] === i);
      if (!d.length) continue;
      const box = el("div", { class: "chart label-panel", "data-model": i }, parent);
      el("div", { class: "title" }, box, name(i));
      const layers = d.map((r) => r[2]);
      const f = frame(box, 420, 240, [Math.min(...layers) - 0.3, Math.max(...layers) + 0.3], yd, "layer", M.axis, true, key);
      const g = el("svg:g", { class: "series", "data-model": i }, f.svg);
      Lb.names.forEach(([n], k) => {
        const c = D.label_colours[k % D.label_colours.length];
        const r = d.filter((x) => x[1] === k).sort((a, b) => a[2] - b[2]);
        if (!r.length) return;
        const band = r.filter((x) => Number.isFinite(x[4]) && Number.isFinite(x[5]));
        if (band.length) el("svg:polygon", { points: band.map((x) => `${f.x(x[2])},${f.y(x[4])}`).concat(
          band.slice().reverse().map((x) => `${f.x(x[2])},${f.y(x[5])}`)).join(" "), fill: c, "fill-opacity": 0.15 }, g);
        el("svg:polyline", { points: r.map((x) => `${f.x(x[2])},${f.y(x[3])}`).join(" "), fill: "none", stroke: c, "stroke-width": 1.6 }, g);
        for (const x of r) hover(el("svg:circle", { cx: f.x(x[2]), cy: f.y(x[3]), r: 2.4, fill: c }, g),
          `${name(i)}, label ${n}, layer ${x[2]}\n${fmt(x[3])} ${M.unit}, 95% CI [${fmt(x[4])}, ${fmt(x[5])}], n ${x[6]}`);
      });
    }
  }
  // "What each layer knows": probe accuracy per layer, a line per model, chance dashed (the refs of a probe)
  function probeCharts() {
    const s = document.getElementById("probes-charts");
    if (!s || !D.probes) return;
    s.textContent = "";
    for (const p of D.probes.probes) {
      const M = D.metrics.find((x) => x.label === p.label);
      if (!M) continue;
      const b = el("div", { class: "chart overlay probe", "data-metric": p.label }, s);
      el("div", { class: "title" }, b, `${p.display} per layer on held-out images, 95% CI over images`);
      ciOverlay(b, M);
    }
  }
  function metricSections() {
    for (const M of D.metrics) {
      const s = document.getElementById(`metric-${M.id}`);
      s.querySelectorAll(".charts").forEach((c) => c.remove());
      const charts = el("div", { class: "charts" }, s);
      if (D.heads[M.label] && D.heads[M.label].length) {
        const a = el("div", { class: "chart depth" }, charts);
        el("div", { class: "title" }, a, "depth profile: one dot per head and layer, mean over images (ViT paper Fig. 7)");
        depthProfile(a, M);
      }
      const pairs = [...new Map(D.contrasts.filter((r) => r.metric === M.label).map((r) => [`${r.group_a}\u0000${r.group_b}`, [r.group_a, r.group_b]])).values()];
      for (const pair of pairs.slice(0, 3)) differenceChart(charts, M, pair);
      if (!charts.children.length) {  // no per-head values and nothing to contrast: the per-layer means again
        const b = el("div", { class: "chart overlay" }, charts);
        el("div", { class: "title" }, b, "mean over heads per layer, 95% CI over images");
        ciOverlay(b, M);
      }
      if (D.heads[M.label] && D.heads[M.label].length) {
        const c = el("div", { class: "charts heatmaps" }, s);
        heatmaps(c, M);
      }
      if (D.labels && D.labels[M.label]) labelPanels(el("div", { class: "charts labels" }, s), M);
    }
  }

  // -- tables -------------------------------------------------------------------------------------
  function sortable(table, rows, cols) {
    const thead = el("tr", {}, el("thead", {}, table)), tbody = el("tbody", {}, table);
    const fill = () => {
      tbody.textContent = "";
      for (const r of rows) {
        const tr = el("tr", {}, tbody);
        cols.forEach((c) => { const td = el("td", { class: c.num ? "num" : "" }, tr, c.fmt ? c.fmt(r[c.key], r) : r[c.key]);
                              if (c.cls) td.className += " " + c.cls(r); });
      }
    };
    cols.forEach((c) => {
      const th = el("th", { class: c.num ? "num" : "" }, thead, c.title || c.key);
      th.addEventListener("click", () => {
        const dir = th.dataset.dir === "asc" ? "desc" : "asc";
        thead.querySelectorAll("th").forEach((t) => delete t.dataset.dir);
        th.dataset.dir = dir;
        rows.sort((a, b) => { const x = a[c.key], y = b[c.key];
          const r = typeof x === "number" && typeof y === "number" ? x - y : String(x).localeCompare(String(y), undefined, { numeric: true });
          return dir === "asc" ? r : -r; });
        fill();
      });
    });
    fill();
  }
  function summaryTable() {
    const s = document.getElementById("summary-table"); s.textContent = "";
    if (!D.metrics.length) { if (D.empty_note) el("p", { class: "note" }, s, D.empty_note); return; }
    // one metric at a time (its own unit): sorting never mixes metrics
    const bar = el("div", { class: "controls" }, s), lab = el("label", {}, bar, "metric ");
    const sel = el("select", { id: "summary-metric" }, lab);
    for (const M of D.metrics) el("option", { value: M.label }, sel, `${M.label}: ${M.display}${M.unit ? " (" + M.unit + ")" : ""}`);
    if (!D.metrics.some((M) => M.label === state.summaryMetric)) state.summaryMetric = D.metrics[0].label;
    sel.value = state.summaryMetric;
    sel.addEventListener("change", () => { state.summaryMetric = sel.value; summaryTable(); });
    const M = D.metrics.find((x) => x.label === state.summaryMetric), u = M.unit ? ` (${M.unit})` : "";
    const vis = visible(), rows = [];
    for (const r of D.layers[M.label]) if (vis.includes(r[0]))
      rows.push({ model: D.models[r[0]].name, group: D.models[r[0]].group, layer: r[1], mean: r[2], ci_low: r[3], ci_high: r[4], n: r[5] });
    if (state.byKind) rows.sort((a, b) => D.groups.indexOf(a.group) - D.groups.indexOf(b.group));
    const t = el("table", { class: "sortable", id: "summary", "data-metric": M.label }, el("div", { class: "scroll" }, s));
    sortable(t, rows, [{ key: "model" }, { key: "group", title: D.group_by }, { key: "layer", num: true },
      { key: "mean", title: "mean" + u, num: true, fmt: (v) => fmt(v) }, { key: "ci_low", title: "CI low", num: true, fmt: (v) => fmt(v) },
      { key: "ci_high", title: "CI high", num: true, fmt: (v) => fmt(v) }, { key: "n", title: "images", num: true }]);
  }
  function contrastTable() {
    const s = document.getElementById("contrasts-table");
    if (!D.contrasts.length) { el("p", { class: "note" }, s, D.empty_note || `Only one ${D.group_by} group: nothing to contrast.`); return; }
    if (D.contrast_note) el("p", { class: "note" }, s, D.contrast_note);
    const t = el("table", { class: "sortable", id: "contrasts" }, el("div", { class: "scroll" }, s));
    const models = D.contrasts[0].inference === "models";  // one scope per run: the note says which
    // a p at the smallest value its test can give with this many images (contrasts.csv p_floor, p_holm_floor)
    const atFloor = (v, f) => (v !== null && f > 0 && v <= f * (1 + 1e-9) ? " (floor)" : "");
    sortable(t, D.contrasts.slice(), [{ key: "metric" }, { key: "layer", num: true }, { key: "group_a", title: "group A" },
      { key: "mean_a", title: "mean A", num: true, fmt: (v) => fmt(v) }, { key: "group_b", title: "group B" },
      { key: "mean_b", title: "mean B", num: true, fmt: (v) => fmt(v) },
      { key: "diff", title: "A − B [95% CI]", num: true, fmt: (v, r) => `${fmt(v)} [${fmt(r.ci_low)}, ${fmt(r.ci_high)}]` },
      { key: "p", num: true, fmt: (v, r) => fmt(v) + atFloor(v, r.p_floor) }, { key: "p_holm", title: "p (Holm)", num: true,
        fmt: (v, r) => fmt(v) + atFloor(v, r.p_holm_floor),
        cls: (r) => (r.p_holm < 0.05 ? "sig" : "") },
      { key: models ? "effect_d" : "effect_dz", title: models ? "Cohen's d" : "d_z", num: true, fmt: (v) => fmt(v) },
      { key: "n_images", title: "images", num: true }, { key: "models_a", title: "models A", num: true },
      { key: "models_b", title: "models B", num: true }]);
  }

  // (the attention explorer is drawn by explorer.js, from the same #data)

  // -- everything that depends on the toggles -------------------------------------------------------
  function render() {
    document.querySelectorAll("span.swatch").forEach((sw) => { sw.style.background = colour(+sw.dataset.model); });
    findingsSection();
    probeCharts();
    metricSections();
    summaryTable();
  }
  controls();
  provenance();
  contrastTable();
  render();
  document.body.dataset.ready = "1";
})();
