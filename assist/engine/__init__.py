"""The built-in torch engine: a lean Llama forward, a preallocated KV cache, continuous batching."""

from assist.engine._runner import LlamaRunner
from assist.engine._scheduler import (
    EngineOverloaded,
    RequestOutput,
    SamplingParams,
    Scheduler,
    SeqOutput,
)
from assist.engine._torch import TorchEngine

__all__ = ["EngineOverloaded", "LlamaRunner", "RequestOutput", "SamplingParams", "Scheduler", "SeqOutput", "TorchEngine"]
