"""A subprocess sandbox for model-written Python: ``run_python(code) -> SandboxResult``.

The code runs in a fresh ``python -I -S -B -u`` (isolated: no site-packages, no
``PYTHON*`` variables, no bytecode written) in a throwaway working directory, with a
minimal environment, in its own session, under the runner :mod:`strategies._sandbox_child`.
What each machine allows differs, so the runner sets up every layer it can and
``SandboxResult.protections`` names the ones that took effect (verified where it can be:
``caps-dropped`` is read back from ``/proc/self/status``).

Enforced by the kernel (all of them active on our Linux machines, as root and as an
unprivileged user alike):

- ``rlimits`` (always; set by the runner before it reads the code, not in ``preexec_fn``,
  which can deadlock in a threaded server): RLIMIT_AS (memory, per process), RLIMIT_CPU,
  RLIMIT_FSIZE, RLIMIT_NOFILE, RLIMIT_CORE=0; ``nproc``: RLIMIT_NPROC at the user's current
  task count plus ``max_processes``, for non-root only (the kernel never applies it to uid 0).
- ``cgroup-pids`` / ``cgroup-memory``: a cgroup of the run's own capping its tasks
  (processes and threads: what bounds a fork bomb as root) and their memory together.
- ``userns``: as non-root, the namespaces below come through a user namespace.
- ``netns``: a new network namespace, whose only interface is a loopback that is down.
- ``mountns-readonly``: a private mount namespace in which every mount is read-only and the
  working directory is a ``disk_mb`` tmpfs (files written there vanish with it).
- ``pidns``: the code runs as pid 1 of a new pid namespace: it sees and signals no outside
  process, everything it starts dies with it, and it dies with the runner (PDEATHSIG), so
  killing the process group kills all even after a ``setsid()``.
- ``caps-dropped``: no capabilities (bounding set emptied, no_new_privs): the code cannot
  remount, and namespaces it creates inherit the mounts locked read-only.
- The wall-clock timeout: the parent SIGKILLs the process group and the cgroup's tasks.

Enforced in-process by a prelude the runner installs before the code, bypassable by
determined code (``ctypes``, the classes under the wrappers): ``prelude-net`` (sockets
other than AF_UNIX refuse), ``prelude-fs`` (``open``/``os``-level writes, renames and
deletions outside the working directory refuse), and only where the kernel layers are
missing: ``prelude-exec`` (no new programs, which would run without the prelude),
``prelude-fork`` (no new processes, when nothing bounds their number) and ``prelude-kill``
(signals only within the session). Without the namespaces (``isolate=False`` shows that
fallback) the prelude alone keeps the code off the network and off other files (as uid 0
without capabilities it still owns root's files), children that ``setsid()`` outlive the
run, and the working directory is a real one bounded only by RLIMIT_FSIZE per file. Give
untrusted code only to a sandbox whose ``protections`` lists the kernel layers you rely on.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass

__all__ = ["SandboxResult", "run_python"]

_MAX_CODE = 1 << 20
_CHILD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_sandbox_child.py")


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
    dropped); ``max_processes`` caps tasks, threads included, besides the runner's own.
    ``isolate=False`` skips the namespaces and cgroups: rlimits and the prelude only (the
    fallback of machines without them, for tests).
    """
    import selectors
    import subprocess

    data = code.encode("utf-8", "surrogatepass")
    if len(data) > _MAX_CODE:
        raise ValueError(f"code is {len(data)} bytes; the sandbox takes at most {_MAX_CODE}")
    t0 = time.monotonic()
    workdir = os.path.realpath(tempfile.mkdtemp(prefix="assist-sbx-"))
    cgroups = _make_cgroups(max_processes + 2, (memory_mb + disk_mb + 64) << 20) if isolate else {}
    report_r, report_w = os.pipe()
    config = {"workdir": workdir, "memory_mb": memory_mb, "cpu_s": int(timeout_s) + 2,
              "disk_mb": disk_mb, "nproc": max_processes, "cgroups": cgroups, "report": report_w,
              "isolate": isolate}
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir,
           "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8"}
    out: dict[int, bytearray] = {}
    dropped = 0
    timed_out = False
    try:
        proc = subprocess.Popen(
            [sys.executable, "-I", "-S", "-B", "-u", _CHILD, json.dumps(config)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=workdir,
            env=env, start_new_session=True, pass_fds=(report_w,))
        os.close(report_w)
        report_w = -1
        assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
        try:  # the runner reads all of stdin before anything else, so this cannot deadlock
            proc.stdin.write(data)
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
            proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            timed_out = True
        _kill_all(proc.pid, cgroups)  # leftovers, even after a clean exit
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
        _remove_cgroups(cgroups)
        shutil.rmtree(workdir, onerror=_force_remove)
    return SandboxResult(stdout=stdout, stderr=stderr, returncode=returncode, timed_out=timed_out,
                         killed_reason=_reason(returncode, timed_out),
                         protections=tuple(report.get("active", ())), truncated=dropped > 0,
                         problems=tuple(f"{k}: {v}" for k, v in report.get("problems", {}).items()),
                         seconds=time.monotonic() - t0, pid=proc.pid)


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


def _make_cgroups(max_tasks: int, max_bytes: int) -> dict[str, str]:
    """Child cgroups of our own (v1 pids/memory hierarchies, or v2), where we may create them."""
    found: dict[str, str] = {}
    try:
        lines = open("/proc/self/cgroup").read().splitlines()
    except OSError:
        return found
    for line in lines:
        _, controllers, path = line.split(":", 2)
        for kind, knob, value in (("pids", "pids.max", max_tasks),
                                  ("memory", "memory.limit_in_bytes", max_bytes)):
            if controllers == kind:
                _try_cgroup(found, kind, f"/sys/fs/cgroup/{kind}{path}", {knob: value})
        if controllers == "" and os.path.exists("/sys/fs/cgroup/cgroup.controllers"):
            for kind, knob, value in (("pids", "pids.max", max_tasks),
                                      ("memory", "memory.max", max_bytes)):
                if kind not in found:
                    _try_cgroup(found, kind, f"/sys/fs/cgroup{path}", {knob: value})
    return found


def _try_cgroup(found: dict[str, str], kind: str, parent: str, knobs: dict[str, int]) -> None:
    path = os.path.join(parent, f"assist-sbx-{uuid.uuid4().hex[:12]}")
    try:
        os.mkdir(path)
    except OSError:
        return
    try:
        for knob, value in knobs.items():
            with open(os.path.join(path, knob), "w") as f:
                f.write(str(value))
        found[kind] = path
    except OSError:
        os.rmdir(path)


def _kill_all(pgid: int, cgroups: dict[str, str]) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    for path in cgroups.values():  # tasks that left the process group (setsid) are still here
        for _ in range(200):
            try:
                pids = [int(p) for p in open(os.path.join(path, "cgroup.procs")).read().split()]
            except OSError:
                break
            if not pids:
                break
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.005)


def _remove_cgroups(cgroups: dict[str, str]) -> None:
    for path in cgroups.values():
        for _ in range(100):  # killed tasks leave the cgroup once reaped
            try:
                os.rmdir(path)
                break
            except FileNotFoundError:
                break
            except OSError:
                time.sleep(0.01)


def _force_remove(func: object, path: str, exc: object) -> None:
    """rmtree's error handler: the code may have left directories without write permission."""
    try:
        os.chmod(os.path.dirname(path), 0o700)
        os.chmod(path, 0o700)
    except OSError:
        pass
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            os.unlink(path)
        except OSError:
            pass

