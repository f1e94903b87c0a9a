// The results viewer: `assist eval view DIR...`. One payload (/api/runs) draws the tables,
// the plots and the item list; one item's records and traces come from /api/items/{index}.
// The plots are inline SVG drawn here, with a tooltip on every point.
"use strict";

(function () {
  const { h, render, folded } = window.AssistTrace;
  const $ = (id) => document.getElementById(id);
  const SVG = "http://www.w3.org/2000/svg";
  const COLORS = ["#2f5fd0", "#d0622f", "#1d8a4a", "#9b3fb5", "#b28a00", "#2a9bb0", "#c23b6d", "#6b6b70"];
  const state = { data: null, selected: null };

  function s(tag, attrs, ...children) {
    const el = document.createElementNS(SVG, tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (k === "text") el.textContent = v;
      else if (k === "dataset") Object.assign(el.dataset, v);
      else el.setAttribute(k, String(v));
    }
    for (const c of children.flat()) if (c) el.append(c);
    return el;
  }

  const pct = (x) => (x === null || x === undefined ? "—" : (100 * x).toFixed(1) + "%");
  const pp = (x) => (x >= 0 ? "+" : "") + (100 * x).toFixed(1);
  const pval = (p) => (p < 0.001 ? "p<0.001" : `p=${p.toFixed(3)}`);

  // -- the tooltip shared by every plot -----------------------------------------------------
  const tip = h("div", { class: "tooltip", hidden: true });
  function hoverable(el, text) {
    el.classList.add("point");
    el.dataset.tip = text;
    el.append(s("title", { text }));
    el.addEventListener("mouseenter", () => { tip.textContent = text; tip.hidden = false; el.classList.add("hot"); });
    el.addEventListener("mousemove", (e) => {
      tip.style.left = Math.min(e.clientX + 12, window.innerWidth - 330) + "px";
      tip.style.top = e.clientY + 12 + "px";
    });
    el.addEventListener("mouseleave", () => { tip.hidden = true; el.classList.remove("hot"); });
    return el;
  }

  // -- tables -------------------------------------------------------------------------------
  function deltaCell(st) {
    const vs = st.vs_baseline;
    if (!vs) return "(baseline)";
    if (vs.delta === null) return "no common items";
    return `${pp(vs.delta)} pp [${pp(vs.lo)}, ${pp(vs.hi)}] ${pval(vs.p)}`;
  }

  function resultsTable(task, strategies) {
    const heads = ["strategy", "accuracy [95% CI]", "Δ vs baseline [95% CI]", "tokens/item", "calls/item",
      "latency p50 / p95", "unparsable", "truncated", "errors"];
    const rows = Object.entries(strategies).map(([name, st]) => {
      const lat = st.latency_s || {};
      return h("tr", { dataset: { strategy: name } },
        h("td", {}, h("code", {}, name)),
        h("td", {}, `${pct(st.accuracy)} [${(100 * st.ci95[0]).toFixed(1)}, ${(100 * st.ci95[1]).toFixed(1)}]`),
        h("td", {}, deltaCell(st)),
        h("td", {}, Math.round(st.tokens_per_item.total).toLocaleString()),
        h("td", {}, st.calls_per_item.toFixed(2)),
        h("td", {}, lat.p50 === null || lat.p50 === undefined ? "—" : `${lat.p50.toFixed(2)} / ${lat.p95.toFixed(2)} s`),
        h("td", {}, pct(st.unparsable_rate)), h("td", {}, pct(st.truncation_rate)), h("td", {}, pct(st.error_rate)));
    });
    const ns = [...new Set(Object.values(strategies).map((st) => st.n))].join("/");
    const ks = [...new Set(Object.values(strategies).map((st) => st.runs_per_item))].join("/");
    return h("div", { class: "table-wrap" },
      h("h3", {}, `${task} (n=${ns} items, K=${ks} runs/item)`),
      h("table", { class: "results" }, h("thead", {}, h("tr", {}, heads.map((x) => h("th", {}, x)))), h("tbody", {}, rows)));
  }

  function drawResults(data) {
    const box = $("results");
    for (const run of data.runs) {
      const c = run.config || {};
      box.append(h("div", { class: "run" },
        h("div", { class: "dim" }, `${run.name} · ${c.served_model ?? "?"} · seed ${c.seed ?? "?"} · ` +
          `K=${c.samples ?? "?"} · ${run.date ?? ""}${run.commit ? " · " + run.commit : ""}`),
        Object.entries(run.summary).map(([task, strategies]) => resultsTable(task, strategies))));
    }
    if (data.runs.length > 1) {
      const cmp = data.compare;
      $("compare").hidden = false;
      $("compare").append(h("div", { class: "table-wrap" }, h("table", { class: "compare" },
        h("thead", {}, h("tr", {}, h("th", {}, "task"), h("th", { class: "left" }, "strategy"), cmp.labels.map((l) => h("th", {}, l)))),
        h("tbody", {}, cmp.rows.map((row) => h("tr", {},
          h("td", {}, row.task), h("td", { class: "left" }, h("code", {}, row.strategy)),
          row.cells.map((cell) => h("td", {}, cell ? `${pct(cell.accuracy)} [${(100 * cell.ci95[0]).toFixed(1)}, ` +
            `${(100 * cell.ci95[1]).toFixed(1)}]` : "—"))))))));
    }
  }

  // -- plots ------------------------------------------------------------------------------
  const W = 460, H = 300, M = { l: 46, r: 16, t: 26, b: 40 };
  const px = (x0, x1) => (x) => M.l + ((x - x0) / (x1 - x0 || 1)) * (W - M.l - M.r);
  const py = (y) => H - M.b - y * (H - M.t - M.b);

  function frame(title, xTicks, xLabel) {
    const svg = s("svg", { class: "plot", viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": title });
    svg.append(s("text", { x: M.l, y: 16, text: title, "font-weight": 600 }));
    for (const y of [0, 0.25, 0.5, 0.75, 1]) {
      svg.append(s("line", { class: "grid", x1: M.l, x2: W - M.r, y1: py(y), y2: py(y) }));
      svg.append(s("text", { x: M.l - 6, y: py(y) + 4, "text-anchor": "end", text: `${y * 100}%` }));
    }
    for (const [x, label] of xTicks) {
      svg.append(s("line", { class: "grid", x1: x, x2: x, y1: M.t, y2: H - M.b }));
      svg.append(s("text", { x, y: H - M.b + 14, "text-anchor": "middle", text: label }));
    }
    svg.append(s("line", { class: "axis", x1: M.l, x2: W - M.r, y1: H - M.b, y2: H - M.b }));
    svg.append(s("line", { class: "axis", x1: M.l, x2: M.l, y1: M.t, y2: H - M.b }));
    svg.append(s("text", { x: (W + M.l) / 2, y: H - 6, "text-anchor": "middle", text: xLabel }));
    return svg;
  }

  function frontier(run, task, strategies) {
    const pts = Object.entries(strategies).map(([name, st], i) => ({ name, st, i,
      x: Math.log10(Math.max(1, st.tokens_per_item.total)) }));
    const lo = Math.floor(Math.min(...pts.map((p) => p.x)) * 2) / 2;
    const hi = Math.max(lo + 0.5, Math.ceil(Math.max(...pts.map((p) => p.x)) * 2) / 2);
    const X = px(lo - 0.1, hi + 0.1);
    const ticks = [];
    for (let e = Math.ceil(lo); e <= hi; e++) ticks.push([X(e), (10 ** e).toLocaleString()]);
    if (!ticks.length) ticks.push([X(lo), Math.round(10 ** lo).toLocaleString()]);
    const svg = frame(`${task} · ${run.name}`, ticks, "tokens per item (log)");
    for (const p of pts) {
      const color = COLORS[p.i % COLORS.length];
      const [cl, ch] = p.st.ci95;
      const g = s("g", { dataset: { strategy: p.name } },
        s("line", { x1: X(p.x), x2: X(p.x), y1: py(cl), y2: py(ch), stroke: color, "stroke-width": 1.5 }),
        s("line", { x1: X(p.x) - 4, x2: X(p.x) + 4, y1: py(cl), y2: py(cl), stroke: color }),
        s("line", { x1: X(p.x) - 4, x2: X(p.x) + 4, y1: py(ch), y2: py(ch), stroke: color }),
        s("text", { x: X(p.x) + 7, y: py(p.st.accuracy) - 6, text: p.name, fill: color }));
      g.append(hoverable(s("circle", { cx: X(p.x), cy: py(p.st.accuracy), r: 5, fill: color }),
        `${p.name}: ${pct(p.st.accuracy)} [${pct(cl)}, ${pct(ch)}] at ${Math.round(p.st.tokens_per_item.total)} ` +
        `tokens/item, ${p.st.calls_per_item.toFixed(2)} calls/item`));
      svg.append(g);
    }
    return svg;
  }

  function majk(run, task, curves) {
    const kmax = Math.max(...Object.values(curves).map((c) => Math.max(...Object.keys(c.maj_at_k).map(Number))));
    const X = px(1, Math.max(2, kmax));
    const ticks = [];
    for (let k = 1; k <= kmax; k = k < 4 ? k + 1 : k * 2) ticks.push([X(k), String(k)]);
    const svg = frame(`${task} · ${run.name}`, ticks, "k (samples)");
    Object.entries(curves).forEach(([name, curve], i) => {
      const color = COLORS[i % COLORS.length];
      for (const [key, dash] of [["maj_at_k", null], ["pass_at_k", "3 3"]]) {
        const pts = Object.entries(curve[key] || {}).map(([k, v]) => [Number(k), v]).sort((a, b) => a[0] - b[0]);
        if (!pts.length) continue;
        const line = s("polyline", { points: pts.map(([k, v]) => `${X(k)},${py(v)}`).join(" "), fill: "none",
          stroke: color, "stroke-width": 1.8, dataset: { strategy: name, curve: key } });
        if (dash) line.setAttribute("stroke-dasharray", dash);
        svg.append(line);
        for (const [k, v] of pts) {
          svg.append(hoverable(s("circle", { cx: X(k), cy: py(v), r: key === "maj_at_k" ? 4 : 3, fill: color }),
            `${name} ${key.replace("_at_", "@")}=${k}: ${pct(v)}`.replace("@k=", "@")));
        }
      }
      svg.append(s("text", { x: W - M.r - 4, y: M.t + 12 + 14 * i, "text-anchor": "end", fill: color, text: name }));
    });
    return svg;
  }

  function drawPlots(data) {
    const fplots = $("frontier").querySelector(".plots");
    const mplots = $("majk").querySelector(".plots");
    for (const run of data.runs) {
      for (const [task, strategies] of Object.entries(run.summary)) fplots.append(frontier(run, task, strategies));
      for (const [task, curves] of Object.entries(run.curves || {})) {
        $("majk").hidden = false;
        mplots.append(majk(run, task, curves));
      }
    }
  }

  // -- items ------------------------------------------------------------------------------
  function strategyLabel(key) {
    const [run, ...rest] = key.split(":");
    const name = rest.join(":");
    return state.data.runs.length > 1 ? `${state.data.runs[Number(run)].name}/${name}` : name;
  }

  function filtered() {
    const wrong = $("f-wrong").checked, disagree = $("f-disagree").checked;
    const id = $("f-id").value.trim().toLowerCase(), text = $("f-text").value.trim().toLowerCase();
    return state.data.items.filter((item) => {
      if (wrong && !item.wrong) return false;
      if (disagree && !item.disagree) return false;
      if (id && !item.id.toLowerCase().includes(id)) return false;
      if (text) {
        const hay = [item.question, item.reference, ...Object.values(item.answers).map((a) => a.answer)]
          .map((x) => String(x ?? "").toLowerCase()).join("\n");
        if (!hay.includes(text)) return false;
      }
      return true;
    });
  }

  function drawItems() {
    const items = filtered();
    $("count").textContent = `${items.length} of ${state.data.items.length} items`;
    $("items").replaceChildren(...items.map((item) => h("div", {
      class: "item" + (item.index === state.selected ? " selected" : ""), dataset: { index: String(item.index), id: item.id },
      onclick: () => select(item.index),
    },
    h("div", {}, h("code", {}, item.id), h("span", { class: "dim" }, ` · gold ${item.reference}`)),
    h("div", { class: "q dim" }, item.question),
    h("div", { class: "marks" }, Object.entries(item.answers).map(([key, a]) => h("span", {
      class: "mark " + (a.correct >= 1 ? "right" : a.correct > 0 ? "part" : ""),
      title: `${strategyLabel(key)}: ${a.answer ?? "no answer"}${a.errored ? " (errored)" : ""}`,
    }, `${strategyLabel(key)} ${a.correct >= 1 ? "✓" : "✗"}`))))));
  }

  function runCard(rec) {
    const runs = rec.runs || [];
    return h("div", { class: "column strategy", dataset: { strategy: rec.strategy } },
      h("h3", {}, rec.strategy),
      runs.map((r, j) => h("div", { class: "one-run" },
        runs.length > 1 ? h("div", { class: "dim" }, `run ${j + 1} (seed ${r.seed})`) : null,
        h("div", { class: "stats" },
          h("div", {}, "answer", h("b", { class: r.correct ? "good" : "bad" }, `${r.answer ?? "—"} ${r.correct ? "✓" : "✗"}`)),
          h("div", {}, "tokens", h("b", {}, `${r.prompt_tokens ?? "?"} / ${r.completion_tokens ?? "?"}`)),
          h("div", {}, "calls", h("b", {}, String(r.calls ?? "?"))),
          h("div", {}, "latency", h("b", {}, r.latency_s === null || r.latency_s === undefined ? "—" : r.latency_s.toFixed(2) + " s"))),
        r.error ? h("div", { class: "bad" }, "error: " + r.error) : null,
        folded(r.text, "text:"),
        render(r.trace))));
  }

  async function select(index) {
    state.selected = index;
    for (const el of $("items").children) el.classList.toggle("selected", Number(el.dataset.index) === index);
    const resp = await fetch(`/api/items/${index}`);
    const item = await resp.json();
    const byRun = new Map();
    for (const rec of item.records) {
      if (!byRun.has(rec.run)) byRun.set(rec.run, []);
      byRun.get(rec.run).push(rec);
    }
    $("detail").replaceChildren(h("div", { class: "item-detail", dataset: { index: String(index), id: item.id } },
      h("h3", {}, h("code", {}, item.id), h("span", { class: "dim" }, ` · ${item.task}`)),
      h("pre", { class: "question" }, item.question),
      h("div", {}, "gold answer: ", h("b", { class: "gold" }, String(item.reference ?? "—"))),
      [...byRun.entries()].map(([run, recs]) => h("div", { class: "run-block", dataset: { run: String(run) } },
        state.data.runs.length > 1 ? h("h3", {}, state.data.runs[run].name) : null,
        h("div", { class: "strategies" }, recs.map(runCard))))));
  }

  async function main() {
    document.body.append(tip);
    const resp = await fetch("/api/runs");
    state.data = await resp.json();
    $("runs-line").textContent = state.data.runs.map((r) => r.name).join(" · ");
    $("runs-line").title = state.data.runs.map((r) => r.path).join("\n");
    drawResults(state.data);
    drawPlots(state.data);
    for (const id of ["f-wrong", "f-disagree", "f-id", "f-text"]) $(id).addEventListener("input", drawItems);
    drawItems();
  }

  document.addEventListener("DOMContentLoaded", main);
})();
