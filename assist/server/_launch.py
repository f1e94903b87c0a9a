"""The server's typed configuration, the backend it names, and the uvicorn run.

``assist serve``'s flags are generated from :class:`ServeConfig` (by
:mod:`assist.cli.serve`), so the help text, the defaults and the Python API cannot drift
apart. The field metadata keys (``help``, ``choices``, ``metavar``, ``split``) are the ones
the flag generator reads.
"""

from __future__ import annotations

import logging
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from assist.errors import BadRequest
from assist.server._backend import Backend, EngineBackend, UpstreamBackend

__all__ = ["ServeConfig", "allowed_hosts", "build_backend", "build_policy", "listen", "serve", "vllm_options"]

log = logging.getLogger("assist.server")


@dataclass
class ServeConfig:
    model: str | None = field(default=None, metadata={"help": "checkpoint folder, e.g. runs/tiny/rlhf"})
    engine: str = field(default="torch", metadata={"help": "in-process engine for --model",
                                                   "choices": ("torch", "vllm")})
    upstream: list[str] = field(default_factory=list, metadata={
        "help": "proxy to an OpenAI-compatible server instead (base URL, e.g. http://h:8000/v1); "
                "repeat or comma-separate for replicas", "metavar": "URL", "split": True})
    upstream_model: str | None = field(default=None, metadata={"help": "model name on the upstream (default: its first)"})
    upstream_api_key: str | None = field(default=None, metadata={"help": "API key sent to the upstream"})
    served_model_name: str = field(default="assistant", metadata={"help": "the model name clients ask for"})
    host: str = field(default="127.0.0.1", metadata={"help": "interface to listen on"})
    port: int = field(default=8000, metadata={"help": "port to listen on"})
    api_key: str | None = field(default=None, metadata={
        "help": "require this bearer key on every route but /health (/metrics and the docs included)",
        "env": "ASSIST_API_KEY", "env_empty": True})
    public_metrics: bool = field(default=False, metadata={"help": "with --api-key: serve /metrics without the key"})
    public_docs: bool = field(default=False, metadata={
        "help": "with --api-key: serve /docs, /redoc and /openapi.json without the key"})
    allowed_hosts: list[str] = field(default_factory=list, metadata={
        "help": "Host header names served, comma-separated ('*.example.com' for subdomains, '*' for any); "
                "others get 400 (DNS rebinding). Default: localhost, 127.0.0.1 and ::1 when --host is "
                "loopback, else any", "metavar": "HOSTS", "split": True})
    max_in_flight: int = field(default=256, metadata={
        "help": "model calls accepted at once, each request counted at its worst case (n, prompts x n, "
                "n x a strategy's calls); beyond: 429 + Retry-After"})
    max_batch: int = field(default=64, metadata={"help": "torch engine: sequences decoded together"})
    prefix_cache_mb: float = field(default=64.0, metadata={  # the torch engine's PREFIX_CACHE_MB
        "help": "torch engine: memory in MiB for the keys and values of cached prompt prefixes, "
                "shared between requests, claimed at start (0: off)", "metavar": "MIB"})
    compile: bool = field(default=False, metadata={
        "help": "torch engine: run decode steps through torch.compile (needs a C++ compiler; "
                "starts seconds later, decodes about twice as fast at small batches on the CPU)"})
    dtype: str = field(default="auto", metadata={
        "help": "weights' dtype, both engines (default: auto: the torch engine bfloat16 on a GPU, "
                "float32 on the CPU; vllm float32)", "choices": ("auto", "float32", "bfloat16", "float16")})
    max_model_len: int | None = field(default=None, metadata={
        "help": "context length cap in tokens, prompt and completion together, both engines "
                "(default: the checkpoint's max_position_embeddings)", "metavar": "N"})
    max_body_bytes: int = field(default=4 << 20, metadata={"help": "larger request bodies get 413"})
    access_log: bool = field(default=False, metadata={"help": "log every request (costs CPU per request)"})
    # The strategy policy: what a spec from a client may ask of this server (strategies._policy).
    resource: list[str] = field(default_factory=list, metadata={
        "help": "KIND[:NAME]=PATH, loaded at start for strategies to use by NAME (default: 'default'); "
                "KIND: rm (reward model, bon:rm=NAME), store (document store, read-only, rag:store=NAME), "
                "schema (JSON schema file, json:schema=NAME); repeat for more",
        "metavar": "KIND[:NAME]=PATH"})
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
    vllm_args: list[str] = field(default_factory=list, metadata={
        "help": "after --: arguments for the vLLM server as they are (with --engine vllm; they come "
                "last, so they win), e.g. -- --max-model-len 256 --swap-space 1",
        "positional": True, "nargs": "*", "metavar": "-- VLLM_ARG"})
    log_level: str = field(default="info", metadata={
        "help": "uvicorn's log level (the command line's --log-level)", "cli": False})


def _names(text: str | None) -> list[str]:
    return [n.strip() for n in (text or "").split(",") if n.strip()]


def run_defaults(model: str | None) -> dict[str, Path]:
    """A checkpoint inside a training run (``runs/tiny/rlhf``) brings the run's own reward
    model (``runs/tiny/rm``) and the facts store its demo built (``runs/tiny/eval/facts/
    facts.sqlite``), so `assist serve --model runs/tiny/rlhf` serves bon and rag as the demo
    evaluated them. Paths beside the operator's own --model: nothing a client names."""
    if not model:
        return {}
    run = Path(model).resolve().parent
    if not (run / "metrics.json").is_file():  # not a training run's stage folder
        return {}
    found: dict[str, Path] = {}
    if (run / "rm" / "config.json").is_file():
        found["rm"] = run / "rm"
    if (store := run / "eval" / "facts" / "facts.sqlite").is_file():
        found["store"] = store
    return found


def build_policy(cfg: ServeConfig) -> Any:
    """The strategy policy ``cfg`` names, its resources loaded now (None without the
    strategies package). ``$ASSIST_REWARD_MODEL`` and ``$ASSIST_RAG_STORE``, when set, are
    the ``default`` reward model and store unless ``--resource`` names one."""
    import os

    try:
        from strategies import Limits, Policy, PolicyError, parse_resource
    except ImportError:
        return None
    resources = list(cfg.resource or [])
    try:
        given = {parse_resource(r)[:2] for r in resources}
        for kind, env in (("rm", "ASSIST_REWARD_MODEL"), ("store", "ASSIST_RAG_STORE")):
            if os.environ.get(env) and (kind, "default") not in given:
                resources.append(f"{kind}={os.environ[env]}")
                given.add((kind, "default"))
        for kind, path in run_defaults(cfg.model).items():
            if (kind, "default") not in given:
                log.info("default %s from the training run: %s (--resource %s=PATH for another)", kind, path, kind)
                resources.append(f"{kind}={path}")
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


def vllm_options(cfg: ServeConfig) -> dict[str, Any]:
    """The :class:`assist.engine._vllm.VLLMServer` options ``--dtype`` and ``--max-model-len``
    name (``auto``: the server's default); the arguments after ``--`` go as ``extra_args``."""
    options: dict[str, Any] = {}
    if cfg.dtype != "auto":
        options["dtype"] = cfg.dtype
    if cfg.max_model_len:
        options["max_model_len"] = cfg.max_model_len
    return options


def build_backend(cfg: ServeConfig) -> Backend:
    """The backend ``cfg`` names; a vLLM child process is started here and owned by it."""
    from assist._remote import RemoteChatModel, list_models
    from assist.errors import AssistError, UpstreamError

    if cfg.upstream:
        model = cfg.upstream_model
        if not model:  # ask the first replica which model it serves, before the loop starts
            try:
                model = str(list_models(cfg.upstream[0], cfg.upstream_api_key)[0]["id"])
            except (AssistError, IndexError, KeyError) as exc:
                raise UpstreamError(f"--upstream {cfg.upstream[0]}: could not list its models "
                                    f"({exc}); pass --upstream-model") from exc
        return UpstreamBackend(RemoteChatModel(cfg.upstream, model, cfg.upstream_api_key))
    assert cfg.model is not None
    if cfg.engine == "vllm":
        from assist.engine._vllm import VLLMClient, VLLMServer

        server = VLLMServer(cfg.model, extra_args=cfg.vllm_args, **vllm_options(cfg)).start()
        remote = VLLMClient(server)  # chat prompts go as ids encoded here: message text stays text
        return UpstreamBackend(remote, context_length=getattr(server, "max_model_len", None), owned=server)
    from assist.engine import TorchEngine

    return EngineBackend(TorchEngine(cfg.model, max_batch=cfg.max_batch, name=cfg.served_model_name,
                                     dtype=None if cfg.dtype == "auto" else cfg.dtype,
                                     max_len=cfg.max_model_len, prefix_cache_mb=cfg.prefix_cache_mb,
                                     compile=cfg.compile))


def _examples(model: str | None) -> list[dict[str, Any]]:
    """The playground's example prompts, from the task world the checkpoint was trained on."""
    from assist.server._web import task_examples

    return task_examples(model)


def listen(host: str, port: int) -> socket.socket:
    """The endpoint's socket, bound before anything slow starts: a port in use fails at once,
    and no port picked meanwhile (a vLLM child's) can take it."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds it
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise BadRequest(f"cannot listen on {host}:{port}: {exc.strerror or exc}", param="--port") from None
    return sock


def serve(cfg: ServeConfig) -> None:
    """Build the backend and run the endpoint until interrupted (the backend closes with it)."""
    import uvicorn

    from assist.server._app import create_app

    sock = listen(cfg.host, cfg.port)
    try:
        policy = build_policy(cfg)  # resources load before the backend starts: a bad one fails fast
    except BaseException:
        sock.close()
        raise
    try:
        backend = build_backend(cfg)
    except BaseException:
        sock.close()
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
                         allowed_hosts=hosts, examples=lambda: _examples(cfg.model))
        config = uvicorn.Config(app, host=cfg.host, port=cfg.port, log_level=cfg.log_level,
                                access_log=cfg.access_log, timeout_graceful_shutdown=5)
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        sock.close()
        if policy is not None:
            policy.close()
        owned: Any = getattr(backend, "owned", None)
        if owned is not None:  # lifespan normally closed it; a failed start must not orphan vLLM
            owned.close()
