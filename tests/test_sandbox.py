"""The sandbox's escape suite: reads and writes outside its directory, network and Unix
sockets, a fork bomb, 10 GB, an infinite loop, a caller SIGKILLed mid-run, each against both
the full sandbox and the fallback of machines without namespaces (``isolate=False``) where
that makes sense; plus ordinary code, which must just work.

Each test asserts the strongest layer the running machine grants: the kernel's where the
kernel has it (a layer that fails to set up where the kernel allows it fails the test), the
prelude's only where the kernel refuses. The fork bomb runs unbounded only after a bounded
loop showed the kernel caps the tasks."""

from __future__ import annotations

import asyncio
import os
import socket
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from strategies import _sandbox_child as runner
from strategies._sandbox import SandboxResult, run_python
from strategies._toolbox import get_tool

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the sandbox is Linux-only")
BOTH = pytest.mark.parametrize("isolate", [True, False], ids=["kernel", "fallback"])
CTYPES_OPEN = "import ctypes\nprint(ctypes.CDLL(None).open({path!r}.encode(), 0o101, 0o644))\n"
REPO = Path(__file__).resolve().parents[1]
# The code names its processes (comm, inherited by forks) so that tests find them from outside.
MARK = "import ctypes\nctypes.CDLL(None).prctl(15, {marker!r}.encode(), 0, 0, 0)\n"  # PR_SET_NAME


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


def _require_private_root(result: SandboxResult) -> None:
    """Skip only where the kernel refuses a mount namespace; any other miss is a failure."""
    if "private-root" in result.protections:
        return
    if "unshare(mnt): " in "\n".join(result.problems) and not any(
            p.startswith("private-root") for p in result.problems):
        pytest.skip(f"the kernel refuses mount namespaces here: {result.problems}")
    pytest.fail(f"no private root where the kernel allows one: {result.protections} {result.problems}")


def _marked(marker: str) -> list[int]:
    """Live processes (not zombies) named ``marker``."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if open(f"/proc/{pid}/comm").read().strip() != marker:
                continue
            if open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] != "Z":
                found.append(int(pid))
        except OSError:
            pass
    return found


def _leftovers(runner_pid: int) -> list[str]:
    """The cgroups and working directories a runner made, while they exist."""
    prefix = f"{runner.PREFIX}{runner_pid}-"
    found = []
    for parent in set(runner._cgroup_parents().values()) | {runner.TMP}:
        try:
            found += [os.path.join(parent, n) for n in os.listdir(parent) if n.startswith(prefix)]
        except OSError:
            pass
    return found


def _alive(pid: int) -> bool:
    try:
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _wait_for(condition: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value or time.monotonic() > deadline:
            assert value, f"{what}: not within {timeout} s"
            return value
        time.sleep(0.05)


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


@BOTH
def test_the_kernel_refuses_writes_that_bypass_the_prelude(isolate: bool):
    escape = f"/tmp/escape_{uuid.uuid4().hex}"
    result = run_python(CTYPES_OPEN.format(path=escape), isolate=isolate)
    if isolate:
        _require_private_root(result)
    elif "landlock-fs" not in result.protections:
        pytest.skip(f"no Landlock here, only the prelude guards writes: {result.problems}")
    assert result.stdout.strip() == "-1" and not os.path.exists(escape)


def test_the_host_filesystem_is_out_of_sight(tmp_path: Path):
    """Only the interpreter, its standard library and the shared libraries, read-only, and
    the working directory: no /etc secrets, no project, no /tmp, no home, no host sockets."""
    secret = tmp_path / "secret.txt"
    secret.write_text("host only")
    stdlib = os.path.dirname(os.__file__)
    hidden = ["/etc/shadow", "/etc/passwd", "/etc/hostname", str(REPO / "strategies" / "_sandbox.py"),
              str(REPO), str(secret), "/tmp", "/run", "/var", "/home", "/sys", "/work",
              "/root/.bashrc", os.path.expanduser("~/.ssh"), "/usr/bin/python3", "/usr/local"]
    python = (stdlib, os.path.realpath(sys.executable))  # visible by design, with their parents
    hidden = [p for p in hidden if not any(q == p or q.startswith(p + "/") for q in python)]
    code = (f"import ctypes, os\nlibc = ctypes.CDLL(None)\n"
            f"for path in {hidden!r}:\n"
            "    print('seen' if os.path.lexists(path) else 'hidden', libc.open(path.encode(), 0), path)\n"
            f"print('write-stdlib', libc.open({os.path.join(stdlib, 'os.py')!r}.encode(), 1))\n"
            "print('create-root', libc.open(b'/planted', 0o101, 0o644))\n"
            "print('root', *sorted(os.listdir('/')))\nprint('etc', *sorted(os.listdir('/etc')))\n"
            "import json, sqlite3, ssl, decimal\nprint('stdlib ok')\n")
    result = run_python(code)
    _require_private_root(result)
    assert result.ok, result
    lines = result.stdout.splitlines()
    for line in lines[:len(hidden)]:
        assert line.startswith("hidden -1 "), line
    assert "write-stdlib -1" in lines and "create-root -1" in lines
    python_tops = {Path(p).parts[1] for p in python}
    root = set(next(line for line in lines if line.startswith("root ")).split()[1:])
    assert root <= {"dev", "proc", "sandbox", "usr", "lib", "lib32", "lib64", "etc"} | python_tops, root
    assert next(line for line in lines if line.startswith("etc ")).split()[1:] <= ["ld.so.cache"]
    assert lines[-1] == "stdlib ok"


def test_the_fallback_refuses_the_host_filesystem(tmp_path: Path):
    """Without namespaces: Landlock, where the kernel has it, refuses reads outside the
    interpreter and the working directory even to ctypes; else only the prelude does."""
    secret = tmp_path / "secret.txt"
    secret.write_text("host only")
    paths = ["/etc/shadow", str(REPO / "strategies" / "_sandbox.py"), str(secret)]
    code = (f"import ctypes\nlibc = ctypes.CDLL(None)\nfor path in {paths!r}:\n"
            "    try:\n        print('read', open(path).read(4))\n"
            "    except OSError as exc:\n        print('refused', exc.errno)\n"
            "    print('ctypes', libc.open(path.encode(), 0))\n")
    result = run_python(code, isolate=False)
    assert result.ok and "read" not in result.stdout and result.stdout.count("refused") == 3, result
    if "landlock-fs" not in result.protections:
        assert "prelude-read" in result.protections, result
        pytest.skip(f"no Landlock here: only the prelude refuses reads ({result.problems})")
    assert result.stdout.count("ctypes -1") == 3, result


@BOTH
def test_unix_sockets_of_the_host_are_unreachable(isolate: bool, tmp_path: Path):
    """A path socket under /tmp and an abstract one, even through the class under the
    prelude's guard: hidden by the private root and the network namespace (or refused by
    seccomp in the fallback)."""
    path, name = str(tmp_path / "host.sock"), f"assist-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX) as on_path, socket.socket(socket.AF_UNIX) as abstract:
        on_path.bind(path)
        os.chmod(path, 0o777)
        abstract.bind("\0" + name)
        for server in (on_path, abstract):
            server.listen()
            server.setblocking(False)
        code = ("import _socket, socket\nraw = _socket.socket.__mro__[1]\n"
                f"for where, address in (('path', {path!r}), ('abstract', '\\0' + {name!r})):\n"
                "    for how, cls in (('guarded', socket.socket), ('raw', raw)):\n"
                "        try:\n            s = cls(socket.AF_UNIX, socket.SOCK_STREAM)\n"
                "            s.settimeout(1)\n            s.connect(address)\n"
                "            print(where, how, 'connected')\n"
                "        except OSError as exc:\n            print(where, how, 'refused', type(exc).__name__)\n")
        result = run_python(code, isolate=isolate)
        if isolate:
            _require_private_root(result)
            assert "netns" in result.protections, result
        elif "seccomp-net" not in result.protections:
            pytest.skip(f"no seccomp here: only the prelude refuses sockets ({result.problems})")
        assert "connected" not in result.stdout and result.stdout.count("refused") == 4, result
        for server in (on_path, abstract):
            with pytest.raises(BlockingIOError):
                server.accept()  # nothing ever arrived


CALLER = """
import importlib.util, sys
spec = importlib.util.spec_from_file_location("sandbox", sys.argv[1])
sandbox = importlib.util.module_from_spec(spec)
sys.modules["sandbox"] = sandbox
spec.loader.exec_module(sandbox)
sandbox.run_python(sys.stdin.read(), timeout_s=120, isolate=sys.argv[2] == "1")
"""
# The code forks through libc (past the prelude), the child leaves the session, both loop.
ESCAPER = MARK + """import time
libc = ctypes.CDLL(None)
if libc.fork() == 0:
    libc.setsid()
while True:
    time.sleep(0.05)
"""


@BOTH
def test_the_sandbox_dies_with_its_caller_and_leaves_nothing(isolate: bool):
    marker = f"sbx{uuid.uuid4().hex[:12]}"
    caller = subprocess.Popen([sys.executable, "-c", CALLER, str(REPO / "strategies" / "_sandbox.py"),
                               "1" if isolate else "0"], stdin=subprocess.PIPE, text=True)
    try:
        caller.stdin.write(ESCAPER.format(marker=marker))
        caller.stdin.close()
        sandboxed = _wait_for(lambda: len(_marked(marker)) == 2 and _marked(marker), 30,
                              "the code and its child start")
        runners = [c for c in runner._children(caller.pid)
                   if "_sandbox_child" in open(f"/proc/{c}/cmdline").read()]
        assert len(runners) == 1, runners
        made = _leftovers(runners[0])
        assert made, "the run made neither a cgroup nor a working directory"
    finally:
        caller.kill()
        caller.wait()
    _wait_for(lambda: not any(map(_alive, [*sandboxed, *runners])), 10, "the sandbox dies")
    assert _marked(marker) == []
    _wait_for(lambda: not any(map(os.path.exists, made)), 10, f"{made} are removed")


def test_code_that_leaves_the_session_is_killed_at_the_timeout():
    marker = f"sbx{uuid.uuid4().hex[:12]}"
    for isolate in (True, False):
        result = run_python(ESCAPER.format(marker=marker), timeout_s=1, isolate=isolate)
        assert result.timed_out, result
        assert _marked(marker) == [] and _leftovers(result.pid) == []


def test_leftovers_of_a_killed_runner_are_swept_at_the_next_start():
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = [os.path.join(parent, f"{runner.PREFIX}{dead.pid}-0123456789ab")
             for parent in set(runner._cgroup_parents().values()) | {runner.TMP}]
    made = []
    for path in stale:
        try:
            os.mkdir(path)
            made.append(path)
        except OSError:
            pass
    assert made, stale
    workdir = os.path.join(runner.TMP, f"{runner.PREFIX}{dead.pid}-0123456789ab")
    os.makedirs(os.path.join(workdir, "locked"))
    Path(workdir, "locked", "file").write_text("x")
    os.chmod(os.path.join(workdir, "locked"), 0o500)
    assert run_python("print(1)").stdout == "1\n"
    assert [p for p in made if os.path.exists(p)] == []


@BOTH
def test_no_connection_leaves_the_sandbox(isolate: bool):
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        server.setblocking(False)
        port = server.getsockname()[1]
        code = (f"import _socket, socket\ntry:\n    socket.create_connection(('127.0.0.1', {port}), timeout=1)\n"
                "    print('connected')\nexcept OSError as exc:\n    print('refused', exc)\n"
                # The class under the prelude's guards: only the kernel stops this one.
                f"try:\n    s = _socket.socket.__mro__[1](socket.AF_INET, socket.SOCK_STREAM)\n"
                f"    s.settimeout(1)\n    s.connect(('127.0.0.1', {port}))\n    print('connected')\n"
                "except OSError as exc:\n    print('refused', exc)\n")
        result = run_python(code, isolate=isolate)
        kernel = {"netns", "seccomp-net", "landlock-net"} & set(result.protections)
        if isolate and "netns" not in kernel:  # only the kernel's refusal excuses its absence
            assert "unshare(net): " in "\n".join(result.problems), result
        if not kernel:
            pytest.skip(f"no kernel layer against the network here: {result.problems}")
        assert "connected" not in result.stdout and result.stdout.count("refused") == 2, result
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


def test_a_trivial_run_stays_fast():
    times = sorted(run_python("print(1)").seconds for _ in range(5))
    assert statistics.median(times) < 1.0, times


def test_python_tool_reports_output_and_errors():
    python = get_tool("python")
    assert asyncio.run(python.call({"code": "print(6 * 7)"})) == "42"
    failed = asyncio.run(python.call({"code": "print('before')\n1 / 0"}))
    assert failed.startswith("before\nstderr:\n") and "ZeroDivisionError" in failed
    assert failed.endswith("exit code 1")
    assert asyncio.run(python.call({"code": "pass"})) == "(no output)"
