// distdrgn dashboard: a canvas scatter of every particle (ImageData, one pixel write per
// point), box/lasso selection over typed arrays, and views of volumes generated on demand.
// No library and no network access beyond this server.
"use strict";
(function () {
  const T0 = performance.now();
  const token = new URLSearchParams(location.search).get("token") || "";
  const $ = (id) => document.getElementById(id);
  const api = (path, opts) => fetch(path, Object.assign({ headers: { "X-Token": token } }, opts || {}));
  const withToken = (path) => path + (path.includes("?") ? "&" : "?") + "token=" + encodeURIComponent(token);

  const state = {
    meta: null, n: 0, cols: {}, x: null, y: null, colors: null, sel: null,
    view: { x0: 0, x1: 1, y0: 0, y1: 1 }, tool: "pan", path: null, drag: null,
    layers: [], anchors: [], picked: null, traj: null, centers: [],
  };
  const api_ = { ready: false, timings: {} };
  window.dashboard = api_;

  // ---- colour maps (little-endian RGBA packed into Uint32: 0xAABBGGRR) -------------------
  const pack = (r, g, b) => ((255 << 24) | (b << 16) | (g << 8) | r) >>> 0;
  const TAB20 = ["1f77b4","aec7e8","ff7f0e","ffbb78","2ca02c","98df8a","d62728","ff9896","9467bd","c5b0d5",
    "8c564b","c49c94","e377c2","f7b6d2","7f7f7f","c7c7c7","bcbd22","dbdb8d","17becf","9edae5"]
    .map((h) => pack(parseInt(h.slice(0, 2), 16), parseInt(h.slice(2, 4), 16), parseInt(h.slice(4, 6), 16)));
  // viridis, 9 stops, interpolated into a 256-entry table
  const VIR = [[68,1,84],[71,44,122],[59,81,139],[44,113,142],[33,144,141],[39,173,129],[92,200,99],[170,220,50],[253,231,37]];
  const LUT = new Uint32Array(256);
  for (let i = 0; i < 256; i++) {
    const t = i / 255 * (VIR.length - 1), k = Math.min(VIR.length - 2, Math.floor(t)), f = t - k;
    const c = [0, 1, 2].map((j) => Math.round(VIR[k][j] * (1 - f) + VIR[k + 1][j] * f));
    LUT[i] = pack(c[0], c[1], c[2]);
  }
  const SELECTED = pack(230, 20, 20);

  function status(text) { $("status").textContent = text || ""; }

  async function column(name) {
    if (!state.cols[name]) {
      const r = await api("api/column?name=" + encodeURIComponent(name));
      if (!r.ok) throw new Error((await r.json()).error);
      state.cols[name] = new Float32Array(await r.arrayBuffer());
    }
    return state.cols[name];
  }

  function colMeta(name) { return state.meta.columns.find((c) => c.name === name); }

  function computeColors(name) {
    const v = state.cols[name], m = colMeta(name), out = new Uint32Array(state.n);
    if (m.categorical) {
      for (let i = 0; i < state.n; i++) out[i] = TAB20[((v[i] | 0) % 20 + 20) % 20];
    } else {
      const lo = m.min, s = m.max > m.min ? 255 / (m.max - m.min) : 0;
      for (let i = 0; i < state.n; i++) {
        const k = (v[i] - lo) * s;
        out[i] = LUT[k >= 0 ? (k <= 255 ? k | 0 : 255) : 0];
      }
    }
    state.colors = out;
  }

  // ---- view and rendering -------------------------------------------------------------
  const plot = $("plot"), overlay = $("overlay");
  const ctx = plot.getContext("2d"), octx = overlay.getContext("2d");
  let W = 0, H = 0, image = null, buf = null, pending = false;
  const PAD = 40;

  function resize() {
    const r = plot.parentElement.getBoundingClientRect();
    W = Math.max(100, Math.floor(r.width)); H = Math.max(100, Math.floor(r.height));
    for (const c of [plot, overlay]) { c.width = W; c.height = H; }
    image = ctx.createImageData(W, H);
    buf = new Uint32Array(image.data.buffer);
    requestRender();
  }

  function fitView() {
    const m = [colMeta(state.xname), colMeta(state.yname)];
    const dx = (m[0].max - m[0].min) || 1, dy = (m[1].max - m[1].min) || 1;
    state.view = { x0: m[0].min - 0.03 * dx, x1: m[0].max + 0.03 * dx, y0: m[1].min - 0.03 * dy, y1: m[1].max + 0.03 * dy };
  }

  // data -> screen: sx = PAD + (x - x0) * ax; sy = H - PAD - (y - y0) * ay
  function axes() {
    const v = state.view;
    return { ax: (W - 2 * PAD) / (v.x1 - v.x0), ay: (H - 2 * PAD) / (v.y1 - v.y0) };
  }
  const toData = (sx, sy) => {
    const { ax, ay } = axes(), v = state.view;
    return [v.x0 + (sx - PAD) / ax, v.y0 + (H - PAD - sy) / ay];
  };
  const toScreen = (x, y) => {
    const { ax, ay } = axes(), v = state.view;
    return [PAD + (x - v.x0) * ax, H - PAD - (y - v.y0) * ay];
  };

  function requestRender() {
    if (!pending) { pending = true; requestAnimationFrame(() => { pending = false; render(); }); }
  }

  function drawPoints(onlySelected, colorOf) {
    const x = state.x, y = state.y, sel = state.sel, n = state.n, v = state.view;
    const { ax, ay } = axes(), size = +$("psize").value, half = size >> 1;
    const bx = PAD - v.x0 * ax, by = H - PAD + v.y0 * ay;
    for (let i = 0; i < n; i++) {
      if (onlySelected && !sel[i]) continue;
      const px = (bx + x[i] * ax) | 0, py = (by - y[i] * ay) | 0;
      if (px < half || py < half || px >= W - size || py >= H - size) continue;
      const c = colorOf === null ? state.colors[i] : colorOf;
      if (size === 1) { buf[py * W + px] = c; continue; }
      for (let dy = -half; dy < size - half; dy++) {
        const row = (py + dy) * W + px - half;
        for (let dx = 0; dx < size; dx++) buf[row + dx] = c;
      }
    }
  }

  function render() {
    if (!state.x) return;
    buf.fill(0xffffffff);
    drawPoints(false, null);
    if (state.count > 0) drawPoints(true, SELECTED);
    ctx.putImageData(image, 0, 0);
    drawOverlay();
  }

  function ticks(lo, hi) {
    const step = Math.pow(10, Math.floor(Math.log10((hi - lo) / 5 || 1)));
    const s = [1, 2, 5, 10].map((m) => m * step).find((m) => (hi - lo) / m <= 8) || step * 10;
    const out = [];
    for (let t = Math.ceil(lo / s) * s; t <= hi; t += s) out.push(+t.toPrecision(6));
    return out;
  }

  function drawOverlay() {
    octx.clearRect(0, 0, W, H);
    octx.strokeStyle = "#888"; octx.fillStyle = "#333"; octx.font = "11px sans-serif"; octx.lineWidth = 1;
    octx.strokeRect(PAD, PAD, W - 2 * PAD, H - 2 * PAD);
    const v = state.view;
    octx.textAlign = "center";
    for (const t of ticks(v.x0, v.x1)) { const [sx] = toScreen(t, 0); octx.fillText(String(t), sx, H - PAD + 14); }
    octx.textAlign = "right";
    for (const t of ticks(v.y0, v.y1)) { const [, sy] = toScreen(0, t); octx.fillText(String(t), PAD - 4, sy + 4); }
    octx.textAlign = "center"; octx.font = "12px sans-serif";
    octx.fillText(state.xname, W / 2, H - 8);
    octx.save(); octx.translate(12, H / 2); octx.rotate(-Math.PI / 2); octx.fillText(state.yname, 0, 0); octx.restore();
    // k-means centres, anchors, picked particle, trajectory path
    const mark = (row, color, r) => {
      const [sx, sy] = toScreen(state.x[row], state.y[row]);
      octx.beginPath(); octx.arc(sx, sy, r, 0, 2 * Math.PI); octx.strokeStyle = color; octx.lineWidth = 2; octx.stroke();
    };
    for (const c of state.centers) mark(c, "#000", 5);
    if (state.traj) {
      octx.beginPath(); octx.strokeStyle = "#e60"; octx.lineWidth = 2;
      state.traj.path.forEach((r, k) => { const [sx, sy] = toScreen(state.x[r], state.y[r]); k ? octx.lineTo(sx, sy) : octx.moveTo(sx, sy); });
      octx.stroke();
    }
    for (const a of state.anchors) mark(a, "#e60", 7);
    if (state.picked !== null) mark(state.picked, "#d0f", 8);
    if (state.path && state.path.length > 1) {
      octx.beginPath(); octx.strokeStyle = "#c00"; octx.lineWidth = 1.5; octx.setLineDash([4, 3]);
      state.path.forEach(([sx, sy], k) => (k ? octx.lineTo(sx, sy) : octx.moveTo(sx, sy)));
      if (state.tool === "lasso") octx.closePath();
      octx.stroke(); octx.setLineDash([]);
    }
  }

  // ---- selection ------------------------------------------------------------------------
  function combine(inside) {
    const mode = $("selmode").value, sel = state.sel, n = state.n;
    if (mode === "replace") sel.set(inside);
    else if (mode === "add") for (let i = 0; i < n; i++) sel[i] |= inside[i];
    else if (mode === "intersect") for (let i = 0; i < n; i++) sel[i] &= inside[i];
    else for (let i = 0; i < n; i++) sel[i] &= inside[i] ^ 1;
    updateCount();
  }

  function updateCount() {
    let c = 0;
    const sel = state.sel;
    for (let i = 0; i < state.n; i++) c += sel[i];
    state.count = c;
    $("count").textContent = c.toLocaleString();
    requestRender();
    return c;
  }

  // inside[i] = 1 for points in the polygon verts [[x, y], ...] (data coordinates); even-odd rule.
  // The edges are binned by y, so each point tests only the few edges spanning its height
  // (a 100-vertex lasso over 1M points is then ~10 edge tests per point, not 100).
  function insidePolygon(verts) {
    const m = verts.length, vx = new Float64Array(m), vy = new Float64Array(m);
    let xmin = Infinity, xmax = -Infinity, ymin = Infinity, ymax = -Infinity;
    verts.forEach(([a, b], k) => {
      vx[k] = a; vy[k] = b;
      xmin = Math.min(xmin, a); xmax = Math.max(xmax, a); ymin = Math.min(ymin, b); ymax = Math.max(ymax, b);
    });
    const NB = 512, scale = ymax > ymin ? NB / (ymax - ymin) : 0;
    const binOf = (v) => Math.min(NB - 1, Math.max(0, Math.floor((v - ymin) * scale)));
    const start = new Int32Array(NB + 1);
    for (let a = 0, b = m - 1; a < m; b = a++) {
      const lo = binOf(Math.min(vy[a], vy[b])), hi = binOf(Math.max(vy[a], vy[b]));
      for (let k = lo; k <= hi; k++) start[k + 1]++;
    }
    for (let k = 0; k < NB; k++) start[k + 1] += start[k];
    const fill = start.slice(0, NB), edges = new Int32Array(start[NB]);
    for (let a = 0, b = m - 1; a < m; b = a++) {
      const lo = binOf(Math.min(vy[a], vy[b])), hi = binOf(Math.max(vy[a], vy[b]));
      for (let k = lo; k <= hi; k++) edges[fill[k]++] = a;
    }
    const x = state.x, y = state.y, n = state.n, out = new Uint8Array(n);
    for (let i = 0; i < n; i++) {
      const px = x[i], py = y[i];
      if (px < xmin || px > xmax || py < ymin || py > ymax) continue;
      const k = binOf(py);
      let c = 0;
      for (let e = start[k], stop = start[k + 1]; e < stop; e++) {
        const a = edges[e], b = a === 0 ? m - 1 : a - 1;
        if ((vy[a] > py) !== (vy[b] > py) && px < (vx[b] - vx[a]) * (py - vy[a]) / (vy[b] - vy[a]) + vx[a]) c ^= 1;
      }
      out[i] = c;
    }
    return out;
  }

  function insideBox(xa, ya, xb, yb) {
    const x0 = Math.min(xa, xb), x1 = Math.max(xa, xb), y0 = Math.min(ya, yb), y1 = Math.max(ya, yb);
    const x = state.x, y = state.y, n = state.n, out = new Uint8Array(n);
    for (let i = 0; i < n; i++) out[i] = x[i] >= x0 && x[i] <= x1 && y[i] >= y0 && y[i] <= y1 ? 1 : 0;
    return out;
  }

  function timed(fn) {
    const t = performance.now();
    const c = fn();
    api_.timings.lastSelection = performance.now() - t;
    return c;
  }
  api_.selectPolygon = (verts) => timed(() => { combine(insidePolygon(verts)); return state.count; });
  api_.selectBox = (xa, ya, xb, yb) => timed(() => { combine(insideBox(xa, ya, xb, yb)); return state.count; });
  api_.count = () => state.count;
  api_.selectedRows = () => { const r = []; for (let i = 0; i < state.n; i++) if (state.sel[i]) r.push(i); return r; };
  api_.toScreen = toScreen;
  api_.renderNow = () => { render(); return state.count; };
  api_.toData = toData;

  function renderLayers() {
    const ul = $("layers");
    ul.innerHTML = "";
    state.layers.forEach((layer, k) => {
      const li = document.createElement("li");
      li.textContent = `${layer.name} (${layer.count.toLocaleString()}) `;
      for (const [label, op] of [["∪", "or"], ["∩", "and"], ["load", "load"], ["×", "drop"]]) {
        const b = document.createElement("button");
        b.type = "button"; b.textContent = label; b.title = { or: "union with the selection", and: "intersection with the selection", load: "replace the selection by this layer", drop: "forget this layer" }[op];
        b.dataset.layer = layer.name; b.dataset.op = op;
        b.onclick = () => api_.layerOp(layer.name, op);
        li.appendChild(b);
      }
      ul.appendChild(li);
    });
  }
  api_.keepLayer = (name) => {
    const mask = state.sel.slice();
    let c = 0; for (let i = 0; i < state.n; i++) c += mask[i];
    state.layers = state.layers.filter((l) => l.name !== name);
    state.layers.push({ name, mask, count: c });
    renderLayers();
    return c;
  };
  api_.layerOp = (name, op) => {
    const k = state.layers.findIndex((l) => l.name === name);
    if (k < 0) return state.count;
    const m = state.layers[k].mask, sel = state.sel;
    if (op === "or") for (let i = 0; i < state.n; i++) sel[i] |= m[i];
    else if (op === "and") for (let i = 0; i < state.n; i++) sel[i] &= m[i];
    else if (op === "load") sel.set(m);
    else if (op === "drop") { state.layers.splice(k, 1); renderLayers(); }
    return updateCount();
  };
  api_.invert = () => { const s = state.sel; for (let i = 0; i < state.n; i++) s[i] ^= 1; return updateCount(); };
  api_.clear = () => { state.sel.fill(0); return updateCount(); };

  api_.save = async (name, fmt) => {
    const r = await api(`api/selection?format=${encodeURIComponent(fmt)}&name=${encodeURIComponent(name)}`,
      { method: "POST", body: state.sel, headers: { "X-Token": token, "Content-Type": "application/octet-stream" } });
    const res = await r.json();
    const p = $("saved");
    p.innerHTML = "";
    if (!r.ok) { p.textContent = res.error; return res; }
    p.appendChild(document.createTextNode(`saved ${res.count.toLocaleString()} particles: `));
    for (const f of res.files) {
      const a = document.createElement("a");
      a.href = withToken("api/file?name=" + encodeURIComponent(f)); a.textContent = f; a.download = f;
      p.appendChild(a); p.appendChild(document.createTextNode(" "));
    }
    return res;
  };

  // ---- volumes and images ---------------------------------------------------------------
  function drawGray(canvas, data, D, offset) {
    canvas.width = D; canvas.height = D;
    const c = canvas.getContext("2d"), img = c.createImageData(D, D), px = new Uint32Array(img.data.buffer);
    let lo = Infinity, hi = -Infinity;
    for (let i = 0; i < D * D; i++) { const v = data[offset + i]; if (v < lo) lo = v; if (v > hi) hi = v; }
    const s = hi > lo ? 255 / (hi - lo) : 0;
    // row 0 of the array is the bottom of the picture (y up), as in the .mrc viewers
    for (let r = 0; r < D; r++) for (let q = 0; q < D; q++) {
      const g = ((data[offset + r * D + q] - lo) * s) | 0;
      px[(D - 1 - r) * D + q] = pack(g, g, g);
    }
    c.putImageData(img, 0, 0);
  }

  api_.pick = async (row) => {
    state.picked = row; requestRender();
    $("pickinfo").textContent = `row ${row}` + (state.meta.columns.length ? "" : "");
    status("generating volume...");
    const t = performance.now();
    const r = await api("api/volume?row=" + row);
    if (!r.ok) { status((await r.json()).error); return null; }
    const D = +r.headers.get("X-D"), v = new Float32Array(await r.arrayBuffer());
    ["vz", "vy", "vx", "vp"].forEach((id, k) => drawGray($(id), v, D, k * D * D));
    $("mrclink").innerHTML = `<a href="${withToken("api/volume.mrc?row=" + row)}" download="vol_row${row}.mrc">download vol_row${row}.mrc</a> (D=${D})`;
    if (state.meta.store) {
      const ri = await api("api/image?row=" + row);
      if (ri.ok) { const Di = +ri.headers.get("X-D"); drawGray($("pimg"), new Float32Array(await ri.arrayBuffer()), Di, 0); }
    }
    status(`volume in ${((performance.now() - t) / 1000).toFixed(2)} s`);
    return D;
  };

  function nearestRow(sx, sy) {
    // k-means centres first (they are drawn as rings), then every point
    let best = -1, bd = 100;
    for (const c of state.centers) {
      const [cx, cy] = toScreen(state.x[c], state.y[c]), d = (cx - sx) ** 2 + (cy - sy) ** 2;
      if (d < bd) { bd = d; best = c; }
    }
    if (best >= 0) return best;
    const x = state.x, y = state.y, { ax, ay } = axes(), v = state.view;
    const bx = PAD - v.x0 * ax, by = H - PAD + v.y0 * ay;
    bd = 400;
    for (let i = 0; i < state.n; i++) {
      const dx = bx + x[i] * ax - sx, dy = by - y[i] * ay - sy, d = dx * dx + dy * dy;
      if (d < bd) { bd = d; best = i; }
    }
    return best;
  }

  // ---- trajectory -------------------------------------------------------------------------
  api_.addAnchor = (row) => { state.anchors.push(row); $("anchors").textContent = state.anchors.join(", "); requestRender(); };
  api_.runTrajectory = async () => {
    status("graph traversal...");
    const r = await api("api/trajectory", { method: "POST", headers: { "X-Token": token, "Content-Type": "application/json" },
      body: JSON.stringify({ anchors: state.anchors, points: +$("trajpoints").value,
        max_neighbors: +$("trajmax").value, avg_neighbors: +$("trajavg").value }) });
    const res = await r.json();
    if (!r.ok) { status(res.error); $("trajinfo").textContent = res.error; return res; }
    state.traj = res;
    const box = $("trajviews"); box.innerHTML = "";
    res.projections.forEach((p, k) => {
      const f = document.createElement("figure"), c = document.createElement("canvas");
      drawGray(c, p, res.D, 0);
      f.appendChild(c); f.insertAdjacentHTML("beforeend", `<figcaption>${k}: row ${res.rows[k]}</figcaption>`);
      box.appendChild(f);
    });
    $("trajinfo").textContent = `${res.path.length} particles on the path, ${res.rows.length} volumes`;
    $("trajlink").innerHTML = `<a href="${withToken("api/trajectory.zip?id=" + res.id)}">download the volume series (.zip)</a>`;
    status(""); requestRender();
    return res;
  };

  // ---- mouse ------------------------------------------------------------------------------
  overlay.addEventListener("mousedown", (e) => {
    const sx = e.offsetX, sy = e.offsetY;
    state.drag = { sx, sy, view: Object.assign({}, state.view) };
    if (state.tool === "lasso" || state.tool === "box") state.path = [[sx, sy]];
  });
  overlay.addEventListener("mousemove", (e) => {
    const d = state.drag;
    if (!d) return;
    const sx = e.offsetX, sy = e.offsetY;
    if (state.tool === "pan") {
      const { ax, ay } = axes(), dx = (sx - d.sx) / ax, dy = (sy - d.sy) / ay;
      state.view = { x0: d.view.x0 - dx, x1: d.view.x1 - dx, y0: d.view.y0 + dy, y1: d.view.y1 + dy };
      requestRender();
    } else if (state.tool === "lasso") { state.path.push([sx, sy]); drawOverlay(); }
    else if (state.tool === "box") {
      state.path = [[d.sx, d.sy], [sx, d.sy], [sx, sy], [d.sx, sy], [d.sx, d.sy]]; drawOverlay();
    }
  });
  overlay.addEventListener("mouseup", (e) => {
    const d = state.drag; state.drag = null;
    if (!d) return;
    const sx = e.offsetX, sy = e.offsetY, moved = Math.abs(sx - d.sx) + Math.abs(sy - d.sy) > 3;
    if (state.tool === "lasso" && state.path && state.path.length >= 3) {
      api_.selectPolygon(state.path.map(([a, b]) => toData(a, b)));
    } else if (state.tool === "box" && moved) {
      const [xa, ya] = toData(d.sx, d.sy), [xb, yb] = toData(sx, sy);
      api_.selectBox(xa, ya, xb, yb);
    } else if ((state.tool === "pick" || state.tool === "anchor") && !moved) {
      const row = nearestRow(sx, sy);
      if (row >= 0) (state.tool === "pick" ? api_.pick(row) : api_.addAnchor(row));
    }
    state.path = null; requestRender();
  });
  overlay.addEventListener("wheel", (e) => {
    e.preventDefault();
    const [cx, cy] = toData(e.offsetX, e.offsetY), f = Math.exp(e.deltaY * 0.0015), v = state.view;
    state.view = { x0: cx + (v.x0 - cx) * f, x1: cx + (v.x1 - cx) * f, y0: cy + (v.y0 - cy) * f, y1: cy + (v.y1 - cy) * f };
    requestRender();
  }, { passive: false });

  // ---- variables ----------------------------------------------------------------------------
  async function setVars(x, y, c, refit) {
    status("loading...");
    [state.x, state.y] = await Promise.all([column(x), column(y)]);
    await column(c);
    state.xname = x; state.yname = y; state.cname = c;
    computeColors(c);
    if (refit) fitView();
    status(""); render();
  }
  api_.setVars = (x, y, c) => {
    $("xvar").value = x; $("yvar").value = y; $("cvar").value = c;
    return setVars(x, y, c, true);
  };

  async function start() {
    const r = await api("api/meta");
    if (!r.ok) { status("cannot load the run: " + r.status); return; }
    const meta = await r.json();
    state.meta = meta; state.n = meta.n; state.sel = new Uint8Array(meta.n); state.count = 0;
    state.centers = meta.centers;
    $("psize").value = meta.n <= 20000 ? 3 : meta.n <= 200000 ? 2 : 1;
    $("runinfo").textContent = `${meta.run} (epoch ${meta.epoch}): ${meta.n.toLocaleString()} particles, zdim ${meta.zdim}`;
    $("total").textContent = meta.n.toLocaleString();
    for (const id of ["xvar", "yvar", "cvar"]) {
      const s = $(id);
      for (const c of meta.columns) s.add(new Option(c.name, c.name));
    }
    for (const f of meta.exports) $("savefmt").add(new Option({ pkl: "ind.pkl", star: ".star", cs: ".cs" }[f], f));
    $("xvar").value = meta.x; $("yvar").value = meta.y; $("cvar").value = meta.color;
    for (const id of ["xvar", "yvar", "cvar"]) $(id).onchange = () => setVars($("xvar").value, $("yvar").value, $("cvar").value, id !== "cvar");
    $("psize").oninput = requestRender;
    $("reset-view").onclick = () => { fitView(); requestRender(); };
    document.querySelectorAll('input[name="tool"]').forEach((el) => (el.onchange = () => (state.tool = el.value)));
    $("invert").onclick = api_.invert; $("clear").onclick = api_.clear;
    $("keep").onclick = () => api_.keepLayer($("layername").value || "layer");
    $("save").onclick = () => api_.save($("savename").value, $("savefmt").value);
    $("runtraj").onclick = api_.runTrajectory;
    $("clearanchors").onclick = () => { state.anchors = []; state.traj = null; $("anchors").textContent = "none"; requestRender(); };
    if (meta.landscape.length) {
      const box = $("landscape");
      box.innerHTML = "<h2>Volume landscape (analyze-landscape)</h2>";
      for (const f of meta.landscape) box.insertAdjacentHTML("beforeend", `<img alt="${f}" src="${withToken("api/file?name=" + encodeURIComponent(f))}">`);
    }
    if (meta.notes.length) status(meta.notes.join("; "));
    window.addEventListener("resize", resize);
    const r2 = plot.parentElement.getBoundingClientRect();
    W = Math.max(100, Math.floor(r2.width)); H = Math.max(100, Math.floor(r2.height));
    for (const c of [plot, overlay]) { c.width = W; c.height = H; }
    image = ctx.createImageData(W, H); buf = new Uint32Array(image.data.buffer);
    await setVars(meta.x, meta.y, meta.color, true);
    api_.timings.firstRender = performance.now() - T0;
    api_.ready = true;
    if (meta.notes.length) status(meta.notes.join("; "));
  }
  start().catch((e) => { status(String(e)); api_.error = String(e); });
})();
