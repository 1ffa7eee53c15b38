/* probekit report: the attention explorer. Every model side by side on one showcase image, all heads as
   small multiples, one colour scale per image and layer shared by every model and head (drawn as a bar),
   hover to move the query patch, click to pin it. Drawn from #data (explorer) and the blob in #blob. */
"use strict";
(function () {
  const D = JSON.parse(document.getElementById("data").textContent), E = D.explorer;
  const body = document.getElementById("explorer-body");
  if (!body) return;
  const NS = "http://www.w3.org/2000/svg";
  const PALETTE = ["#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#F0E442", "#000000"];
  function el(tag, attrs, parent, text) {
    const e = tag.startsWith("svg:") ? document.createElementNS(NS, tag.slice(4)) : document.createElement(tag);
    for (const k in attrs || {}) e.setAttribute(k, attrs[k]);
    if (text !== undefined) e.textContent = text;
    if (parent) parent.appendChild(e);
    return e;
  }
  if (!E || !E.models.length) {
    el("p", { class: "note" }, body, (E && E.note) || "No explorer arrays were stored for this run.");
    return;
  }

  // -- codes, colours ------------------------------------------------------------------------------
  const LV = E.levels || 255;  // a value p is stored as round(LV * sqrt(p))
  const P = new Float64Array(LV + 1);
  for (let c = 0; c <= LV; c++) P[c] = (c / LV) * (c / LV);
  const STOPS = [[0, 0, 4], [40, 11, 84], [101, 21, 110], [159, 42, 99], [212, 72, 66], [245, 125, 21],
                 [250, 193, 39], [252, 255, 164]];  // inferno
  function inferno(t) {
    t = Math.min(1, Math.max(0, t)) * (STOPS.length - 1);
    const i = Math.min(STOPS.length - 2, Math.floor(t)), u = t - i;
    return STOPS[i].map((a, k) => Math.round(a + (STOPS[i + 1][k] - a) * u));
  }
  const LUT = Array.from({ length: 256 }, (_, k) => inferno(k / 255));
  const rgb = (c) => `rgb(${c[0]},${c[1]},${c[2]})`;
  function fmtP(p) {
    if (!(p > 0)) return "0";
    return p >= 0.095 ? p.toFixed(2) : p >= 0.001 ? p.toPrecision(2) : p.toExponential(1);
  }

  // -- controls and layout --------------------------------------------------------------------------
  el("p", { class: "note", id: "explorer-stored" }, body, E.stored);
  el("p", { class: "note" }, body, "Hover any map to move the query patch (outlined on every map, at the same " +
     "place in each model's input); click to pin it. Every map shown shares one colour scale across models and " +
     "heads (the bar; its peak is the largest value of the image and layer, or of the query shown), so a " +
     "near-uniform map is drawn as dim as it is next to a peaked one.");
  const bar = el("div", { class: "controls x-controls" }, body);
  const sel = {};
  for (const [k, label] of [["image", "image"], ["layer", "layer"], ["show", "show"], ["scale-by", "colour scale"]]) {
    const lab = el("label", {}, bar, label + " ");
    sel[k] = el("select", { id: `x-${k}` }, lab);
  }
  const M0 = E.models[0], images = M0.images;
  images.forEach((n, i) => el("option", { value: i }, sel.image, n));
  const nLayers = Math.max(...E.models.map((m) => m.shape[1]));
  for (let l = 0; l < nLayers; l++) el("option", { value: l }, sel.layer, String(l));
  const cls = E.models.every((m) => m.query === "cls") ? "CLS" : E.models.some((m) => m.query === "cls")
    ? "CLS (mean query without CLS)" : "mean query";
  for (const [v, t] of [["attn", "the query patch's attention"], ["cls", cls + " attention"],
                        ["rollout", "rollout (heads fused, layers 0..l)"]]) el("option", { value: v }, sel.show, t);
  for (const [v, t] of [["layer", "per image and layer"], ["query", "per query shown"]]) el("option", { value: v }, sel["scale-by"], t);
  const bgLab = el("label", {}, bar);
  const bgBox = el("input", { type: "checkbox", id: "x-bg", checked: "" }, bgLab);
  bgLab.appendChild(document.createTextNode(" image under the maps"));

  const grid = el("div", { class: "x-grid" }, body);
  const SW = 560;  // the bar's width in px
  const scaleSvg = el("svg:svg", { class: "colour-scale", id: "x-scale", width: SW, height: 62, viewBox: `0 0 ${SW} 62`,
                                   role: "img" }, el("div", { class: "x-scale-box" }, grid));
  const cap = el("p", { class: "x-caption", id: "x-query-cap" }, grid);
  const readout = el("p", { class: "note x-readout", id: "x-readout" }, grid, "\u00a0");
  const rows = E.models.map((m, j) => {
    const row = el("div", { class: "x-row", "data-model": m.model }, grid);
    const name = el("div", { class: "x-name" }, row);
    el("span", { class: "swatch", "data-model": m.model }, name).style.background = PALETTE[m.model % PALETTE.length];
    el("span", {}, name, D.models[m.model].name);
    el("span", { class: "note" }, name, ` ${m.grid[0]}x${m.grid[1]} patches of ${m.patch[0]} px, ${m.shape[2]} heads`);
    const maps = el("div", { class: "x-maps" }, row);
    const fig = (kind, id, size, text) => {
      const f = el("figure", { class: kind }, maps);
      const c = el("canvas", Object.assign({ class: "x-map", width: size, height: size }, id ? { id } : {}), f);
      return { canvas: c, cap: el("figcaption", {}, f, text) };
    };
    const main = fig("x-main", j === 0 ? "x-query" : `x-query-${j}`, 200, "mean of heads");
    const heads = [];
    for (let h = 0; h < m.shape[2]; h++) heads.push(fig("x-head", null, 104, `head ${h}`));
    return { row, main, heads };
  });

  // -- state ---------------------------------------------------------------------------------------
  let X = null;  // per model: {attn, cls, rollout} uint8 views into the decoded blob
  let pin = { fx: 0.5, fy: 0.5 }, hov = null, frame = 0;
  const imgs = E.models.map((m) => m.bg.map((src) => { const im = new Image(); im.onload = () => later(); im.src = src; return im; }));
  const off = document.createElement("canvas");  // one pixel per patch, drawn scaled up (never in the page)
  const index = E.models.map((m) => new Map(m.queries.map((p, k) => [p, k])));

  function queryOf(j, f) {  // the model's patch under the point, and the stored query nearest to it
    const m = E.models[j], [gh, gw] = m.grid;
    const r = Math.min(gh - 1, Math.floor(f.fy * gh)), c = Math.min(gw - 1, Math.floor(f.fx * gw));
    let k = index[j].get(r * gw + c);
    if (k === undefined) {
      let bd = Infinity;
      m.queries.forEach((p, q) => { const d = (Math.floor(p / gw) - r) ** 2 + (p % gw - c) ** 2; if (d < bd) { bd = d; k = q; } });
    }
    const sp = m.queries[k];
    return { r, c, k, sr: Math.floor(sp / gw), sc: sp % gw };
  }
  function later() { if (!frame) frame = requestAnimationFrame(() => { frame = 0; redraw(); }); }

  // values of one map as colour positions t in [0, 1] (t = sqrt(p / peak), the scale's peak code S)
  function codesOf(j, what, i, l, h, k) {
    const m = E.models[j], [, L, H, Q, N] = m.shape, a = X[j][what];
    const base = what === "rollout" ? (i * L + l) * N : what === "cls" ? ((i * L + l) * H + h) * N
      : (((i * L + l) * H + h) * Q + k) * N;
    return a.subarray(base, base + N);
  }
  function meanOf(j, what, i, l, k) {  // mean of the heads' probabilities
    const m = E.models[j], H = m.shape[2], N = m.grid[0] * m.grid[1], out = new Float64Array(N);
    for (let h = 0; h < H; h++) { const c = codesOf(j, what, i, l, h, k); for (let p = 0; p < N; p++) out[p] += P[c[p]] / H; }
    return out;
  }
  function paint(canvas, j, i, n, tOf, mark) {
    const m = E.models[j], [gh, gw] = m.grid, ctx = canvas.getContext("2d"), W = canvas.width, Hh = canvas.height;
    off.width = gw; off.height = gh;
    const octx = off.getContext("2d"), img = octx.createImageData(gw, gh);
    for (let p = 0; p < n; p++) {
      const c = LUT[Math.max(0, Math.min(255, Math.round(tOf(p) * 255)))];
      img.data[4 * p] = c[0]; img.data[4 * p + 1] = c[1]; img.data[4 * p + 2] = c[2]; img.data[4 * p + 3] = 255;
    }
    octx.putImageData(img, 0, 0);
    ctx.imageSmoothingEnabled = false;
    ctx.globalAlpha = 1;
    ctx.clearRect(0, 0, W, Hh);
    const bg = imgs[j][i];
    if (bgBox.checked && bg && bg.complete && bg.naturalWidth) { ctx.drawImage(bg, 0, 0, W, Hh); ctx.globalAlpha = 0.75; }
    ctx.drawImage(off, 0, 0, W, Hh);
    ctx.globalAlpha = 1;
    if (mark) {
      const cw = W / gw, ch = Hh / gh, lw = W >= 160 ? 1.5 : 1;  // on the cell's edge: its colour stays visible
      ctx.lineWidth = lw; ctx.strokeStyle = "#00e5ff";
      ctx.strokeRect(mark.c * cw - lw / 2, mark.r * ch - lw / 2, cw + lw, ch + lw);
      if (mark.sr !== mark.r || mark.sc !== mark.c) {
        ctx.fillStyle = "#00e5ff"; ctx.beginPath();
        ctx.arc((mark.sc + 0.5) * cw, (mark.sr + 0.5) * ch, 3, 0, 2 * Math.PI); ctx.fill();
      }
    }
  }
  function blank(canvas) { const ctx = canvas.getContext("2d"); ctx.clearRect(0, 0, canvas.width, canvas.height); }

  function drawScale(S, what) {  // the bar: t in [0, 1] is p = (t S / LV)^2
    scaleSvg.textContent = "";
    const x0 = 10, x1 = SW - 20, y = 18, hgt = 12, pmax = P[S] || 0;
    const defs = el("svg:defs", {}, scaleSvg), g = el("svg:linearGradient", { id: "x-grad" }, defs);
    for (let k = 0; k <= 10; k++) el("svg:stop", { offset: k / 10, "stop-color": rgb(inferno(k / 10)) }, g);
    el("svg:text", { x: x0, y: 11, class: "x-scale-title" }, scaleSvg,
       `attention p (square-root scale), shared by every model and head: ${images[+sel.image.value]}, layer ${sel.layer.value}` +
       (what === "rollout" ? " (rollout)" : what === "attn" && sel["scale-by"].value === "query" ? ", this query" : ""));
    el("svg:rect", { x: x0, y, width: x1 - x0, height: hgt, fill: "url(#x-grad)", stroke: "#9aa4ad" }, scaleSvg);
    for (const t of [0, 0.25, 0.5, 0.75, 1]) {
      const x = x0 + t * (x1 - x0);
      el("svg:line", { x1: x, x2: x, y1: y + hgt, y2: y + hgt + 4, stroke: "#5c6670" }, scaleSvg);
      el("svg:text", { x, y: y + hgt + 14, "text-anchor": t === 0 ? "start" : t === 1 ? "end" : "middle" }, scaleSvg,
         fmtP(pmax * t * t));
    }
    if (what !== "rollout" && S > 0) {  // where uniform attention over each model's patches falls
      const byN = new Map();
      for (const m of E.models) { const n = m.grid[0] * m.grid[1]; byN.set(n, [...(byN.get(n) || []), D.models[m.model].name]); }
      const said = [];
      for (const [n, names] of byN) {
        const tu = Math.sqrt(1 / n) * LV / S, x = x0 + Math.min(1, tu) * (x1 - x0);
        el("svg:line", { x1: x, x2: x, y1: y - 2, y2: y + hgt + 2, stroke: "#fff", "stroke-width": 2 }, scaleSvg);
        said.push(`1/${n} = ${fmtP(1 / n)}` + (byN.size > 1 ? ` (${names.join(", ")})` : "") + (tu > 1 ? ", above the scale" : ""));
      }
      el("svg:text", { x: x0, y: y + hgt + 28, class: "x-uniform" }, scaleSvg, `white marks: uniform attention, ${said.join("; ")}`);
    }
  }

  function redraw() {
    if (!X) return;
    const i = +sel.image.value, l = +sel.layer.value, what = sel.show.value, f = hov || pin;
    let S = (E.scale[what][i] || [])[l] || 0;
    if (what === "attn" && sel["scale-by"].value === "query") {  // the largest of the maps shown, still one for all
      S = 0;
      E.models.forEach((m, j) => {
        if (l >= m.shape[1]) return;
        const k = queryOf(j, f).k;
        for (let h = 0; h < m.shape[2]; h++) { const c = codesOf(j, "attn", i, l, h, k); for (let p = 0; p < c.length; p++) if (c[p] > S) S = c[p]; }
      });
    }
    drawScale(S, what);
    const q0 = queryOf(0, f);
    cap.textContent = what === "attn"
      ? `query patch (row ${q0.r}, col ${q0.c}) of ${D.models[M0.model].name}'s ${M0.grid[0]}x${M0.grid[1]} grid, ` +
        `layer ${l}` + (hov ? " (hover; click to pin)" : " (pinned)") +
        ((q0.sr !== q0.r || q0.sc !== q0.c) ? `; nearest stored query (row ${q0.sr}, col ${q0.sc}), dotted` : "")
      : what === "cls" ? `${cls} attention over the patches, layer ${l}, per head and their mean`
      : `attention rollout through layers 0..${l} (heads fused), ${cls} row`;
    E.models.forEach((m, j) => {
      const R = rows[j], N = m.grid[0] * m.grid[1], have = l < m.shape[1];
      const q = queryOf(j, f), mark = what === "attn" ? q : null;
      R.heads.forEach((hd) => { hd.canvas.parentElement.style.display = what === "rollout" ? "none" : ""; });
      if (!have) {
        blank(R.main.canvas); R.main.cap.textContent = `no layer ${l} (${m.shape[1]} layers)`;
        R.heads.forEach((hd) => { blank(hd.canvas); hd.cap.textContent = `head ${R.heads.indexOf(hd)}: no layer ${l}`; });
        return;
      }
      const tScale = S > 0 ? LV / S : 0;
      if (what === "rollout") {
        const c = codesOf(j, "rollout", i, l, 0, 0);
        paint(R.main.canvas, j, i, N, (p) => c[p] / S || 0, null);
        R.main.cap.textContent = `rollout, peak ${fmtP(P[Math.max(...c)])}`;
        return;
      }
      const mean = meanOf(j, what, i, l, q.k);
      paint(R.main.canvas, j, i, N, (p) => Math.sqrt(mean[p]) * tScale, mark);
      R.main.cap.textContent = `mean of heads, peak ${fmtP(Math.max(...mean))}`;
      R.heads.forEach((hd, h) => {
        const c = codesOf(j, what, i, l, h, q.k);
        paint(hd.canvas, j, i, N, (p) => c[p] * tScale / LV, mark);
        hd.cap.textContent = `head ${h} · peak ${fmtP(P[Math.max(...c)])}`;
      });
    });
  }

  // -- pointer: hover previews, click pins -------------------------------------------------------------
  function where(e) {
    const r = e.currentTarget.getBoundingClientRect();
    return { fx: Math.min(0.9999, Math.max(0, (e.clientX - r.left) / r.width)),
             fy: Math.min(0.9999, Math.max(0, (e.clientY - r.top) / r.height)) };
  }
  function describe(e) {
    const canvas = e.currentTarget, j = rows.findIndex((R) => R.main.canvas === canvas || R.heads.some((h) => h.canvas === canvas));
    if (j < 0 || !X) return;
    const m = E.models[j], f = where(e), q = queryOf(j, f), l = +sel.layer.value;
    const h = rows[j].heads.findIndex((hd) => hd.canvas === canvas);
    readout.textContent = `${D.models[m.model].name}, ${h < 0 ? "mean of heads" : "head " + h}, layer ${l}: patch (row ${q.r}, ` +
      `col ${q.c})` + (sel.show.value === "attn" ? " is the query" : "");
  }
  for (const R of rows) {
    for (const c of [R.main.canvas, ...R.heads.map((h) => h.canvas)]) {
      c.addEventListener("mousemove", (e) => { hov = where(e); describe(e); later(); });
      c.addEventListener("mouseleave", () => { hov = null; readout.textContent = "\u00a0"; later(); });
      c.addEventListener("click", (e) => { pin = where(e); hov = null; redraw(); });
    }
  }
  for (const k of ["image", "layer", "show", "scale-by"]) sel[k].addEventListener("change", redraw);
  bgBox.addEventListener("change", redraw);

  // -- data ----------------------------------------------------------------------------------------
  async function decodeBlob() {
    const b64 = document.getElementById("blob").textContent.trim();
    const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
    const stream = new Blob([bytes]).stream().pipeThrough(new DecompressionStream("deflate"));
    return new Uint8Array(await new Response(stream).arrayBuffer());
  }
  decodeBlob().then((buf) => {
    X = E.models.map((m) => {
      const o = {};
      for (const k in m.arrays) o[k] = buf.subarray(m.arrays[k][0], m.arrays[k][0] + m.arrays[k][1]);
      return o;
    });
    redraw();
    document.body.dataset.explorer = "ready";
  }).catch((err) => { el("p", { class: "bad" }, body, "This browser cannot decompress the explorer data: " + err); });
})();
