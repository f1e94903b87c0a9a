"""Inference-time strategies built only on the ``ChatModel`` protocol.

Each works unchanged against the torch engine, vLLM, a remote OpenAI-compatible server or
``assist.testing.FakeChatModel``; each is chosen by a spec string (see ``strategies.parse``)
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
from strategies._base import (
    Bound,
    BudgetExhausted,
    Cost,
    Delta,
    Done,
    Event,
    OptionError,
    Progress,
    Recorder,
    Result,
    Strategy,
    StrategyBase,
    bound_of,
    nodes,
    with_fields,
)
from strategies._embed import EmbedderError, HashingEmbedder, MiniLMEmbedder, embedder_by_name
from strategies._ingest import IngestError, load_chunks, store_from_facts
from strategies._policy import Limits, Policy, PolicyError, parse_resource
from strategies._reward import RewardModel, Scorer
from strategies._sandbox import SandboxResult, run_python
from strategies._spec import REGISTRY, LimitError, SpecError, parse, register
from strategies._store import MODES, DocumentStore, StoreError
from strategies._toolbox import (
    Tool,
    ToolError,
    UnknownTool,
    available_tools,
    get_tool,
    register_tool,
    retrieval_tool,
    tool,
)
from strategies.best_of_n import BestOfN
from strategies.cot import ChainOfThought
from strategies.direct import Direct
from strategies.extract import EXTRACTORS, Extractor
from strategies.json_output import JsonOutput
from strategies.plain import Plain
from strategies.rag import Retrieve, citation_report
from strategies.reflect import Reflect
from strategies.self_consistency import SelfConsistency
from strategies.tools import ToolUse
from strategies.voting import vote

# Listed by the endpoint's /v1/models as "<spec>::<model>" aliases (those the server can run:
# bon and rag only where it has a default reward model and store).
EXAMPLES = ("direct", "cot", "sc@8", "bon@8", "reflect", "tools", "rag", "sc@4(tools)")

__all__ = [
    "EXAMPLES",
    "EXTRACTORS",
    "MODES",
    "REGISTRY",
    "BestOfN",
    "Bound",
    "BudgetExhausted",
    "ChainOfThought",
    "Cost",
    "Delta",
    "Direct",
    "DocumentStore",
    "Done",
    "EmbedderError",
    "Event",
    "Extractor",
    "HashingEmbedder",
    "IngestError",
    "JsonOutput",
    "LimitError",
    "Limits",
    "MiniLMEmbedder",
    "OptionError",
    "Plain",
    "Policy",
    "PolicyError",
    "Progress",
    "Recorder",
    "Reflect",
    "Result",
    "Retrieve",
    "RewardModel",
    "SandboxResult",
    "Scorer",
    "SelfConsistency",
    "SpecError",
    "StoreError",
    "Strategy",
    "StrategyBase",
    "Tool",
    "ToolError",
    "ToolUse",
    "UnknownTool",
    "available_tools",
    "bound_of",
    "citation_report",
    "embedder_by_name",
    "get_tool",
    "load_chunks",
    "nodes",
    "parse",
    "parse_resource",
    "register",
    "register_tool",
    "retrieval_tool",
    "run_python",
    "store_from_facts",
    "tool",
    "vote",
    "with_fields",
]
