"""`assist serve` as a user runs it: a real process, a real port, Ctrl-C to stop."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time

import httpx
import openai
import pytest

from tests.conftest import ASSIST, REPO, run_assist


@pytest.mark.parametrize("args, says", [
    ([], "exactly one of --model"),
    (["--model", "nowhere"], "--model nowhere"),
    (["--upstream", "ftp://x"], "--upstream ftp://x"),
    (["--model", "x", "--upstream", "http://h/v1"], "exactly one of"),
    (["--port", "http"], "--port"),
    (["--engine", "tensorrt"], "--engine"),
    (["--upstream", "http://h/v1", "--compile"], "--compile set up a checkpoint"),
])
def test_bad_flags_are_one_line_and_exit_2(args, says):
    proc = run_assist("serve", *args, timeout=60)
    assert proc.returncode == 2
    assert says in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_port_in_use_is_one_line_before_the_model_loads(trained_run):
    """The socket is bound first: a taken port fails at once, and nothing started later (a
    vLLM child picking a free port) can take the endpoint's own."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = run_assist("serve", "--model", str(trained_run[0] / "rlhf"), "--port", str(port), timeout=60)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"cannot listen on 127.0.0.1:{port}" in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1  # no model was loaded (its progress bar would show)


@pytest.mark.slow
def test_serve_answers_and_stops_on_ctrl_c(trained_run):
    run, _ = trained_run
    port = _free_port()
    proc = subprocess.Popen([*ASSIST, "serve", "--model", str(run / "rlhf"), "--port", str(port),
                             "--api-key", "k"], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "assist serve did not come up"
            time.sleep(0.2)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="k", max_retries=0)
        resp = client.chat.completions.create(model="assistant", messages=[{"role": "user", "content": "Hi"}],
                                              max_tokens=8, temperature=0)
        assert resp.choices[0].message.content is not None and resp.usage.completion_tokens > 0
        assert [m.id for m in client.models.list().data][0] == "assistant"
    finally:
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
    assert proc.returncode in (0, 130), out
    assert "Traceback" not in out
