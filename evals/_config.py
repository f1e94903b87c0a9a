"""Typed configuration of an evaluation run (``assist eval run``).

:class:`EvalConfig` is the single source of every ``assist eval run`` flag: its name, type,
default and help text, in the field metadata the CLI's flag generator
(:mod:`assist.cli._flags`) reads, so the Python API and the CLI cannot drift apart. Checks
that need no model or file (flag combinations, the strategy list) happen in :func:`check`,
before any work. (:class:`evals.diversity.DiversityConfig` configures ``assist eval
diversity``.)
"""

from __future__ import annotations

import dataclasses
import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from assist.errors import BadRequest

__all__ = [
    "EvalConfig",
    "EvalError",
    "build_task",
    "check",
    "default_data_dir",
    "default_out",
    "generated_task",
    "run_settings",
    "split_specs",
]

REPO = Path(__file__).resolve().parents[1]


def _extractor_names() -> tuple[str, ...]:
    """The ``--extractor`` choices, read where they live when the parser is built."""
    from strategies.extract import EXTRACTORS

    return tuple(EXTRACTORS)


class EvalError(BadRequest):
    """A user mistake found before or while setting up a run; the message is one line."""


def _f(default: Any, help: str, choices: Any = None, **kw: Any) -> Any:
    return field(default=default, metadata={"help": help, "choices": choices, **kw})


@dataclass
class EvalConfig:
    task: str = _f("arith", "arith | facts | gsm8k | PATH.jsonl (question/answer per line)")
    strategies: str = _f("direct,cot", "comma-separated strategy specs, e.g. direct,cot,sc@8:t=0.7 "
                                       "(see `assist eval ls`)")
    model: str | None = _f(None, "checkpoint folder to load in-process, e.g. runs/tiny/rlhf")
    engine: str = _f("torch", "in-process engine for --model", ("torch", "vllm"))
    compile: bool = _f(False, "torch engine: decode steps through torch.compile (needs a C++ "
                              "compiler; starts seconds later, about twice the tokens/s at low "
                              "--concurrency on the CPU; the same greedy answers)")
    base_url: str | None = _f(None, "an OpenAI-compatible server instead, e.g. http://h:8000/v1",
                              env="OPENAI_BASE_URL", env_unless=("model",))
    model_name: str | None = _f(None, "model name on --base-url (default: the server's first)")
    api_key: str | None = _f(None, "bearer key for --base-url", env="OPENAI_API_KEY",
                             env_needs=("base_url",))
    limit: int | None = _f(None, "evaluate the first N test items (default: all)")
    samples: int = _f(1, "independent runs per item (K), inspect's epochs; run j is seeded "
                         "--seed + j", flags=("--samples", "--epochs"))
    concurrency: int = _f(8, "runs in flight at once")
    reuse_calls: bool = _f(False, "compute a greedy or seeded call once when strategies repeat it "
                                  "(sc and bon of an item draw the same samples); each run still "
                                  "counts its tokens and latency")
    seed: int = _f(0, "base seed of the sampling strategies")
    max_tokens: int | None = _f(None, "max_tokens of every strategy that has the option")
    out: str | None = _f(None, "output folder (default: runs/eval/<task>-<time>)")
    resume: bool = _f(False, "continue a run in --out: finished items in samples.jsonl are kept, "
                             "errored runs are run again; refused if the task, model, strategy "
                             "set, seed, --samples, --max-tokens or --engine differ")
    max_error_rate: float = _f(0.05, "exit 3 (results still written) when more than this share "
                                     "of runs errored (model or transport failures, not wrong "
                                     "answers); default 0.05, 0: any error fails the run")
    data_dir: str | None = _f(None, "gsm8k: folder with test.jsonl (default: ../shared/data/gsm8k)")
    extractor: str = _f("strict", "answer extractor of a gsm8k / .jsonl task", _extractor_names)
    on_bad_line: str = _f("stop", "a malformed .jsonl line: stop (exit 2) or skip it",
                          ("stop", "skip"))
    embedder: str = _f("auto", "embedder of the facts store built for rag (auto: minilm if it "
                               "loads, else hashing)", ("auto", "minilm", "hashing"))
    baseline: str | None = _f(None, "strategy the others are compared with (default: the first)")
    task_config: str | None = _f(None, "a run's metrics.json whose arith/facts settings to use "
                                       "(default: the one beside --model, if any)")


# A piece that continues the previous spec's options ("t=0.7" in "sc@8:seed=1,t=0.7").
_OPTION = re.compile(r"\s*[A-Za-z_][A-Za-z0-9_]*\s*=[^():@]*")


def split_specs(text: str) -> list[str]:
    """Strategy specs from a comma-separated list.

    Commas also separate a spec's own options (``sc@8:t=0.7,seed=1``), so a piece of the
    form ``key=value`` joins the spec before it; commas inside parentheses never split.
    """
    pieces: list[str] = []
    depth, start = 0, 0
    for i, ch in enumerate(text + ","):
        depth += {"(": 1, ")": -1}.get(ch, 0)
        if ch == "," and depth <= 0:
            pieces.append(text[start:i])
            start = i + 1
    specs: list[str] = []
    for piece in pieces:
        if specs and _OPTION.fullmatch(piece) and ":" in specs[-1]:
            specs[-1] += "," + piece.strip()
        elif piece.strip():
            specs.append(piece.strip())
    return specs


def default_data_dir() -> Path | None:
    """``../shared/data/gsm8k`` beside the clone (or the working folder), when present."""
    for root in (REPO.parent, Path.cwd().parent):
        if (root / "shared" / "data" / "gsm8k" / "test.jsonl").is_file():
            return root / "shared" / "data" / "gsm8k"
    return None


def default_out(name: str) -> Path:
    return Path("runs") / "eval" / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"


def check(cfg: EvalConfig) -> list[str]:
    """The strategy specs of ``cfg`` after checking flag combinations (no files touched)."""
    if bool(cfg.model) == bool(cfg.base_url):
        raise EvalError("give exactly one of --model (a checkpoint) or --base-url (a server)")
    if cfg.base_url and not cfg.base_url.startswith(("http://", "https://")):
        raise EvalError(f"--base-url {cfg.base_url}: expected an http(s) URL")
    if cfg.model and not (Path(cfg.model) / "config.json").is_file():
        raise EvalError(f"--model {cfg.model}: no Hugging Face checkpoint (config.json) there")
    for name in ("samples", "concurrency"):
        if getattr(cfg, name) < 1:
            raise EvalError(f"--{name} must be at least 1, not {getattr(cfg, name)}")
    for name in ("limit", "max_tokens"):
        value = getattr(cfg, name)
        if value is not None and value < 1:
            raise EvalError(f"--{name.replace('_', '-')} must be at least 1, not {value}")
    if cfg.compile and not (cfg.model and cfg.engine == "torch"):
        raise EvalError("--compile is for the torch engine: --model with --engine torch")
    if cfg.resume and not cfg.out:
        raise EvalError("--resume needs the --out folder of the run to continue")
    specs = split_specs(cfg.strategies)
    if not specs:
        raise EvalError("--strategies is empty")
    if len(set(specs)) != len(specs):
        raise EvalError(f"--strategies names a strategy twice: {cfg.strategies}")
    if cfg.baseline is not None and cfg.baseline not in specs:
        raise EvalError(f"--baseline {cfg.baseline} is not among --strategies")
    return specs


def run_settings(metrics: Path | None, *, required: bool = False) -> dict[str, Any]:
    """The ``config`` a training run recorded in its ``metrics.json`` ({} when there is none
    and it is not ``required``): a run trained on harder arith or another facts world must
    be evaluated on the same generator settings, not the defaults."""
    if metrics is None or (not required and not metrics.is_file()):
        return {}
    try:
        return dict(json.loads(metrics.read_text())["config"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise EvalError(f"{metrics}: not a training run's metrics.json ({exc})") from exc


def generated_task(name: str, settings: dict[str, Any]) -> Any:
    """``arith`` or ``facts`` with the run's generator settings where it recorded them."""
    from evals.tasks import ArithConfig, ArithTask, FactsConfig, FactsTask

    kind: Any = ArithConfig if name == "arith" else FactsConfig
    known = {f.name for f in dataclasses.fields(kind)}
    values = {k: tuple(v) if isinstance(v, list) else v  # JSON turned the ops tuple into a list
              for k, v in (settings.get(name) or {}).items() if k in known}
    try:
        return ArithTask(kind(**values)) if name == "arith" else FactsTask(kind(**values))
    except (TypeError, ValueError) as exc:
        raise EvalError(f"{name} settings of the run: {exc}") from exc


def build_task(cfg: EvalConfig) -> Any:
    """The task ``cfg`` names, its test split read now, so a missing file or a bad line
    fails before any model loads (the message names ``file:line``)."""
    from evals.tasks import JsonlError, JsonlTask, gsm8k_task
    from strategies.extract import EXTRACTORS

    try:
        if cfg.task in ("arith", "facts"):
            metrics = (Path(cfg.task_config) if cfg.task_config
                       else Path(cfg.model).parent / "metrics.json" if cfg.model else None)
            return generated_task(cfg.task, run_settings(metrics, required=bool(cfg.task_config)))
        if cfg.task == "gsm8k":
            data = Path(cfg.data_dir) if cfg.data_dir else default_data_dir()
            if data is None:
                raise EvalError("the gsm8k task needs --data-dir, a folder with test.jsonl")
            task = gsm8k_task(data)
        elif cfg.task.endswith(".jsonl"):
            path = Path(cfg.task)
            if not path.is_file():
                raise EvalError(f"{path}: no such task file")
            task = JsonlTask(path.stem, {"test": path}, skip_bad=cfg.on_bad_line == "skip")
        else:
            raise EvalError(f"unknown task {cfg.task!r}; expected arith, facts, gsm8k or a "
                            "PATH.jsonl")
        task.extractor = EXTRACTORS[cfg.extractor]
        if not task.split("test"):
            raise EvalError(f"task {cfg.task}: no test items")
    except JsonlError as exc:
        raise EvalError(str(exc)) from exc
    return task
