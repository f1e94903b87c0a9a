"""The project's one error tree: every error it raises on purpose is an ``AssistError``.

Each class carries two statuses: ``status``, the HTTP status OpenAI would use (the server
turns any of them into OpenAI's nested error shape without knowing where it came from),
and ``exit_status``, what a command exits with (2: the user can fix it; the CLI prints
one line, never a traceback). Engines and clients map third-party failures (httpx, vLLM,
torch) to these at their boundary; the other packages subclass the branch that fits:

- :class:`BadRequest` (400): bad input, a bad option, flag, file or config: the
  strategies' ``SpecError`` (and ``LimitError``), ``OptionError``, ``PolicyError``,
  ``StoreError``, ``IngestError``, ``ToolError``, ``CalculatorError``; the evals'
  ``EvalError`` and ``JsonlError``; training's ``ConfigError``, ``RunError`` and
  ``CheckpointError``.
- :class:`NotFound` (404): an unknown name (model, tool; a ``SpecError`` for an unknown
  strategy answers 404 too).
- :class:`Unavailable` (503): something the work needs cannot be loaded or started (an
  optional package: ``EmbedderError``; a vLLM child: ``VLLMStartError``).
- :class:`Overloaded` (429), :class:`Unauthorized` (401), :class:`UpstreamError` (502) and
  :class:`UpstreamTimeout` (504).

Python callers catch one family: ``except AssistError``.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "AssistError",
    "BadRequest",
    "ContextLengthExceeded",
    "NotFound",
    "Overloaded",
    "Unauthorized",
    "Unavailable",
    "UpstreamError",
    "UpstreamTimeout",
]


class AssistError(Exception):
    """Base class: ``status`` is the HTTP status, ``type``/``param``/``code`` OpenAI's
    fields, ``exit_status`` the command's exit status (the CLI prints ``message``)."""

    status = 500
    type = "server_error"
    exit_status = 2

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code

    def to_openai(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class BadRequest(AssistError, ValueError):
    """The request is invalid (names the offending parameter in ``param``)."""

    status = 400
    type = "invalid_request_error"


class ContextLengthExceeded(BadRequest):
    """Prompt plus ``max_tokens`` do not fit the model's context."""

    def __init__(self, message: str, *, param: str | None = "messages") -> None:
        super().__init__(message, param=param, code="context_length_exceeded")


class Unauthorized(AssistError):
    status = 401
    type = "authentication_error"


class NotFound(AssistError, LookupError):
    """Unknown model or strategy."""

    status = 404
    type = "invalid_request_error"


class Overloaded(AssistError):
    """Queue full: retry after ``retry_after`` seconds (HTTP 429 with ``Retry-After``)."""

    status = 429
    type = "rate_limit_error"

    def __init__(self, message: str, *, retry_after: float = 1.0) -> None:
        super().__init__(message, code="overloaded")
        self.retry_after = retry_after


class Unavailable(AssistError, RuntimeError):
    """Something the work needs cannot be loaded or started: an optional package that is
    not installed, a child server that would not come up (HTTP 503)."""

    status = 503
    type = "service_unavailable"


class UpstreamError(AssistError):
    """A remote server failed or could not be reached (HTTP 502)."""

    status = 502
    type = "upstream_error"

    def __init__(self, message: str, *, upstream_status: int | None = None, code: str | None = None) -> None:
        super().__init__(message, code=code)
        self.upstream_status = upstream_status


class UpstreamTimeout(UpstreamError):
    """A remote server did not answer in time (HTTP 504)."""

    status = 504
    type = "upstream_timeout"
