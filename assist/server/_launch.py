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

__all__ = ["ServeConfig", "add_serve_flags", "build_backend", "config_from_args", "serve"]

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
    api_key: str | None = field(default=None, metadata={"help": "require this bearer key on /v1 routes"})
    max_in_flight: int = field(default=256, metadata={"help": "requests accepted at once; beyond: 429 + Retry-After"})
    max_batch: int = field(default=64, metadata={"help": "torch engine: sequences decoded together"})
    max_body_bytes: int = field(default=4 << 20, metadata={"help": "larger request bodies get 413"})
    access_log: bool = field(default=False, metadata={"help": "log every request (costs CPU per request)"})


def add_serve_flags(parser: argparse.ArgumentParser) -> None:
    for f in dataclasses.fields(ServeConfig):
        flag = "--" + f.name.replace("_", "-")
        kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", "str")
        if f.type in ("bool", bool):
            parser.add_argument(flag, action="store_true", help=f.metadata["help"])
        elif f.name == "upstream":
            parser.add_argument(flag, action="append", metavar="URL", help=f.metadata["help"])
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
    cfg = ServeConfig(**values)
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
    return cfg


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
        from assist.engine._vllm import VLLMServer

        server = VLLMServer(cfg.model).start()
        remote = RemoteChatModel(server.base_url, server.served_model_name)
        return UpstreamBackend(remote, context_length=getattr(server, "max_model_len", None), owned=server)
    from assist.engine import TorchEngine

    return EngineBackend(TorchEngine(cfg.model, max_batch=cfg.max_batch, name=cfg.served_model_name))


def serve(cfg: ServeConfig) -> None:
    """Build the backend and run the endpoint until interrupted (the backend closes with it)."""
    import uvicorn

    from assist.server._app import create_app

    backend = build_backend(cfg)
    try:
        names = [cfg.served_model_name] + ([cfg.model] if cfg.model else [])
        aliases: list[str] = []
        try:
            import strategies

            aliases = list(getattr(strategies, "EXAMPLES", ()))
        except ImportError:
            pass
        app = create_app(backend, names=names, api_key=cfg.api_key, max_body_bytes=cfg.max_body_bytes,
                         max_in_flight=cfg.max_in_flight, strategy_aliases=aliases)
        uvicorn.run(app, host=cfg.host, port=cfg.port, log_level="info", access_log=cfg.access_log,
                    timeout_graceful_shutdown=5)
    finally:
        owned: Any = getattr(backend, "owned", None)
        if owned is not None:  # lifespan normally closed it; a failed start must not orphan vLLM
            owned.close()
