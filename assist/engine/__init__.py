"""Engines: the built-in torch engine (a lean Llama forward, a preallocated KV cache,
continuous batching) and vLLM as a managed child process.

Names load on first use, so ``import assist.engine._vllm`` (or ``assist.load(...,
engine="vllm")``) does not pay for torch, transformers and xgrammar.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from assist.engine._grammar import Grammar, GrammarCache, ToolPlan, plan_tools
    from assist.engine._runner import LlamaRunner
    from assist.engine._scheduler import (
        EngineOverloaded,
        RequestOutput,
        SamplingParams,
        Scheduler,
        SeqOutput,
        TokenIdLogprob,
    )
    from assist.engine._torch import TorchEngine
    from assist.engine._vllm import VLLMEngine, VLLMServer

_WHERE = {
    "Grammar": "_grammar", "GrammarCache": "_grammar", "ToolPlan": "_grammar", "plan_tools": "_grammar",
    "LlamaRunner": "_runner",
    "EngineOverloaded": "_scheduler", "RequestOutput": "_scheduler", "SamplingParams": "_scheduler",
    "Scheduler": "_scheduler", "SeqOutput": "_scheduler", "TokenIdLogprob": "_scheduler",
    "TorchEngine": "_torch",
    "VLLMEngine": "_vllm", "VLLMServer": "_vllm",
}

__all__ = [
    "EngineOverloaded",
    "Grammar",
    "GrammarCache",
    "LlamaRunner",
    "RequestOutput",
    "SamplingParams",
    "Scheduler",
    "SeqOutput",
    "TokenIdLogprob",
    "ToolPlan",
    "TorchEngine",
    "VLLMEngine",
    "VLLMServer",
    "plan_tools",
]


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'assist.engine' has no attribute {name!r}")
    return getattr(importlib.import_module(f"assist.engine.{_WHERE[name]}"), name)
