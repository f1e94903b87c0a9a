// The playground: one prompt, several strategies, each in its own column against this
// server's own endpoint. Every column streams: the plain model token by token, a strategy
// the stage that writes its answer (a vote shows its progress while it samples), its trace
// coming on the last chunk (the "return_trace" extension), drawn by trace.js.
//
// The API key, when the server needs one, is asked for and kept in a variable of this page
// only (never in storage or a cookie): reload the page and it is gone.
"use strict";

(function () {
  const { h, render } = window.AssistTrace;
  const $ = (id) => document.getElementById(id);
  const state = {
    key: null,
    model: "assistant",
    chosen: [], // {spec: string | null (the plain model), label}
    checks: new Map(), // spec -> the check's answer, for the temperature option
    running: false,
  };

  class ApiError extends Error {
    constructor(status, body) {
      const error = (body && body.error) || {};
      super(error.message || `HTTP ${status}`);
      this.status = status;
      this.param = error.param;
    }
  }

  function headers() {
    const out = { "Content-Type": "application/json" };
    if (state.key) out.Authorization = "Bearer " + state.key;
    return out;
  }

  async function api(method, path, body) {
    const resp = await fetch(path, { method, headers: headers(), body: body ? JSON.stringify(body) : undefined });
    const data = await resp.json().catch(() => null);
    if (resp.status === 401) askForKey(state.key ? "that key was refused" : "");
    if (!resp.ok) throw new ApiError(resp.status, data);
    return data;
  }

  function askForKey(message) {
    $("key-box").hidden = false;
    $("key-status").textContent = message || "";
    $("key").focus();
  }

  // -- loading: models, strategy aliases, examples ------------------------------------------
  async function load() {
    let models;
    try {
      models = await api("GET", "/v1/models");
    } catch (err) {
      $("server").textContent = err.status === 401 ? "waiting for the API key" : "cannot list models: " + err.message;
      return;
    }
    $("key-box").hidden = true;
    const ids = models.data.map((m) => m.id);
    state.model = ids.find((id) => !id.includes("::")) || ids[0] || "assistant";
    $("server").textContent = `model: ${state.model}`;
    const aliases = [null, ...ids.filter((id) => id.includes("::")).map((id) => id.split("::")[0])];
    const fresh = !state.chosen.length;
    const box = $("aliases");
    box.replaceChildren(...aliases.map((spec) => {
      const input = h("input", { type: "checkbox", dataset: { spec: spec ?? "" } });
      input.checked = state.chosen.some((c) => c.spec === spec) ||
        (fresh && (spec === "cot" || spec === "sc@8"));
      if (input.checked && !state.chosen.some((c) => c.spec === spec)) choose(spec);
      input.addEventListener("change", () => (input.checked ? choose(spec) : unchoose(spec)));
      return h("label", { class: "chip alias" }, input, spec ?? `${state.model} (plain, streamed)`);
    }));
    renderChosen();
    loadExamples();
  }

  async function loadExamples() {
    try {
      const { data } = await api("GET", "/v1/playground/examples");
      $("examples").replaceChildren(...(data.length ? data.map((ex) => h("button", {
        type: "button", class: "chip example", title: `${ex.id} · gold answer: ${ex.answer}`,
        onclick: () => {
          $("prompt").value = ex.question;
          $("gold").textContent = `${ex.task} ${ex.id} · gold answer: ${ex.answer}`;
        },
      }, h("span", { class: "tag" }, ex.task), " ", ex.question.length > 70 ? ex.question.slice(0, 69) + "…" : ex.question))
        : [h("span", { class: "dim" }, "none")]));
    } catch (err) {
      $("examples").replaceChildren(h("span", { class: "dim" }, "no examples: " + err.message));
    }
  }

  // -- choosing strategies ------------------------------------------------------------------
  function choose(spec) {
    if (state.chosen.some((c) => c.spec === spec)) return;
    state.chosen.push({ spec, label: spec ?? `${state.model} (plain)` });
    renderChosen();
  }

  function unchoose(spec) {
    state.chosen = state.chosen.filter((c) => c.spec !== spec);
    for (const input of document.querySelectorAll("#aliases input")) {
      if ((input.dataset.spec || null) === spec) input.checked = false;
    }
    renderChosen();
  }

  // Every chosen strategy has a column, in the order chosen; a column keeps its last answer
  // and the history of its runs until the strategy is removed.
  function renderChosen() {
    const columns = $("columns");
    const keep = new Set(state.chosen.map((c) => c.label));
    for (const col of [...columns.children]) if (!keep.has(col.dataset.label)) col.remove();
    for (const c of state.chosen) {
      let col = [...columns.children].find((el) => el.dataset.label === c.label);
      if (!col) col = newColumn(c);
      columns.append(col); // in order
    }
  }

  function newColumn(c) {
    const col = h("article", { class: "column", dataset: { label: c.label, spec: c.spec ?? "" } },
      h("h3", {}, c.label, h("button", { type: "button", class: "x", title: "remove", onclick: () => unchoose(c.spec) }, "×")),
      h("div", { class: "status col-status dim" }, "not run yet"),
      h("pre", { class: "answer" }),
      h("div", { class: "stats" },
        stat("extracted answer", "extracted"), stat("tokens (in / out)", "tokens"),
        stat("calls", "calls"), stat("latency", "latency")),
      h("div", { class: "history" }),
      h("div", { class: "trace-box" }));
    col.history = [];
    return col;
  }

  function stat(label, key) {
    return h("div", {}, label, h("b", { class: "stat-" + key }, "—"));
  }

  let checkTimer = null;
  let checkSeq = 0;

  async function check(spec) {
    const body = { spec };
    const cap = Number($("max-tokens").value);
    if (cap >= 1) body.max_tokens = cap;
    const result = await api("POST", "/v1/strategies/check", body);
    state.checks.set(spec, result);
    return result;
  }

  // The spec is checked as it is typed, by the server's own parser and policy; the error it
  // gives names the bad token.
  function onSpecInput() {
    const spec = $("spec").value.trim();
    clearTimeout(checkTimer);
    $("add-spec").disabled = true;
    $("spec").classList.remove("invalid");
    if (!spec) {
      $("spec-status").textContent = "";
      return;
    }
    checkTimer = setTimeout(async () => {
      const seq = ++checkSeq;
      try {
        const result = await check(spec);
        if (seq !== checkSeq) return;
        $("spec-status").className = "status good";
        $("spec-status").textContent = `✓ ${result.spec} · up to ${result.calls} model call${result.calls === 1 ? "" : "s"}`;
        $("add-spec").disabled = false;
      } catch (err) {
        if (seq !== checkSeq) return;
        $("spec").classList.add("invalid");
        $("spec-status").className = "status bad spec-error";
        $("spec-status").textContent = err.message;
      }
    }, 200);
  }

  function addTyped() {
    const spec = $("spec").value.trim();
    if (!spec || $("add-spec").disabled) return;
    const canonical = (state.checks.get(spec) || {}).spec || spec;
    choose(canonical);
    $("spec").value = "";
    $("spec-status").textContent = "";
    $("add-spec").disabled = true;
  }

  // -- running ------------------------------------------------------------------------------
  function messages() {
    const out = [];
    const system = $("system").value.trim();
    if (system) out.push({ role: "system", content: system });
    out.push({ role: "user", content: $("prompt").value });
    return out;
  }

  function sampling() {
    const out = {};
    const t = $("temperature").value.trim();
    const cap = $("max-tokens").value.trim();
    const seed = $("seed").value.trim();
    if (t !== "") out.temperature = Number(t);
    if (cap !== "") out.max_tokens = Number(cap);
    if (seed !== "") out.seed = Number(seed);
    return out;
  }

  // A strategy samples with its own options, so the temperature goes into its spec as the
  // outermost strategy's t option (when it has one and the spec does not set it already).
  async function specWith(spec, temperature) {
    if (temperature === undefined) return spec;
    const cut = spec.indexOf("(");
    const head = cut < 0 ? spec : spec.slice(0, cut);
    if (/(^|[:,])\s*(t|temperature)\s*=/.test(head)) return spec;
    const known = state.checks.get(spec) || (await check(spec).catch(() => ({})));
    if (!known.temperature) return spec;
    const withT = head + (head.includes(":") ? "," : ":") + "t=" + temperature;
    return withT + (cut < 0 ? "" : spec.slice(cut));
  }

  function extract(text) {
    const matches = [...(text || "").matchAll(/####\s*([^\n]+)/g)];
    return matches.length ? matches[matches.length - 1][1].trim() : null;
  }

  function show(col, fields) {
    const q = (cls) => col.querySelector(cls);
    if ("status" in fields) {
      q(".col-status").textContent = fields.status;
      q(".col-status").className = "status col-status " + (fields.bad ? "bad" : "dim");
    }
    if ("text" in fields) q(".answer").textContent = fields.text;
    if ("extracted" in fields) q(".stat-extracted").textContent = fields.extracted ?? "—";
    if (fields.usage) {
      q(".stat-tokens").textContent = `${fields.usage.prompt_tokens} / ${fields.usage.completion_tokens}`;
      q(".stat-calls").textContent = String(fields.usage.calls ?? 1);
    }
    if ("latency" in fields) q(".stat-latency").textContent = fields.latency.toFixed(2) + " s";
    if ("trace" in fields) q(".trace-box").replaceChildren(fields.trace);
  }

  // POST a streamed chat request and hand each chunk to onChunk, as the server sends them
  // (server-sent events, one JSON chunk per "data:" event, until [DONE]). An error before
  // the stream is the HTTP error; one in the stream is an event with "error".
  async function stream(body, onChunk) {
    const resp = await fetch("/v1/chat/completions", { method: "POST", headers: headers(), body: JSON.stringify(body) });
    if (resp.status === 401) askForKey(state.key ? "that key was refused" : "");
    if (!resp.ok) throw new ApiError(resp.status, await resp.json().catch(() => null));
    const reader = resp.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { done, value } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const event = buffer.slice(0, cut).trim();
        buffer = buffer.slice(cut + 2);
        if (!event.startsWith("data:")) continue;
        const data = event.slice(5).trim();
        if (data === "[DONE]") continue;
        const chunk = JSON.parse(data);
        if (chunk.error) throw new ApiError(500, chunk);
        onChunk(chunk);
      }
    }
  }

  async function runPlain(col, base) {
    const t0 = performance.now();
    let text = "", usage = null, first = null;
    await stream({ ...base, model: state.model, stream: true, stream_options: { include_usage: true } }, (chunk) => {
      if (chunk.usage) usage = chunk.usage;
      const delta = chunk.choices && chunk.choices[0] && chunk.choices[0].delta;
      if (delta && delta.content) {
        if (first === null) first = (performance.now() - t0) / 1000;
        text += delta.content;
        show(col, { text, status: `streaming… first token ${first.toFixed(2)} s` });
      }
    });
    const latency = (performance.now() - t0) / 1000;
    show(col, { text, extracted: extract(text), usage: usage && { ...usage, calls: 1 }, latency,
      status: `done · first token ${first === null ? "—" : first.toFixed(2) + " s"}`,
      trace: h("div", { class: "dim" }, "(a plain answer: one call, no strategy steps)") });
    return extract(text) ?? text.trim().slice(0, 40);
  }

  // A voting strategy's progress while it samples: "samples 3 of 8", and the tally so far.
  function progressText(p) {
    const tally = Object.entries(p.tally || {}).sort((a, b) => b[1] - a[1])
      .map(([answer, votes]) => `${answer} ×${Number.isInteger(votes) ? votes : votes.toFixed(2)}`).join(", ");
    return `${p.strategy || "voting"}: samples ${p.samples} of ${p.of}` + (p.scoring ? " · scoring" : "") +
      (tally ? ` · tally ${tally}` : "");
  }

  // A strategy streams the stage that writes its answer; its trace, extracted answer and
  // cost come on the choice's last chunk (return_trace). stream_progress is asked of every
  // strategy: only a vote (sc, bon) has progress to send, shown while nothing else can be.
  async function runStrategy(col, spec, base) {
    const t0 = performance.now();
    const { temperature, ...rest } = base;
    const sent = await specWith(spec, temperature);
    let text = "", usage = null, last = null, first = null, updates = 0;
    await stream({ ...rest, model: `${sent}::${state.model}`, stream: true, stream_options: { include_usage: true },
      return_trace: true, stream_progress: true }, (chunk) => {
      if (chunk.usage) usage = chunk.usage;
      if (chunk.progress && chunk.progress.index === 0) {
        const said = progressText(chunk.progress);
        // Kept on the column too, once the status has moved on (the browser tests read it).
        col.dataset.progress = String(Number(col.dataset.progress || 0) + 1);
        col.dataset.lastProgress = said;
        show(col, { status: said });
      }
      for (const choice of chunk.choices || []) {
        if (choice.index !== 0) continue;
        const delta = choice.delta || {};
        if (delta.content) {
          if (first === null) first = (performance.now() - t0) / 1000;
          text += delta.content;
          col.dataset.updates = String(++updates);
          show(col, { text, status: `streaming the answer… first text ${first.toFixed(2)} s` });
        }
        if (delta.tool_calls && !text) text = JSON.stringify(delta.tool_calls);
        if (choice.finish_reason) last = choice;
      }
    });
    if (!last) throw new Error("the stream ended before the answer did");
    const latency = (performance.now() - t0) / 1000;
    show(col, { text, extracted: last.answer, usage, latency, trace: render(last.trace || []),
      status: `done · ${sent}${last.cost ? ` · ${last.cost.latency_s.toFixed(2)} s on the server` : ""}` +
        (first === null ? "" : ` · first text ${first.toFixed(2)} s`) });
    return last.answer;
  }

  // The answers of a column's runs, with how often the most common one came back.
  function drawHistory(col) {
    const runs = col.history;
    const counts = new Map();
    for (const r of runs) counts.set(r.answer, (counts.get(r.answer) || 0) + 1);
    const top = Math.max(0, ...counts.values());
    col.querySelector(".history").replaceChildren(
      runs.length > 1 ? h("div", { class: "stability", dataset: { runs: String(runs.length), same: String(top) } },
        `stability: the most common answer in ${top} of ${runs.length} runs`) : "",
      h("div", {}, runs.map((r) => h("span", { class: "tag " + (r.error ? "bad" : "") },
        `seed ${r.seed}: ${r.error ? "error" : r.answer ?? "—"}`))));
  }

  async function runAll(again) {
    if (state.running) return;
    if (!$("prompt").value.trim()) {
      $("run-status").textContent = "Write a prompt first (or pick an example).";
      return;
    }
    if (!state.chosen.length) {
      $("run-status").textContent = "Choose at least one strategy.";
      return;
    }
    if (again) $("seed").value = String((Number($("seed").value) || 0) + 1);
    state.running = true;
    $("run").disabled = $("again").disabled = true;
    $("run-status").textContent = `running ${state.chosen.length} column(s)…`;
    const base = { messages: messages(), ...sampling() };
    const cols = [...$("columns").children];
    await Promise.all(cols.map(async (col) => {
      if (!again) col.history = [];
      const spec = col.dataset.spec || null;
      col.dataset.updates = col.dataset.progress = "0";
      col.dataset.lastProgress = "";
      show(col, { status: "running…", text: "", extracted: null, trace: h("div") });
      let answer = null, error = null;
      try {
        answer = spec === null ? await runPlain(col, base) : await runStrategy(col, spec, base);
      } catch (err) {
        error = err.message;
        show(col, { status: "error: " + err.message, bad: true });
      }
      col.history.push({ seed: base.seed ?? "—", answer, error });
      drawHistory(col);
    }));
    state.running = false;
    $("run").disabled = false;
    $("again").disabled = false;
    $("run-status").textContent = "done";
  }

  // -- wiring ---------------------------------------------------------------------------------
  document.addEventListener("DOMContentLoaded", () => {
    $("key-form").addEventListener("submit", (event) => {
      event.preventDefault();
      state.key = $("key").value.trim() || null;
      $("key").value = "";
      load();
    });
    $("spec").addEventListener("input", onSpecInput);
    $("spec").addEventListener("keydown", (event) => {
      if (event.key === "Enter") addTyped();
    });
    $("add-spec").addEventListener("click", addTyped);
    $("run").addEventListener("click", () => runAll(false));
    $("again").addEventListener("click", () => runAll(true));
    load();
  });
})();
