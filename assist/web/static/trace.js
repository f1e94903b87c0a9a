// A strategy's trace, drawn: shared by the playground and the results viewer.
//
// A trace is a list of steps (see strategies/_base.py): one "call" per model call and the
// strategy's own steps, "vote", "score", "reflect", "tool", "retrieve", "citations",
// "validate". Each kind gets its own drawing; a kind this file does not know is shown as
// one line of JSON, so a new strategy's steps are never hidden. Model text is always set
// as textContent, never as HTML: a reply holding <tags> must not become page markup.
"use strict";

(function () {
  // h("div", {class: "x", title: "y"}, child, "text", ...): an element with text children.
  function h(tag, props, ...children) {
    const el = document.createElement(tag);
    for (const [key, value] of Object.entries(props || {})) {
      if (value === undefined || value === null || value === false) continue;
      if (key === "class") el.className = value;
      else if (key === "text") el.textContent = value;
      else if (key.startsWith("on")) el.addEventListener(key.slice(2), value);
      else if (key === "dataset") Object.assign(el.dataset, value);
      else el.setAttribute(key, value === true ? "" : String(value));
    }
    for (const child of children.flat()) {
      if (child === undefined || child === null || child === false) continue;
      el.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return el;
  }

  function shown(value) {
    if (value === null || value === undefined) return "—";
    return typeof value === "string" ? value : JSON.stringify(value);
  }

  // A bar of width share (0..1) inside a fixed track; the number beside it says the value.
  function bar(share, cls) {
    const fill = h("span", { class: "fill " + (cls || "") });
    fill.style.width = Math.max(0, Math.min(1, share)) * 100 + "%";
    return h("span", { class: "track" }, fill);
  }

  function step(kind, title, ...body) {
    return h("div", { class: "step step-" + kind, dataset: { step: kind } },
      h("div", { class: "step-title" }, title), ...body);
  }

  // A long text folded to its first line, the whole of it one click away.
  function folded(text, label) {
    const value = text === null || text === undefined ? "" : String(text);
    const first = value.split("\n").find((line) => line.trim()) || "(empty)";
    return h("details", { class: "folded" },
      h("summary", {}, label ? h("span", { class: "dim" }, label + " ") : null, first),
      h("pre", { class: "text" }, value));
  }

  function drawCall(entry, number) {
    const usage = entry.usage || {};
    const texts = entry.texts || [];
    const t = entry.temperature === null || entry.temperature === undefined ? "default" : entry.temperature;
    return step("call", `call ${number} · n=${entry.n || 1} · t=${t} · ${usage.prompt_tokens ?? "?"} in, ` +
      `${usage.completion_tokens ?? "?"} out`,
      texts.map((text, i) => folded(text, texts.length > 1 ? `[${i}]` : "")));
  }

  // Self-consistency: a bar per distinct answer (samples without an answer get their own),
  // so the bars together show every one of the k samples.
  function drawVote(entry) {
    const answers = entry.answers || [];
    const tally = entry.tally || {};
    const samples = entry.samples ?? answers.length;
    const rows = Object.entries(tally).sort((a, b) => b[1] - a[1]);
    const unparsed = answers.filter((a) => a === null || a === undefined).length;
    if (unparsed) rows.push([null, unparsed]);
    const most = Math.max(1, ...rows.map((r) => r[1]));
    const notes = [`${samples} sample${samples === 1 ? "" : "s"}`];
    if (entry.early_stop) notes.push("stopped early");
    return step("vote", "votes",
      h("div", { class: "votes", dataset: { samples: String(samples) } },
        rows.map(([answer, votes]) => h("div", {
          class: "vote-row" + (answer !== null && answer === entry.winner ? " winner" : "") +
            (answer === null ? " unparsed" : ""),
          dataset: { votes: String(votes) },
          title: answer === null ? "samples without an answer" : `answer ${answer}: ${votes} vote(s)`,
        },
        h("span", { class: "label" }, answer === null ? "(no answer)" : answer),
        bar(votes / most, answer === entry.winner ? "good" : ""),
        h("span", { class: "num" }, Number.isInteger(votes) ? votes : votes.toFixed(3)),
        h("span", {}, answer !== null && answer === entry.winner ? h("span", { class: "tag good" }, "winner") : "")))),
      h("div", { class: "dim note" }, notes.join(" · ")));
  }

  function drawScore(entry) {
    if (entry.error) {
      return step("score", "best-of-n scores",
        h("div", { class: "bad" }, `the scorer failed (${entry.error}); fell back to a vote`),
        entry.tally ? drawVote({ tally: entry.tally, answers: [], samples: Object.values(entry.tally)
          .reduce((a, b) => a + b, 0) }) : null);
    }
    const scores = entry.scores || [];
    const answers = entry.answers || [];
    const lo = Math.min(...scores), hi = Math.max(...scores);
    return step("score", `best-of-${scores.length} scores (reward model)`,
      h("div", { class: "scores" }, scores.map((score, i) => h("div", {
        class: "score-row" + (i === entry.chosen ? " winner" : ""), dataset: { candidate: String(i) },
        title: `candidate ${i}: score ${score}`,
      },
      h("span", { class: "num dim" }, `#${i}`),
      h("span", { class: "label" }, shown(answers[i])),
      bar(hi > lo ? (score - lo) / (hi - lo) : 1, i === entry.chosen ? "good" : ""),
      h("span", { class: "num" }, Number(score).toFixed(3)),
      h("span", {}, i === entry.chosen ? h("span", { class: "tag good" }, "chosen") : "")))));
  }

  // Reflection: the attempt the critique read, the critique, then the revision (or not).
  function drawReflect(entry, attempt) {
    const revised = !entry.stands;
    return step("reflect", `reflect round ${entry.round ?? "?"}`,
      h("div", { class: "flow" },
        h("div", { class: "box" }, h("div", { class: "dim" }, `attempt → ${shown(entry.answer_before)}`),
          attempt !== null ? folded(attempt) : null),
        h("div", { class: "arrow" }, "→"),
        h("div", { class: "box" }, h("div", { class: "dim" }, "critique"), folded(entry.check)),
        h("div", { class: "arrow" }, "→"),
        h("div", { class: "box " + (revised ? "warn" : "good") },
          revised ? `revision → ${shown(entry.answer_after)}` : "the answer stands")));
  }

  function drawTool(entry) {
    const args = JSON.stringify(entry.arguments ?? {});
    const failed = entry.error !== null && entry.error !== undefined;
    return step("tool", h("span", {}, "tool ", h("code", {}, `${entry.name}(${args})`),
      entry.seconds !== undefined && entry.seconds !== null ? h("span", { class: "dim" }, ` ${entry.seconds} s`) : null),
    h("div", { class: failed ? "bad" : "" }, failed ? `error: ${entry.error}` : `→ ${shown(entry.result)}`));
  }

  function drawRetrieve(entry) {
    const passages = entry.passages || [];
    const hi = Math.max(1e-9, ...passages.map((p) => Math.abs(p.score || 0)));
    return step("retrieve", `retrieved${entry.mode ? " (" + entry.mode + ")" : ""} for “${entry.query ?? ""}”`,
      h("div", { class: "passages" }, passages.map((p, rank) => h("div", {
        class: "passage-row", dataset: { passage: String(p.id) }, title: `passage ${p.id}: score ${p.score}`,
      },
      h("span", { class: "num dim" }, `${rank + 1}`), h("span", { class: "label" }, String(p.id)),
      bar(Math.abs(p.score || 0) / hi), h("span", { class: "num" }, Number(p.score || 0).toFixed(4))))));
  }

  function drawCitations(entry) {
    const valid = new Set((entry.valid || []).map(String));
    const cited = (entry.cited || []).map(String);
    const invalid = (entry.invalid || []).map(String).filter((id) => !cited.includes(id));
    const chips = [...cited, ...invalid].map((id) => h("span", {
      class: "tag " + (valid.has(id) ? "good" : "bad"), dataset: { valid: String(valid.has(id)) },
    }, `${id} ${valid.has(id) ? "✓ valid" : "✗ invalid"}`));
    return step("citations", "citations", chips.length ? chips : h("span", { class: "dim" }, "none cited"));
  }

  function drawValidate(entry) {
    return step("validate", `json attempt ${entry.attempt ?? "?"}`,
      entry.ok ? h("span", { class: "tag good" }, "valid") : h("span", { class: "bad" }, shown(entry.problem || "invalid")));
  }

  const STEPS = { vote: drawVote, score: drawScore, tool: drawTool, retrieve: drawRetrieve,
    citations: drawCitations, validate: drawValidate };

  // The steps in the order they happened. A reflect step is drawn with the attempt it read:
  // the text of the call before its critique call.
  function render(trace) {
    const out = h("div", { class: "trace" });
    const callTexts = [];
    let calls = 0;
    for (const entry of trace || []) {
      const kind = entry.step;
      if (kind === "call") {
        calls += 1;
        callTexts.push((entry.texts || [""])[0]);
        out.append(drawCall(entry, calls));
      } else if (kind === "reflect") {
        out.append(drawReflect(entry, callTexts.length >= 2 ? callTexts[callTexts.length - 2] : null));
      } else if (STEPS[kind]) {
        out.append(STEPS[kind](entry));
      } else {
        out.append(step("other", `${kind}`, h("code", { class: "dim" }, JSON.stringify(entry))));
      }
    }
    if (!out.childElementCount) out.append(h("div", { class: "dim" }, "(no steps recorded)"));
    return out;
  }

  window.AssistTrace = { h, render, bar, folded };
})();
