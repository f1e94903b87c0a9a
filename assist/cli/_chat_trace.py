"""How ``assist chat`` shows an answer's cost (the footer) and its trace (``/trace``).

A strategy's trace is a list of dicts (see :mod:`strategies._base`): one ``call`` per
underlying model call and the strategy's own steps (``vote``, ``reflect``, ``tool``,
``retrieve``, ``citations``, ``score``, ``validate``). Each step kind gets a compact rich
rendering; a kind this module does not know is shown as one line of JSON, so a new
strategy's steps are never hidden. Model text always goes in as :class:`rich.text.Text`,
never as markup: a reply with ``[brackets]`` must not restyle (or break) the screen.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

__all__ = ["Turn", "footer", "preview", "render_trace"]

PREVIEW = 160  # characters of a call's text or a tool result shown per line


@dataclass
class Turn:
    """One answer, kept for the footer and ``/trace``."""

    spec: str
    text: str
    usage: Any  # strategies.Cost
    trace: list[dict[str, Any]] = field(default_factory=list)
    answer: str | None = None
    first_token_s: float | None = None  # streamed answers only


def preview(value: Any, limit: int = PREVIEW) -> str:
    """One line: whitespace collapsed, cut with an ellipsis."""
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=str)
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def footer(turn: Turn) -> str:
    """``sc@2 · answer 4 · 90 tokens (20 in, 70 out) · 1 call · 0.19 s``."""
    u = turn.usage
    parts = [turn.spec]
    if turn.answer is not None and turn.spec != "plain":
        parts.append(f"answer {preview(turn.answer, 40)}")
    parts.append(f"{u.total_tokens} tokens ({u.prompt_tokens} in, {u.completion_tokens} out)")
    parts.append(_plural(u.calls, "call"))
    parts.append(f"{u.latency_s:.2f} s")
    if turn.first_token_s is not None:
        parts.append(f"first token {turn.first_token_s:.2f} s")
        if u.completion_tokens and u.latency_s > 0:
            parts.append(f"{u.completion_tokens / u.latency_s:.0f} tok/s")
    return " · ".join(parts)


def _call(entry: Mapping[str, Any], number: int) -> RenderableType:
    usage = entry.get("usage") or {}
    head = Text.assemble((f"call {number}", "bold"))
    head.append(f"  n={entry.get('n', 1)} t={entry.get('temperature')} · "
                f"{usage.get('prompt_tokens', '?')} in, {usage.get('completion_tokens', '?')} out",
                style="dim")
    lines: list[RenderableType] = [head]
    texts = entry.get("texts") or []
    for i, text in enumerate(texts):
        label = f"  [{i}] " if len(texts) > 1 else "  "
        line = Text.assemble((label, "dim"), preview(text) or "(empty)")
        line.no_wrap, line.overflow = True, "ellipsis"  # one screen line per sample
        lines.append(line)
    return Group(*lines)


def _vote(entry: Mapping[str, Any]) -> RenderableType:
    answers: Sequence[Any] = entry.get("answers") or []
    tally: Mapping[str, float] = entry.get("tally") or {}
    winner = entry.get("winner")
    unparsed = sum(a is None for a in answers)
    notes = [_plural(int(entry.get("samples", len(answers))), "sample")]
    if unparsed:
        notes.append(f"{unparsed} without an answer")
    if entry.get("early_stop"):
        notes.append("stopped early")
    table = Table()
    table.add_column("answer")
    table.add_column("votes", justify="right")
    table.add_column("")
    for answer, votes in sorted(tally.items(), key=lambda kv: -kv[1]):
        shown = f"{votes:g}" if votes == int(votes) else f"{votes:.3f}"
        table.add_row(Text(preview(answer, 60)), shown, "winner" if answer == winner else "")
    if not tally:
        table.add_row(Text("(no sample had an answer)", style="dim"), "0", "")
    return Group(Text("self-consistency votes", style="bold"), table,
                 Text(", ".join(notes), style="dim"))


def _reflect(entry: Mapping[str, Any]) -> RenderableType:
    head = Text.assemble((f"reflect round {entry.get('round', '?')}: ", "bold"))
    if entry.get("stands"):
        head.append("the answer stands", style="green")
    else:
        head.append(f"revised {entry.get('answer_before')!r} → {entry.get('answer_after')!r}",
                    style="yellow")
    return Group(head, Text.assemble(("  critique: ", "dim"), preview(entry.get("check", ""), 400)))


def _tool(entry: Mapping[str, Any]) -> RenderableType:
    args = json.dumps(entry.get("arguments"), ensure_ascii=False, default=str)
    head = Text.assemble(("tool ", "bold"), f"{entry.get('name')}({preview(args, 120)})")
    if entry.get("seconds") is not None:
        head.append(f"  {entry['seconds']:.3f} s", style="dim")
    if entry.get("error") is not None:
        body = Text.assemble(("  error: ", "red"), preview(entry["error"]))
    else:
        body = Text.assemble(("  → ", "dim"), preview(entry.get("result", "")))
    return Group(head, body)


def _retrieve(entry: Mapping[str, Any]) -> RenderableType:
    mode = f" ({entry['mode']})" if entry.get("mode") else ""
    title = Text.assemble((f"retrieved{mode} for ", "bold"))
    title.append(repr(preview(entry.get("query", ""), 80)))
    table = Table()
    for col in ("#", "passage", "score"):
        table.add_column(col, justify="left" if col == "passage" else "right")
    for rank, passage in enumerate(entry.get("passages") or [], start=1):
        table.add_row(str(rank), Text(str(passage.get("id"))), f"{passage.get('score', 0):.4f}")
    return Group(title, table)


def _citations(entry: Mapping[str, Any]) -> RenderableType:
    text = Text.assemble(("citations: ", "bold"))
    for key, style in (("cited", ""), ("valid", "green"), ("invalid", "red")):
        ids = entry.get(key) or []
        text.append(f"{key} {', '.join(map(str, ids)) or '-'}  ", style=style)
    return text


def _score(entry: Mapping[str, Any]) -> RenderableType:
    if entry.get("error"):
        return Text(f"scorer failed ({preview(entry['error'], 100)}); fell back to a vote",
                    style="yellow")
    table = Table()
    for col in ("#", "answer", "score", ""):
        table.add_column(col, justify="right" if col in ("#", "score") else "left")
    answers = entry.get("answers") or []
    for i, score in enumerate(entry.get("scores") or []):
        answer = answers[i] if i < len(answers) else None
        table.add_row(str(i), Text(preview(answer, 60) if answer is not None else "-"),
                      f"{score:.4f}", "chosen" if i == entry.get("chosen") else "")
    return Group(Text("best-of-n scores", style="bold"), table)


def _validate(entry: Mapping[str, Any]) -> RenderableType:
    head = (f"json attempt {entry.get('attempt')}: ", "bold")
    if entry.get("ok"):
        return Text.assemble(head, ("valid", "green"))
    return Text.assemble(head, (preview(entry.get("problem") or "invalid"), "red"))


_STEPS: dict[str, Callable[[Mapping[str, Any]], RenderableType]] = {
    "vote": _vote, "reflect": _reflect, "tool": _tool, "retrieve": _retrieve,
    "citations": _citations, "score": _score, "validate": _validate,
}


def render_trace(turn: Turn) -> list[RenderableType]:
    """The last answer's steps in the order they happened, under a one-line summary."""
    out: list[RenderableType] = [Text(f"trace of the last answer — {footer(turn)}", style="dim")]
    calls = 0
    for entry in turn.trace:
        step = entry.get("step")
        if step == "call":
            calls += 1
            out.append(_call(entry, calls))
        elif step in _STEPS:
            out.append(_STEPS[step](entry))
        else:
            out.append(Text.assemble((f"{step}: ", "bold"), preview(dict(entry), 300)))
    if len(out) == 1:
        out.append(Text("(the strategy recorded no steps)", style="dim"))
    return out
