"""``assist serve``: typed configuration, the backend it names, and the uvicorn run.

The CLI flags are generated from :class:`ServeConfig`, so the help text, the defaults and
the Python API cannot drift apart.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from assist.errors import BadRequest, UpstreamError
from assist.server._backend import Backend, EngineBackend, UpstreamBackend

__all__ = ["ServeConfig", "add_serve_flags", "build_backend", "build_policy", "config_from_args", "serve"]

log = logging.getLogger("assist.server")


@dataclass
class ServeConfig:
    model: str | None = field(default=None, metadata={"help": "checkpoint folder, e.g. runs/tiny/rlhf"})
    engine: str = field(default="torch", metadata={"help": "torch | vllm (in-process engine for --model)"})
    upstream: list[str] = field(default_factory=list, metadata={
        "help": "proxy to an OpenAI-compatible server instead (base URL, e.g. http://h:8000/v1); "
                "repeat or comma-separate for replicas"})
    upstream_model: str | None = field(default=None, metadata={"help": "model name on the upstream (default: its first)"})
    upstream_api_key: str | None = field(default=None, metadata={"help": "API key sent to the upstream"})
    served_model_name: str = field(default="assistant", metadata={"help": "the model name clients ask for"})
    host: str = field(default="127.0.0.1", metadata={"help": "interface to listen on"})
    port: int = field(default=8000, metadata={"help": "port to listen on"})
    api_key: str | None = field(default=None, metadata={
        "help": "require this bearer key on every route but /health (/metrics and the docs included)"})
    public_metrics: bool = field(default=False, metadata={"help": "with --api-key: serve /metrics without the key"})
    public_docs: bool = field(default=False, metadata={
        "help": "with --api-key: serve /docs, /redoc and /openapi.json without the key"})
    allowed_hosts: list[str] = field(default_factory=list, metadata={
        "help": "Host header names served, comma-separated ('*.example.com' for subdomains, '*' for any); "
                "others get 400 (DNS rebinding). Default: localhost, 127.0.0.1 and ::1 when --host is "
                "loopback, else any"})
    max_in_flight: int = field(default=256, metadata={
        "help": "model calls accepted at once, each request counted at its worst case (n, prompts x n, "
                "n x a strategy's calls); beyond: 429 + Retry-After"})
    max_batch: int = field(default=64, metadata={"help": "torch engine: sequences decoded together"})
    max_body_bytes: int = field(default=4 << 20, metadata={"help": "larger request bodies get 413"})
    access_log: bool = field(default=False, metadata={"help": "log every request (costs CPU per request)"})
    # The strategy policy: what a spec from a client may ask of this server (strategies._policy).
    resource: list[str] = field(default_factory=list, metadata={
        "help": "KIND[:NAME]=PATH, loaded at start for strategies to use by NAME (default: 'default'); "
                "KIND: rm (reward model, bon:rm=NAME), store (document store, read-only, rag:store=NAME), "
                "schema (JSON schema file, json:schema=NAME); repeat for more"})
    strategies: str | None = field(default=None, metadata={
        "help": "comma-separated strategy names clients may use (default: all built-ins)"})
    allow_python: bool = field(default=False, metadata={
        "help": "let the tools strategy run the sandboxed python tool (off by default)"})
    max_depth: int = field(default=3, metadata={"help": "strategies nested in one spec, e.g. sc(reflect(cot)) is 3"})
    max_k: int = field(default=32, metadata={"help": "the largest @K in a strategy spec"})
    max_calls: int = field(default=256, metadata={
        "help": "worst-case model calls of one request (n x its strategy's, prompts x n)"})
    max_total_tokens: int = field(default=65536, metadata={
        "help": "worst-case completion tokens of one strategy request (calls x max_tokens)"})


def add_serve_flags(parser: argparse.ArgumentParser) -> None:
    for f in dataclasses.fields(ServeConfig):
        flag = "--" + f.name.replace("_", "-")
        kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", "str")
        if f.type in ("bool", bool):
            parser.add_argument(flag, action="store_true", help=f.metadata["help"])
        elif f.name == "upstream":
            parser.add_argument(flag, action="append", metavar="URL", help=f.metadata["help"])
        elif f.name == "allowed_hosts":
            parser.add_argument(flag, action="append", metavar="HOSTS", help=f.metadata["help"])
        elif f.name == "resource":
            parser.add_argument(flag, action="append", metavar="KIND[:NAME]=PATH", help=f.metadata["help"])
        elif f.name == "engine":
            parser.add_argument(flag, choices=("torch", "vllm"), default=f.default, help=f.metadata["help"])
        elif kind.startswith("int"):
            parser.add_argument(flag, type=int, default=f.default, help=f.metadata["help"])
        else:
            parser.add_argument(flag, default=f.default, help=f.metadata["help"])


def config_from_args(args: argparse.Namespace) -> ServeConfig:
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(ServeConfig)}
    urls = [u.strip() for item in (values["upstream"] or []) for u in item.split(",") if u.strip()]
    values["upstream"] = urls
    values["allowed_hosts"] = [h.strip() for item in (values["allowed_hosts"] or []) for h in item.split(",")
                               if h.strip()]
    cfg = ServeConfig(**values)
    if cfg.api_key is not None and not cfg.api_key.strip():
        raise BadRequest("--api-key is empty: give a key, or leave the flag out to serve without one",
                         param="--api-key")
    if bool(cfg.model) == bool(cfg.upstream):
        raise BadRequest("give exactly one of --model (serve a checkpoint) or --upstream (proxy a server)",
                         param="--model")
    if cfg.model and not (Path(cfg.model) / "config.json").is_file():
        raise BadRequest(f"--model {cfg.model}: no Hugging Face checkpoint (config.json) there", param="--model")
    for url in cfg.upstream:
        if not url.startswith(("http://", "https://")):
            raise BadRequest(f"--upstream {url}: expected an http(s) URL", param="--upstream")
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
        from strategies import REGISTRY
        from strategies._policy import PolicyError, parse_resource
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


def build_policy(cfg: ServeConfig) -> Any:
    """The strategy policy ``cfg`` names, its resources loaded now (None without the
    strategies package). ``$ASSIST_REWARD_MODEL`` and ``$ASSIST_RAG_STORE``, when set, are
    the ``default`` reward model and store unless ``--resource`` names one."""
    import os

    try:
        from strategies import Limits, Policy, PolicyError
        from strategies._policy import parse_resource
    except ImportError:
        return None
    resources = list(cfg.resource or [])
    try:
        given = {parse_resource(r)[:2] for r in resources}
        for kind, env in (("rm", "ASSIST_REWARD_MODEL"), ("store", "ASSIST_RAG_STORE")):
            if os.environ.get(env) and (kind, "default") not in given:
                resources.append(f"{kind}={os.environ[env]}")
        limits = Limits(max_depth=cfg.max_depth, max_k=cfg.max_k, max_calls=cfg.max_calls,
                        max_total_tokens=cfg.max_total_tokens)
        return Policy.load(resources, strategies=_names(cfg.strategies) if cfg.strategies else None,
                           allow_python=cfg.allow_python, limits=limits)
    except PolicyError as exc:
        raise BadRequest(str(exc), param="--resource") from None


def allowed_hosts(cfg: ServeConfig) -> list[str] | None:
    """The ``Host`` names to serve: ``--allowed-hosts``; else, on a loopback interface (the
    default), the loopback names only, so a web page cannot reach the server by rebinding
    its own name to 127.0.0.1; else None (any: clients may use any name for a public
    interface; pass --allowed-hosts or --api-key there)."""
    if cfg.allowed_hosts:
        return list(cfg.allowed_hosts)
    host = cfg.host.strip("[]").lower()
    if host in ("localhost", "::1") or host.startswith("127."):
        return ["localhost", "127.0.0.1", "::1", host]
    return None


def _upstream_model(url: str, api_key: str | None) -> str:
    """Ask the first replica which model it serves (a plain sync call before the loop starts)."""
    import httpx

    base = url.rstrip("/")
    base = base if base.endswith("/v1") else base + "/v1"
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        data = httpx.get(base + "/models", headers=headers, timeout=10).raise_for_status().json()
        return str(data["data"][0]["id"])
    except (httpx.HTTPError, KeyError, IndexError, ValueError) as exc:
        raise UpstreamError(f"--upstream {url}: could not list its models ({exc}); "
                            "pass --upstream-model") from exc


def build_backend(cfg: ServeConfig) -> Backend:
    """The backend ``cfg`` names; a vLLM child process is started here and owned by it."""
    from assist._remote import RemoteChatModel

    if cfg.upstream:
        model = cfg.upstream_model or _upstream_model(cfg.upstream[0], cfg.upstream_api_key)
        return UpstreamBackend(RemoteChatModel(cfg.upstream, model, cfg.upstream_api_key))
    assert cfg.model is not None
    if cfg.engine == "vllm":
        from assist.engine._vllm import VLLMClient, VLLMServer

        server = VLLMServer(cfg.model).start()
        remote = VLLMClient(server)  # chat prompts go as ids encoded here: message text stays text
        return UpstreamBackend(remote, context_length=getattr(server, "max_model_len", None), owned=server)
    from assist.engine import TorchEngine

    return EngineBackend(TorchEngine(cfg.model, max_batch=cfg.max_batch, name=cfg.served_model_name))


def serve(cfg: ServeConfig) -> None:
    """Build the backend and run the endpoint until interrupted (the backend closes with it)."""
    import uvicorn

    from assist.server._app import create_app

    policy = build_policy(cfg)  # resources load before the backend starts: a bad one fails fast
    try:
        backend = build_backend(cfg)
    except BaseException:
        if policy is not None:
            policy.close()
        raise
    try:
        names = [cfg.served_model_name] + ([cfg.model] if cfg.model else [])
        aliases: list[str] = []
        try:
            import strategies

            aliases = list(getattr(strategies, "EXAMPLES", ()))
        except ImportError:
            pass
        hosts = allowed_hosts(cfg)
        if hosts is None and cfg.api_key is None:
            log.warning("serving %s with no --api-key and any Host header: anyone who can reach it can use "
                        "it; pass --api-key, --allowed-hosts or both", cfg.host)
        app = create_app(backend, names=names, api_key=cfg.api_key, max_body_bytes=cfg.max_body_bytes,
                         max_in_flight=cfg.max_in_flight, strategy_aliases=aliases, policy=policy,
                         public_metrics=cfg.public_metrics, public_docs=cfg.public_docs,
                         allowed_hosts=hosts)
        uvicorn.run(app, host=cfg.host, port=cfg.port, log_level="info", access_log=cfg.access_log,
                    timeout_graceful_shutdown=5)
    finally:
        if policy is not None:
            policy.close()
        owned: Any = getattr(backend, "owned", None)
        if owned is not None:  # lifespan normally closed it; a failed start must not orphan vLLM
            owned.close()
