"""Prometheus metrics for the endpoint, built on ``prometheus_client``.

Each app has its own :class:`~prometheus_client.CollectorRegistry` (never the global one),
so two apps in one process share no series. Two families of series:

- vLLM's names, so that a dashboard built for vLLM reads this server as it is:
  ``vllm:time_to_first_token_seconds``, ``vllm:inter_token_latency_seconds``,
  ``vllm:e2e_request_latency_seconds`` (histograms), ``vllm:num_requests_running``,
  ``vllm:num_requests_waiting`` (gauges), ``vllm:prompt_tokens_total``,
  ``vllm:generation_tokens_total`` and ``vllm:request_success_total{finished_reason}``
  (counters), all labelled ``model_name``; with the torch engine's prefix cache also
  ``vllm:prefix_cache_queries`` and ``vllm:prefix_cache_hits`` (counters, in prompt tokens:
  looked up, and found cached), counted by the engine over every model call (a strategy's
  too). They count requests as clients see them, at the
  serving layer: a strategy request is one request (its tokens are all its calls' tokens).
  Time to first token and inter-token latency come from streamed answers (the first
  chunk that carries text, then the gaps between a choice's text chunks); a whole answer
  counts in the end-to-end latency only.
- ``assist_*``: requests by route and status, latency by route, tokens, cancellations,
  rejections, requests in flight, per-strategy requests and model calls (``strategy`` is
  the strategy's registered name, ``none`` for a plain request), and the backend's gauges.

:func:`prefixed` renames another server's exposition (a vLLM child's) so that it can be
appended without two families of one name.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Iterable, Mapping
from typing import Any

import httpx
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families

__all__ = ["CONTENT_TYPE", "ENGINE_PREFIX", "Metrics", "Tracked", "engine_metrics", "prefixed"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
ENGINE_PREFIX = "engine_"  # before each of a vLLM child's series: engine_vllm:num_requests_running
ENGINE_TIMEOUT = 5.0  # seconds to wait for the child's /metrics
_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
# vLLM 0.32's defaults (vllm/v1/metrics/buckets.py), so that dashboards' quantiles line up
_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
_ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0)
_E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
                480.0, 960.0, 1920.0, 7680.0)
# vLLM's reasons, and OpenAI's tool_calls; anything else is counted as "other" (bounded labels)
FINISH_REASONS = ("stop", "length", "abort", "error", "repetition", "tool_calls")
_GAUGE_HELP = {
    "requests_in_flight_limit": "Model completions admitted at once before requests are refused (429).",
    "model_calls_in_flight": "Admitted model completions (worst case) in flight.",
    "queue_depth": "Sequences queued in the engine's scheduler, waiting for a batch slot.",
    "running_sequences": "Sequences the engine is decoding.",
    "upstream_outstanding": "Requests outstanding at each upstream replica.",
}
# The engine's own counters among the backend's figures, exposed under vLLM's names.
_ENGINE_COUNTERS = {
    "prefix_cache_queries": ("vllm:prefix_cache_queries",
                             "Prefix cache queries, in terms of number of queried tokens."),
    "prefix_cache_hits": ("vllm:prefix_cache_hits", "Prefix cache hits, in terms of number of cached tokens."),
}
log = logging.getLogger("assist.server")
_NAME = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?$")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


class _Gauges:
    """A collector for the backend's gauges, handed over at each scrape as
    ``{"name": v, 'name{label="x"}': v}``; each becomes ``assist_<name>``."""

    def __init__(self) -> None:
        self.values: Mapping[str, float] = {}

    def collect(self) -> Iterable[Metric]:
        families: dict[str, tuple[GaugeMetricFamily, list[str]]] = {}
        for key, value in sorted(self.values.items()):
            match = _NAME.match(key)
            if match is None:
                continue
            base, inner = match.groups()
            labels = dict(_LABEL.findall(inner or ""))
            if base not in families:
                help_ = _GAUGE_HELP.get(base, f"The backend's {base.replace('_', ' ')}.")
                families[base] = GaugeMetricFamily(f"assist_{base}", help_, labels=sorted(labels)), sorted(labels)
            family, names = families[base]
            if sorted(labels) != names:
                continue  # one label set per family: a stray key must not break the exposition
            family.add_metric([labels[k] for k in names], float(value))
        return [family for family, _ in families.values()]


class _EngineCounters:
    """The engine's running totals (handed over at each scrape like the gauges) as counters
    with vLLM's names; a backend without them (an upstream) exposes none."""

    def __init__(self, model_name: str) -> None:
        self.model_name = model_name
        self.values: Mapping[str, float] = {}

    def collect(self) -> Iterable[Metric]:
        out = []
        for key, (name, help_) in _ENGINE_COUNTERS.items():
            if key in self.values:
                family = CounterMetricFamily(name, help_, labels=["model_name"])
                family.add_metric([self.model_name], float(self.values[key]))
                out.append(family)
        return out


class Metrics:
    """The endpoint's series, in a registry of its own; ``render`` writes them out."""

    def __init__(self, model_name: str = "assistant") -> None:
        self.registry = r = CollectorRegistry()
        self.model_name = model_name
        self.in_flight = 0  # requests admitted and not yet answered
        self.waiting = 0.0  # the engine's queue, as of the last scrape
        m = ["model_name"]
        # -- vLLM's names --
        self.ttft = Histogram("vllm:time_to_first_token_seconds", "Histogram of time to first token in seconds.",
                              m, buckets=_TTFT_BUCKETS, registry=r).labels(model_name)
        self.itl = Histogram("vllm:inter_token_latency_seconds", "Histogram of inter-token latency in seconds.",
                             m, buckets=_ITL_BUCKETS, registry=r).labels(model_name)
        self.e2e = Histogram("vllm:e2e_request_latency_seconds", "Histogram of e2e request latency in seconds.",
                             m, buckets=_E2E_BUCKETS, registry=r).labels(model_name)
        Gauge("vllm:num_requests_running", "Number of requests admitted and being answered.", m,
              registry=r).labels(model_name).set_function(lambda: float(self.in_flight))
        Gauge("vllm:num_requests_waiting", "Number of requests waiting to be processed (the engine's queue).", m,
              registry=r).labels(model_name).set_function(lambda: float(self.waiting))
        self.prompt_tokens = Counter("vllm:prompt_tokens", "Number of prefill tokens processed.", m,
                                     registry=r).labels(model_name)
        self.generation_tokens = Counter("vllm:generation_tokens", "Number of generation tokens processed.", m,
                                         registry=r).labels(model_name)
        success = Counter("vllm:request_success", "Count of successfully processed requests.",
                          m + ["finished_reason"], registry=r)
        self.success = {reason: success.labels(model_name, reason) for reason in (*FINISH_REASONS, "other")}
        # -- assist_* --
        self.requests = Counter("assist_requests", "Requests answered, by route and HTTP status.",
                                ["route", "status"], registry=r)
        self.latency = Histogram("assist_request_latency_seconds", "Wall time from request to full answer.",
                                 ["route"], buckets=_BUCKETS, registry=r)
        tokens = Counter("assist_tokens", "Tokens processed (prompt) and generated (completion).", ["kind"],
                         registry=r)
        self.tokens = {kind: tokens.labels(kind) for kind in ("prompt", "completion")}
        self.cancelled = Counter("assist_requests_cancelled", "Requests whose client went away mid-generation.",
                                 registry=r)
        self.rejected = Counter("assist_requests_rejected", "Requests turned away because the queue was full.",
                                registry=r)
        Gauge("assist_requests_in_flight", "Requests accepted and not yet answered.",
              registry=r).set_function(lambda: float(self.in_flight))
        self.strategy_requests = Counter("assist_strategy_requests", "Requests admitted, by strategy "
                                         "(its registered name; none for a plain request).", ["strategy"], registry=r)
        self.model_calls = Counter("assist_model_calls", "Model completions made for requests, by strategy.",
                                   ["strategy"], registry=r)
        self.strategy_requests.labels("none")
        self.model_calls.labels("none")
        self._gauges = _Gauges()
        r.register(self._gauges)
        self._counters = _EngineCounters(model_name)
        r.register(self._counters)

    # -- recording ----------------------------------------------------------------------------
    def observe(self, route: str, status: int, seconds: float) -> None:
        """One HTTP request answered (any route; ``route`` is a bounded label)."""
        self.requests.labels(route, str(status)).inc()
        self.latency.labels(route).observe(seconds)

    def count_usage(self, usage: Mapping[str, Any] | None) -> None:
        if not usage:
            return
        prompt, completion = int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0)
        self.tokens["prompt"].inc(prompt)
        self.tokens["completion"].inc(completion)
        self.prompt_tokens.inc(prompt)
        self.generation_tokens.inc(completion)

    def finished(self, reason: str | None) -> None:
        self.success.get(reason or "stop", self.success["other"]).inc()

    def track(self, strategy: str, calls: int | None) -> Tracked:
        """A request just admitted: ``strategy`` its label (``none`` for a plain one), ``calls``
        its model completions when known now (a plain request's), else counted from its usage."""
        self.strategy_requests.labels(strategy).inc()
        if calls is not None:
            self.model_calls.labels(strategy).inc(calls)
        return Tracked(self, strategy, count_calls=calls is None)

    # -- exposition ---------------------------------------------------------------------------
    def render(self, gauges: Mapping[str, float]) -> str:
        """The exposition, with the backend's ``gauges`` as of now (``queue_depth`` also
        feeds ``vllm:num_requests_waiting``; ``prefix_cache_queries``/``_hits`` are the
        engine's counters)."""
        self.waiting = float(gauges.get("queue_depth", 0.0))
        self._gauges.values = {k: v for k, v in gauges.items() if k not in _ENGINE_COUNTERS}
        self._counters.values = {k: v for k, v in gauges.items() if k in _ENGINE_COUNTERS}
        return generate_latest(self.registry).decode()


class Tracked:
    """One admitted request's timings and outcome. Feed it every streamed chunk
    (:meth:`chunk`) or the whole answer (:meth:`answer`), then :meth:`done` or :meth:`fail`."""

    def __init__(self, metrics: Metrics, strategy: str, *, count_calls: bool) -> None:
        self.metrics = metrics
        self.strategy = strategy
        self.count_calls = count_calls
        self.t0 = time.perf_counter()
        self.first: float | None = None
        self.last: dict[int, float] = {}
        self.reasons: list[str] = []
        self.over = False
        self.hide_usage = False  # a stream whose client did not ask for usage (the server did)

    def usage(self, usage: Mapping[str, Any] | None) -> None:
        if not usage:
            return
        self.metrics.count_usage(usage)
        if self.count_calls and usage.get("calls"):
            self.metrics.model_calls.labels(self.strategy).inc(int(usage["calls"]))

    def chunk(self, chunk: Mapping[str, Any]) -> None:
        """A streamed chunk: its text times the first token and the gaps between tokens."""
        now = time.perf_counter()
        for choice in chunk.get("choices") or ():
            delta = choice.get("delta") or {}
            if delta.get("content") or delta.get("tool_calls") or choice.get("text"):
                if self.first is None:
                    self.first = now
                    self.metrics.ttft.observe(now - self.t0)
                index = int(choice.get("index") or 0)
                previous = self.last.get(index)
                if previous is not None:
                    self.metrics.itl.observe(now - previous)
                self.last[index] = now
            if choice.get("finish_reason"):
                self.reasons.append(str(choice["finish_reason"]))
        self.usage(chunk.get("usage"))

    def answer(self, body: Mapping[str, Any]) -> None:
        """A whole answer: its choices' finish reasons and its usage."""
        self.reasons += [str(c.get("finish_reason") or "stop") for c in body.get("choices") or ()]
        self.usage(body.get("usage"))

    def done(self) -> None:
        """Answered in full: the end-to-end latency, and each choice by its finish reason."""
        if self.over:
            return
        self.over = True
        self.metrics.e2e.observe(time.perf_counter() - self.t0)
        for reason in self.reasons or ["stop"]:
            self.metrics.finished(reason)

    def fail(self, reason: str | None) -> None:
        """Ended without a full answer: ``abort`` (the client left), ``error``, or None (not
        counted: a request the backend refused)."""
        if self.over:
            return
        self.over = True
        if reason is not None:
            self.metrics.finished(reason)


def prefixed(text: str, prefix: str) -> str:
    """Another server's text exposition with ``prefix`` before every family's name (its
    samples, HELP and TYPE lines); other comments are dropped."""
    out = []
    for line in text.splitlines():
        if line.startswith(("# HELP ", "# TYPE ")):
            out.append(line[:7] + prefix + line[7:])
        elif line.strip() and not line.startswith("#"):
            out.append(prefix + line.lstrip())
    return "\n".join(out) + "\n" if out else ""


async def engine_metrics(backend: Any) -> str:
    """The series of the engine child ``backend`` owns (a vLLM server: ``owned.root_url``),
    each name prefixed :data:`ENGINE_PREFIX`, and ``assist_engine_metrics_up`` saying
    whether it answered; empty when the backend owns no such child."""
    root = getattr(getattr(backend, "owned", None), "root_url", None)
    if not root:
        return ""
    text, up = "", 0
    try:
        async with httpx.AsyncClient(timeout=ENGINE_TIMEOUT, trust_env=False) as client:  # our own child
            response = await client.get(f"{root}/metrics")
        response.raise_for_status()
        text = prefixed(response.text, ENGINE_PREFIX)
        for _ in text_string_to_metric_families(text):  # what does not parse is not passed on
            pass
        up = 1
    except Exception as exc:  # down, slow, or not Prometheus text: ours are served all the same
        text = ""
        log.warning("the engine's /metrics at %s did not answer in Prometheus text: %s", root, exc)
    return (text + "# HELP assist_engine_metrics_up Whether the engine child's /metrics answered this scrape.\n"
            f"# TYPE assist_engine_metrics_up gauge\nassist_engine_metrics_up {float(up)}\n")
