"""``rag@k``: retrieval augmentation — search a document store, answer from the passages.

The last user turn is the query. The ``k`` passages found are appended to it, and the
question after them (:func:`assist.prompts.ask_with_passages`): exactly the shape of the SFT ``facts_rag`` turns
(``training.conversations``), so the small assistant reads them the way it was trained
to and cites ``[kb-N]``. One greedy call answers, or an inner
strategy does (``rag(cot)``); ``reflect(rag)`` and ``sc@8(rag)`` compose from outside.

Citations are checked, not trusted: every bracketed id in the answer is either among the
retrieved passages (valid) or not (invalid: made up, or remembered from training). Both
lists go into the trace (``step="citations"``), next to what was retrieved
(``step="retrieve"``), so the eval harness can count hallucinated citations;
:func:`citation_report` reads them back off a Result.

The store: ``store=PATH`` (default ``$ASSIST_RAG_STORE``), a :class:`DocumentStore`, or
from Python any ``search(query, k)`` callable, sync or async, returning passages.
"""

from __future__ import annotations

import asyncio
import inspect
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from assist.errors import BadRequest
from assist.prompts import Passage, ask_with_passages, render_passages
from assist.types import Message
from strategies._base import (
    Bound,
    BudgetExhausted,
    OptionError,
    Recorder,
    Result,
    StrategyBase,
    check_common,
    run_final,
)
from strategies._prompted import final_stage, resolve_extractor
from strategies._spec import register
from strategies._store import MODES, DocumentStore
from strategies.extract import CITATION, Extractor, without_citations

__all__ = ["STORE_ENV", "Retrieve", "check_citations", "citation_report", "citations",
           "with_passages", "without_citations"]

STORE_ENV = "ASSIST_RAG_STORE"
SearchFn = Callable[[str, int], Any]  # returns (or resolves to) a sequence of passages


def citations(text: str) -> list[str]:
    """The ids cited in ``text``, in order of first mention."""
    found = [part for m in CITATION.finditer(text) for part in re.split(r"\s*[,;]\s*", m.group(1))]
    return list(dict.fromkeys(found))


def check_citations(text: str, retrieved: Sequence[str]) -> dict[str, list[str]]:
    """``cited``, and of those the ``valid`` (retrieved) and ``invalid`` (not) ones."""
    cited = citations(text)
    known = set(retrieved)
    return {"cited": cited, "valid": [c for c in cited if c in known],
            "invalid": [c for c in cited if c not in known]}


def citation_report(result: Result) -> dict[str, list[str]] | None:
    """The last citation check in a result's trace (None when no ``rag`` ran)."""
    for entry in reversed(result.trace):
        if entry.get("step") == "citations":
            return {key: list(entry[key]) for key in ("cited", "valid", "invalid")}
    return None


def with_passages(messages: Sequence[Mapping[str, Any]], passages: Sequence[Passage]
                  ) -> list[dict[str, Any]]:
    """The conversation with the passages in its last user turn, after the question and
    before the question again (:func:`assist.prompts.ask_with_passages`): the SFT format
    (``training.conversations.facts_rag``).

    After, not before: a small model reads a value by what precedes it, and a question
    between a passage and the answer ("What is the currency of X?" then "The currency of
    X is the") draws that lookup onto the question. Teacher-forced, the tiny base read
    28% of values with the question in between and 100% with the passage last. A system
    message of the caller's own stays where it is.
    """
    out = [dict(m) for m in messages]
    last = max((i for i, m in enumerate(out) if m.get("role") == "user"), default=None)
    if last is None:
        return [*out, {"role": "user", "content": render_passages(passages)}]
    out[last]["content"] = ask_with_passages(_text(out[last].get("content")), passages)
    return out


def _text(content: Any) -> str:
    if isinstance(content, list):  # OpenAI content parts: the text parts, in order
        return " ".join(str(p.get("text", "")) for p in content if isinstance(p, Mapping))
    return str(content or "")


def _as_passage(item: Any) -> Passage:
    if isinstance(item, Passage):
        return item
    if isinstance(item, tuple | list) and 2 <= len(item) <= 3:
        return Passage(str(item[0]), str(item[1]), float(item[2]) if len(item) == 3 else 0.0)
    if hasattr(item, "id") and hasattr(item, "text"):  # a store Chunk, or alike
        return Passage(str(item.id), str(item.text), float(getattr(item, "score", 0.0)))
    raise TypeError(f"rag: search returned {item!r}, not a passage")


@register("rag", python_only=("search",), resources={"store": "store"})
@dataclass(repr=False)
class Retrieve(StrategyBase):
    """Greedy by default. ``store`` may be a path, a DocumentStore, or None (then
    ``search``, else ``$ASSIST_RAG_STORE``)."""

    # One passage: the tiny assistant reads a value out of the passage it is given, but
    # not the asked kingdom's out of three (5% teacher-forced); the store ranks it first.
    # Larger models: rag@3.
    k: int = 1
    store: str | Path | DocumentStore | None = None
    search: SearchFn | None = None
    mode: str = "hybrid"
    temperature: float = 0.0
    seed: int | None = None  # sampled runs (t > 0) reproduce
    max_tokens: int | None = None
    extractor: str | Extractor = "default"
    inner: Any = None
    budget: int | None = None

    def __post_init__(self) -> None:
        check_common(self)
        if not isinstance(self.mode, str) or self.mode not in MODES:
            raise OptionError("mode", f"must be one of {', '.join(MODES)}, not {self.mode!r}"[:200])
        self.extract = resolve_extractor(self.extractor)
        if isinstance(self.store, int | float) and not isinstance(self.store, bool):
            self.store = str(self.store)  # the spec parser reads "store=2024" as a number
        if self.search is not None and not callable(self.search):
            raise OptionError("search", f"must be callable, not {type(self.search).__name__}")
        if self.store is not None and not isinstance(self.store, str | Path) and not callable(
                getattr(self.store, "search", None)):
            raise OptionError("store", f"must be a path or a DocumentStore, not {type(self.store).__name__}")
        if self.store is None and self.search is None and os.environ.get(STORE_ENV):
            self.store = os.environ[STORE_ENV]
        if isinstance(self.store, str | Path) and not Path(self.store).is_file():
            # Fail at parse time, naming the path: a typo must not become empty retrieval.
            raise OptionError("store", f"rag: no document store at {self.store} "
                              "(build one with `assist index add`)")
        self._opened: DocumentStore | None = None

    def bound(self, max_tokens: int) -> Bound:
        """One answer: a call, or a run of the inner strategy."""
        return self.attempt_bound(max_tokens)

    def _searcher(self) -> SearchFn:
        if self.search is not None:
            return self.search
        if self.store is not None and not isinstance(self.store, str | Path):
            store = self.store  # a DocumentStore, or any object searching alike
        elif self.store is not None:
            if self._opened is None:  # opened on first use, then kept for every request
                self._opened = DocumentStore(self.store, create=False)
            store = self._opened
        else:
            raise ValueError(f"rag: no document store; pass store=PATH or set ${STORE_ENV}")
        mode = self.mode
        return lambda query, k: store.search(query, k=k, mode=mode)

    async def retrieve(self, query: str) -> list[Passage]:
        search = self._searcher()
        if inspect.iscoroutinefunction(search):
            found = await search(query, self.k)
        else:  # a store search may load a model or scan a matrix: keep the event loop free
            found = await asyncio.to_thread(search, query, self.k)
            if inspect.isawaitable(found):
                found = await found
        return [_as_passage(p) for p in list(found)[: self.k]]

    async def solve(self, model: Recorder, messages: list[dict[str, Any]]) -> Result:
        query = next((_text(m.get("content")) for m in reversed(messages)
                      if m.get("role") == "user"), "")
        if not query.strip():  # the caller's input: a 400 over HTTP, a ValueError in Python
            raise BadRequest("rag: the conversation has no user turn to retrieve for", param="messages")
        passages = await self.retrieve(query)
        model.note(step="retrieve", query=query, mode=self.mode if self.search is None else None,
                   passages=[{"id": p.id, "score": round(p.score, 6)} for p in passages])
        augmented = with_passages(messages, passages)
        try:
            if self.inner is not None:
                inner = await run_final(self.inner, model, augmented)
                message, answer = inner.message, inner.answer
            else:
                completion = await model.chat(augmented, temperature=self.temperature,
                                              max_tokens=self.max_tokens, seed=self.seed, **final_stage(model))
                message = completion.choices[0].message
                answer = self.extract(without_citations(message.content or ""))
        except BudgetExhausted:
            message, answer = Message(role="assistant", content=""), None
        model.note(step="citations", **check_citations(message.content or "",
                                                       [p.id for p in passages]))
        return model.result(message, answer)

    def close(self) -> None:
        """Close a store this strategy opened from a path (a passed-in one is the caller's)."""
        if self._opened is not None:
            self._opened.close()
            self._opened = None
