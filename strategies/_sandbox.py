"""A subprocess sandbox for model-written Python: ``run_python(code) -> SandboxResult``.

The code runs in a fresh ``python -I -S -B -u`` (the base interpreter, isolated: no
site-packages, no ``PYTHON*`` variables, no bytecode written) with a minimal environment,
under the runner :mod:`strategies._sandbox_child`. The runner stays outside as the code's
keeper; the code runs in the runner's one child. What each machine allows differs, so every
layer that can be set up is, and ``SandboxResult.protections`` names the ones that took effect
(``problems`` says why others did not).

The kernel layers, all active on our Linux machines, as root and as an unprivileged user:

- ``private-root``: a mount namespace whose root is a new, read-only tmpfs holding only
  read-only binds of the interpreter, its standard library (its site-packages hidden), the
  shared-library directories (``/usr/lib``, ``/lib*``, ``/etc/ld.so.cache``) and
  ``/usr/share/zoneinfo``; ``/dev/{null,zero,full,random,urandom}``; a read-only ``/proc``
  of the pid namespace; and the working directory ``/sandbox``, a ``disk_mb`` tmpfs that
  vanishes with the namespace. The host's ``/etc``, ``/tmp``, home directories, the project
  and every path-based socket are not there to open (``pivot_root``, the old root detached).
- ``netns``: a new network namespace (only a loopback, down), which also scopes abstract
  Unix sockets; ``ipcns``: a new IPC namespace. ``userns``: as non-root, through a user
  namespace.
- ``pidns``: the code is pid 1 of a new pid namespace: it sees and signals no outside
  process, and everything it starts dies with it.
- ``cgroup-pids`` / ``cgroup-memory``, where the caller may create cgroups (as root): a
  cgroup of the run's own capping tasks (threads included: what bounds a fork bomb as root)
  and memory (tmpfs pages included).
- ``rlimits`` (always): RLIMIT_AS, RLIMIT_CPU, RLIMIT_FSIZE, RLIMIT_NOFILE, RLIMIT_CORE=0;
  ``nproc``: RLIMIT_NPROC at the user's task count plus ``max_processes``, for non-root only.
- ``caps-dropped``: no capabilities, empty bounding set, no_new_privs.
- Dying with the caller, leaving nothing: the runner gets SIGTERM when its caller dies
  (PR_SET_PDEATHSIG, SIGKILL included) and the code gets SIGKILL when the runner dies; on
  SIGTERM, on the wall-clock timeout (the caller sends SIGTERM, then SIGKILL after a grace),
  on its own alarm or when the code ends, the runner kills the code and every process it
  started (it is their child subreaper, so even those that left the session), then removes
  its cgroups. Cgroups and fallback directories are named ``assist-sbx-<runner pid>-…``, and
  every runner first sweeps those whose runner is gone (one SIGKILLed itself).

The fallback, where the kernel refuses the namespaces (``isolate=False`` forces it, for
tests), still has rlimits, no capabilities and the keeper, plus, kernel-enforced where the
kernel has them: ``landlock-fs`` (Linux 5.13+: reads and execs only of the interpreter,
stdlib, shared libraries, ``/dev`` nodes and the process's own ``/proc`` entry; writes only in
the working directory, a real ``/tmp/assist-sbx-…`` directory removed by the runner),
``landlock-net`` (5.19+: no TCP bind or connect), ``landlock-scope`` (6.12+: no abstract Unix
socket or signal outside the sandbox) and ``seccomp-net`` (socket(2), io_uring and foreign
syscall ABIs fail: no new socket at all, path-based Unix ones included; socketpair works).
What the fallback cannot give: the host's files stay visible to ``stat``, and without
Landlock only the prelude refuses reads; without pid namespace or cgroups nothing bounds
processes as root but the prelude (so it forbids forks).

Enforced in-process by a prelude the runner installs before the code, bypassable by
determined code (``ctypes``, the classes under the wrappers): ``prelude-net`` (sockets refuse;
Unix ones are allowed only inside a private root and network namespace), ``prelude-fs``
(``open``/``os``-level writes, renames and deletions outside the working directory refuse),
and only where the kernel layers are missing: ``prelude-read`` (reads outside the interpreter
and the working directory), ``prelude-exec`` (no new programs, which would run without the
prelude), ``prelude-fork`` (no new processes, when nothing bounds their number) and
``prelude-kill`` (signals only within the session). Give untrusted code only to a sandbox
whose ``protections`` lists the kernel layers you rely on.
"""

from __future__ import annotations

import functools
import json
import marshal
import os
import signal
import sys
import time
from dataclasses import dataclass
from typing import Any

__all__ = ["SandboxResult", "run_python"]

_MAX_CODE = 1 << 20
_CHILD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_sandbox_child.py")
# The base interpreter, not a virtual environment's link to it: with -I -S the code sees no
# site-packages anyway, and the private root then needs only this installation's files.
_PYTHON = os.path.realpath(getattr(sys, "_base_executable", None) or sys.executable)
_GRACE_S = 3.0  # how long the runner may take to clean up after SIGTERM
# The runner's bytecode comes first on its stdin, compiled once per process: compiling its
# source at every start would cost more than the rest of the start-up. Its path stays in
# the command line, where sweeps and tests look for it.
_BOOT = ("import marshal, sys\n"
         "exec(marshal.loads(sys.stdin.buffer.read({size})), "
         "{{'__name__': '__main__', '__file__': {path!r}}})")


@dataclass(frozen=True)
class SandboxResult:
    """What a sandboxed run printed and how it ended; ``pid`` was its process group."""

    stdout: str
    stderr: str
    returncode: int | None
    timed_out: bool = False
    killed_reason: str | None = None
    protections: tuple[str, ...] = ()
    problems: tuple[str, ...] = ()  # "layer: why" for each layer the machine refused
    truncated: bool = False
    seconds: float = 0.0
    pid: int = 0

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.timed_out


def run_python(code: str, *, timeout_s: float = 5.0, memory_mb: int = 256,
               max_output: int = 10_000, max_processes: int = 16,
               disk_mb: int = 64, isolate: bool = True) -> SandboxResult:
    """Run ``code`` in a sandboxed interpreter; blocking (use ``asyncio.to_thread``).

    ``max_output`` caps each of stdout and stderr (bytes kept; the rest is drained and
    dropped); ``max_processes`` caps tasks, threads included, besides the sandbox's first.
    ``isolate=False`` skips the namespaces and cgroups: the fallback of machines without
    them (Landlock, seccomp, uid ``nobody``, rlimits and the prelude), for tests.
    """
    import selectors
    import subprocess

    data = code.encode("utf-8", "surrogatepass")
    if len(data) > _MAX_CODE:
        raise ValueError(f"code is {len(data)} bytes; the sandbox takes at most {_MAX_CODE}")
    t0 = time.monotonic()
    report_r, report_w = os.pipe()
    config = {"parent": os.getpid(), "memory_mb": memory_mb, "cpu_s": int(timeout_s) + 2,
              "timeout_s": timeout_s, "disk_mb": disk_mb, "nproc": max_processes,
              "max_tasks": max_processes + 1, "max_bytes": (memory_mb + disk_mb + 64) << 20,
              "report": report_w, "isolate": isolate}
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8"}
    out: dict[int, bytearray] = {}
    dropped = 0
    timed_out = False
    try:
        runner = _runner_code()
        proc = subprocess.Popen(
            [_PYTHON, "-I", "-S", "-B", "-u", "-c", _BOOT.format(size=len(runner), path=_CHILD),
             json.dumps(config)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd="/",
            env=env, start_new_session=True, pass_fds=(report_w,))
        os.close(report_w)
        report_w = -1
        assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
        try:  # the runner reads all of stdin before anything else, so this cannot deadlock
            proc.stdin.write(runner + data)
            proc.stdin.close()
        except BrokenPipeError:
            pass
        deadline = t0 + timeout_s
        with selectors.DefaultSelector() as sel:
            for stream in (proc.stdout, proc.stderr):
                out[stream.fileno()] = bytearray()
                sel.register(stream.fileno(), selectors.EVENT_READ)
            while sel.get_map():
                left = deadline - time.monotonic()
                if left <= 0:
                    timed_out = True
                    break
                for key, _ in sel.select(left):
                    chunk = os.read(key.fd, 65536)
                    if not chunk:
                        sel.unregister(key.fd)
                    buf = out[key.fd]
                    keep = max(0, min(len(chunk), max_output - len(buf)))
                    buf += chunk[:keep]
                    dropped += len(chunk) - keep
        try:
            proc.wait(0 if timed_out else max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            timed_out = True
            _stop(proc)
        returncode = proc.wait()
        stdout, stderr = (bytes(out[s.fileno()]).decode("utf-8", "replace")
                          for s in (proc.stdout, proc.stderr))
        proc.stdout.close()
        proc.stderr.close()
        report = _read_report(report_r)
    finally:
        for fd in (report_r, report_w):
            if fd >= 0:
                os.close(fd)
    return SandboxResult(stdout=stdout, stderr=stderr, returncode=returncode, timed_out=timed_out,
                         killed_reason=_reason(returncode, timed_out),
                         protections=tuple(report.get("active", ())), truncated=dropped > 0,
                         problems=tuple(f"{k}: {v}" for k, v in report.get("problems", {}).items()),
                         seconds=time.monotonic() - t0, pid=proc.pid)


@functools.lru_cache(maxsize=1)
def _runner_code() -> bytes:
    with open(_CHILD, "rb") as f:
        return marshal.dumps(compile(f.read(), _CHILD, "exec", dont_inherit=True))


def _stop(proc: Any) -> None:
    """Ask the runner to kill the code and clean up (SIGTERM); SIGKILL it if it does not, and
    its process group while its pid is still held (the next runner sweeps what is left)."""
    import subprocess

    try:
        os.kill(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        proc.wait(_GRACE_S)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def _reason(returncode: int, timed_out: bool) -> str | None:
    if timed_out:
        return "timeout"
    if returncode >= 0:
        return None
    names = {signal.SIGXCPU: "cpu time limit", signal.SIGXFSZ: "file size limit",
             signal.SIGKILL: "killed (memory limit?)"}
    sig = signal.Signals(-returncode)
    return names.get(sig, f"signal {sig.name}")


def _read_report(fd: int) -> dict:
    os.set_blocking(fd, False)
    raw = b""
    try:
        while chunk := os.read(fd, 65536):
            raw += chunk
    except BlockingIOError:
        pass
    try:
        return json.loads(raw or b"{}")
    except ValueError:
        return {}
