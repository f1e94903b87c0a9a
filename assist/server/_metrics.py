"""Prometheus metrics for the endpoint, in the text exposition format.

A few counters and one latency histogram are all an operator needs here (requests by
route and status, tokens in and out, latency, cancellations, queue depth), so they are
kept in plain dicts rather than pulling a metrics library into the core install.
"""

from __future__ import annotations

import bisect
import threading
from collections import defaultdict
from collections.abc import Mapping

__all__ = ["Metrics"]

_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


def _labels(labels: Mapping[str, str]) -> str:
    if not labels:
        return ""
    inner = ",".join(f'{k}="{str(v).replace(chr(34), "")}"' for k, v in sorted(labels.items()))
    return "{" + inner + "}"


class Metrics:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: dict[tuple[str, int], int] = defaultdict(int)
        self.tokens: dict[str, int] = defaultdict(int)
        self.cancelled = 0
        self.rejected = 0
        self.in_flight = 0
        self._latency: dict[str, list[int]] = {}
        self._latency_sum: dict[str, float] = defaultdict(float)

    def observe(self, route: str, status: int, seconds: float) -> None:
        with self._lock:
            self.requests[(route, status)] += 1
            counts = self._latency.setdefault(route, [0] * (len(_BUCKETS) + 1))
            counts[bisect.bisect_left(_BUCKETS, seconds)] += 1
            self._latency_sum[route] += seconds

    def count_usage(self, usage: Mapping[str, int] | None) -> None:
        if not usage:
            return
        with self._lock:
            self.tokens["prompt"] += int(usage.get("prompt_tokens") or 0)
            self.tokens["completion"] += int(usage.get("completion_tokens") or 0)

    def render(self, gauges: Mapping[str, float]) -> str:
        lines = [
            "# HELP assist_requests_total Requests answered, by route and HTTP status.",
            "# TYPE assist_requests_total counter",
        ]
        with self._lock:
            for (route, status), n in sorted(self.requests.items()):
                lines.append(f"assist_requests_total{_labels({'route': route, 'status': str(status)})} {n}")
            lines += ["# HELP assist_tokens_total Tokens processed (prompt) and generated (completion).",
                      "# TYPE assist_tokens_total counter"]
            for kind in ("prompt", "completion"):
                lines.append(f"assist_tokens_total{_labels({'kind': kind})} {self.tokens[kind]}")
            lines += ["# HELP assist_requests_cancelled_total Requests whose client went away mid-generation.",
                      "# TYPE assist_requests_cancelled_total counter",
                      f"assist_requests_cancelled_total {self.cancelled}",
                      "# HELP assist_requests_rejected_total Requests turned away because the queue was full.",
                      "# TYPE assist_requests_rejected_total counter",
                      f"assist_requests_rejected_total {self.rejected}",
                      "# HELP assist_requests_in_flight Requests accepted and not yet answered.",
                      "# TYPE assist_requests_in_flight gauge",
                      f"assist_requests_in_flight {self.in_flight}",
                      "# HELP assist_request_latency_seconds Wall time from request to full answer.",
                      "# TYPE assist_request_latency_seconds histogram"]
            for route, counts in sorted(self._latency.items()):
                running = 0
                for bound, c in zip(_BUCKETS, counts, strict=False):
                    running += c
                    lines.append(f"assist_request_latency_seconds_bucket{_labels({'route': route, 'le': str(bound)})} {running}")
                running += counts[-1]
                lines.append(f"assist_request_latency_seconds_bucket{_labels({'route': route, 'le': '+Inf'})} {running}")
                lines.append(f"assist_request_latency_seconds_sum{_labels({'route': route})} {self._latency_sum[route]:.6f}")
                lines.append(f"assist_request_latency_seconds_count{_labels({'route': route})} {running}")
        typed: set[str] = set()
        for name, value in sorted(gauges.items()):
            base = name.split("{", 1)[0]
            if base not in typed:  # one TYPE line per family, however many label sets
                typed.add(base)
                lines.append(f"# TYPE assist_{base} gauge")
            lines.append(f"assist_{name} {value}")
        return "\n".join(lines) + "\n"
