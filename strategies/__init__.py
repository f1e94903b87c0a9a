"""Inference-time strategies built only on the ``ChatModel`` protocol.

Each works unchanged against the torch engine, vLLM, a remote OpenAI-compatible server or
``assist.testing.FakeChatModel``; each is chosen by a spec string (see :mod:`strategies._spec`)
from Python (``strategies.parse("sc@8")``), over HTTP (model ``"sc@8::assistant"``) and in
the eval CLI.
"""

from strategies import (  # noqa: F401  (importing a strategy module registers its spec)
    best_of_n,
    cot,
    direct,
    json_output,
    plain,
    rag,
    reflect,
    self_consistency,
    tools,
)
from strategies._base import BudgetExhausted, Cost, Recorder, Result, Strategy, StrategyBase
from strategies._extract import EXTRACTORS, Extractor
from strategies._policy import Limits, Policy, PolicyError
from strategies._reward import RewardModel, Scorer
from strategies._sandbox import SandboxResult, run_python
from strategies._spec import REGISTRY, LimitError, SpecError, parse, register
from strategies._store import DocumentStore
from strategies._toolbox import (
    Tool,
    ToolError,
    available_tools,
    get_tool,
    register_tool,
    retrieval_tool,
    tool,
)
from strategies.best_of_n import BestOfN
from strategies.cot import ChainOfThought
from strategies.direct import Direct
from strategies.json_output import JsonOutput
from strategies.plain import Plain
from strategies.rag import Retrieve, citation_report
from strategies.reflect import Reflect
from strategies.self_consistency import SelfConsistency, vote
from strategies.tools import ToolUse

# Listed by the endpoint's /v1/models as "<spec>::<model>" aliases.
EXAMPLES = ("direct", "cot", "sc@8", "reflect", "tools", "sc@4(tools)")

__all__ = [
    "EXAMPLES",
    "EXTRACTORS",
    "REGISTRY",
    "BestOfN",
    "BudgetExhausted",
    "ChainOfThought",
    "Cost",
    "Direct",
    "DocumentStore",
    "Extractor",
    "JsonOutput",
    "LimitError",
    "Limits",
    "Plain",
    "Policy",
    "PolicyError",
    "Recorder",
    "Reflect",
    "Result",
    "Retrieve",
    "RewardModel",
    "SandboxResult",
    "Scorer",
    "SelfConsistency",
    "SpecError",
    "Strategy",
    "StrategyBase",
    "Tool",
    "ToolError",
    "ToolUse",
    "available_tools",
    "citation_report",
    "get_tool",
    "parse",
    "register",
    "register_tool",
    "retrieval_tool",
    "run_python",
    "tool",
    "vote",
]
