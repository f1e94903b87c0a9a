"""The endpoint's logic between the routes and a backend: routing, admission, accounting.

Model names follow ``[STRATEGY::]MODEL``: ``assistant`` is the plain model, and
``sc@8::assistant`` runs the self-consistency strategy against it. ``::`` is the separator
because it appears in no model id we know of (Hugging Face ids use ``/``, ``-`` and ``.``;
Ollama tags a single ``:``). The extra body field ``"strategy": "sc@8"`` does the same.

Admission counts engine work, not requests: each request weighs its worst-case model
completions (``n`` for a chat, prompts x ``n`` for a completion, ``n`` x the strategy's
:meth:`~strategies._base.StrategyBase.bound` for a strategy), and beyond ``max_in_flight``
of them the answer is 429 with ``Retry-After``. An accepted request is always answered, or
cancelled with every sub-call it started when it fails or its client leaves (streamed or
not), which frees its engine slots.

Strategy specs from clients are held to a :class:`strategies.Policy`: the strategies
served, resources named (never paths), and limits on depth, ``k``, calls and tokens,
all checked before any work starts (a 400 naming the limit).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, TypeVar

from starlette.requests import Request

from assist.errors import AssistError, BadRequest, NotFound, Overloaded
from assist.fanout import gather
from assist.server._backend import Backend
from assist.server._metrics import Metrics, Tracked
from assist.server._protocol import (
    ChatRequest,
    CompletionRequest,
    StreamOptions,
    refuse_unsupported,
    vllm_sampling,
)
from assist.server._streaming import (
    finish_reason,
    stream_progress,
    stream_strategies,
    total_usage,
    traced,
)

__all__ = ["SEPARATOR", "ClientGone", "Serving", "StrategyResolver", "split_model"]

T = TypeVar("T")
SEPARATOR = "::"
StrategyResolver = Callable[[str], Any]  # spec -> an object with `async run(model, messages)`
MAX_CALLS = 256  # per request, when no policy says otherwise (the strategies package is absent)
STRATEGY_SEEDS = 2**61  # a request's seed, modulo this, seeds a strategy (smaller seeds are kept as they are)
UNKNOWN_CALL_TOKENS = 4096  # a call's length when neither the request nor the backend bounds it


class ClientGone(Exception):
    """The client disconnected before its answer was ready; its work was cancelled."""


def split_model(name: str | None) -> tuple[str | None, str | None]:
    """``"sc@8::assistant"`` → ``("sc@8", "assistant")``; ``"assistant"`` → ``(None, "assistant")``."""
    if name and SEPARATOR in name:
        spec, _, model = name.partition(SEPARATOR)
        return spec or None, model or None
    return None, name


def _default_policy() -> Any:
    """Every registered strategy, no resources, no python tool, the default limits; None
    when the strategies package is not installed."""
    try:
        from strategies import Policy
    except ImportError:
        return None
    return Policy()


def _spec_error(exc: Exception) -> AssistError:
    """A SpecError as the client sees it: 404 for a strategy not served, else a 400 that
    names the option or the limit."""
    from strategies import LimitError

    message = getattr(exc, "message", str(exc))
    if getattr(exc, "unknown", False):
        return NotFound(message, param="strategy", code="strategy_not_found")
    code = "limit_exceeded" if isinstance(exc, LimitError) else "invalid_strategy"
    return BadRequest(message, param=getattr(exc, "param", None) or "strategy", code=code)


def _resolver(policy: Any) -> StrategyResolver:
    def resolve(spec: str) -> Any:
        try:
            import strategies
        except ImportError as exc:  # the core install may lack the strategies package
            raise NotFound(f"strategies are not installed (asked for {spec[:100]!r})", param="strategy",
                           code="strategy_not_found") from exc
        try:
            return strategies.parse(spec, policy=policy)
        except strategies.SpecError as exc:
            raise _spec_error(exc) from None
        except (ValueError, TypeError) as exc:  # a plugin strategy's own check
            raise BadRequest(f"strategy {spec[:100]!r}: {exc}", param="strategy", code="invalid_strategy") from None

    return resolve


class Serving:
    """``names[0]`` is the model name clients see; further names (a checkpoint's path, say)
    are accepted but never printed. ``policy`` (default: :class:`strategies.Policy()`)
    holds strategy specs to its strategies, resources and limits; ``max_in_flight`` counts
    model completions admitted at once."""

    def __init__(
        self, backend: Backend, *, names: Sequence[str] = ("assistant",), max_in_flight: int = 256,
        resolver: StrategyResolver | None = None, strategy_aliases: Sequence[str] = (), policy: Any = None,
    ) -> None:
        self.backend = backend
        self.names = list(names)
        self.max_in_flight = max_in_flight
        self.policy = policy if policy is not None else _default_policy()
        self.resolver = resolver or _resolver(self.policy)
        limits = getattr(self.policy, "limits", None)
        self.max_calls = int(getattr(limits, "max_calls", MAX_CALLS))
        self.metrics = Metrics(model_name=self.names[0])
        self.units = 0  # admitted model completions (worst case) in flight
        self.started = int(time.time())
        self.strategy_aliases = [a for a in strategy_aliases if self._serves(a)]

    def _serves(self, spec: str) -> bool:
        try:
            self.resolver(spec)
        except AssistError:
            return False
        return True

    # -- admission ------------------------------------------------------------------------
    def _weigh(self, calls: int, what: str) -> int:
        """A request's admission weight: its worst-case model calls, refused (400) over the
        per-request limit before anything runs."""
        if calls > self.max_calls:
            raise BadRequest(f"this request may make up to {calls} model calls ({what}); this server allows "
                             f"{self.max_calls} per request", param="max_calls", code="limit_exceeded")
        return max(1, calls)

    def _admit(self, weight: int = 1) -> int:
        """Admit ``weight`` units or answer 429; returns what to :meth:`_release`. A request
        heavier than the whole capacity runs alone (it waits for an idle server)."""
        weight = max(1, min(weight, self.max_in_flight))
        if self.units + weight > self.max_in_flight:
            self.metrics.rejected.inc()
            raise Overloaded(f"the server is at capacity ({self.units} of {self.max_in_flight} model calls in "
                             f"flight; this request needs {weight}); retry shortly", retry_after=1.0)
        self.units += weight
        self.metrics.in_flight += 1
        return weight

    def _release(self, weight: int = 1) -> None:
        self.units -= weight
        self.metrics.in_flight -= 1

    @contextlib.asynccontextmanager
    async def admitted(self, weight: int = 1) -> AsyncIterator[None]:
        """Hold ``weight`` units while the body runs (work that is not a generation, such as
        tokenizing, still counts)."""
        held = self._admit(weight)
        try:
            yield
        finally:
            self._release(held)

    async def _guarded(self, request: Request, work: Awaitable[T]) -> T:
        """Run ``work``; cancel it if the client disconnects first."""
        task = asyncio.ensure_future(work)

        async def disconnected() -> None:
            while (await request.receive())["type"] != "http.disconnect":
                pass

        watcher = asyncio.ensure_future(disconnected())
        try:
            await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        except BaseException:  # we were cancelled ourselves: so is the work
            task.cancel()
            raise
        finally:
            watcher.cancel()
        if task.done():
            return task.result()
        task.cancel()
        self.metrics.cancelled.inc()
        # Wait for the cancellation to reach every sub-call, so the admission slot is
        # released when the engine work has stopped, not before.
        await asyncio.wait({task})
        raise ClientGone

    # -- routing ----------------------------------------------------------------------------
    def route(self, model: str | None, strategy: str | None) -> tuple[str, Any | None]:
        """(model name to report, strategy object or None) for a request."""
        spec, name = split_model(model)
        if spec and strategy and spec != strategy:
            raise BadRequest(f"the model name asks for strategy {spec!r} but the body for {strategy!r}",
                             param="strategy")
        spec = spec or strategy
        name = name or self.names[0]
        if name not in self.names:  # only the public name is printed: the others may be paths
            shown = name if len(name) <= 100 else name[:100] + "..."
            raise NotFound(f"The model {shown!r} does not exist; this server serves {self.names[0]!r}",
                           param="model", code="model_not_found")
        return name, (self.resolver(spec) if spec else None)

    # -- routes -----------------------------------------------------------------------------
    async def chat(self, req: ChatRequest, request: Request) -> dict[str, Any] | AsyncIterator[bytes]:
        name, strategy = self.route(req.model, req.strategy)
        if strategy is None:
            weight = self._admit(self._weigh(req.n, f"n={req.n}"))
            track = self._track(req, None, req.n)
            if req.stream:
                return await self._sse(self.backend.stream_chat(req), name, weight, track)
            return await self._answer(request, self.backend.chat(req), name, weight, track)
        runs, calls = self._plan(strategy, req)
        weight = self._admit(calls)
        track = self._track(req, strategy, None)
        if req.stream:
            return await self._sse(self._strategy_stream(runs, req, name, request), name, weight, track)
        return await self._answer(request, self._run_strategy(runs, req, name), name, weight, track)

    async def complete(self, req: CompletionRequest, request: Request) -> dict[str, Any] | AsyncIterator[bytes]:
        name, strategy = self.route(req.model, req.strategy)
        if strategy is not None:
            raise BadRequest("strategies run on chat; use /v1/chat/completions", param="strategy")
        prompts = len(req.prompts())
        weight = self._admit(self._weigh(prompts * req.n, f"{prompts} prompt(s) x n={req.n}"))
        track = self._track(req, None, prompts * req.n)
        if req.stream:
            return await self._sse(self.backend.stream_complete(req), name, weight, track)
        return await self._answer(request, self.backend.complete(req), name, weight, track)

    def _track(self, req: ChatRequest | CompletionRequest, strategy: Any, calls: int | None) -> Tracked:
        """Start a request's metrics (``calls``: its model completions, when known now). A
        stream always asks its source for usage, to count its tokens; when the client did not
        ask, the usage is taken out of the chunks it is sent (:meth:`_event`)."""
        track = self.metrics.track(strategy_label(strategy), calls)
        track.hide_usage = bool(req.stream and not req.include_usage)
        if track.hide_usage:
            req.stream_options = StreamOptions(include_usage=True)
        return track

    async def _answer(self, request: Request, work: Awaitable[dict[str, Any]], name: str,
                      weight: int, track: Tracked) -> dict[str, Any]:
        """A whole (non-streamed) answer: run it until done or the client leaves, release the
        admission slot, name the model as the client asked for it, count its tokens."""
        try:
            body = await self._guarded(request, work)
        except BaseException as exc:
            track.fail(_outcome(exc))
            raise
        finally:
            self._release(weight)
        body["model"] = name
        track.answer(body)
        track.done()
        return body

    def models(self) -> dict[str, Any]:
        ids = self.names[:1] + [f"{spec}{SEPARATOR}{self.names[0]}" for spec in self.strategy_aliases]
        data = [{"id": i, "object": "model", "created": self.started, "owned_by": "assist",
                 "root": self.names[0], "max_model_len": self.backend.context_length} for i in ids]
        return {"object": "list", "data": data}

    # -- strategies -------------------------------------------------------------------------
    def _plan(self, strategy: Any, req: ChatRequest) -> tuple[list[Any], int]:
        """The request's ``n`` runs of the strategy, configured (its ``max_tokens`` caps each
        call, its ``seed`` seeds run i with seed + i), and their worst-case model calls,
        checked against the limits: all before any work starts."""
        from strategies import bound_of, with_fields

        # A strategy samples with its own settings: a sampling field it would not apply is
        # refused, never dropped in silence (the engines apply every one of them).
        refuse_unsupported(req)
        unapplied = next(iter(vllm_sampling(req)), None)
        if unapplied is not None:
            raise BadRequest(f"{unapplied} is not applied to a strategy's calls (a strategy samples with its own "
                             "options); send it without a strategy", param=unapplied, code="unsupported_parameter")

        def configured(i: int) -> Any:
            changes: dict[str, Any] = {}
            if req.limit is not None:
                changes["max_tokens"] = req.limit
            if req.seed is not None:  # any 64-bit seed; folded so that seed + offsets stay in range
                changes["seed"] = req.seed % STRATEGY_SEEDS + i
            return with_fields(strategy, lambda node: changes) if changes else strategy

        try:
            runs = [configured(i) for i in range(req.n)]
        except (ValueError, TypeError) as exc:  # a seed or max_tokens the strategy refuses
            raise BadRequest(f"strategy: {exc}", param=getattr(exc, "option", None) or "strategy") from None
        known = [x for x in (req.limit, self.backend.context_length) if x]
        cap = min(known) if known else UNKNOWN_CALL_TOKENS
        if self.policy is not None:
            try:
                calls = self.policy.check_cost(runs[0], n=req.n, max_tokens=cap).calls
            except ValueError as exc:
                raise _spec_error(exc) from None
        else:
            calls = bound_of(runs[0], cap).calls * req.n
        return runs, self._weigh(calls, f"n={req.n} x the strategy's {calls // max(1, req.n)}")

    async def _run_strategy(self, runs: Sequence[Any], req: ChatRequest, name: str) -> dict[str, Any]:
        """Run each choice's strategy; when one fails, the others are cancelled with it."""

        messages = [m.to_dict() for m in req.messages]
        results = await gather(*(run.run(self.backend.model, messages) for run in runs))
        choices = []
        for i, result in enumerate(results):
            message = result.message.model_dump(exclude_none=True)
            choices.append({"index": i, "message": message, "finish_reason": finish_reason(message),
                            "logprobs": None})
            if getattr(req, "return_trace", False):  # our extension, only when asked (README)
                choices[-1].update(traced(result))
        return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
                "model": name, "choices": choices, "usage": total_usage(results),
                "strategy": getattr(runs[0], "spec", None) or req.strategy}

    async def _strategy_stream(self, runs: Sequence[Any], req: ChatRequest, name: str,
                               request: Request) -> AsyncIterator[dict[str, Any]]:
        """Each choice's strategy streams the stage that writes its answer, as it writes it;
        with ``stream_progress`` a vote's progress comes too (:mod:`._streaming`). Until the
        first event the client is watched here; when it leaves, every pending call is cancelled."""
        progress = stream_progress(req.model_extra)
        messages = [m.to_dict() for m in req.messages]
        async with contextlib.aclosing(stream_strategies(
                runs, self.backend.model, messages, name=name, progress=progress,
                include_usage=req.include_usage, guard=lambda work: self._guarded(request, work),
                trace=bool(getattr(req, "return_trace", False)))) as chunks:
            async for chunk in chunks:
                yield chunk

    # -- server-sent events -----------------------------------------------------------------
    async def _sse(self, source: AsyncIterator[dict[str, Any]], name: str, weight: int,
                   track: Tracked) -> AsyncIterator[bytes]:
        """Start the stream (errors before the first chunk are ordinary HTTP errors), then
        relay chunks as SSE; an error mid-stream becomes an ``error`` event."""
        try:
            first = await source.__anext__()
        except StopAsyncIteration:
            first = None
        except BaseException as exc:
            track.fail(_outcome(exc))
            self._release(weight)
            await _close(source)
            raise
        return self._events(source, first, name, weight, track)

    async def _events(self, source: AsyncIterator[dict[str, Any]], first: dict[str, Any] | None,
                      name: str, weight: int, track: Tracked) -> AsyncIterator[bytes]:
        finished = False
        try:
            if first is not None:
                if (event := self._event(first, name, track)) is not None:
                    yield event
                async for chunk in source:
                    if (event := self._event(chunk, name, track)) is not None:
                        yield event
            finished = True
            track.done()
        except AssistError as exc:
            finished = True
            track.fail("error")
            yield f"data: {json.dumps(exc.to_openai())}\n\n".encode()
        finally:
            if not finished:  # the client went away: the generator was closed mid-stream
                self.metrics.cancelled.inc()
                track.fail("abort")
            self._release(weight)
            await _close(source)
        yield b"data: [DONE]\n\n"

    def _event(self, chunk: dict[str, Any], name: str, track: Tracked) -> bytes | None:
        """A chunk as an SSE event; None for a usage-only chunk the client did not ask for."""
        chunk["model"] = name
        track.chunk(chunk)
        if track.hide_usage and "usage" in chunk:
            if not chunk.get("choices"):
                return None
            del chunk["usage"]
        return f"data: {json.dumps(chunk)}\n\n".encode()


def strategy_label(strategy: Any) -> str:
    """A bounded metrics label for a request's strategy: ``none`` for a plain request, else
    the registered name its spec starts with (``sc`` for ``sc@8(cot)``), ``other`` when
    that is not a registered strategy (a custom resolver's)."""
    if strategy is None:
        return "none"
    match = re.match(r"[A-Za-z_][\w-]*", str(getattr(strategy, "spec", "") or ""))
    try:
        from strategies import REGISTRY
    except ImportError:
        return "other"
    return match.group(0) if match and match.group(0) in REGISTRY else "other"


def _outcome(exc: BaseException) -> str | None:
    """How a request that failed after admission is counted: ``abort`` when its client
    left or it was cancelled, ``error`` for a server-side failure, not at all for a request
    the backend refused (a 4xx: it never ran, as vLLM does not count it either)."""
    if isinstance(exc, ClientGone | asyncio.CancelledError):
        return "abort"
    if isinstance(exc, AssistError) and exc.status < 500:
        return None
    return "error"


async def _close(source: AsyncIterator[Any]) -> None:
    aclose: Callable[[], Awaitable[None]] | None = getattr(source, "aclose", None)
    if aclose is not None:
        await aclose()
