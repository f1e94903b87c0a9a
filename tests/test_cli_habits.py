"""CLI habits users bring from vLLM, lm-eval and inspect: ``--version``, ``--log-level``,
environment defaults (``ASSIST_API_KEY``, ``OPENAI_BASE_URL``, ``OPENAI_API_KEY``), vLLM's
own arguments after ``--``, ``--dtype`` / ``--max-model-len`` on both engines, and
``--epochs`` for ``--samples``."""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import logging
import os
import signal
import subprocess
import time

import httpx
import pytest

from assist.cli import build_parser, main, run_parsed
from assist.cli._flags import from_args
from assist.errors import BadRequest
from tests.conftest import ASSIST, REPO

ENV_VARS = ("ASSIST_API_KEY", "OPENAI_BASE_URL", "OPENAI_API_KEY")


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    for name in ENV_VARS:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def ckpt(tmp_path):
    """A folder that passes the flag checks (config.json); nothing loads it."""
    (tmp_path / "config.json").write_text("{}")
    return str(tmp_path)


def parse(*argv: str) -> argparse.Namespace:
    return build_parser(argv[0]).parse_args(list(argv))


def help_of(capsys, *argv: str) -> str:
    with pytest.raises(SystemExit) as exc:
        main([*argv, "--help"])
    assert exc.value.code == 0
    return " ".join(capsys.readouterr().out.split())  # argparse wraps lines


# -- --version --------------------------------------------------------------------------------
@pytest.mark.parametrize("argv", [["--version"], ["serve", "--version"], ["eval", "run", "--version"]])
def test_version_is_the_package_metadata(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == f"assist {importlib.metadata.version('assist')}"


# -- --log-level ------------------------------------------------------------------------------
def test_log_level_is_parsed_before_or_after_the_command():
    assert parse("eval", "ls").log_level == "info"  # the default
    assert build_parser("eval").parse_args(["--log-level", "debug", "eval", "ls"]).log_level == "debug"
    assert parse("eval", "ls", "--log-level", "error").log_level == "error"
    assert parse("chat", "--model", "m", "--log-level", "warning").log_level == "warning"
    with pytest.raises(SystemExit):
        parse("eval", "ls", "--log-level", "loud")


def test_logging_is_set_up_once_per_command_at_its_level(capsys):
    root_before, handlers_before = logging.getLogger().level, list(logging.getLogger().handlers)

    def command(args):
        logging.getLogger("assist.x").info("an info line")
        logging.getLogger("assist.x").debug("a debug line")
        logging.getLogger("httpx").info("HTTP Request: one per request")
        return 0

    assert run_parsed(argparse.Namespace(func=command, log_level="info")) == 0
    err = capsys.readouterr().err
    assert "INFO assist.x: an info line" in err and "debug line" not in err
    assert "HTTP Request" not in err  # the clients' per-request lines wait for debug
    run_parsed(argparse.Namespace(func=command, log_level="debug"))
    err = capsys.readouterr().err
    assert "a debug line" in err and "HTTP Request" in err
    run_parsed(argparse.Namespace(func=command, log_level="warning"))
    assert capsys.readouterr().err == ""
    # Each command's setup is undone: the process (a test session) is as it was.
    assert logging.getLogger().level == root_before and logging.getLogger().handlers == handlers_before


def test_serve_hands_the_log_level_to_uvicorn(ckpt, monkeypatch):
    import uvicorn

    import assist.server._app as app_module
    import assist.server._launch as launch

    seen: dict = {}
    monkeypatch.setattr(launch, "build_backend", lambda cfg: object())
    monkeypatch.setattr(app_module, "create_app", lambda backend, **kw: "app")

    class Server:  # uvicorn's, run on the socket serve bound
        def __init__(self, config: uvicorn.Config) -> None:
            seen["log_level"] = config.log_level

        def run(self, sockets: list) -> None:
            seen["sockets"] = len(sockets)

    monkeypatch.setattr(uvicorn, "Server", Server)
    bind = launch.listen
    monkeypatch.setattr(launch, "listen", lambda host, port: bind(host, 0))  # any free port, not 8000
    assert main(["serve", "--model", ckpt, "--log-level", "debug"]) == 0
    assert seen["log_level"] == "debug" and seen["sockets"] == 1
    assert main(["--log-level", "error", "serve", "--model", ckpt]) == 0
    assert seen["log_level"] == "error"
    assert main(["serve", "--model", ckpt]) == 0
    assert seen["log_level"] == "info"


# -- environment defaults ---------------------------------------------------------------------
def test_serve_reads_assist_api_key_and_the_flag_wins(ckpt, monkeypatch, capsys):
    from assist.cli.serve import config_from_args

    assert config_from_args(parse("serve", "--model", ckpt)).api_key is None
    monkeypatch.setenv("ASSIST_API_KEY", "from-env")
    assert config_from_args(parse("serve", "--model", ckpt)).api_key == "from-env"
    assert config_from_args(parse("serve", "--model", ckpt, "--api-key", "flag")).api_key == "flag"
    for empty in ("", "  "):  # set but empty: refused, never "no key"
        monkeypatch.setenv("ASSIST_API_KEY", empty)
        with pytest.raises(BadRequest, match="ASSIST_API_KEY is set but empty"):
            config_from_args(parse("serve", "--model", ckpt))
        assert main(["serve", "--model", ckpt]) == 2
        assert "ASSIST_API_KEY is set but empty" in capsys.readouterr().err
    with pytest.raises(BadRequest, match="--api-key is empty"):
        config_from_args(parse("serve", "--model", ckpt, "--api-key", ""))
    assert "(env: ASSIST_API_KEY)" in help_of(capsys, "serve")


@pytest.mark.parametrize("form", [("eval", "run"), ("eval",)])
def test_eval_reads_openai_base_url_and_key(form, ckpt, monkeypatch):
    from evals.run import EvalConfig

    monkeypatch.setenv("OPENAI_BASE_URL", "http://h:8000/v1")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-env")
    cfg = from_args(EvalConfig, parse(*form, "--task", "arith"))
    assert (cfg.base_url, cfg.api_key) == ("http://h:8000/v1", "sk-env")
    cfg = from_args(EvalConfig, parse(*form, "--base-url", "http://other/v1", "--api-key", "k"))
    assert (cfg.base_url, cfg.api_key) == ("http://other/v1", "k")  # flags win
    cfg = from_args(EvalConfig, parse(*form, "--model", ckpt))  # a checkpoint: no server, no key
    assert (cfg.model, cfg.base_url, cfg.api_key) == (ckpt, None, None)
    monkeypatch.setenv("OPENAI_BASE_URL", "")  # empty: unset
    assert from_args(EvalConfig, parse(*form, "--model", ckpt)).base_url is None


def test_chat_reads_openai_base_url_and_key(ckpt, monkeypatch, capsys):
    from assist.cli.chat import ChatConfig

    with pytest.raises(SystemExit):  # neither --model nor --base-url, and no variable
        parse("chat")
    capsys.readouterr()
    monkeypatch.setenv("OPENAI_BASE_URL", "http://h:8000/v1")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-env")
    cfg = from_args(ChatConfig, parse("chat"))
    assert (cfg.base_url, cfg.api_key) == ("http://h:8000/v1", "sk-env")
    cfg = from_args(ChatConfig, parse("chat", "--model", ckpt))
    assert (cfg.model, cfg.base_url, cfg.api_key) == (ckpt, None, None)


@pytest.mark.parametrize("argv", [("eval", "run"), ("chat",)])
def test_help_names_the_variables_read(argv, capsys):
    text = help_of(capsys, *argv)
    assert "(env: OPENAI_BASE_URL)" in text and "(env: OPENAI_API_KEY)" in text
    assert "--log-level" in text and "--version" in text


# -- vLLM's own arguments after --, --dtype and --max-model-len ----------------------------------
VLLM_ARGV = ("serve", "--engine", "vllm", "--dtype", "bfloat16", "--max-model-len", "512",
             "--", "--max-model-len", "256", "--swap-space", "1")


def test_arguments_after_double_dash_reach_the_vllm_child(ckpt, monkeypatch):
    from assist.cli.serve import config_from_args
    from assist.engine._vllm import VLLMServer
    from assist.server._launch import build_backend

    cfg = config_from_args(parse(VLLM_ARGV[0], "--model", ckpt, *VLLM_ARGV[1:]))
    assert cfg.vllm_args == ["--max-model-len", "256", "--swap-space", "1"]
    started: list[VLLMServer] = []
    monkeypatch.setattr(VLLMServer, "start", lambda self, wait=True: started.append(self) or self)
    backend = build_backend(cfg)  # no child starts: start() is the stand-in above
    try:
        server = started[0]
        server.enforce_eager = True
        cmd = server.command()
        assert cmd[cmd.index("--dtype") + 1] == "bfloat16"
        assert cmd[cmd.index("--max-model-len") + 1] == "512"
        assert cmd[-4:] == ["--max-model-len", "256", "--swap-space", "1"]  # last: vLLM takes these
    finally:
        backend.owned.close()
    # No --dtype: the server's own default; no --max-model-len: none passed.
    cfg = config_from_args(parse("serve", "--model", ckpt, "--engine", "vllm"))
    backend = build_backend(cfg)
    try:
        cmd = started[1].command()
        assert cmd[cmd.index("--dtype") + 1] == "float32" and "--max-model-len" not in cmd
    finally:
        backend.owned.close()


@pytest.mark.parametrize("argv, message", [
    (("--", "--max-model-len", "256"), "need --model and --engine vllm"),
    (("stray",), "need --model and --engine vllm"),  # torch: nothing takes it
    (("--engine", "vllm", "--max-model-len", "0"), "must be at least 1"),
])
def test_bad_engine_arguments_are_one_line(argv, message, ckpt, capsys):
    assert main(["serve", "--model", ckpt, *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_dtype_and_context_cap_on_the_torch_engine(trained_run):
    import torch

    from assist.cli.serve import config_from_args
    from assist.server._launch import build_backend

    model = str(trained_run[0] / "rlhf")
    backend = build_backend(config_from_args(parse("serve", "--model", model, "--dtype", "bfloat16",
                                                   "--max-model-len", "64")))
    try:
        assert backend.engine.model.dtype == torch.bfloat16
        assert backend.engine.context_length == backend.context_length == 64
    finally:
        backend.engine.close()
    positions = json.loads((trained_run[0] / "rlhf" / "config.json").read_text())["max_position_embeddings"]
    with pytest.raises(BadRequest, match="positions"):
        build_backend(config_from_args(parse("serve", "--model", model,
                                             "--max-model-len", str(positions + 1))))


@pytest.mark.slow
def test_a_real_vllm_child_takes_the_arguments_after_double_dash(trained_run, tmp_path):
    pytest.importorskip("vllm")
    from assist.engine._vllm import _free_port

    port = _free_port("127.0.0.1")
    proc = subprocess.Popen([*ASSIST, "serve", "--model", str(trained_run[0] / "rlhf"), "--engine", "vllm",
                             "--port", str(port), "--log-level", "warning", "--", "--max-model-len", "256"],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"}, start_new_session=True)
    try:
        deadline, listed = time.monotonic() + 400, None
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                listed = httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=5).json()
                break
            except (httpx.HTTPError, ValueError):
                time.sleep(1)
        assert listed is not None, proc.stdout.read() if proc.poll() is not None else "not ready in time"
        assert any(m.get("max_model_len") == 256 for m in listed["data"]), listed
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


# -- --epochs ---------------------------------------------------------------------------------
@pytest.mark.parametrize("form", [("eval", "run"), ("eval",)])
def test_epochs_is_samples(form, capsys):
    from evals.run import EvalConfig

    assert from_args(EvalConfig, parse(*form, "--epochs", "3")).samples == 3
    assert from_args(EvalConfig, parse(*form, "--samples", "2")).samples == 2
    assert from_args(EvalConfig, parse(*form)).samples == 1
    assert "--samples SAMPLES, --epochs SAMPLES" in help_of(capsys, "eval", "run")


def test_version_flag_from_a_subprocess():
    proc = subprocess.run([*ASSIST, "--version"], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert proc.returncode == 0
    assert proc.stdout.strip() == f"assist {importlib.metadata.version('assist')}"
