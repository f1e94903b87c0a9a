"""What a request to the torch engine asks for and what it gets back, and the checks every
request passes before it is queued (:func:`validate`): a bad parameter fails its own call,
named, never the batch it would have joined.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import torch

from assist.errors import BadRequest, Overloaded

__all__ = [
    "SAMPLING_EPS",
    "SEED_MODULUS",
    "Constraint",
    "ConstraintFactory",
    "EngineOverloaded",
    "RequestOutput",
    "SamplingParams",
    "SeqOutput",
    "TokenIdLogprob",
    "validate",
]


# Below this temperature sampling is greedy: dividing logits by ~0 overflows (vLLM's rule too).
SAMPLING_EPS = 1e-5


# Seeds are taken modulo 2**63 (what a torch generator holds), so any integer a client sends
# seeds its request instead of failing the batch it joined; seeds below it are unchanged.
SEED_MODULUS = 1 << 63


class EngineOverloaded(Overloaded):
    """The waiting queue is full; retry later (HTTP 429 through :class:`assist.errors.Overloaded`)."""


class Constraint(Protocol):
    """One sequence's grammar state: masks logits in place, then follows the chosen token."""

    def mask_(self, logits: torch.Tensor) -> None: ...
    def accept(self, token: int) -> bool: ...
    def is_terminated(self) -> bool: ...


class ConstraintFactory(Protocol):
    """A compiled grammar; ``new()`` starts a fresh constraint for one sequence."""

    def new(self) -> Constraint: ...


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    n: int = 1
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    logprobs: bool = False
    top_logprobs: int = 0
    grammar: ConstraintFactory | None = None
    prompt_logprobs: int | None = None  # None: not asked; k: each prompt token's logprob and top k
    ignore_eos: bool = False  # generate exactly max_tokens (benchmarks; vLLM's field of the same name)
    # vLLM's further sampling fields, with its semantics (vllm/v1/sample/sampler.py), applied
    # in its order: allowed_token_ids, min_tokens, logit_bias, then the repetition, frequency
    # and presence penalties (all before the greedy pick); min_p after the temperature.
    presence_penalty: float = 0.0  # minus this for every token already generated
    frequency_penalty: float = 0.0  # minus this times each token's count in the output
    repetition_penalty: float = 1.0  # tokens of the prompt or output: logit / p if > 0, else x p
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias in [-100, 100]) added
    min_p: float = 0.0  # sampling only: drop tokens below min_p x the likeliest's probability
    min_tokens: int = 0  # no stop token (eos, stop_token_ids) or stop string before this many
    include_stop_str_in_output: bool = False  # keep the stop string (or stop token's text)
    allowed_token_ids: tuple[int, ...] | None = None  # sample only among these
    # vLLM's default leaves special tokens (tool-call markers, <|reward|>, ...) out of the
    # text; its tool parser keeps them when tools are offered, and so does TorchEngine.
    skip_special_tokens: bool = False

    @property
    def adjusts(self) -> bool:
        """Whether the logits are changed before the pick (penalties, biases, masks)."""
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0
                    or self.logit_bias or self.min_tokens or self.allowed_token_ids is not None)


@dataclass
class TokenIdLogprob:
    """A sampled (or prompt) token's logprob by token id, with the top alternatives as
    ``(id, logprob)``: the engine's raw reading, which the API layer turns into
    :class:`assist.types.TokenLogprob` (text, bytes)."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class SeqOutput:
    index: int
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    logprobs: list[TokenIdLogprob] = field(default_factory=list)
    prompt_logprobs: list[TokenIdLogprob | None] | None = None  # the request's, shared by its outputs


@dataclass
class RequestOutput:
    prompt_tokens: int
    outputs: list[SeqOutput]
    queued_s: float = 0.0
    total_s: float = 0.0
    # One entry per prompt token; the first is None (nothing precedes it to predict it).
    prompt_logprobs: list[TokenIdLogprob | None] | None = None
    cached_tokens: int = 0  # prompt tokens read from the prefix cache, not computed




def validate(p: SamplingParams, vocab_size: int) -> None:
    """Refuse parameters no request may carry (each named), before the request is queued."""
    def whole(name: str, value: object, low: int, high: int | None = None) -> None:
        if type(value) is not int or value < low or (high is not None and value > high):
            bound = f"[{low}, {high}]" if high is not None else f">= {low}"
            raise BadRequest(f"{name} must be an integer {bound}, not {value!r}", param=name)

    def real(name: str, value: object, ok: Callable[[float], bool], what: str) -> None:
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) \
                or not ok(value):
            raise BadRequest(f"{name} must be {what}, not {value!r}", param=name)

    whole("n", p.n, 1)
    whole("max_tokens", p.max_tokens, 0)
    whole("top_k", p.top_k, 0)
    whole("top_logprobs", p.top_logprobs, 0, vocab_size)
    if p.prompt_logprobs is not None:
        whole("prompt_logprobs", p.prompt_logprobs, 0, vocab_size)
    real("temperature", p.temperature, lambda v: v >= 0, "a finite number >= 0")
    real("top_p", p.top_p, lambda v: 0 < v <= 1, "in (0, 1]")
    if p.seed is not None and (isinstance(p.seed, bool) or not isinstance(p.seed, int)):
        raise BadRequest(f"seed must be an integer, not {p.seed!r}", param="seed")
    if not isinstance(p.stop, tuple | list) or not all(isinstance(x, str) and x for x in p.stop):
        raise BadRequest("stop must be non-empty strings", param="stop")
    if not all(type(i) is int for i in p.stop_token_ids):
        raise BadRequest("stop_token_ids must be integers", param="stop_token_ids")
    real("presence_penalty", p.presence_penalty, lambda v: -2 <= v <= 2, "in [-2, 2]")
    real("frequency_penalty", p.frequency_penalty, lambda v: -2 <= v <= 2, "in [-2, 2]")
    real("repetition_penalty", p.repetition_penalty, lambda v: v > 0, "a finite number > 0")
    real("min_p", p.min_p, lambda v: 0 <= v <= 1, "in [0, 1]")
    whole("min_tokens", p.min_tokens, 0, p.max_tokens if p.max_tokens > 0 else None)
    for i, b in p.logit_bias:
        whole("logit_bias", i, 0, vocab_size - 1)
        real("logit_bias", b, lambda v: True, "a finite number")
    if p.allowed_token_ids is not None:
        if not p.allowed_token_ids:
            raise BadRequest("allowed_token_ids must not be empty", param="allowed_token_ids")
        for i in p.allowed_token_ids:
            whole("allowed_token_ids", i, 0, vocab_size - 1)
