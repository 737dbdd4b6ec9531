/* safactory view: the run page's curves, drawn as SVG by hand (no library, nothing fetched from elsewhere).
   Rows come from /api/runs/RUN/metrics?offset=N; while the run is running the page asks again every
   poll_s seconds with the offset it got, so the curves grow as metrics.jsonl does. A series gets a
   point where its marker (an evaluation's label, a training step) or its value changed; gate decisions
   are dashed vertical lines. */
(function () {
  "use strict";
  const NS = "http://www.w3.org/2000/svg";
  const PALETTE = ["#1f6fb4", "#e0701b", "#2b9a3e", "#c8312f", "#7b55b0", "#8a5a4b", "#d257a8", "#6f6f6f", "#a8a626", "#1aa9b8"];
  const W = 460, H = 210, L = 46, R = 12, T = 10, B = 24;
  const MAX_DOTS = 400;
  const data = JSON.parse(document.getElementById("run-data").textContent);
  const root = document.getElementById("charts");
  const state = {
    offset: 0, maxX: 0, gates: [], lastGate: null, status: data.status,
    charts: data.charts.map(function (spec) { return { spec: spec, lines: new Map(), patterns: spec.series.map(function (s) { return s.pattern ? new RegExp(s.pattern) : null; }) }; })
  };

  function num(v) { return typeof v === "number" && isFinite(v) ? v : null; }

  function clock(s) {
    if (s < 60) return (s < 10 ? s.toFixed(1) : Math.round(s)) + "s";
    if (s < 3600) return Math.floor(s / 60) + "m" + String(Math.round(s % 60)).padStart(2, "0");
    return Math.floor(s / 3600) + "h" + String(Math.floor((s % 3600) / 60)).padStart(2, "0");
  }

  function label(v) {
    if (Math.abs(v) >= 1000) return v.toFixed(0);
    return String(+v.toPrecision(3));
  }

  function add(chart, name, key, marker, row, x) {
    const y = num(row[key]);
    if (y === null) return;
    let line = chart.lines.get(name);
    if (!line) { line = { points: [], mark: undefined, value: undefined }; chart.lines.set(name, line); }
    const mark = marker ? row[marker] : undefined;
    if (line.points.length && mark === line.mark && y === line.value) return;
    line.points.push([x, y]);
    line.mark = mark;
    line.value = y;
  }

  function ingest(rows) {
    rows.forEach(function (row) {
      const x = num(row.time_s);
      if (x === null) return;
      state.maxX = Math.max(state.maxX, x);
      const version = row["gate/candidate_version"], accepted = row["gate/accepted"];
      if (version != null && typeof accepted === "boolean") {
        const last = state.lastGate;
        if (!last || last[0] !== version || last[1] !== accepted) state.gates.push({ x: x, version: version, accepted: accepted });
        state.lastGate = [version, accepted];
      }
      state.charts.forEach(function (chart) {
        chart.spec.series.forEach(function (s, i) {
          if (s.key) { add(chart, s.label, s.key, s.marker, row, x); return; }
          const re = chart.patterns[i];
          if (!re) return;
          Object.keys(row).forEach(function (k) {
            const m = re.exec(k);
            if (m) add(chart, s.label.replace("{}", m[1]), k, s.marker, row, x);
          });
        });
      });
    });
  }

  function el(name, attrs, parent) {
    const node = document.createElementNS(NS, name);
    Object.keys(attrs).forEach(function (k) { node.setAttribute(k, attrs[k]); });
    if (parent) parent.appendChild(node);
    return node;
  }

  function niceStep(range, n) {
    const raw = range / n, mag = Math.pow(10, Math.floor(Math.log10(raw))), f = raw / mag;
    return (f <= 1 ? 1 : f <= 2 ? 2 : f <= 5 ? 5 : 10) * mag;
  }

  function ticks(lo, hi, n) {  /* round numbers from lo to hi (both already on the step) */
    const step = niceStep(hi - lo, n), out = [];
    for (let v = Math.ceil(lo / step - 1e-9) * step; v <= hi + step * 1e-9; v += step) out.push(+v.toPrecision(12));
    return out;
  }

  function draw(chart, box) {
    box.textContent = "";
    const title = document.createElement("div");
    title.className = "title";
    title.textContent = chart.spec.title;
    box.appendChild(title);
    const lines = Array.from(chart.lines.entries()).filter(function (e) { return e[1].points.length; });
    if (!lines.length) {
      const none = document.createElement("div");
      none.className = "nodata";
      none.textContent = "no data yet";
      box.appendChild(none);
      box.dataset.points = "0";
      return;
    }
    const legend = document.createElement("div");
    legend.className = "legend";
    lines.forEach(function (e, i) {
      const item = document.createElement("span");
      const swatch = document.createElement("i");
      swatch.style.borderColor = PALETTE[i % PALETTE.length];
      item.appendChild(swatch);
      item.appendChild(document.createTextNode(e[0]));
      legend.appendChild(item);
    });
    box.appendChild(legend);
    let lo = Infinity, hi = -Infinity;
    lines.forEach(function (e) { e[1].points.forEach(function (p) { lo = Math.min(lo, p[1]); hi = Math.max(hi, p[1]); }); });
    if (chart.spec.rate) { lo = Math.min(0, lo); hi = Math.max(1, hi); }
    if (hi - lo < 1e-9) { lo -= 0.5; hi += 0.5; }
    if (!chart.spec.rate) {  /* widen to round numbers */
      const step = niceStep(hi - lo, 5);
      lo = Math.floor(lo / step + 1e-9) * step;
      hi = Math.ceil(hi / step - 1e-9) * step;
    }
    const xmax = Math.max(state.maxX, 1e-9);
    const sx = function (x) { return L + (x / xmax) * (W - L - R); };
    const sy = function (y) { return T + (1 - (y - lo) / (hi - lo)) * (H - T - B); };
    const svg = el("svg", { viewBox: "0 0 " + W + " " + H, role: "img", "aria-label": chart.spec.title });
    ticks(lo, hi, 5).forEach(function (v) {
      el("line", { x1: L, x2: W - R, y1: sy(v), y2: sy(v), class: "gridline" }, svg);
      el("text", { x: L - 4, y: sy(v) + 3, "text-anchor": "end" }, svg).textContent = label(v);
    });
    ticks(0, xmax, 4).filter(function (v) { return v <= xmax; }).forEach(function (v) {
      el("text", { x: sx(v), y: H - 6, "text-anchor": "middle" }, svg).textContent = clock(v);
    });
    el("line", { x1: L, x2: L, y1: T, y2: H - B, class: "axis" }, svg);
    el("line", { x1: L, x2: W - R, y1: H - B, y2: H - B, class: "axis" }, svg);
    state.gates.forEach(function (g) {
      const line = el("line", { x1: sx(g.x), x2: sx(g.x), y1: T, y2: H - B, class: "gate " + (g.accepted ? "accepted" : "rejected") }, svg);
      el("title", {}, line).textContent = "gate: v" + g.version + (g.accepted ? " accepted" : " rejected") + " at " + clock(g.x);
    });
    let dots = 0;
    lines.forEach(function (e, i) {
      const color = PALETTE[i % PALETTE.length];
      const pts = e[1].points;
      el("polyline", { points: pts.map(function (p) { return sx(p[0]).toFixed(1) + "," + sy(p[1]).toFixed(1); }).join(" "), fill: "none", stroke: color, "stroke-width": 1.6, class: "series", "data-series": e[0] }, svg);
      const stride = Math.max(1, Math.ceil(pts.length / MAX_DOTS));
      pts.forEach(function (p, j) {
        if (j % stride !== 0 && j !== pts.length - 1) return;
        const dot = el("circle", { cx: sx(p[0]).toFixed(1), cy: sy(p[1]).toFixed(1), r: 2.6, fill: color, class: "pt" }, svg);
        el("title", {}, dot).textContent = e[0] + ": " + label(p[1]) + " at " + clock(p[0]);
        dots++;
      });
    });
    box.appendChild(svg);
    box.dataset.points = String(dots);
  }

  const boxes = state.charts.map(function (chart) {
    const box = document.createElement("div");
    box.className = "chart";
    box.id = "chart-" + chart.spec.id;
    root.appendChild(box);
    return box;
  });

  function render() {
    state.charts.forEach(function (chart, i) { draw(chart, boxes[i]); });
    root.dataset.rows = String(state.offset);
  }

  function setStatus(status) {
    state.status = status;
    const badge = document.getElementById("status");
    if (badge && badge.textContent !== status) { badge.textContent = status; badge.className = "badge " + status; }
    const note = document.getElementById("live-note");
    if (note) note.textContent = status === "running" ? "(live: updated every " + data.poll_s + " s)" : "";
  }

  function poll() {
    fetch("/api/runs/" + encodeURIComponent(data.run) + "/metrics?offset=" + state.offset, { credentials: "same-origin" })
      .then(function (r) { return r.json(); })
      .then(function (body) {
        const moved = body.offset !== state.offset;
        if (body.offset < state.offset) {  /* the log was rewritten: start over */
          state.charts.forEach(function (c) { c.lines.clear(); });
          state.gates = []; state.lastGate = null; state.maxX = 0;
        }
        state.offset = body.offset;
        if (body.rows.length) { ingest(body.rows); render(); }
        else if (!boxes[0].dataset.points) render();
        setStatus(body.status);
        if (body.rows.length && moved && body.status !== "running") poll();  /* more than one slice */
        else if (body.status === "running") setTimeout(poll, data.poll_s * 1000);
      })
      .catch(function () { setTimeout(poll, data.poll_s * 4000); });
  }

  poll();
})();
