"""The sandbox's runner: ``python -I -S -B -u _sandbox_child.py CONFIG`` reads code on stdin.

Run by :func:`strategies._sandbox.run_python` (whose docstring says what each layer
enforces), never imported by the package at run time, and so standard library only. Before
the code runs it sets the rlimits, joins the cgroups, unshares what namespaces it can,
remounts everything read-only but the tmpfs working directory, forks pid 1 of a new pid
namespace, drops every capability, installs the in-process prelude, and writes the layers
that took effect to the report descriptor. Setting the limits here rather than in
``preexec_fn`` covers the same code (the user's runs only after this) and stays safe in the
threaded server, where ``preexec_fn`` can deadlock.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from typing import Any, NoReturn

_NS = {"user": 0x10000000, "pid": 0x20000000, "net": 0x40000000, "mnt": 0x00020000}
_MS = {"nosuid": 2, "nodev": 4, "noexec": 8, "noatime": 1024, "nodiratime": 2048,
       "relatime": 1 << 21, "strictatime": 1 << 24}
_MS_RDONLY, _MS_REMOUNT, _MS_BIND, _MS_REC, _MS_PRIVATE = 1, 32, 4096, 16384, 1 << 18


def main(config: dict[str, Any]) -> None:
    code = sys.stdin.buffer.read().decode("utf-8", "surrogatepass")
    os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
    import ctypes
    import resource

    libc = ctypes.CDLL(None, use_errno=True)
    libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong,
                           ctypes.c_char_p]
    active: list[str] = []
    problems: dict[str, str] = {}
    workdir, mb = config["workdir"], 1 << 20
    limits = {"AS": config["memory_mb"] * mb, "CPU": config["cpu_s"], "CORE": 0,
              "FSIZE": config["disk_mb"] * mb, "NOFILE": 64}
    if os.geteuid() != 0:  # counts every task of the user, so it is relative to what runs now
        limits["NPROC"] = _user_tasks() + config["nproc"]
    for name, value in limits.items():
        resource.setrlimit(getattr(resource, f"RLIMIT_{name}"), (value, value))
    active += ["rlimits", "nproc"] if "NPROC" in limits else ["rlimits"]
    for kind, path in config["cgroups"].items():
        try:
            with open(os.path.join(path, "cgroup.procs"), "w") as f:
                f.write(str(os.getpid()))
            active.append(f"cgroup-{kind}")
        except OSError as exc:
            problems[f"cgroup-{kind}"] = str(exc)
    spaces = _unshare(libc, active, problems) if config["isolate"] else set()
    if "mnt" in spaces:
        _readonly_mounts(libc, workdir, config["disk_mb"], active, problems)
    if "pid" in spaces:
        child = os.fork()
        if child:
            os.close(config["report"])
            _relay(child)
        # Should the code leave the process group (setsid), killing the group still kills
        # the runner, and the runner's death takes pid 1 and so the whole namespace down.
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
        active.append("pidns")
        flags = _MS_RDONLY | _MS["nosuid"] | _MS["nodev"] | _MS["noexec"]
        if "mnt" in spaces and libc.mount(b"proc", b"/proc", b"proc", flags, None) != 0:
            problems["proc"] = os.strerror(ctypes.get_errno())
    _drop_caps(libc, active, problems)
    os.chdir(workdir)
    _prelude(workdir, active)
    os.write(config["report"], json.dumps({"active": active, "problems": problems}).encode())
    os.close(config["report"])
    _execute(code)


def _user_tasks() -> int:
    uid, count = os.getuid(), 0
    for pid in os.listdir("/proc"):
        try:
            if pid.isdigit() and os.stat(f"/proc/{pid}").st_uid == uid:
                count += len(os.listdir(f"/proc/{pid}/task"))
        except OSError:
            pass
    return count


def _unshare(libc: object, active: list[str], problems: dict[str, str]) -> set[str]:
    """The first set of namespaces the kernel grants; root needs no user namespace."""
    import ctypes

    full = ("net", "mnt", "pid")
    tries = [full, ("user", *full), ("net",)] if os.geteuid() == 0 else [("user", *full), ("user", "net")]
    uid, gid = os.getuid(), os.getgid()
    for spaces in tries:
        if libc.unshare(sum(_NS[s] for s in spaces)) != 0:  # type: ignore[attr-defined]
            problems[f"unshare({'+'.join(spaces)})"] = os.strerror(ctypes.get_errno())
            continue
        if "user" in spaces:  # keep our ids inside, so files keep their owner
            try:
                for name, text in (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"),
                                   ("gid_map", f"{gid} {gid} 1")):
                    with open(f"/proc/self/{name}", "w") as f:
                        f.write(text)
                active.append("userns")
            except OSError as exc:  # unmapped ids still work; the other layers still apply
                problems["userns-map"] = str(exc)
        if "net" in spaces:
            active.append("netns")
        return set(spaces)
    return set()


def _readonly_mounts(libc: object, workdir: str, disk_mb: int, active: list[str],
                     problems: dict[str, str]) -> None:
    import ctypes
    import re

    mount = libc.mount  # type: ignore[attr-defined]
    # Private first: otherwise the tmpfs and the read-only flags would propagate to the host.
    if mount(None, b"/", None, _MS_REC | _MS_PRIVATE, None) != 0:
        problems["mount-private"] = os.strerror(ctypes.get_errno())
        return
    options = f"size={disk_mb}m,mode=0700".encode()
    if mount(b"tmpfs", workdir.encode(), b"tmpfs", _MS["nosuid"] | _MS["nodev"], options) != 0:
        problems["tmpfs"] = os.strerror(ctypes.get_errno())
        return
    failed = []
    for line in open("/proc/self/mountinfo").read().splitlines():
        fields = line.split()
        target = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[4])
        if target == workdir:
            continue
        # Flags the kernel locks in a user namespace must be repeated on a remount.
        flags = _MS_REMOUNT | _MS_BIND | _MS_RDONLY
        flags |= sum(_MS.get(opt, 0) for opt in fields[5].split(","))
        if mount(None, target.encode(), None, flags, None) != 0:
            failed.append(f"{target}: {os.strerror(ctypes.get_errno())}")
    if failed:
        problems["readonly"] = "; ".join(failed)
    else:
        active.append("mountns-readonly")


def _relay(child: int) -> None:
    """The runner outside the pid namespace: exit the way pid 1 inside did."""
    _, status = os.waitpid(child, 0)
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        signal.signal(sig, signal.SIG_DFL)
        os.kill(os.getpid(), sig)
        os._exit(128 + sig)
    os._exit(os.waitstatus_to_exitcode(status))


def _drop_caps(libc: object, active: list[str], problems: dict[str, str]) -> None:
    import ctypes

    prctl = libc.prctl  # type: ignore[attr-defined]
    prctl(38, 1, 0, 0, 0)  # PR_SET_NO_NEW_PRIVS: no setuid binary gives them back
    try:
        last = int(open("/proc/sys/kernel/cap_last_cap").read())
    except (OSError, ValueError):
        last = 63
    for cap in range(last + 1):
        prctl(24, cap, 0, 0, 0)  # PR_CAPBSET_DROP: else exec as uid 0 regains them all
    prctl(47, 4, 0, 0, 0)  # PR_CAP_AMBIENT_CLEAR_ALL

    class Header(ctypes.Structure):
        _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]

    zeros = (ctypes.c_uint32 * 6)()  # effective, permitted, inheritable for two 32-bit words
    libc.capset(ctypes.byref(Header(0x20080522, 0)), zeros)  # type: ignore[attr-defined]
    status = open("/proc/self/status").read()
    if "CapEff:\t0000000000000000" in status and "CapBnd:\t0000000000000000" in status:
        active.append("caps-dropped")
    else:
        problems["caps"] = "capabilities remain"


def _execute(code: str) -> None:
    import traceback
    import types

    main = types.ModuleType("__main__")
    runner, sys.modules["__main__"] = sys.modules["__main__"], main  # noqa: F841 (kept alive)
    sys.argv = ["<sandbox>"]
    try:
        exec(compile(code, "<sandbox>", "exec"), main.__dict__)
    except SystemExit:
        raise
    except BaseException as exc:  # the code's own error, without the runner's frames
        report = traceback.TracebackException.from_exception(exc)
        report.stack = traceback.StackSummary.from_list(
            [f for f in report.stack if f.filename != __file__])
        sys.stderr.write("".join(report.format()))
        sys.exit(1)


def _prelude(workdir: str, active: list[str]) -> None:
    """In-process guards for what the kernel layers may not cover; ctypes gets past them."""
    import _posixsubprocess
    import _socket
    import builtins
    import errno
    import io
    import socket
    import subprocess

    def refuse(what: str, path: object = None) -> NoReturn:
        raise PermissionError(errno.EACCES, f"sandbox: {what} is not allowed", path)

    def inside(path: Any, dir_fd: int | None = None) -> bool:
        if isinstance(path, int):
            return True  # an already-open descriptor
        base = os.readlink(f"/proc/self/fd/{dir_fd}") if dir_fd is not None else os.getcwd()
        full = os.path.realpath(os.path.join(base, os.fsdecode(os.fspath(path))))
        return full == workdir or full.startswith(workdir + os.sep) or full == os.devnull

    real_open, real_os_open = io.open, os.open
    writes = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND

    def guarded_open(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        if set(mode) & set("wax+") and not inside(file):
            refuse("writing outside the working directory", file)
        return real_open(file, mode, *args, **kwargs)

    def guarded_os_open(path: Any, flags: int, mode: int = 0o777, *, dir_fd: int | None = None) -> int:
        if flags & writes and not inside(path, dir_fd):
            refuse("writing outside the working directory", path)
        return real_os_open(path, flags, mode, dir_fd=dir_fd)

    builtins.open = io.open = guarded_open  # type: ignore[assignment]
    os.open = guarded_os_open  # type: ignore[assignment]

    def guard(name: str, *params: tuple[int, str, str]) -> None:
        real = getattr(os, name)

        def guarded(*args: Any, **kwargs: Any) -> Any:
            for pos, key, fd_key in params:
                path = args[pos] if pos < len(args) else kwargs.get(key)
                if path is not None and not inside(path, kwargs.get(fd_key)):
                    refuse(f"os.{name} outside the working directory", path)
            return real(*args, **kwargs)

        setattr(os, name, guarded)

    for name in ("remove", "unlink", "rmdir", "mkdir", "chmod", "chown", "truncate", "utime",
                 "mkfifo", "mknod"):
        guard(name, (0, "path", "dir_fd"))
    for name in ("rename", "replace", "link"):
        guard(name, (0, "src", "src_dir_fd"), (1, "dst", "dst_dir_fd"))
    guard("symlink", (1, "dst", "dir_fd"))

    def no_network(base: type) -> type:
        # A subclass, not a function: ``class SSLSocket(socket)`` and the like still import.
        class NoNetwork(base):  # type: ignore[misc, valid-type]
            def __init__(self, family: int = -1, type: int = -1, proto: int = -1,
                         fileno: int | None = None) -> None:
                if fileno is None and family != socket.AF_UNIX:
                    refuse("network access")
                super().__init__(family, type, proto, fileno)

        return NoNetwork

    socket.socket = no_network(socket.socket)  # type: ignore[misc, assignment]
    _socket.socket = no_network(_socket.socket)  # type: ignore[misc, assignment]
    active += ["prelude-net", "prelude-fs"]

    def blocked(what: str) -> Any:
        def refuse_call(*args: Any, **kwargs: Any) -> NoReturn:
            refuse(what)

        return refuse_call

    # A new program runs without this prelude: only allow one where the kernel confines it.
    if not {"netns", "mountns-readonly"} <= set(active):
        for module, name in ((os, "execv"), (os, "execve"), (os, "posix_spawn"),
                             (os, "posix_spawnp"), (os, "system"), (_posixsubprocess, "fork_exec"),
                             (subprocess, "_fork_exec")):
            if hasattr(module, name):
                setattr(module, name, blocked("starting programs"))
        active.append("prelude-exec")
    if not {"cgroup-pids", "nproc"} & set(active):  # nothing in the kernel bounds a fork bomb
        for name in ("fork", "forkpty"):
            setattr(os, name, blocked("starting processes"))
        active.append("prelude-fork")
    if "pidns" not in active:  # outside processes are visible: signal only our own session
        real_kill, real_killpg, session = os.kill, os.killpg, os.getsid(0)

        def guarded_kill(pid: int, sig: int) -> None:
            if pid == -1 or (pid > 0 and os.getsid(pid) != session) or pid < -1 and -pid != os.getpgrp():
                refuse("signalling processes outside the sandbox")
            real_kill(pid, sig)

        def guarded_killpg(pgid: int, sig: int) -> None:
            if pgid not in (0, os.getpgrp()):
                refuse("signalling processes outside the sandbox")
            real_killpg(pgid, sig)

        os.kill, os.killpg = guarded_kill, guarded_killpg
        active.append("prelude-kill")


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
