"""``assist serve``: the server's flags (generated from :class:`assist.server.ServeConfig`),
their checks, and the run; the app, the serving and the backends live in :mod:`assist.server`.

``ASSIST_API_KEY`` is the key when ``--api-key`` is not given (set but empty, it is refused as
an empty ``--api-key`` is). With ``--engine vllm``, the arguments after ``--`` go to the vLLM
server as they are: ``assist serve --model M --engine vllm -- --max-model-len 256``.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any

from assist.cli._flags import add_flags, from_args
from assist.errors import BadRequest

if TYPE_CHECKING:
    from assist.server._launch import ServeConfig

__all__ = ["add_parser", "config_from_args"]


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    from assist.server._launch import ServeConfig

    s = subparsers.add_parser(
        "serve", help="serve a checkpoint or proxy a server behind an OpenAI-compatible API")
    add_flags(s, ServeConfig)
    s.set_defaults(func=_serve)
    return s


def _serve(args: argparse.Namespace) -> int:
    from assist.server import serve

    serve(config_from_args(args))
    return 0


def config_from_args(args: argparse.Namespace) -> ServeConfig:
    """The checked config the parsed flags name (:class:`assist.errors.BadRequest` names the
    flag at fault)."""
    from assist.server._launch import ServeConfig

    cfg = from_args(ServeConfig, args)
    if cfg.api_key is not None and not cfg.api_key.strip():
        where = "--api-key is empty" if getattr(args, "api_key", None) is not None else \
            "ASSIST_API_KEY is set but empty"
        raise BadRequest(f"{where}: give a key, or leave it out to serve without one",
                         param="--api-key")
    if bool(cfg.model) == bool(cfg.upstream):
        raise BadRequest("give exactly one of --model (serve a checkpoint) or --upstream (proxy a server)",
                         param="--model")
    if cfg.model and not (Path(cfg.model) / "config.json").is_file():
        raise BadRequest(f"--model {cfg.model}: no Hugging Face checkpoint (config.json) there", param="--model")
    for url in cfg.upstream:
        if not url.startswith(("http://", "https://")):
            raise BadRequest(f"--upstream {url}: expected an http(s) URL", param="--upstream")
    if cfg.vllm_args and (cfg.engine != "vllm" or not cfg.model):
        raise BadRequest(f"{' '.join(cfg.vllm_args)}: arguments after -- go to the vLLM server; "
                         "they need --model and --engine vllm", param="--engine")
    if cfg.compile and cfg.engine != "torch":
        raise BadRequest("--compile is for the torch engine (--engine torch); vLLM compiles by itself",
                         param="--compile")
    if cfg.upstream and (cfg.dtype != "auto" or cfg.max_model_len is not None or cfg.compile):
        raise BadRequest("--dtype, --max-model-len and --compile set up a checkpoint (--model), not --upstream",
                         param="--dtype")
    if cfg.max_model_len is not None and cfg.max_model_len < 1:
        raise BadRequest(f"--max-model-len {cfg.max_model_len}: must be at least 1", param="--max-model-len")
    if not cfg.prefix_cache_mb >= 0:
        raise BadRequest(f"--prefix-cache-mb {cfg.prefix_cache_mb}: must be >= 0 (0: off)", param="--prefix-cache-mb")
    if not 0 < cfg.port < 65536:
        raise BadRequest(f"--port {cfg.port}: not a port", param="--port")
    _check_policy_flags(cfg)
    return cfg


def _check_policy_flags(cfg: ServeConfig) -> None:
    """The policy flags' syntax and ranges (loading the resources waits for :func:`serve`)."""
    cfg.resource = list(cfg.resource or [])
    for name in ("max_in_flight", "max_depth", "max_k", "max_calls", "max_total_tokens"):
        if getattr(cfg, name) < 1:
            flag = "--" + name.replace("_", "-")
            raise BadRequest(f"{flag} {getattr(cfg, name)}: must be at least 1", param=flag)
    try:
        from strategies import REGISTRY, PolicyError, parse_resource
    except ImportError:
        if cfg.resource or cfg.strategies or cfg.allow_python:
            raise BadRequest("the policy flags need the strategies package", param="--resource") from None
        return
    try:
        for text in cfg.resource:
            parse_resource(text)
    except PolicyError as exc:
        raise BadRequest(str(exc), param="--resource") from None
    unknown = [n for n in _names(cfg.strategies) if n not in REGISTRY]
    if cfg.strategies is not None and (unknown or not _names(cfg.strategies)):
        raise BadRequest(f"--strategies {cfg.strategies}: unknown {', '.join(unknown) or 'empty list'} "
                         f"(known: {', '.join(sorted(REGISTRY))})", param="--strategies")


def _names(text: str | None) -> list[str]:
    return [n.strip() for n in (text or "").split(",") if n.strip()]
