"""The OpenAI-compatible endpoint: ``assist serve`` or ``create_app(backend)`` in Python.

Routes (``_app``) are thin; ``_serving`` holds routing, admission and accounting;
``_backend`` adapts an in-process engine or upstream servers; ``_protocol`` validates
request bodies.
"""

from assist.server._app import create_app
from assist.server._backend import Backend, EngineBackend, UpstreamBackend
from assist.server._launch import ServeConfig, build_backend, serve
from assist.server._serving import SEPARATOR, split_model
from assist.server._viewer import EvalRun, load_run, serve_viewer, viewer_app

__all__ = [
    "SEPARATOR",
    "Backend",
    "EngineBackend",
    "EvalRun",
    "ServeConfig",
    "UpstreamBackend",
    "build_backend",
    "create_app",
    "load_run",
    "serve",
    "serve_viewer",
    "split_model",
    "viewer_app",
]
