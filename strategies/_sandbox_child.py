"""The sandbox's runner: ``python -I -S -B -u _sandbox_child.py CONFIG`` reads code on stdin.

Run by :func:`strategies._sandbox.run_python` (whose docstring says what each layer
enforces), standard library only. Two processes:

- The *runner* (this script's first process) stays outside the sandbox as its keeper. It
  gets SIGTERM when its caller dies, SIGKILL included (PR_SET_PDEATHSIG). On SIGTERM, on its
  own deadline or when the code ends, it kills the code and every process the code started
  (it is their child subreaper), removes the cgroups and any working directory it made, and
  exits the way the code did. At start
  it sweeps what runners that were themselves SIGKILLed left behind (cgroups and working
  directories are named ``assist-sbx-<runner pid>-…``).
- The *sandbox* (its one child) is pid 1 of a new pid namespace where the kernel allows it,
  dies with the runner (PR_SET_PDEATHSIG SIGKILL), joins the run's cgroups, unshares the
  mount, network and IPC namespaces, builds a new root on a tmpfs holding only read-only
  binds of the interpreter, its standard library and the shared libraries, a few ``/dev``
  nodes, a fresh ``/proc`` and a tmpfs working directory, pivots into it, sets the rlimits,
  drops every capability, installs the prelude and runs the code. Where the kernel refuses
  the private root it falls back to Landlock and seccomp instead.

The layers that took effect go to the report descriptor. Setting them here rather than in
``preexec_fn`` keeps the threaded server safe (``preexec_fn`` can deadlock there).
"""

from __future__ import annotations

import json
import os
import signal
import sys
from typing import Any, NoReturn

PREFIX = "assist-sbx-"  # cgroups and fallback working directories: PREFIX + runner pid + "-" + hex
TMP = "/tmp"
WORKDIR = "/sandbox"  # the working directory inside the private root
_NS = {"user": 0x10000000, "pid": 0x20000000, "net": 0x40000000, "mnt": 0x00020000,
       "ipc": 0x08000000}
_MS_RDONLY, _MS_NOSUID, _MS_NODEV, _MS_NOEXEC = 1, 2, 4, 8
_MS_REMOUNT, _MS_BIND, _MS_MOVE, _MS_REC, _MS_PRIVATE = 32, 4096, 8192, 16384, 1 << 18
_MS_NOATIME, _MS_NODIRATIME, _MS_RELATIME, _MS_STRICTATIME = 1024, 2048, 1 << 21, 1 << 24
_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41}
_SOCKET = {"x86_64": 41, "aarch64": 198}
_AUDIT_ARCH = {"x86_64": 0xC000003E, "aarch64": 0xC00000B7}
_PR_SET_PDEATHSIG, _PR_SET_CHILD_SUBREAPER, _PR_SET_NO_NEW_PRIVS = 1, 36, 38


def main(config: dict[str, Any]) -> None:
    """The runner: set up, fork the sandbox, wait for it, clean up, exit as it did."""
    child = 0  # the sandbox's pid while it may still be running, else 0
    stop = False

    def terminate(signum: int, frame: object) -> None:
        nonlocal stop
        stop = True
        if child:
            os.kill(child, signal.SIGKILL)

    # First: from here on a SIGTERM (the caller's death, the caller's timeout) means clean up.
    signal.signal(signal.SIGTERM, terminate)
    signal.signal(signal.SIGALRM, terminate)
    code = sys.stdin.buffer.read().decode("utf-8", "surrogatepass")
    os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong,
                           ctypes.c_char_p]
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if os.getppid() != config["parent"]:  # the caller died before the line above
        os._exit(1)
    libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)  # what the code starts stays ours to kill
    signal.alarm(int(config["timeout_s"]) + 3)  # in case the caller hangs rather than dies
    runner = os.getpid()
    active: list[str] = []
    problems: dict[str, str] = {}
    sweep()
    cgroups = make_cgroups(runner, config["max_tasks"], config["max_bytes"]) if config["isolate"] else {}
    pidns = config["isolate"] and _unshare_pid(libc, active, problems)
    alive_r, alive_w = os.pipe()
    if not stop:
        child = os.fork()
        if child == 0:
            os.close(alive_w)
            _sandbox(libc, config, code, runner, alive_r, cgroups, pidns, active, problems)
        if stop:  # a SIGTERM between fork() and the assignment
            os.kill(child, signal.SIGKILL)
    os.close(alive_r)
    os.close(config["report"])
    status = os.waitpid(child, 0)[1] if child else 9  # 9: as if SIGKILLed
    child = 0
    signal.alarm(0)
    reap_children(runner)
    for path in cgroups.values():
        _kill_cgroup(path)
    for path in cgroups.values():
        _rmdir(path, tries=100)
    remove_workdirs(runner)
    _relay(status)


# --- the sandbox ------------------------------------------------------------------------------

def _sandbox(libc: Any, config: dict[str, Any], code: str, runner: int, alive_r: int,
             cgroups: dict[str, str], pidns: bool, active: list[str],
             problems: dict[str, str]) -> NoReturn:
    import select

    for sig in (signal.SIGTERM, signal.SIGALRM):
        signal.signal(sig, signal.SIG_DFL)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if select.select([alive_r], [], [], 0)[0]:  # EOF: the runner died before the line above
        os._exit(1)
    os.close(alive_r)
    if pidns:
        # Killing the runner kills pid 1 (PDEATHSIG) and so every process of the namespace.
        active.append("pidns")
    for kind, path in cgroups.items():
        try:
            with open(os.path.join(path, "cgroup.procs"), "w") as f:
                f.write("0")  # this process
            active.append(f"cgroup-{kind}")
        except OSError as exc:
            problems[f"cgroup-{kind}"] = str(exc)
    try:
        last_cap = int(open("/proc/sys/kernel/cap_last_cap").read())
    except (OSError, ValueError):
        last_cap = 63
    spaces = _unshare_rest(libc, active, problems) if config["isolate"] else set()
    private = "mnt" in spaces and _private_root(libc, config["disk_mb"], pidns, problems)
    if private:
        workdir = WORKDIR
        active.append("private-root")
    else:  # the fallback: a real directory, removed by the runner
        workdir = os.path.join(TMP, f"{PREFIX}{runner}-{os.urandom(6).hex()}")
        os.mkdir(workdir, 0o700)
    mb = 1 << 20
    limits = {"AS": config["memory_mb"] * mb, "CPU": config["cpu_s"], "CORE": 0,
              "FSIZE": config["disk_mb"] * mb, "NOFILE": 64}
    if os.geteuid() != 0:  # counts every task of the user, so it is relative to what runs now
        limits["NPROC"] = _user_tasks(os.geteuid()) + config["nproc"]
    import resource

    for name, value in limits.items():
        resource.setrlimit(getattr(resource, f"RLIMIT_{name}"), (value, value))
    active += ["rlimits", "nproc"] if "NPROC" in limits else ["rlimits"]
    landlock = None if private else _landlock_ruleset(libc, workdir, problems)
    _drop_caps(libc, last_cap, active, problems)
    if landlock is not None:
        _landlock_restrict(libc, landlock, active, problems)
    if not (private and "net" in spaces):
        _seccomp_no_sockets(libc, active, problems)
    os.chdir(workdir)
    os.environ.update(HOME=workdir, TMPDIR=workdir)
    _prelude(workdir, active)
    os.write(config["report"], json.dumps({"active": active, "problems": problems}).encode())
    os.close(config["report"])
    _execute(code)
    sys.exit(0)


def _unshare_pid(libc: Any, active: list[str], problems: dict[str, str]) -> bool:
    """A new pid namespace for the runner's child (through a user namespace if need be)."""
    import ctypes

    tries = [("pid",), ("user", "pid")] if os.geteuid() == 0 else [("user", "pid"), ("user",)]
    uid, gid = os.getuid(), os.getgid()
    for spaces in tries:
        if libc.unshare(sum(_NS[s] for s in spaces)) != 0:
            problems[f"unshare({'+'.join(spaces)})"] = os.strerror(ctypes.get_errno())
            continue
        if "user" in spaces:  # keep our ids inside, so files keep their owner
            try:
                for name, text in (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"),
                                   ("gid_map", f"{gid} {gid} 1")):
                    with open(f"/proc/self/{name}", "w") as f:
                        f.write(text)
                active.append("userns")
            except OSError as exc:
                problems["userns-map"] = str(exc)
        return "pid" in spaces
    return False


def _unshare_rest(libc: Any, active: list[str], problems: dict[str, str]) -> set[str]:
    """The mount, network and IPC namespaces: together, else each one the kernel grants."""
    import ctypes

    spaces: set[str] = set()
    for tried in (("mnt", "net", "ipc"), ("mnt",), ("net",), ("ipc",)):
        if len(spaces) + len(tried) > 3:
            break
        if libc.unshare(sum(_NS[s] for s in tried)) == 0:
            spaces.update(tried)
        else:
            problems[f"unshare({'+'.join(tried)})"] = os.strerror(ctypes.get_errno())
    if "net" in spaces:
        active.append("netns")  # its only interface is a loopback that is down
    if "ipc" in spaces:
        active.append("ipcns")
    return spaces


def python_paths() -> tuple[list[str], list[str]]:
    """(directories, files) the interpreter needs: its standard library, the interpreter and
    every file it has mapped (libpython where shared), the shared-library directories."""
    dirs = [p for p in sys.path if os.path.isdir(p)]
    files = [p for p in sys.path if os.path.isfile(p)]  # python3X.zip where there is one
    files.append(os.path.realpath(sys.executable))
    try:
        for line in open("/proc/self/maps").read().splitlines():
            fields = line.split(None, 5)
            if len(fields) == 6 and fields[5].startswith("/") and os.path.isfile(fields[5]):
                files.append(fields[5])
    except OSError:
        pass
    for top in ("/usr/lib", "/usr/lib64", "/usr/lib32", "/lib", "/lib64", "/lib32",
                "/usr/share/zoneinfo"):
        if os.path.isdir(top) and not os.path.islink(top):
            dirs.append(top)
    if os.path.isfile("/etc/ld.so.cache"):
        files.append("/etc/ld.so.cache")
    return sorted(set(dirs)), sorted(set(files))


def _covered(path: str, dirs: list[str]) -> bool:
    return any(path == d or path.startswith(d.rstrip("/") + "/") for d in dirs)


def _private_root(libc: Any, disk_mb: int, pidns: bool, problems: dict[str, str]) -> bool:
    """Pivot into a new root on a tmpfs: read-only binds of what :func:`python_paths` lists,
    /dev/{null,zero,full,random,urandom}, a read-only /proc of the pid namespace, and a
    ``disk_mb`` tmpfs at ``WORKDIR``. Nothing else of the host is reachable afterwards."""
    import ctypes

    def mount(src: str | None, dst: str, fstype: str | None, flags: int, data: str | None = None) -> None:
        if libc.mount(src and src.encode(), dst.encode(), fstype and fstype.encode(), flags,
                      data and data.encode()) != 0:
            raise OSError(ctypes.get_errno(), f"mount {src or fstype} on {dst}: "
                          f"{os.strerror(ctypes.get_errno())}")

    def bind(src: str, readonly: bool = True) -> None:
        dst = new + src
        if os.path.isdir(src):
            os.makedirs(dst, exist_ok=True)
        else:
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            os.close(os.open(dst, os.O_CREAT | os.O_WRONLY, 0o644))
        try:
            mount(src, dst, None, _MS_BIND)
        except OSError:  # a user namespace forbids a bind that would uncover locked mounts
            mount(src, dst, None, _MS_BIND | _MS_REC)
        if readonly:  # flags the kernel locks in a user namespace must be repeated
            mount(None, dst, None, _MS_REMOUNT | _MS_BIND | _MS_RDONLY | _lock_flags(src))

    dirs, files = python_paths()
    top = [d for d in dirs if not _covered(d, [o for o in dirs if o != d])]
    base = next((d for d in (TMP, "/mnt", "/media", "/srv", "/opt", "/var/tmp")
                 if os.path.isdir(d) and not os.path.islink(d)
                 and not _covered(d, top) and not any(_covered(p, [d]) for p in top + files)), None)
    if base is None:
        problems["private-root"] = "no directory to build it on"
        return False
    new, mounted = base, False
    try:
        # Private first: otherwise the mounts would propagate to the host.
        mount(None, "/", None, _MS_REC | _MS_PRIVATE)
        mount("tmpfs", new, "tmpfs", _MS_NOSUID | _MS_NODEV, "size=1m,nr_inodes=4096,mode=0755")
        mounted = True
        for d in top:
            bind(d)
        for link in ("/lib", "/lib64", "/lib32"):  # merged-/usr symlinks, as on the host
            if os.path.islink(link) and not os.path.lexists(new + link):
                os.symlink(os.readlink(link), new + link)
        for f in files:
            if not _covered(f, top):
                bind(f)
        for d in dirs:  # the interpreter's own site-packages stays out of sight
            site = os.path.join(d, "site-packages")
            if d in sys.path and os.path.isdir(new + site):
                mount("tmpfs", new + site, "tmpfs", _MS_RDONLY | _MS_NOSUID | _MS_NODEV | _MS_NOEXEC,
                      "size=4k")
        os.makedirs(new + "/dev")
        for node in ("null", "zero", "full", "random", "urandom"):
            if os.path.exists(f"/dev/{node}"):
                bind(f"/dev/{node}", readonly=False)
        if pidns:
            os.mkdir(new + "/proc")
            mount("proc", new + "/proc", "proc", _MS_RDONLY | _MS_NOSUID | _MS_NODEV | _MS_NOEXEC)
            for name, target in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"),
                                 ("stdout", "/proc/self/fd/1"), ("stderr", "/proc/self/fd/2")):
                os.symlink(target, f"{new}/dev/{name}")
        os.mkdir(new + WORKDIR)
        mount("tmpfs", new + WORKDIR, "tmpfs", _MS_NOSUID | _MS_NODEV,
              f"size={disk_mb}m,mode=0700")
        os.chdir(new)
        pivot = _PIVOT_ROOT.get(os.uname().machine)
        if pivot is not None and libc.syscall(pivot, b".", b".") == 0:
            if libc.umount2(b".", 2) != 0:  # MNT_DETACH: the old root, stacked on the new one
                raise OSError(ctypes.get_errno(), "umount of the old root failed")
        else:  # switch_root's way: move the new root over / and chroot into it
            mount(".", "/", None, _MS_MOVE)
            os.chroot(".")
        os.chdir("/")
        mount(None, "/", None, _MS_REMOUNT | _MS_BIND | _MS_RDONLY | _MS_NOSUID | _MS_NODEV)
        return True
    except OSError as exc:
        problems["private-root"] = str(exc)
        try:
            os.chdir("/")
        except OSError:
            pass
        if mounted:  # only our own tmpfs: the fallback's directory then lands on the host's
            libc.umount2(base.encode(), 2)
        return False


def _lock_flags(path: str) -> int:
    flags = os.statvfs(path).f_flag
    ms = sum(m for st, m in ((2, _MS_NOSUID), (4, _MS_NODEV), (8, _MS_NOEXEC), (1024, _MS_NOATIME),
                             (2048, _MS_NODIRATIME), (4096, _MS_RELATIME)) if flags & st)
    return ms if flags & (1024 | 4096) else ms | _MS_STRICTATIME


def _user_tasks(uid: int) -> int:
    count = 0
    for pid in os.listdir("/proc"):
        try:
            if pid.isdigit() and os.stat(f"/proc/{pid}").st_uid == uid:
                count += len(os.listdir(f"/proc/{pid}/task"))
        except OSError:
            pass
    return count


def _drop_caps(libc: Any, last_cap: int, active: list[str], problems: dict[str, str]) -> None:
    import ctypes

    libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)  # no setuid binary gives them back
    for cap in range(last_cap + 1):
        libc.prctl(24, cap, 0, 0, 0)  # PR_CAPBSET_DROP: else exec as uid 0 regains them all
    libc.prctl(47, 4, 0, 0, 0)  # PR_CAP_AMBIENT_CLEAR_ALL

    class Header(ctypes.Structure):
        _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]

    data = (ctypes.c_uint32 * 6)()  # effective, permitted, inheritable for two 32-bit words
    libc.capset(ctypes.byref(Header(0x20080522, 0)), data)
    libc.capget(ctypes.byref(Header(0x20080522, 0)), data)
    # An unprivileged user cannot empty the bounding set, but with no_new_privs and a uid other
    # than 0 no exec can raise a capability out of it.
    bounding = [cap for cap in range(last_cap + 1) if libc.prctl(23, cap, 0, 0, 0) == 1]
    if not any(data) and (not bounding or os.geteuid() != 0):
        active.append("caps-dropped")
    else:
        problems["caps"] = "capabilities remain"


def _landlock_ruleset(libc: Any, workdir: str,
                      problems: dict[str, str]) -> tuple[int, int] | None:
    """A Landlock ruleset (kernel 5.13+) for the fallback: read and run only what
    :func:`python_paths` lists, write only in ``workdir``; with ABI 4+ no TCP, with ABI 6+
    no abstract Unix sockets or signals beyond the sandbox. (fd, ABI), or None."""
    import ctypes
    import struct

    abi = libc.syscall(444, None, 0, 1)  # LANDLOCK_CREATE_RULESET_VERSION
    if abi < 1:
        problems["landlock"] = os.strerror(ctypes.get_errno()) if abi < 0 else "unavailable"
        return None
    fs_all = (1 << 13) - 1 | (1 << 13 if abi >= 2 else 0) | (1 << 14 if abi >= 3 else 0) | (
        1 << 15 if abi >= 5 else 0)
    if abi >= 6:
        attr = struct.pack("=QQQ", fs_all, 3, 3)  # no TCP bind/connect; scoped: abstract, signal
    elif abi >= 4:
        attr = struct.pack("=QQ", fs_all, 3)
    else:
        attr = struct.pack("=Q", fs_all)
    ruleset = libc.syscall(444, attr, len(attr), 0)
    if ruleset < 0:
        problems["landlock"] = os.strerror(ctypes.get_errno())
        return None
    read_dir, read_file = 1 | 4 | 8, 1 | 4  # EXECUTE, READ_FILE, READ_DIR
    devices = 2 | 4 | (1 << 14 if abi >= 3 else 0)  # WRITE_FILE, READ_FILE, TRUNCATE
    dirs, files = python_paths()
    rules = [(d, read_dir) for d in dirs] + [(f, read_file) for f in files]
    rules += [(f"/dev/{n}", devices) for n in ("null", "zero", "full")]
    rules += [(f"/dev/{n}", 4) for n in ("random", "urandom")]
    rules += [(f"/proc/{os.getpid()}", 4 | 8), (workdir, fs_all)]
    for path, access in rules:
        try:
            fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
        except OSError:
            continue
        rule = struct.pack("=Qi", access, fd)  # struct landlock_path_beneath_attr, packed
        if libc.syscall(445, ruleset, 1, rule, 0) != 0:
            problems[f"landlock-rule {path}"] = os.strerror(ctypes.get_errno())
        os.close(fd)
    return ruleset, abi


def _landlock_restrict(libc: Any, ruleset_abi: tuple[int, int], active: list[str],
                       problems: dict[str, str]) -> None:
    import ctypes

    ruleset, abi = ruleset_abi
    if libc.syscall(446, ruleset, 0) != 0:  # needs no_new_privs, set by _drop_privileges
        problems["landlock"] = os.strerror(ctypes.get_errno())
    else:
        active += ["landlock-fs"] + (["landlock-net"] if abi >= 4 else []) + (
            ["landlock-scope"] if abi >= 6 else [])
    os.close(ruleset)


def _seccomp_no_sockets(libc: Any, active: list[str], problems: dict[str, str]) -> None:
    """Without both a network namespace and a private root, no new socket at all: a seccomp
    filter fails socket(2), io_uring_setup(2) (whose ops can open sockets) and every syscall
    of another ABI (x32, i386's socketcall). socketpair(2) still works (asyncio needs it)."""
    import ctypes
    import struct

    machine = os.uname().machine
    if machine not in _SOCKET:
        problems["seccomp"] = f"no filter for {machine}"
        return
    deny = 0x00050000 | 1  # SECCOMP_RET_ERRNO | EPERM
    allow = 0x7FFF0000

    def op(code: int, k: int, jt: int = 0, jf: int = 0) -> bytes:
        return struct.pack("=HBBI", code, jt, jf, k)

    ld, jeq, jge, ret = 0x20, 0x15, 0x35, 0x06
    program = [op(ld, 4), op(jeq, _AUDIT_ARCH[machine], 1, 0), op(ret, deny),  # arch
               op(ld, 0), op(jge, 0x40000000, 3, 0),  # x32 syscalls
               op(jeq, _SOCKET[machine], 2, 0), op(jeq, 425, 1, 0),  # socket, io_uring_setup
               op(ret, allow), op(ret, deny)]
    code = b"".join(program)
    buf = ctypes.create_string_buffer(code, len(code))

    class Prog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]

    prog = Prog(len(program), ctypes.cast(buf, ctypes.c_void_p))
    if libc.prctl(22, 2, ctypes.byref(prog), 0, 0) != 0:  # PR_SET_SECCOMP, SECCOMP_MODE_FILTER
        problems["seccomp"] = os.strerror(ctypes.get_errno())
    else:
        active.append("seccomp-net")


# --- the keeper's cleanup -----------------------------------------------------------------------

def _children(pid: int) -> list[int]:
    try:
        return [int(p) for p in open(f"/proc/{pid}/task/{pid}/children").read().split()]
    except (OSError, ValueError):
        found = []
        for entry in filter(str.isdigit, os.listdir("/proc")):
            try:
                if int(open(f"/proc/{entry}/stat").read().rsplit(")", 1)[1].split()[1]) == pid:
                    found.append(int(entry))
            except (OSError, IndexError, ValueError):
                pass
        return found


def reap_children(runner: int) -> None:
    """Kill and reap every process left under the runner, a child subreaper: orphans of the
    code, even those that left its session, are reparented to it."""
    import time

    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        children = _children(runner)
        for pid in children:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            while os.waitpid(-1, os.WNOHANG)[0] > 0:
                pass
        except ChildProcessError:
            if not children:
                return
        if not children:
            return
        time.sleep(0.002)


def _cgroup_parents() -> dict[str, str]:
    """kind -> the directory this process's cgroup of that kind is (v1 pids/memory, or v2)."""
    found: dict[str, str] = {}
    try:
        lines = open("/proc/self/cgroup").read().splitlines()
    except OSError:
        return found
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers in ("pids", "memory"):
            found[controllers] = f"/sys/fs/cgroup/{controllers}{path}"
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "" and os.path.exists("/sys/fs/cgroup/cgroup.controllers"):
            for kind in ("pids", "memory"):
                found.setdefault(kind, f"/sys/fs/cgroup{path}")
    return found


def make_cgroups(runner: int, max_tasks: int, max_bytes: int) -> dict[str, str]:
    """Child cgroups of our own capping tasks and memory, where we may create them."""
    found: dict[str, str] = {}
    knobs = {"pids": {"pids.max": max_tasks},
             "memory": {"memory.limit_in_bytes": max_bytes, "memory.max": max_bytes}}
    for kind, parent in _cgroup_parents().items():
        path = os.path.join(parent, f"{PREFIX}{runner}-{os.urandom(6).hex()}")
        try:
            os.mkdir(path)
        except OSError:
            continue
        written = False
        for knob, value in knobs[kind].items():
            try:
                with open(os.path.join(path, knob), "w") as f:
                    f.write(str(value))
                written = True
            except OSError:
                pass
        if written:
            found[kind] = path
        else:
            _rmdir(path, tries=1)
    return found


def _kill_cgroup(path: str) -> None:
    import time

    for _ in range(200):
        try:
            pids = [int(p) for p in open(os.path.join(path, "cgroup.procs")).read().split()]
        except (OSError, ValueError):
            return
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.005)


def _rmdir(path: str, tries: int) -> bool:
    import time

    for _ in range(tries):  # killed tasks leave the cgroup once reaped
        try:
            os.rmdir(path)
            return True
        except FileNotFoundError:
            return True
        except OSError:
            time.sleep(0.01)
    return False


def _orphaned(name: str) -> bool | None:
    """Whether the runner that made ``PREFIX<pid>-…`` is gone; None for another name."""
    head, _, rest = name[len(PREFIX):].partition("-")
    if not (head.isdigit() and rest):
        return None
    try:
        return "_sandbox_child" not in open(f"/proc/{head}/cmdline").read()
    except OSError:
        return True


def sweep() -> None:
    """Remove the cgroups and working directories of runners that are gone (SIGKILLed), and
    empty cgroups of the older unnamed kind."""
    for parent in set(_cgroup_parents().values()):
        try:
            names = [n for n in os.listdir(parent) if n.startswith(PREFIX)]
        except OSError:
            continue
        for name in names:
            orphaned = _orphaned(name)
            if orphaned:
                _kill_cgroup(os.path.join(parent, name))
            if orphaned is not False:
                _rmdir(os.path.join(parent, name), tries=10 if orphaned else 1)
    try:
        names = [n for n in os.listdir(TMP) if n.startswith(PREFIX)]
    except OSError:
        return
    for name in names:
        if _orphaned(name):
            _remove_tree(os.path.join(TMP, name))


def remove_workdirs(runner: int) -> None:
    try:
        names = [n for n in os.listdir(TMP) if n.startswith(f"{PREFIX}{runner}-")]
    except OSError:
        return
    for name in names:
        _remove_tree(os.path.join(TMP, name))


def _remove_tree(path: str) -> None:
    import shutil

    def force(func: object, failed: str, exc: object) -> None:
        """The code may have left directories without write permission."""
        try:
            os.chmod(os.path.dirname(failed), 0o700)
            os.chmod(failed, 0o700)
        except OSError:
            pass
        if os.path.isdir(failed) and not os.path.islink(failed):
            shutil.rmtree(failed, ignore_errors=True)
        else:
            try:
                os.unlink(failed)
            except OSError:
                pass

    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, onerror=force)


def _relay(status: int) -> NoReturn:
    """Exit the way the sandbox did."""
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        signal.signal(sig, signal.SIG_DFL)
        os.kill(os.getpid(), sig)
        os._exit(128 + sig)
    os._exit(os.waitstatus_to_exitcode(status))


# --- the code ---------------------------------------------------------------------------------

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

    def resolve(path: Any, dir_fd: int | None = None) -> str:
        base = os.readlink(f"/proc/self/fd/{dir_fd}") if dir_fd is not None else os.getcwd()
        return os.path.realpath(os.path.join(base, os.fsdecode(os.fspath(path))))

    def inside(path: Any, dir_fd: int | None = None) -> bool:
        if isinstance(path, int):
            return True  # an already-open descriptor
        full = resolve(path, dir_fd)
        return full == workdir or full.startswith(workdir + os.sep) or full == os.devnull

    # Reads: the kernel hides the rest behind the private root or Landlock; else only this.
    guard_reads = not {"private-root", "landlock-fs"} & set(active)
    read_dirs, read_files = python_paths() if guard_reads else ([], [])
    read_dirs += [workdir, "/dev"]

    def readable(path: Any, dir_fd: int | None = None) -> bool:
        if not guard_reads or isinstance(path, int):
            return True
        full = resolve(path, dir_fd)
        return full in read_files or _covered(full, [*read_dirs, f"/proc/{os.getpid()}"])

    real_open, real_os_open = io.open, os.open
    writes = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND

    def guarded_open(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        if set(mode) & set("wax+") and not inside(file):
            refuse("writing outside the working directory", file)
        if not readable(file):
            refuse("reading outside the interpreter and the working directory", file)
        return real_open(file, mode, *args, **kwargs)

    def guarded_os_open(path: Any, flags: int, mode: int = 0o777, *, dir_fd: int | None = None) -> int:
        if flags & writes and not inside(path, dir_fd):
            refuse("writing outside the working directory", path)
        if not readable(path, dir_fd):
            refuse("reading outside the interpreter and the working directory", path)
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
    if guard_reads:
        for name in ("listdir", "scandir"):
            real_list = getattr(os, name)

            def guarded_list(path: Any = ".", *, _real: Any = real_list, _name: str = name) -> Any:
                if not readable(path):
                    refuse(f"os.{_name} outside the interpreter and the working directory", path)
                return _real(path)

            setattr(os, name, guarded_list)
        active.append("prelude-read")

    # Unix sockets stay only where no host path and no host abstract name can be reached.
    local_unix = {"netns", "private-root"} <= set(active)

    def no_network(base: type) -> type:
        # A subclass, not a function: ``class SSLSocket(socket)`` and the like still import.
        class NoNetwork(base):  # type: ignore[misc, valid-type]
            def __init__(self, family: int = -1, type: int = -1, proto: int = -1,
                         fileno: int | None = None) -> None:
                if fileno is None and not (local_unix and family == socket.AF_UNIX):
                    refuse("network access")
                # Not super(): socket.socket.__init__ calls _socket.socket.__init__, which is
                # the other of these two classes, with an instance of the first.
                base.__init__(self, family, type, proto, fileno)

        return NoNetwork

    socket.socket = no_network(socket.socket)  # type: ignore[misc, assignment]
    _socket.socket = no_network(_socket.socket)  # type: ignore[misc, assignment]
    active += ["prelude-net", "prelude-fs"]

    def blocked(what: str) -> Any:
        def refuse_call(*args: Any, **kwargs: Any) -> NoReturn:
            refuse(what)

        return refuse_call

    # A new program runs without this prelude: only allow one where the kernel confines it.
    confined = {"netns", "private-root"} <= set(active) or {"landlock-fs", "seccomp-net"} <= set(active)
    if not (confined and {"cgroup-pids", "nproc"} & set(active)):
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
    if not {"pidns", "landlock-scope"} & set(active):  # outside processes can be signalled
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
