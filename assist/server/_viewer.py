"""The eval results viewer: ``assist eval view DIR [DIR...]`` serves the browser page
(``assist/web/static/viewer.html``) and the runs' data, on the same stack as the endpoint.

The folders come from the command line, so they are trusted; nothing a browser sends names
a file. The page gets one JSON payload (:func:`viewer_payload`: every run's results table,
its curves, the side-by-side comparison and the item list without traces) and fetches one
item's runs and traces by its index in that list (``/api/items/{index}``), so a large run
is not shipped whole to draw the table.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from assist.errors import AssistError, BadRequest, NotFound
from assist.server._app import Edge
from assist.server._metrics import Metrics
from assist.server._web import add_page_routes

__all__ = ["EvalRun", "load_run", "serve_viewer", "viewer_app", "viewer_payload"]

CONFIG_KEYS = ("task", "task_name", "served_model", "strategy_specs", "samples", "seed", "items", "max_tokens")


@dataclass
class EvalRun:
    """One ``assist eval run --out DIR`` folder as the viewer reads it."""

    path: Path
    results: dict[str, Any]
    records: list[dict[str, Any]] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.path.name


def load_run(path: Path | str) -> EvalRun:
    """The run in ``path``: its ``results.json`` (required) and ``samples.jsonl`` (its items;
    a repeated record replaces the earlier one, as the summary counts it). A folder that is
    not an eval run is a :class:`BadRequest` naming it."""
    from evals.report import load_results, read_samples

    folder = Path(path)
    if not folder.is_dir():
        raise BadRequest(f"{folder}: no such folder (give folders written by `assist eval run --out DIR`)")
    if not (folder / "results.json").is_file():
        raise BadRequest(f"{folder}: no results.json (give folders written by `assist eval run --out DIR`)")
    try:
        results = load_results(folder)
        latest: dict[tuple[str, str, str], dict[str, Any]] = {}
        if (folder / "samples.jsonl").is_file():
            for rec in read_samples(folder / "samples.jsonl"):
                latest[(str(rec["task"]), str(rec["strategy"]), str(rec["item"]))] = rec
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise BadRequest(f"{folder}: cannot read the run ({type(exc).__name__}: {exc})") from None
    return EvalRun(folder, results, list(latest.values()))


def _curves(run: EvalRun) -> dict[str, dict[str, Any]]:
    """maj@k and pass@k per task and strategy: the summary's (K > 1 runs per item), else the
    curve a self-consistency vote recorded in its trace (the demo's sc@16 at K = 1)."""
    from evals.claims import maj_at_k_from_votes

    out: dict[str, dict[str, Any]] = {}
    for task, strategies in run.results.get("summary", {}).items():
        for strategy, stats in strategies.items():
            curve = {"maj_at_k": stats.get("maj_at_k"), "pass_at_k": stats.get("pass_at_k")}
            if not curve["maj_at_k"]:
                curve = maj_at_k_from_votes([r for r in run.records if r["task"] == task], strategy)
            if curve.get("maj_at_k"):
                out.setdefault(task, {})[strategy] = {key: {str(k): v for k, v in (curve[key] or {}).items()}
                                                      for key in ("maj_at_k", "pass_at_k")}
    return out


def _answers(record: Mapping[str, Any]) -> list[str | None]:
    return [None if r.get("error") is not None else r.get("answer") for r in record.get("runs") or []]


def _items(runs: Sequence[EvalRun]) -> tuple[list[dict[str, Any]], list[list[tuple[int, dict[str, Any]]]]]:
    """The item list (one entry per task and item id over every run, ids in natural order)
    and, for each, the (run index, record) pairs that hold it, strategies in each run's
    order (its results table's)."""
    from strategies.extract import normalize

    order: dict[tuple[str, str], int] = {}
    items: list[dict[str, Any]] = []
    held: list[list[tuple[int, dict[str, Any]]]] = []
    for r, run in enumerate(runs):
        for rec in run.records:
            key = (str(rec["task"]), str(rec["item"]))
            if key not in order:
                order[key] = len(items)
                items.append({"index": len(items), "task": key[0], "id": key[1],
                              "question": str(rec.get("question") or ""), "reference": rec.get("reference"),
                              "answers": {}})
                held.append([])
            i = order[key]
            held[i].append((r, rec))
            runs_ = rec.get("runs") or []
            items[i]["answers"][f"{r}:{rec['strategy']}"] = {
                "answer": _answers(rec)[0] if runs_ else None,
                "correct": sum(bool(x.get("correct")) and x.get("error") is None for x in runs_) / max(1, len(runs_)),
                "errored": any(x.get("error") is not None for x in runs_)}
    # Items in a reader's order (arith-test-2 before arith-test-10), not in the order they finished.
    ranked = sorted(range(len(items)), key=lambda i: (items[i]["task"], _natural(items[i]["id"])))
    items, held = [items[i] for i in ranked], [held[i] for i in ranked]
    rank = [{(t, name): j for t, names in run.results.get("summary", {}).items() for j, name in enumerate(names)}
            for run in runs]
    for pairs in held:
        pairs.sort(key=lambda p: (p[0], rank[p[0]].get((str(p[1]["task"]), str(p[1]["strategy"])), 1 << 30)))
    for item, pairs in zip(items, held, strict=True):
        item["answers"] = {f"{r}:{rec['strategy']}": item["answers"][f"{r}:{rec['strategy']}"] for r, rec in pairs}
    for index, item in enumerate(items):
        item["index"] = index
        cells = item["answers"].values()
        item["wrong"] = any(c["correct"] < 1 for c in cells)
        shown = {normalize(str(c["answer"])) if c["answer"] is not None else None for c in cells}
        item["disagree"] = len(shown) > 1
    return items, held


def _natural(text: str) -> list[tuple[int, Any]]:
    """A sort key reading digit runs as numbers (``item-2`` < ``item-10``)."""
    return [(0, int(part)) if part.isdigit() else (1, part) for part in re.split(r"(\d+)", text) if part]


def _compare(runs: Sequence[EvalRun]) -> dict[str, Any]:
    """``assist eval compare``'s table as data: a row per task and strategy (the union over
    runs, in first-seen order), a cell per run (None where the run lacks it)."""
    names = [run.name for run in runs]
    labels = names if len(set(names)) == len(names) else [str(run.path) for run in runs]
    rows: dict[tuple[str, str], None] = {}
    for run in runs:
        for task, strategies in run.results.get("summary", {}).items():
            rows.update(dict.fromkeys((task, s) for s in strategies))
    table = []
    for task, strategy in rows:
        cells = []
        for run in runs:
            st = run.results.get("summary", {}).get(task, {}).get(strategy)
            cells.append(None if st is None else {"accuracy": st["accuracy"], "ci95": st["ci95"], "n": st["n"]})
        table.append({"task": task, "strategy": strategy, "cells": cells})
    return {"labels": labels, "rows": table}


def viewer_payload(runs: Sequence[EvalRun]) -> dict[str, Any]:
    """Everything the page draws but the traces."""
    items, _ = _items(runs)
    compare = _compare(runs)
    return {
        "runs": [{"index": i, "name": compare["labels"][i], "path": str(run.path),
                  "config": {k: run.results.get("config", {}).get(k) for k in CONFIG_KEYS},
                  "date": run.results.get("date"), "commit": run.results.get("commit"),
                  "summary": run.results.get("summary", {}), "curves": _curves(run),
                  "errors": run.results.get("errors"),
                  "report": (run.path / "report.md").is_file()} for i, run in enumerate(runs)],
        "compare": compare,
        "items": items,
    }


def item_detail(runs: Sequence[EvalRun], held: Sequence[Sequence[tuple[int, dict[str, Any]]]],
                items: Sequence[Mapping[str, Any]], index: int) -> dict[str, Any]:
    """One item: its question and gold answer, and every run's records with their traces."""
    if not 0 <= index < len(items):
        raise NotFound(f"no item {index} (there are {len(items)})", code="not_found")
    out = [{"run": r, "name": runs[r].name, "strategy": rec["strategy"], "runs": rec.get("runs") or []}
           for r, rec in held[index]]
    return {**{k: items[index][k] for k in ("index", "task", "id", "question", "reference")}, "records": out}


def _json(value: Any) -> bytes:
    """JSON a browser parses: NaN and infinities (a statistic over nothing) become null."""

    def clean(x: Any) -> Any:
        if isinstance(x, float) and not math.isfinite(x):
            return None
        if isinstance(x, dict):
            return {str(k): clean(v) for k, v in x.items()}
        if isinstance(x, list | tuple):
            return [clean(v) for v in x]
        return x

    return json.dumps(clean(value), default=str).encode()


def viewer_app(runs: Sequence[EvalRun], *, allowed_hosts: Sequence[str] | None = None) -> FastAPI:
    """The viewer's app: the page at ``/``, ``/api/runs`` (the payload), ``/api/items/{i}``,
    behind the endpoint's own edge (``Host`` check, body limit)."""
    app = FastAPI(title="assist eval view", docs_url=None, redoc_url=None, openapi_url=None)
    items, held = _items(runs)
    payload = _json(viewer_payload(runs))
    app.add_middleware(Edge, limit=1 << 16, metrics=Metrics(model_name="viewer"), allowed_hosts=allowed_hosts)
    add_page_routes(app, "viewer.html")

    @app.exception_handler(AssistError)
    async def _assist_error(request: Request, exc: AssistError) -> JSONResponse:
        return JSONResponse(exc.to_openai(), status_code=exc.status)

    @app.get("/api/runs")
    async def all_runs() -> Response:
        return Response(payload, media_type="application/json")

    @app.get("/api/items/{index}")
    async def one_item(index: int) -> Response:
        body = item_detail(runs, held, items, index)
        return Response(_json(body), media_type="application/json")

    return app


def serve_viewer(dirs: Sequence[Path | str], *, host: str = "127.0.0.1", port: int = 8001,
                 open_browser: bool = True, log_level: str = "warning") -> None:
    """Load the runs (a bad folder fails here, before anything listens), then serve the
    viewer until interrupted, opening a browser on it unless ``open_browser`` is False."""
    import threading
    import webbrowser

    import uvicorn

    from assist.server._launch import ServeConfig, allowed_hosts

    runs = [load_run(d) for d in dirs]
    app = viewer_app(runs, allowed_hosts=allowed_hosts(ServeConfig(host=host)))
    shown = f"[{host}]" if ":" in host else host
    url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else shown}:{port}/"
    print(f"assist eval view: {len(runs)} run(s) at {url} (Ctrl-C stops)", flush=True)
    if open_browser:
        threading.Timer(1.0, webbrowser.open, (url,)).start()
    uvicorn.run(app, host=host, port=port, log_level=log_level, access_log=False)
