"""Streaming bench (issue "Strategies at engine speed", part 2). Writes bench/results/streaming.json.

    python bench/streaming.py [--run runs/tiny] [--items 40] [--max-tokens N]

Against a real ``assist serve`` (``--prefix-cache-mb 0``: no request is sped up by an
earlier one's prompt) on the run's RLHF checkpoint (``runs/tiny/rlhf``; ``runs/test/rlhf``
when the demo run is not there: the figures say which), on held-out ``arith`` test items,
greedy, one request at a time, each call as long as the context allows (as the eval
harness runs them; ``--max-tokens`` caps every call). For ``reflect`` and ``tools``, per item:

1. The streamed answer (``stream: true``): when its first content token arrives
   (TTFT_final), when it ends, and whether its text is the whole answer's.
2. The whole answer (``return_trace: true``): its text, and the stages it went through.
3. The earlier stages replayed alone on the same server, as plain requests, greedy:
   - reflect: the attempt, then the check up to its verdict (the moment the check writes
     ``Corrected:`` or "The answer stands."; the whole check when it writes neither, as
     the answer is then settled only at its end);
   - tools: every turn before the last (with the calculator offered), plus the tools'
     own time from the trace.
   T_earlier is their sum: how long the strategy works before the answer's stage starts.

Goal, per strategy: TTFT_final ≤ 1.1 × T_earlier, over all items (sum over sum). Also
shown: the median of the per-item ratio, and the time to the whole answer over T_earlier
(what a client waited before streaming sent the final stage as it is written).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from assist.prompts import REFLECT_PROMPT  # noqa: E402
from bench._common import write  # noqa: E402
from bench.reliability import serving  # noqa: E402
from evals._config import EvalConfig, build_task  # noqa: E402
from strategies import get_tool  # noqa: E402
from strategies.reflect import verdict  # noqa: E402

GOAL = 1.1


def checkpoint(run: Path) -> Path:
    """The run's RLHF assistant, else the test run's (the bench says which it used)."""
    for candidate in (run / "rlhf", REPO / "runs" / "test" / "rlhf"):
        if (candidate / "config.json").is_file():
            return candidate
    raise SystemExit(f"no checkpoint at {run / 'rlhf'} nor runs/test/rlhf")


def stream(client: httpx.Client, url: str, body: dict[str, Any],
           settled: Callable[[str], bool] | None = None) -> dict[str, Any]:
    """A streamed chat: its text, when its first content arrived, when ``settled(text)``
    first held, and when it ended (seconds from sending)."""
    t0 = time.perf_counter()
    text, first, mark = "", None, None
    with client.stream("POST", url + "/v1/chat/completions", json={**body, "stream": True}) as resp:
        resp.raise_for_status()
        for line in resp.iter_lines():
            if not line.startswith("data:") or line.strip() == "data: [DONE]":
                continue
            chunk = json.loads(line[5:])
            if "error" in chunk and not chunk.get("choices"):
                raise RuntimeError(chunk["error"])
            for choice in chunk.get("choices") or []:
                piece = (choice.get("delta") or {}).get("content") or ""
                if piece:
                    first = time.perf_counter() - t0 if first is None else first
                    text += piece
                    if settled is not None and mark is None and settled(text):
                        mark = time.perf_counter() - t0
    end = time.perf_counter() - t0
    return {"text": text, "first": end if first is None else first, "settled": mark, "end": end}


def whole(client: httpx.Client, url: str, body: dict[str, Any]) -> tuple[dict[str, Any], float]:
    t0 = time.perf_counter()
    resp = client.post(url + "/v1/chat/completions", json=body)
    resp.raise_for_status()
    return resp.json(), time.perf_counter() - t0


def capped(max_tokens: int | None) -> dict[str, Any]:
    return {} if not max_tokens else {"max_tokens": max_tokens}


def reflect_earlier(client: httpx.Client, url: str, question: str, max_tokens: int | None) -> dict[str, Any]:
    """The attempt (a whole answer, as the strategy asks for it), then the check streamed
    up to its verdict, replayed as plain requests."""
    user = [{"role": "user", "content": question}]
    plain = {"model": "assistant", "temperature": 0, **capped(max_tokens)}
    attempt, attempt_s = whole(client, url, {**plain, "messages": user})
    text = attempt["choices"][0]["message"].get("content") or ""
    convo = [*user, {"role": "assistant", "content": text}, {"role": "user", "content": REFLECT_PROMPT}]
    check = stream(client, url, {**plain, "messages": convo}, settled=lambda text: verdict(text)[0] is not None)
    to_verdict = check["settled"] if check["settled"] is not None else check["end"]
    return {"earlier_s": attempt_s + to_verdict, "verdict": verdict(check["text"])[0]}


def tools_earlier(client: httpx.Client, url: str, question: str, max_tokens: int | None,
                  trace: list[dict[str, Any]]) -> dict[str, Any]:
    """Every turn before the last, replayed with the calculator offered (the chat rebuilt
    from the trace, as the strategy sent it), plus the tools' own seconds."""
    schema = get_tool("calculator").schema
    chat: list[dict[str, Any]] = [{"role": "user", "content": question}]
    calls = [i for i, t in enumerate(trace) if t.get("step") == "call"]
    earlier, tool_s, same = 0.0, 0.0, True
    for n, at in enumerate(calls[:-1]):
        body = {"model": "assistant", "messages": chat, "temperature": 0, "tools": [schema],
                **capped(max_tokens)}
        reply, seconds = whole(client, url, body)
        earlier += seconds
        ran = [t for t in trace[at + 1: calls[n + 1]] if t.get("step") == "tool"]
        got = reply["choices"][0]["message"]
        same &= [c["function"]["name"] for c in got.get("tool_calls") or []] == [t["name"] for t in ran]
        chat = [*chat, {"role": "assistant", "content": trace[at]["texts"][0] or None, "tool_calls": [
            {"id": t["id"], "type": "function",
             "function": {"name": t["name"], "arguments": json.dumps(t["arguments"], ensure_ascii=False)}}
            for t in ran]}]
        chat += [{"role": "tool", "tool_call_id": t["id"], "name": t["name"],
                  "content": t["result"] if t.get("error") is None else f"error: {t['error']}"} for t in ran]
        tool_s += sum(float(t.get("seconds") or 0.0) for t in ran)
    return {"earlier_s": earlier + tool_s, "turns": len(calls), "replay_matches": same}


def measure(client: httpx.Client, url: str, spec: str, question: str, max_tokens: int | None) -> dict[str, Any]:
    messages = [{"role": "user", "content": question}]
    body = {"model": f"{spec}::assistant", "messages": messages, **capped(max_tokens)}
    streamed = stream(client, url, body)
    answer, whole_s = whole(client, url, {**body, "return_trace": True})
    choice = answer["choices"][0]
    trace = choice.get("trace") or []
    if spec == "reflect":
        earlier = reflect_earlier(client, url, question, max_tokens)
    else:
        earlier = tools_earlier(client, url, question, max_tokens, trace)
    return {"ttft_final_s": streamed["first"], "stream_end_s": streamed["end"], "whole_s": whole_s,
            "same_text": streamed["text"] == (choice["message"].get("content") or ""),
            "final_tokens": (trace[-1] if spec == "tools" else {}).get("usage", {}).get("completion_tokens"),
            **earlier}


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Sums over the items that had earlier stages (a tools answer with no tool call has
    none: its only stage is the answer's, and its TTFT has nothing to be compared with)."""
    staged = [r for r in rows if r["earlier_s"] > 0]
    out: dict[str, Any] = {"items": len(rows), "items_with_earlier_stages": len(staged),
                           "streamed_text_is_the_answer": sum(r["same_text"] for r in rows) / len(rows)}
    if not staged:
        return out
    ttft = sum(r["ttft_final_s"] for r in staged)
    earlier = sum(r["earlier_s"] for r in staged)
    end = sum(r["stream_end_s"] for r in staged)
    return {**out,
            "ttft_final_s_mean": ttft / len(staged),
            "earlier_stages_s_mean": earlier / len(staged),
            "whole_answer_s_mean": end / len(staged),
            "ttft_over_earlier": ttft / earlier,
            "ttft_over_earlier_median": statistics.median(r["ttft_final_s"] / r["earlier_s"] for r in staged),
            "whole_answer_over_earlier": end / earlier}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", default="runs/tiny")
    ap.add_argument("--items", type=int, default=40)
    ap.add_argument("--max-tokens", type=int, default=None)
    args = ap.parse_args()
    model = checkpoint(REPO / args.run if not Path(args.run).is_absolute() else Path(args.run))
    task = build_task(EvalConfig(task="arith", model=str(model)))
    items = task.split("test", args.items)
    figures: dict[str, Any] = {"checkpoint": str(model.relative_to(REPO) if model.is_relative_to(REPO) else model),
                               "task": "arith", "split": "test", "items": len(items), "max_tokens": args.max_tokens,
                               "server": "assist serve --prefix-cache-mb 0", "per_item": {}}
    log = Path(tempfile.mkdtemp(prefix="bench-streaming-")) / "serve.log"
    with serving(model, ["--prefix-cache-mb", "0"], log) as server, httpx.Client(timeout=600) as client:
        for spec in ("reflect", "tools"):
            rows = []
            for i, item in enumerate(items):
                rows.append(measure(client, server.url, spec, item.question, args.max_tokens))
                print(f"{spec} {i + 1}/{len(items)}: ttft {rows[-1]['ttft_final_s']:.3f}s, "
                      f"earlier {rows[-1]['earlier_s']:.3f}s", flush=True)
            figures["per_item"][spec] = rows
            figures[spec] = summarize(rows)
            if spec == "reflect":  # by the check's verdict: each settles the answer at another point
                for said in ("corrected", "stands", None):
                    some = [r for r in rows if r["verdict"] == said]
                    if some:
                        figures[spec][f"verdict={said}"] = summarize(some)
            print(spec, figures[spec], flush=True)
    figures["goals"] = {f"{spec}: TTFT_final <= {GOAL} x earlier stages":
                        figures[spec].get("ttft_over_earlier", float("inf")) <= GOAL for spec in ("reflect", "tools")}
    figures["goals"]["streamed text is the whole answer, every item"] = all(
        figures[spec]["streamed_text_is_the_answer"] == 1.0 for spec in ("reflect", "tools"))
    print("goals:", figures["goals"], flush=True)
    print("wrote", write("streaming", figures))


if __name__ == "__main__":
    main()
