"""Typed configuration of a training run, and the named presets.

Every field can be set from the command line as ``--set section.field=value`` (for
example ``--set pretrain.steps=400``), so the presets are starting points, not limits.

- ``test``: the whole pipeline in well under a minute, for the test suite.
- ``tiny``: the demo assistant, whole pipeline within 15 minutes on 2 CPU cores.
- ``small``: for a GPU (bf16 autocast), a harder ``arith``.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

from assist.errors import BadRequest
from evals.diversity import DiversityConfig
from evals.tasks import ArithConfig, FactsConfig

__all__ = [
    "PRESETS",
    "STAGES",
    "ConfigError",
    "DataConfig",
    "DiversityConfig",
    "ModelConfig",
    "OptimConfig",
    "RLConfig",
    "RewardConfig",
    "RunConfig",
    "SFTConfig",
    "apply_overrides",
    "preset",
]

STAGES = ("tokenizer", "pretrain", "sft", "scratch", "rm", "rl")


class ConfigError(BadRequest):
    """A bad preset name or override; the message names it."""


@dataclass
class ModelConfig:
    vocab_size: int = 2048
    hidden_size: int = 64
    intermediate_size: int = 192
    num_layers: int = 2
    num_heads: int = 2  # head_dim = hidden_size / num_heads: 32 or 64 suit vLLM's CPU kernels
    num_kv_heads: int = 2
    max_seq_len: int = 512


# OptimConfig.autocast: where the loop computes in bfloat16 (the one list of its modes).
Autocast = Literal["auto", "native", "bf16", "off"]


@dataclass
class OptimConfig:
    steps: int = 100
    batch_size: int = 16  # sequences per step per process
    seq_len: int = 256
    lr: float = 3e-3
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    # Share of the steps after warm-up that hold the peak rate before the cosine starts
    # (0: cosine from the end of warm-up; 0.7: warm-up, stable, decay).
    decay_start: float = 0.0
    warmup_steps: int = 10
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    checkpoint_every: int = 25  # a killed run loses at most this many steps
    # Speed, not recipe: "auto" autocasts to bfloat16 on a GPU only; "native" also on a CPU
    # that computes bfloat16 natively (AVX-512 BF16 / AMX: a `tiny` pretraining step 365 ->
    # 312 ms on this project's AMD EPYC), float32 on one that would emulate it (slower than
    # float32); "bf16" everywhere; "off" keeps float32. `compile` runs the stage under
    # torch.compile (a C++ compiler needed, else eager; the first steps wait for it; with
    # bf16 the same step takes 185 ms: bench/train_step.py). Both change the numerics, so a
    # recipe's figures hold for the settings they were measured with (README: Train).
    autocast: Autocast = "auto"
    compile: bool = False

    def __post_init__(self) -> None:
        if self.autocast not in typing.get_args(Autocast):
            raise ValueError(f"autocast must be one of {', '.join(typing.get_args(Autocast))}, "
                             f"got {self.autocast!r}")
        if not 0.0 <= self.decay_start < 1.0:
            raise ValueError(f"decay_start must be in [0, 1), got {self.decay_start}")


@dataclass
class DataConfig:
    """The pretraining mixture: each document's source is drawn by these ratios."""

    mixture: dict[str, float] = field(
        default_factory=lambda: {"arith": 0.5, "dialogue": 0.2, "facts": 0.1, "code": 0.1, "copy": 0.1}
    )
    tokenizer_chars: int = 2_000_000  # text the BPE is trained on
    stream_margin: float = 1.05  # tokens built / tokens pretraining consumes
    # The first N pretraining steps read `copy` documents only (a stream of their own): a
    # curriculum in which nothing but copying lowers the loss, so the induction circuit
    # that reads numbers and names out of the context forms first, every run.
    copy_warmup_steps: int = 0
    # Share of `copy` documents that are lookups (a practice kingdom's passage, then its
    # facts restated) and of `facts` documents restated so: reading a value out of context.
    lookups: float = 0.2
    restate: float = 0.0

    def __post_init__(self) -> None:
        for name in ("lookups", "restate"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"data.{name} must be in [0, 1], got {getattr(self, name)}")


@dataclass
class SFTConfig(OptimConfig):
    # Share of each conversation kind in the SFT set (see training/conversations.py).
    mixture: dict[str, float] = field(
        default_factory=lambda: {
            "arith_cot": 0.4, "arith_direct": 0.08, "arith_tools": 0.14,
            "arith_reflect": 0.1, "facts_closed": 0.1, "facts_rag": 0.18,
        }
    )
    eval_items: int = 200  # held-out arith items scored greedily after the stage
    # Share of SFT rows that are pretraining ``facts`` passages, loss on every token: keeps
    # the seen world's facts in the weights through SFT (training/sft.py).
    replay: float = 0.0
    # Speed, not recipe: each batch, sorted by length, runs as this many forward passes,
    # each padded to its own longest row, with one optimiser step on the whole batch (the
    # same gradient). Rows range from 60 to 448 tokens, so one pass pads most to 448.
    micro_batches: int = 1
    # Loss weight of the tokens inside a tool call (``<tool_call>`` .. ``</tool_call>``),
    # against 1 for the rest of what the assistant wrote: the call must copy the text's
    # expression digit for digit, and some SFT draws leave one digit of that copy unlearnt
    # (training/sft.py call_weights).
    call_weight: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.call_weight <= 0:
            raise ValueError(f"call_weight must be > 0, got {self.call_weight}")
        if not 0.0 <= self.replay < 1.0:
            raise ValueError("replay is a share of the rows, in [0, 1)")
        if not 1 <= self.micro_batches <= self.batch_size:
            raise ValueError(f"micro_batches must be in [1, batch_size={self.batch_size}], "
                             f"got {self.micro_batches}")


@dataclass
class RewardConfig(OptimConfig):
    prompts: int = 256  # arith prompts sampled from the SFT model
    k: int = 4  # completions per prompt, ranked by the task scorer
    synthetic: int = 2  # written completions per prompt: an ideal one, the rest with one slip
    temperature: float = 1.0
    max_new_tokens: int = 160  # a 4-step solution is ~90 tokens; truncation must be rare
    heldout_fraction: float = 0.15  # prompts kept out to report pairwise accuracy


@dataclass
class RLConfig(OptimConfig):
    reward: Literal["rm", "checker", "both"] = "rm"
    group_size: int = 8  # samples per prompt; advantages are normalised within the group
    temperature: float = 1.0
    max_new_tokens: int = 160
    kl_coef: float = 0.05
    eval_items: int = 200
    # With reward "both": how much the reward model's ranking counts beside the labeller's.
    # "full": as much; "skill": in proportion to its held-out pairwise accuracy, 2 * acc - 1
    # (0 at chance, 1 when it ranks every pair right; training/rl.py rm_share), so a verifier
    # that ranks no better than a coin adds no noise to the policy's advantage.
    rm_trust: Literal["full", "skill"] = "full"


def _diversity() -> DiversityConfig:
    """The mode-collapse measure of each stage (``evals.diversity``; its seed is the run's)."""
    return DiversityConfig(prompts=16, k=8, max_new_tokens=64)


@dataclass
class RunConfig:
    preset: str = "test"
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    pretrain: OptimConfig = field(default_factory=OptimConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    rm: RewardConfig = field(default_factory=RewardConfig)
    rl: RLConfig = field(default_factory=RLConfig)
    diversity: DiversityConfig = field(default_factory=_diversity)
    arith: ArithConfig = field(default_factory=ArithConfig)
    facts: FactsConfig = field(default_factory=FactsConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _test() -> RunConfig:
    return RunConfig(
        preset="test",
        model=ModelConfig(vocab_size=1024, hidden_size=64, intermediate_size=128, num_layers=2,
                          num_heads=2, num_kv_heads=2, max_seq_len=512),
        data=DataConfig(tokenizer_chars=300_000, copy_warmup_steps=10),
        pretrain=OptimConfig(steps=80, batch_size=8, seq_len=128, lr=5e-3, warmup_steps=5,
                             checkpoint_every=10),
        sft=SFTConfig(steps=80, batch_size=8, seq_len=384, lr=3e-3, warmup_steps=5, replay=0.1,
                      checkpoint_every=20, eval_items=16),
        rm=RewardConfig(steps=10, batch_size=4, lr=1e-3, warmup_steps=2, prompts=24, k=3,
                        max_new_tokens=32, checkpoint_every=5),
        rl=RLConfig(steps=3, batch_size=4, lr=1e-4, warmup_steps=1, group_size=3,
                    max_new_tokens=32, checkpoint_every=2, eval_items=16, reward="both",
                    rm_trust="skill"),  # tiny's RL, so that the tests run its path
        diversity=DiversityConfig(prompts=4, k=4, max_new_tokens=24),
        facts=FactsConfig(n_entities=60),
    )


# The loop's speed settings a preset can take (OptimConfig.autocast / .compile), measured on
# `tiny` here. Compiling pays when a stage runs many steps of one shape (pretraining: 35 s
# of compiling, cold, then 312 -> 185 ms a step); SFT's shapes vary, it recompiled three
# times (80 s) and runs its 360 steps eagerly faster. RM and RL sample one token at a time,
# where autocast's casts cost more than bfloat16 saves (RL: 163 s in bfloat16, 103-121 s in
# float32, when its sampling ran under the loop's autocast), so both sample in float32 and
# train in bfloat16: RL's 30 steps 148 -> 131 s, an RM step 0.98 -> 0.87 s (one thread).
BF16: dict[str, Any] = {"autocast": "native"}
FAST: dict[str, Any] = {**BF16, "compile": True}


def _tiny() -> RunConfig:
    # Tuned on 2 CPU cores: a small model with many optimizer steps learns to copy operands
    # from the question far sooner than a wider one with fewer steps (lr 8e-3 diverged).
    # The `copy` source makes copying from context reliable, which tools and retrieval need.
    return RunConfig(
        preset="tiny",
        model=ModelConfig(vocab_size=2048, hidden_size=128, intermediate_size=384, num_layers=4,
                          num_heads=4, num_kv_heads=4, max_seq_len=512),
        # Reading a value out of a passage (what rag needs) comes only when values are words
        # the model has met (a vocabulary of 24 per attribute, below) and lookups are 40% of
        # `copy` with half the passages restated; dialogue gave up 8 points of the mixture
        # for it so that `arith` keeps 45% (at 35%, one seed's base computed 2% in its head at step 1500).
        data=DataConfig(mixture={"arith": 0.45, "dialogue": 0.1, "facts": 0.1, "code": 0.02,
                                 "copy": 0.33}, lookups=0.4, restate=0.5),
        # 256-token windows that start at a document: a question and its whole solution
        # fit in one window, so the solution's numbers are always copyable from context.
        # Two abilities emerge late, each as a sudden jump, and both are needed: copying an
        # operand out of the question ("Max next uses 4?" must find "next uses 46", a key
        # four tokens deep; measured on held-out problems, teacher-forced) and adding in the
        # head. With 15% `copy` documents and 1100 steps the copy jump came at step 800-900
        # or never (it never came in two of five runs, so the base scored 0.5% and
        # everything built on it failed); with 25-30% it came at step 500-600 in both runs
        # tried, the arithmetic at 800-1000, so 1500 steps leave a margin for both.
        # lr 4e-3 kept the copy from ever forming (8e-3 diverged).
        # Pretraining compiled, in bfloat16 where the CPU computes it natively (`FAST`), SFT
        # in bfloat16 eagerly (`BF16`), RM and RL in float32: every figure of the demo was
        # measured so (README: Train).
        # The peak rate holds for 70% of the steps before the cosine (decay_start): the late
        # abilities form at 2e-3 rather than on the way down. Four pretrainings (two per seed),
        # probed teacher-forced: unseen values read 0.57-1.0, added in the head 0.86-0.93,
        # operands copied 1.0; the same day's cosine bases read 0.275 / 0.29 (seed 0) and 0.79
        # (seed 1) and added 0.80-0.83 (README: Train).
        pretrain=OptimConfig(steps=1500, batch_size=16, seq_len=256, lr=2e-3, warmup_steps=30,
                             decay_start=0.7, checkpoint_every=100, **FAST),
        # 15% of SFT rows replay the seen world's passages: without them SFT wore the base
        # model's recall of seen facts from 0.87 to 0.29 (teacher-forced) and closed book on
        # seen kingdoms scored 0%; with them recall stayed at 0.97 and closed book 72%.
        # Tool calls weigh 5 in SFT's loss (call_weight): on seed 0's base with seed 0's SFT
        # draw, the call's copy of the text's expression left the first operand's tens digit
        # unlearnt (teacher-forced p 0.28; `tools` 6%); weights 3 / 5 / 8 gave `tools` 10.0% /
        # 99.5% / 100.0% there. On seed 1's base 5 and 8 gave 99.5%, but 8 read passages
        # worse (`rag` 61.9% against 85.4% unweighted, 5: 83.2%; README: Tools).
        sft=SFTConfig(steps=360, batch_size=16, seq_len=448, lr=2e-3, warmup_steps=20,
                      checkpoint_every=100, replay=0.15, micro_batches=2, call_weight=5.0, mixture={
                          "arith_cot": 0.26, "arith_direct": 0.04, "arith_tools": 0.3,
                          "arith_reflect": 0.16, "facts_closed": 0.08, "facts_rag": 0.16}, **BF16),
        rm=RewardConfig(steps=120, batch_size=8, lr=1e-3, warmup_steps=10, prompts=384,
                        checkpoint_every=40, **BF16),
        # The reward model's scalar plus the labeller's own verdict: a verifier of a million
        # parameters is right on some pairs, not all, and RL finds its blind spots within a
        # few dozen steps; the labeller's signal keeps the policy honest. The reward model
        # counts by its held-out ranking skill (rm_trust): at chance it adds only noise
        # (README: RLHF).
        rl=RLConfig(steps=30, batch_size=8, lr=5e-5, warmup_steps=3, checkpoint_every=10,
                    reward="both", rm_trust="skill", **BF16),
        facts=FactsConfig(vocabulary=24),
    )


def _small() -> RunConfig:
    return RunConfig(
        preset="small",
        model=ModelConfig(vocab_size=4096, hidden_size=512, intermediate_size=1536, num_layers=8,
                          num_heads=8, num_kv_heads=8, max_seq_len=1024),
        pretrain=OptimConfig(steps=3000, batch_size=64, seq_len=512, lr=2e-3, warmup_steps=100,
                             checkpoint_every=500),
        sft=SFTConfig(steps=1500, batch_size=64, seq_len=512, lr=5e-4, warmup_steps=50,
                      checkpoint_every=500, eval_items=500),
        rm=RewardConfig(steps=300, batch_size=16, lr=1e-4, prompts=2048, k=8,
                        checkpoint_every=100),
        rl=RLConfig(steps=200, batch_size=32, lr=1e-5, group_size=8, checkpoint_every=50,
                    eval_items=500),
        diversity=DiversityConfig(prompts=64, k=16, max_new_tokens=64),
        arith=ArithConfig(min_steps=3, max_steps=4, min_operand=100, max_operand=2999,
                          max_value=9999),
        facts=FactsConfig(n_entities=2000),
    )


PRESETS = {"test": _test, "tiny": _tiny, "small": _small}


def preset(name: str) -> RunConfig:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; expected one of {', '.join(PRESETS)}")
    return PRESETS[name]()


def _coerce(raw: str, kind: Any, where: str) -> Any:
    origin = typing.get_origin(kind)
    if origin is Literal:
        if raw not in typing.get_args(kind):
            raise ConfigError(f"{where}: expected one of {', '.join(typing.get_args(kind))}")
        return raw
    if kind is bool:
        if raw.lower() not in ("true", "false", "1", "0"):
            raise ConfigError(f"{where}: expected true or false")
        return raw.lower() in ("true", "1")
    if kind in (int, float, str):
        try:
            return kind(raw)
        except ValueError as exc:
            raise ConfigError(f"{where}: {raw!r} is not a {kind.__name__}") from exc
    if origin in (tuple, dict) or isinstance(kind, types.GenericAlias):
        if origin is tuple:
            return tuple(x for x in raw.split(",") if x)
        pairs = {}
        for item in raw.split(","):
            key, sep, value = item.partition(":")
            if not sep:
                raise ConfigError(f"{where}: expected key:value,key:value")
            pairs[key.strip()] = _coerce(value, float, where)
        return pairs
    raise ConfigError(f"{where}: cannot be set from the command line")


def apply_overrides(config: RunConfig, overrides: list[str]) -> RunConfig:
    """Apply ``section.field=value`` overrides, checking names and types."""
    for item in overrides:
        path, sep, raw = item.partition("=")
        if not sep:
            raise ConfigError(f"--set {item!r}: expected section.field=value")
        *parents, name = path.split(".")
        chain: list[Any] = [config]
        for part in parents:
            if not dataclasses.is_dataclass(chain[-1]) or not hasattr(chain[-1], part):
                raise ConfigError(f"--set {item!r}: no section {part!r}")
            chain.append(getattr(chain[-1], part))
        target = chain[-1]
        fields = {f.name for f in dataclasses.fields(target)} if dataclasses.is_dataclass(target) else set()
        if name not in fields or dataclasses.is_dataclass(getattr(target, name)):
            raise ConfigError(f"--set {item!r}: no field {path!r}")
        if path == "preset":  # the label of the preset the run started from, not a switch
            raise ConfigError(f"--set {item!r}: choose the preset with --preset")
        value = _coerce(raw, typing.get_type_hints(type(target))[name], f"--set {path}")
        try:
            updated = dataclasses.replace(target, **{name: value})  # frozen sections validate here
        except ValueError as exc:
            raise ConfigError(f"--set {path}: {exc}") from exc
        # Write back up the chain; frozen sections (the task configs) are replaced, not mutated.
        for parent, part in zip(reversed(chain[:-1]), reversed(parents), strict=True):
            if not type(parent).__dataclass_params__.frozen:
                setattr(parent, part, updated)
                break
            updated = dataclasses.replace(parent, **{part: updated})
        else:  # no section held it (a top-level field, e.g. seed): the replaced copy is the config
            config = updated
    return config
