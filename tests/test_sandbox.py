"""The sandbox's escape suite: writes outside its directory, sockets, a fork bomb, 10 GB,
an infinite loop, each against both the full sandbox and the prelude-only fallback
(``isolate=False``) where that makes sense; plus ordinary code, which must just work.

The fork bomb runs unbounded only after a bounded loop showed the kernel caps the tasks."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from strategies._sandbox import run_python
from strategies._toolbox import get_tool

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the sandbox is Linux-only")
BOTH = pytest.mark.parametrize("isolate", [True, False], ids=["kernel", "prelude-only"])
CTYPES_OPEN = "import ctypes\nprint(ctypes.CDLL(None).open({path!r}.encode(), 0o101, 0o644))\n"


def _session_members(sid: int) -> list[int]:
    members = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == sid:
            members.append(int(pid))
    return members


def test_ordinary_code_runs_in_a_throwaway_directory():
    code = ("import collections, json, math, os\n"
            "open('notes.txt', 'w').write(json.dumps({'pi': round(math.pi, 2)}))\n"
            "print(open('notes.txt').read())\nprint(os.getcwd())\n")
    result = run_python(code)
    assert result.ok and result.stderr == "" and not result.timed_out, result
    text, workdir = result.stdout.splitlines()
    assert text == '{"pi": 3.14}'
    assert not os.path.exists(workdir)  # removed after the run
    assert {"rlimits", "prelude-fs", "prelude-net"} <= set(result.protections)


def test_isolated_interpreter_and_minimal_environment():
    result = run_python("import os, sys\nprint(sorted(os.environ))\nimport pydantic\n")
    assert result.stdout.strip() == "['HOME', 'LANG', 'LC_ALL', 'PATH', 'TMPDIR']"
    assert "ModuleNotFoundError" in result.stderr and result.returncode == 1  # no site-packages
    assert "_sandbox_child" not in result.stderr  # the runner's frames are not the code's error


@BOTH
def test_writes_outside_the_directory_are_refused(isolate: bool, tmp_path: Path):
    escape = f"/tmp/escape_{uuid.uuid4().hex}"
    victim = tmp_path / "keep.txt"
    victim.write_text("mine")
    code = (f"for attempt in (lambda: open({escape!r}, 'w'), lambda: os.remove({str(victim)!r}),\n"
            f"                lambda: os.rename({str(victim)!r}, 'stolen')):\n"
            "    try:\n        attempt()\n        print('escaped')\n"
            "    except OSError as exc:\n        print('refused', exc.errno)\n")
    result = run_python("import os\n" + code, isolate=isolate)
    assert result.stdout.split().count("refused") == 3, result
    assert not os.path.exists(escape) and victim.read_text() == "mine"


def test_the_kernel_refuses_writes_that_bypass_the_prelude():
    escape = f"/tmp/escape_{uuid.uuid4().hex}"
    result = run_python(CTYPES_OPEN.format(path=escape))
    if "mountns-readonly" not in result.protections:
        pytest.skip(f"no mount namespace here: {result.protections}")
    assert result.stdout.strip() == "-1" and not os.path.exists(escape)


@BOTH
def test_no_connection_leaves_the_sandbox(isolate: bool):
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        server.setblocking(False)
        port = server.getsockname()[1]
        code = (f"import socket\ntry:\n    socket.create_connection(('127.0.0.1', {port}), timeout=1)\n"
                "    print('connected')\nexcept OSError as exc:\n    print('refused', exc)\n")
        if isolate:  # the class under the prelude's guard: only the network namespace stops it
            code += (f"try:\n    s = socket.socket.__mro__[1](socket.AF_INET, socket.SOCK_STREAM)\n"
                     f"    s.settimeout(1)\n    s.connect(('127.0.0.1', {port}))\n    print('connected')\n"
                     "except OSError as exc:\n    print('refused', exc)\n")
        result = run_python(code, isolate=isolate)
        assert "connected" not in result.stdout and "refused" in result.stdout, result
        if isolate and "netns" in result.protections:
            assert result.stdout.count("refused") == 2
        with pytest.raises(BlockingIOError):
            server.accept()  # nothing ever arrived


BOUNDED_FORKS = """
import os, time
made = 0
for _ in range(200):
    try:
        pid = os.fork()
    except OSError as exc:
        print('refused', exc.errno)
        break
    if pid == 0:
        time.sleep(30)
        os._exit(0)
    made += 1
print('made', made)
"""


def test_fork_bomb_is_bounded_and_cleaned_up():
    bounded = run_python(BOUNDED_FORKS, max_processes=8, timeout_s=5)
    assert "refused" in bounded.stdout, bounded  # the cap applies, well before 200
    assert int(bounded.stdout.split("made")[1]) <= 8
    assert _session_members(bounded.pid) == []  # the sleeping children are gone too
    if not {"cgroup-pids", "nproc"} & set(bounded.protections):
        pytest.skip(f"no kernel bound on tasks here, the prelude refuses forks: {bounded.protections}")
    bomb = run_python("import os\nwhile True:\n    os.fork()\n", max_processes=8, timeout_s=2)
    assert bomb.seconds < 2 + 3, bomb.seconds
    with pytest.raises(ProcessLookupError):
        os.killpg(bomb.pid, 0)
    assert _session_members(bomb.pid) == []
    assert subprocess.run(["true"]).returncode == 0  # the machine still forks
    assert run_python("print(1)").stdout == "1\n"


def test_code_that_leaves_the_session_is_still_killed():
    code = "import os, time\nprint(os.getcwd())\nos.setsid()\ntime.sleep(30)\n"
    result = run_python(code, timeout_s=1)
    workdir = result.stdout.strip()
    assert result.timed_out and workdir.startswith("/")
    for pid in filter(str.isdigit, os.listdir("/proc")):  # the runner's argv names its directory
        try:
            assert workdir not in open(f"/proc/{pid}/cmdline").read(), pid
        except OSError:
            pass


def test_prelude_refuses_forks_when_nothing_in_the_kernel_bounds_them():
    result = run_python(BOUNDED_FORKS, isolate=False, max_processes=8)
    if "prelude-fork" in result.protections:
        assert "refused" in result.stdout and "made 0" in result.stdout
    else:  # non-root: RLIMIT_NPROC is the bound
        assert "nproc" in result.protections and int(result.stdout.split("made")[1]) <= 8


def test_ten_gigabytes_fail():
    result = run_python("x = bytearray(10**10)\nprint('allocated')\n")
    assert "allocated" not in result.stdout and not result.ok
    assert "MemoryError" in result.stderr or result.killed_reason, result


def test_infinite_loop_times_out_on_the_wall_clock():
    result = run_python("while True:\n    pass\n", timeout_s=1.0)
    assert result.timed_out and result.killed_reason == "timeout"
    assert 1.0 <= result.seconds < 1.0 + 1.5, result.seconds


def test_output_is_capped_and_drained():
    result = run_python("import sys\nsys.stdout.write('x' * 200_000)\nprint('done', file=sys.stderr)\n",
                        max_output=1000)
    assert result.ok and result.truncated and result.stdout == "x" * 1000
    assert result.stderr == "done\n"


def test_python_tool_reports_output_and_errors():
    python = get_tool("python")
    assert asyncio.run(python.call({"code": "print(6 * 7)"})) == "42"
    failed = asyncio.run(python.call({"code": "print('before')\n1 / 0"}))
    assert failed.startswith("before\nstderr:\n") and "ZeroDivisionError" in failed
    assert failed.endswith("exit code 1")
    assert asyncio.run(python.call({"code": "pass"})) == "(no output)"
