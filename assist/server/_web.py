"""The playground on the endpoint: the page and its files at ``/``, the spec check and the
example prompts the page offers.

The page's files hold no data, so they are served without the API key (like ``/health``)
and the page asks the user for the key: every API call it makes carries it, and it is kept
in the page's memory only. The files are looked up by name in :data:`assist.web.FILES`;
the path a client sends is only ever a key in that table. Every page answer carries a
Content-Security-Policy that allows the server's own scripts and nothing else, so the page
loads nothing from the network and a model's reply, shown as text, cannot run as code.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field

from assist.errors import NotFound
from assist.server._protocol import MAX_INT, ChatRequest
from assist.web import FILES, read

__all__ = ["PAGE_PATHS", "SpecCheck", "add_page_routes", "add_playground", "check_spec", "page_response",
           "task_examples"]

log = logging.getLogger("assist.server")

# The paths the Edge lets through without the key: the page and its files, nothing else.
PAGE_PATHS = frozenset({"/"} | {f"/static/{name}" for name in FILES})
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; "
                               "connect-src 'self'; img-src 'self' data:; base-uri 'none'; "
                               "form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",  # a new version of the package shows at the next load
}
EXAMPLES_PER_TASK = 3


def page_response(name: str) -> Response:
    """The static file ``name`` with the page headers; 404 for a name the table lacks."""
    if name not in FILES:
        raise NotFound(f"no page file {name[:100]!r}", code="not_found")
    content, media = read(name)
    return Response(content, media_type=media, headers=PAGE_HEADERS)


def add_page_routes(app: FastAPI, index: str) -> None:
    """``/`` serves the page ``index`` (``index.html`` or ``viewer.html``), ``/static/NAME``
    the files it loads."""

    @app.get("/", include_in_schema=False)
    async def page() -> Response:
        return page_response(index)

    @app.get("/static/{name}", include_in_schema=False)
    async def static(name: str) -> Response:
        return page_response(name)


class SpecCheck(BaseModel):
    model_config = ConfigDict(extra="forbid")
    spec: str = Field(min_length=1, max_length=1000)
    max_tokens: int | None = Field(None, ge=1, le=MAX_INT)  # weigh the calls as a request with it would be
    n: int = Field(1, ge=1, le=128)


def check_spec(serving: Any, body: SpecCheck) -> dict[str, Any]:
    """The spec as a chat request would meet it: resolved by the server's own resolver under
    its policy, then weighed by the same plan (limits, worst-case calls). A bad spec raises
    the very error the chat request would get (404 unknown, 400 naming the token)."""
    strategy = serving.resolver(body.spec.strip())
    req = ChatRequest.model_validate({"messages": [{"role": "user", "content": ""}], "n": body.n,
                                      "max_tokens": body.max_tokens})
    _, calls = serving._plan(strategy, req)
    fields = {f.name for f in dataclasses.fields(strategy)} if dataclasses.is_dataclass(strategy) else set()
    return {"ok": True, "spec": str(getattr(strategy, "spec", "") or body.spec.strip()), "calls": calls,
            "temperature": "temperature" in fields}


def task_examples(model_path: str | None = None, per_task: int = EXAMPLES_PER_TASK) -> list[dict[str, Any]]:
    """A few held-out questions of ``arith`` and ``facts``, from the generator settings the
    checkpoint at ``model_path`` was trained with (its run's ``metrics.json``; the defaults
    without one). Facts: seen kingdoms first, then one only ``rag`` can answer. [] when the
    evals package is missing or the settings cannot be read."""
    try:
        from evals.run import generated_task, run_settings

        metrics = Path(model_path).parent / "metrics.json" if model_path else None
        settings = run_settings(metrics)
        out: list[dict[str, Any]] = []
        for name in ("arith", "facts"):
            task = generated_task(name, settings)
            items = task.split("test", per_task) if name == "arith" else _facts_examples(task, per_task)
            out += [{"task": name, "id": s.id, "question": s.question, "answer": s.answer} for s in items]
        return out
    except Exception as exc:  # noqa: BLE001 - examples are a convenience; the page works without
        log.warning("no example prompts for the playground: %s", exc)
        return []


def _facts_examples(task: Any, n: int) -> list[Any]:
    seen = {f"facts-{e.id}-" for e in task.entities if e.seen}  # item ids: facts-kb-8-capital
    items = task.split("test")
    known = [s for s in items if s.id[: s.id.rindex("-") + 1] in seen]
    unknown = [s for s in items if s.id[: s.id.rindex("-") + 1] not in seen]
    return known[: max(1, n - 1)] + unknown[:1]


def add_playground(app: FastAPI, serving: Any, examples: Callable[[], list[dict[str, Any]]]) -> None:
    """The page at ``/`` and the two API routes only it needs (both under the key)."""
    add_page_routes(app, "index.html")
    cached: list[list[dict[str, Any]]] = []

    @app.post("/v1/strategies/check")
    async def strategy_check(body: SpecCheck) -> dict[str, Any]:
        """Our extension: ``{"spec": "sc@8"}`` → the canonical spec and its worst-case model
        calls, or the chat request's own error (404 unknown strategy, 400 naming the token)."""
        return check_spec(serving, body)

    @app.get("/v1/playground/examples")
    async def playground_examples() -> dict[str, Any]:
        if not cached:  # generating the tasks takes a moment: off the event loop, once
            cached.append(await asyncio.to_thread(examples))
        return {"object": "list", "data": cached[0]}
