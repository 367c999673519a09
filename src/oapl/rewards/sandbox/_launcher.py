"""In-sandbox side of the oapl code sandbox (stdlib only, run as a script).

This file is executed by :mod:`oapl.rewards.sandbox.runner` as
``python [-s] -P -B -c BOOTSTRAP SOURCE_FD SPEC_FD`` (its source or code and the JSON spec
come on inherited file descriptors, so no host path is in its command line) in a
fresh session (its own process group) with a clean environment.  It is *trusted* code: it sets up isolation
and then runs the untrusted program once per test case, each time in a fresh
forked process that has dropped every privilege.

Process tree (namespace mode)::

    trainer ─ launcher L (new session; unshares user?/net/pid/mount/ipc/uts/cgroup)
                 └─ init P1 (pid 1 of the new pid namespace; builds the
                    read-only file-system view, pivot_root, then re-executes
                    the interpreter from /.oapl-python/<i> so that /proc
                    names no host path; see _reexec)
                      └─ test process T_i (own process group, own mount
                         namespace with a fresh tmpfs /tmp, rlimits, no
                         privileges, clean env) ─ runs the untrusted code

Protocol: the launcher reads a JSON spec from ``SPEC_FD``
and writes length-prefixed (4-byte big-endian) JSON frames to fd 1:

* ``{"type": "ready", ...isolation facts...}`` once, or
  ``{"type": "ready", "error": "..."}`` if isolation could not be set up;
* ``{"type": "result", "index": i, "status": ..., "stdout": ..., ...}`` per test;
* ``{"type": "done"}`` at the end.

Expected outputs never enter the sandbox: comparison happens in the trainer,
so nothing the program does in here can make a wrong answer pass.
"""

from __future__ import annotations

import ctypes
import json
import os
import resource
import select
import signal
import struct
import sys
import time

# --------------------------------------------------------------------------- constants

CLONE_NEWNS = 0x00020000
CLONE_NEWCGROUP = 0x02000000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000

MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_REMOUNT = 32
MS_NOATIME = 1024
MS_NODIRATIME = 2048
MS_BIND = 4096
MS_MOVE = 8192
MS_REC = 16384
MS_PRIVATE = 1 << 18
MS_RELATIME = 1 << 21
MS_STRICTATIME = 1 << 24
MNT_DETACH = 2

PR_SET_PDEATHSIG = 1
PR_SET_DUMPABLE = 4
PR_CAPBSET_DROP = 24
PR_SET_SECUREBITS = 28
PR_SET_CHILD_SUBREAPER = 36
PR_SET_NO_NEW_PRIVS = 38
# SECBIT_NOROOT | _LOCKED | SECBIT_NO_SETUID_FIXUP | _LOCKED | SECBIT_KEEP_CAPS_LOCKED
SECURE_BITS_ALL_LOCKED = 0x2F

_MACHINE = os.uname().machine
_PIVOT_ROOT_NR = {"x86_64": 155, "aarch64": 41, "riscv64": 41}.get(_MACHINE)

# seccomp: (AUDIT_ARCH_*, unshare, clone, clone3) syscall numbers of the architectures we filter on.
_SECCOMP_ARCH = {
    "x86_64": (0xC000003E, 272, 56, 435),
    "aarch64": (0xC00000B7, 97, 220, 435),
    "riscv64": (0xC00000F3, 97, 220, 435),
}.get(_MACHINE)
PR_SET_SECCOMP = 22
SECCOMP_MODE_FILTER = 2

# Exit codes the test process uses for its own (trusted harness) failures.
EXIT_HARNESS_ERROR = 121

# Import header used by LiveCodeBench / DeepCoder graders: programs (notably
# LeetCode starter code using ``List[int]``) rely on these names existing.
LCB_IMPORT_HEADER = (
    "from string import *\nfrom re import *\nfrom datetime import *\n"
    "from collections import *\nfrom heapq import *\nfrom bisect import *\n"
    "from copy import *\nfrom math import *\nfrom random import *\n"
    "from statistics import *\nfrom itertools import *\nfrom functools import *\n"
    "from operator import *\nfrom io import *\nfrom sys import *\nfrom json import *\n"
    "from builtins import *\nfrom typing import *\nimport string\nimport re\n"
    "import datetime\nimport collections\nimport heapq\nimport bisect\nimport copy\n"
    "import math\nimport random\nimport statistics\nimport itertools\nimport functools\n"
    "import operator\nimport io\nimport sys\nimport json\nsys.setrecursionlimit(50000)\n"
)

# Imported before any isolation so the test processes (which may not be able
# to read the interpreter's files in degraded mode) have them in memory.
PRELOAD = (
    "string",
    "re",
    "datetime",
    "collections",
    "heapq",
    "bisect",
    "copy",
    "math",
    "random",
    "statistics",
    "itertools",
    "functools",
    "operator",
    "io",
    "json",
    "typing",
    "decimal",
    "fractions",
    "array",
    "traceback",
    "threading",
    "atexit",
    "types",
    "dataclasses",
    "enum",
    "queue",
    "textwrap",
    "time",
    "codecs",
    "encodings.utf_8",
    "encodings.latin_1",
    "encodings.ascii",
)
# In degraded (no-namespace) mode as root, the sandbox uid may be unable to read
# the interpreter's files (e.g. a Python under /root): preload more there.
PRELOAD_DEGRADED = (
    "socket",
    "struct",
    "hashlib",
    "base64",
    "signal",
    "select",
    "errno",
    "glob",
    "fnmatch",
    "pathlib",
    "tempfile",
    "shutil",
    "zlib",
    "unicodedata",
    "numbers",
    "contextlib",
    "weakref",
    "mmap",
    "ctypes",
    "cmath",
    "pprint",
    "secrets",
    "uuid",
    "subprocess",
    "encodings.idna",
    "encodings.utf_16",
    "encodings.utf_32",
    "encodings.unicode_escape",
    "encodings.raw_unicode_escape",
)

# --------------------------------------------------------------------------- libc

_libc = ctypes.CDLL(None, use_errno=True)


def _b(value: str | None) -> bytes | None:
    return None if value is None else os.fsencode(value)


def _check(rc: int, what: str) -> None:
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def unshare(flags: int) -> None:
    _check(_libc.unshare(ctypes.c_int(flags)), "unshare")


def mount(src: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    _check(_libc.mount(_b(src), _b(target), _b(fstype), ctypes.c_ulong(flags), _b(data)), f"mount {target}")


def umount2(target: str, flags: int) -> None:
    _check(_libc.umount2(_b(target), ctypes.c_int(flags)), f"umount {target}")


def prctl(option: int, arg2: int = 0) -> int:
    return _libc.prctl(
        ctypes.c_int(option), ctypes.c_ulong(arg2), ctypes.c_ulong(0), ctypes.c_ulong(0), ctypes.c_ulong(0)
    )


def pivot_root(new_root: str, put_old: str) -> None:
    if _PIVOT_ROOT_NR is None:
        raise OSError(38, "pivot_root: unknown syscall number on this architecture")
    _check(_libc.syscall(ctypes.c_long(_PIVOT_ROOT_NR), _b(new_root), _b(put_old)), "pivot_root")


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


def drop_bounding_set() -> None:
    """Empty the capability bounding set (needs CAP_SETPCAP; best effort)."""
    for cap in range(64):
        if prctl(PR_CAPBSET_DROP, cap) != 0:
            break  # EINVAL past the last capability (or EPERM without CAP_SETPCAP)


def drop_all_capabilities() -> None:
    """Lock securebits, empty the bounding set and clear every capability set."""
    prctl(PR_SET_SECUREBITS, SECURE_BITS_ALL_LOCKED)  # may fail without CAP_SETPCAP: fine
    drop_bounding_set()
    header = _CapHeader(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3
    data = (_CapData * 2)()
    _check(_libc.capset(ctypes.byref(header), ctypes.byref(data)), "capset")


class _SockFilter(ctypes.Structure):
    _fields_ = [("code", ctypes.c_ushort), ("jt", ctypes.c_ubyte), ("jf", ctypes.c_ubyte), ("k", ctypes.c_uint32)]


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(_SockFilter))]


def no_user_namespaces_filter() -> list[tuple[int, int, int, int]]:
    """A seccomp-BPF program: no new user namespace, by any route.

    ``unshare`` and ``clone`` with ``CLONE_NEWUSER`` fail with EPERM; ``clone3`` (whose flags sit
    in memory a filter cannot read) fails with ENOSYS, so libc falls back to ``clone``; syscalls
    of another ABI (i386 ``int 0x80``, x32) fail with EPERM. Everything else is allowed.
    """
    arch, nr_unshare, nr_clone, nr_clone3 = _SECCOMP_ARCH  # type: ignore[misc]
    ld_abs, jeq, jge, jset, ret = 0x20, 0x15, 0x35, 0x45, 0x06
    allow, eperm, enosys = 0x7FFF0000, 0x00050000 | 1, 0x00050000 | 38
    # offsets in struct seccomp_data: nr 0, arch 4, args[0] 16 (low word, little-endian)
    return [
        (ld_abs, 0, 0, 4),  # 0  A = arch
        (jeq, 1, 0, arch),  # 1  native ABI -> 3
        (ret, 0, 0, eperm),  # 2  another ABI: refuse
        (ld_abs, 0, 0, 0),  # 3  A = syscall number
        (jge, 7, 0, 0x40000000),  # 4  x32 ABI -> 12 (EPERM)
        (jeq, 7, 0, nr_clone3),  # 5  -> 13 (ENOSYS)
        (jeq, 2, 0, nr_unshare),  # 6  -> 9
        (jeq, 1, 0, nr_clone),  # 7  -> 9
        (ret, 0, 0, allow),  # 8
        (ld_abs, 0, 0, 16),  # 9  A = flags (first argument)
        (jset, 1, 0, CLONE_NEWUSER),  # 10 -> 12
        (ret, 0, 0, allow),  # 11
        (ret, 0, 0, eperm),  # 12
        (ret, 0, 0, enosys),  # 13
    ]


def forbid_user_namespaces() -> None:
    """Install :func:`no_user_namespaces_filter` (needs no_new_privs); raises OSError if it cannot."""
    if _SECCOMP_ARCH is None:
        raise OSError(38, f"seccomp filter: unsupported architecture {_MACHINE}")
    prog = no_user_namespaces_filter()
    arr = (_SockFilter * len(prog))(*[_SockFilter(*ins) for ins in prog])
    fprog = _SockFprog(len(prog), ctypes.cast(arr, ctypes.POINTER(_SockFilter)))
    rc = _libc.prctl(
        ctypes.c_int(PR_SET_SECCOMP),
        ctypes.c_ulong(SECCOMP_MODE_FILTER),
        ctypes.byref(fprog),
        ctypes.c_ulong(0),
        ctypes.c_ulong(0),
    )
    _check(rc, "seccomp")


# --------------------------------------------------------------------------- I/O helpers


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def send(fd: int, obj: dict) -> None:
    data = json.dumps(obj, ensure_ascii=True).encode("ascii")
    write_all(fd, struct.pack(">I", len(data)) + data)


# --------------------------------------------------------------------------- isolation setup


def _remount_flags(path: str) -> int:
    """Flags to keep when re-mounting ``path`` read-only (locked flags in a user namespace)."""
    flags = MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV
    try:
        f = os.statvfs(path).f_flag
    except OSError:
        return flags
    if f & os.ST_NOEXEC:
        flags |= MS_NOEXEC
    if f & os.ST_NOATIME:
        flags |= MS_NOATIME
    if f & os.ST_NODIRATIME:
        flags |= MS_NODIRATIME
    if f & getattr(os, "ST_RELATIME", 4096):
        flags |= MS_RELATIME
    elif not f & os.ST_NOATIME:
        flags |= MS_STRICTATIME
    return flags


def _bind_readonly(src: str, dst: str) -> None:
    mount(src, dst, None, MS_BIND | MS_REC)
    try:
        mount(None, dst, None, _remount_flags(src))
    except OSError:
        # Retry without atime flags (some kernels reject them for bind remounts).
        mount(None, dst, None, MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV)


def _home_dir() -> str | None:
    try:
        import pwd

        return os.path.realpath(pwd.getpwuid(os.geteuid()).pw_dir)
    except (ImportError, KeyError, OSError):
        return None


def _python_paths(workdir: str | None = None) -> list[str]:
    """What the interpreter imports from: prefixes, every site-packages, and the ``sys.path`` entries
    that ``.pth`` files add (editable installs), as both the given and the real paths.

    Left out: any folder that is ``/``, the home directory or a folder above it or above the
    sandbox's own folder (a ``.pth`` naming such a folder, or a Python installed with
    ``--prefix=$HOME``, would otherwise expose the host wholesale; their ``lib/pythonX.Y`` and
    site-packages still are exposed), and a ``.pth`` folder holding the trainer's own ``oapl``
    package (the project's source in an editable install).
    """
    import site

    paths = {
        sys.prefix,
        sys.base_prefix,
        sys.exec_prefix,
        sys.base_exec_prefix,
        os.path.dirname(os.path.realpath(sys.executable)),
    }
    prefixes = {os.path.realpath(p) for p in (sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix)}
    try:
        paths.update(site.getsitepackages())
    except AttributeError:  # pragma: no cover - very old virtualenv's site.py
        pass
    if site.ENABLE_USER_SITE:
        paths.add(site.getusersitepackages())
    home = _home_dir()
    guarded = [x for x in (home, workdir and os.path.realpath(workdir)) if x]

    def broad(real: str) -> bool:
        return real == "/" or any(x == real or x.startswith(real.rstrip("/") + "/") for x in guarded)

    for p in sys.path:
        if not p or not os.path.exists(p):
            continue
        real = os.path.realpath(p)
        if os.path.basename(p) in ("site-packages", "dist-packages") or any(
            real == q or real.startswith(q.rstrip("/") + "/") for q in prefixes
        ):
            paths.add(p)
        elif not os.path.isfile(os.path.join(real, "oapl", "rewards", "sandbox", "_launcher.py")):
            paths.add(p)
    out = set()
    for p in paths:
        if p and os.path.exists(p):
            for q in (os.path.realpath(p), os.path.abspath(p)):
                if not broad(os.path.realpath(q)):
                    out.add(q)
    return sorted(out)


SYSTEM_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/etc")
DEVICES = ("null", "zero", "full", "random", "urandom")
# Folders every test case gets a fresh tmpfs on: Python paths under them are linked again in there.
PER_TEST_TMPFS = ("/tmp", "/dev/shm")
# Host-wide /proc files the sandbox reads as empty (as container runtimes mask them).
PROC_MASKED = ("cmdline", "kcore", "keys", "timer_list", "sched_debug", "latency_stats", "kallsyms")
# Where the Python installation is mounted inside the sandbox; its host paths become symlinks to here.
NEUTRAL = "/.oapl-python"


def _symlinked_ancestor(path: str) -> str | None:
    """The first component of ``path`` (itself included) that is a symlink on the host, if any."""
    cur = ""
    for part in path.strip("/").split("/"):
        cur += "/" + part
        if os.path.islink(cur):
            return cur
    return None


def _under(path: str, top: str) -> bool:
    return path == top or path.startswith(top.rstrip("/") + "/")


def _unescape_mountinfo(field: str) -> str:
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and field[i + 1 : i + 4].isdigit():
            out.append(chr(int(field[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def _host_mount_points() -> list[str]:
    try:
        with open("/proc/self/mountinfo") as f:
            return sorted({_unescape_mountinfo(line.split()[4]) for line in f if len(line.split()) > 4})
    except OSError:
        return []


class _Mounter:
    """Mounts host folders read-only into the new root.

    A folder is mounted as a one-layer read-only overlay where the kernel allows it: its mountinfo
    line then reads ``/ <mount point> ... overlay overlay ro,lowerdir=l:e`` (the layers are named
    relative to a staging folder), so neither the folder's host path nor the host's devices and
    file-system options show in ``/proc/*/mountinfo``. Mounts below the folder are mirrored the same
    way. Where overlays are unavailable (old kernels, some file systems) it falls back to a
    recursive read-only bind mount.
    """

    def __init__(self, new_root: str, overlay: bool = True):
        self.overlay = overlay
        self.stage = new_root + NEUTRAL + "/.stage"
        os.makedirs(self.stage + "/l", exist_ok=True)
        os.makedirs(self.stage + "/e", exist_ok=True)
        self.host_mounts = _host_mount_points()
        self.kinds: set[str] = set()

    def _overlay(self, src: str, dst: str) -> None:
        mount(src, self.stage + "/l", None, MS_BIND)
        try:
            os.chdir(self.stage)
            mount("overlay", dst, "overlay", MS_RDONLY | MS_NOSUID | MS_NODEV, "lowerdir=l:e")
        finally:
            umount2(self.stage + "/l", MNT_DETACH)

    def mount_dir(self, src: str, dst: str, skip_file_submounts: bool = False) -> None:
        subs = [m for m in self.host_mounts if m != src and _under(m, src)]
        try:
            if not self.overlay:
                raise OSError(19, "overlays disabled")
            self._overlay(src, dst)
            for m in subs:
                target = dst + m[len(src) :]
                if os.path.isdir(m) and os.path.isdir(target):
                    self._overlay(m, target)
                elif os.path.isfile(m) and os.path.isfile(target) and not skip_file_submounts:
                    _bind_readonly(m, target)
            self.kinds.add("overlay")
        except OSError:
            try:  # undo a partial overlay tree, then bind the whole tree
                umount2(dst, MNT_DETACH)
            except OSError:
                pass
            _bind_readonly(src, dst)
            self.kinds.add("bind")


def build_root(new_root: str, tmpfs_bytes: int, facts: dict, state: dict | None = None, overlay: bool = True) -> None:
    """Create a minimal read-only root in ``new_root`` and pivot into it.

    Exposed read-only: system dirs, and the Python installation wherever it lives (prefixes,
    site-packages, ``.pth`` folders).  The latter are mounted under ``/.oapl-python/<i>`` and their
    host paths are symlinks to there, so everything Python resolves still works, while ``/proc``
    (mountinfo, the executable and mapped files of a re-executed interpreter) shows neutral paths.
    Everything else (home directories, /root, the project, /tmp, /sys, host /proc) is absent.
    Python paths under ``/tmp`` or ``/dev/shm`` are recorded in ``state["per_test"]`` so that every
    test case's fresh tmpfs links them again (see :func:`_private_tmpfs`).
    """
    mount(None, "/", None, MS_REC | MS_PRIVATE)
    mount("tmpfs", new_root, "tmpfs", MS_NOSUID | MS_NODEV, "size=16m,nr_inodes=4096,mode=755")
    mounter = _Mounter(new_root, overlay)
    exposed: list[str] = []
    per_test: list[tuple[str, str]] = []  # (symlink path, target) to recreate in a per-test tmpfs

    def covered(path: str) -> bool:
        return any(_under(path, e) for e in exposed)

    def add_link(link: str, target: str) -> None:
        dst = new_root + link
        if not os.path.lexists(dst):
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            os.symlink(target, dst)
        if any(_under(link, t) for t in PER_TEST_TMPFS):
            per_test.append((link, target))

    for path in SYSTEM_DIRS:
        if not os.path.lexists(path):
            continue
        if os.path.islink(path):
            add_link(path, os.readlink(path))
        elif os.path.isdir(path):
            os.makedirs(new_root + path, exist_ok=True)
            mounter.mount_dir(path, new_root + path, skip_file_submounts=path == "/etc")
            exposed.append(path)
    n = 0
    for path in _python_paths(new_root):
        if covered(path) or not os.path.lexists(path) or any(_under(path, t) for t in ("/proc", "/sys", "/dev/pts")):
            continue
        link = _symlinked_ancestor(path)
        if link is not None:
            # Recreate the link itself; its target's real path is in the list and gets mounted on
            # its own (never mount through a link: that would land on the host's side of it).
            add_link(link, os.readlink(link))
            continue
        if not os.path.isdir(path):  # e.g. a zip on sys.path outside the prefixes: not exposed
            continue
        neutral = f"{NEUTRAL}/{n}"
        n += 1
        os.makedirs(new_root + neutral)
        mounter.mount_dir(path, new_root + neutral)
        add_link(path, neutral)
        exposed.append(path)
    # (the staging folders stay: removing "e", a layer of every overlay, would keep the root file
    # system from being remounted read-only)
    facts["exposed"] = exposed
    facts["python_mounts"] = "+".join(sorted(mounter.kinds))
    if state is not None:
        state["per_test"] = per_test

    _populate_dev_and_tmp(new_root)
    _mount_private_proc(new_root, facts)
    _pivot_into(new_root, facts)


def _populate_dev_and_tmp(new_root: str) -> None:
    """The root's /dev (bound device nodes, the fd links, an empty shm), /tmp and /var/tmp."""
    dev = new_root + "/dev"
    os.makedirs(dev, exist_ok=True)
    for name in DEVICES:
        if os.path.exists("/dev/" + name):
            open(f"{dev}/{name}", "w").close()
            mount("/dev/" + name, f"{dev}/{name}", None, MS_BIND)
    for name, target in (
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
    ):
        os.symlink(target, f"{dev}/{name}")
    os.makedirs(dev + "/shm", exist_ok=True)
    os.makedirs(new_root + "/tmp", exist_ok=True)
    os.chmod(new_root + "/tmp", 0o1777)
    os.makedirs(new_root + "/var", exist_ok=True)
    if not os.path.lexists(new_root + "/var/tmp"):  # a Python under /var/tmp keeps its link there
        os.symlink("/tmp", new_root + "/var/tmp")


def _mount_private_proc(new_root: str, facts: dict) -> None:
    """A /proc of the new pid namespace, its host-wide files masked; none where it cannot be mounted."""
    os.makedirs(new_root + "/proc", exist_ok=True)
    try:
        mount("proc", new_root + "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
        facts["proc"] = "private"
        for name in PROC_MASKED:  # host-wide files (the kernel's boot line can name host paths)
            try:
                mount("/dev/null", f"{new_root}/proc/{name}", None, MS_BIND)
            except OSError:
                pass
    except OSError as exc:  # e.g. masked /proc in some containers: go without /proc
        facts["proc"] = f"absent ({exc})"


def _pivot_into(new_root: str, facts: dict) -> None:
    """Make ``new_root`` the root (pivot_root, else chroot) and remount it read-only."""
    os.chdir(new_root)
    if _PIVOT_ROOT_NR is not None:
        pivot_root(".", ".")
        umount2(".", MNT_DETACH)
        facts["fs"] = "pivot_root"
    else:
        os.chroot(".")
        facts["fs"] = "chroot"
    os.chdir("/")
    mount(None, "/", None, MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV)


def _private_tmpfs(top: str, opts: str, flags: int, per_test: list) -> None:
    """Mount a fresh tmpfs on ``top`` (in this test's mount namespace) holding the symlinks of the
    Python paths that live under ``top`` (their targets are mounted outside it)."""
    mount("tmpfs", top, "tmpfs", flags, opts)
    for link, target in per_test:
        if _under(link, top) and link != top:
            os.makedirs(os.path.dirname(link), exist_ok=True)
            if not os.path.lexists(link):
                os.symlink(target, link)


# --------------------------------------------------------------------------- test process


def _set_limits(spec: dict) -> None:
    cpu = max(1, int(spec["timeout_s"] + 0.999)) + 1
    mem = int(spec["memory_bytes"])
    limits = [
        (resource.RLIMIT_CPU, (cpu, cpu + 1)),
        (resource.RLIMIT_AS, (mem, mem)),
        (resource.RLIMIT_DATA, (mem, mem)),
        (resource.RLIMIT_FSIZE, (int(spec["max_file_bytes"]),) * 2),
        (resource.RLIMIT_NPROC, (int(spec["nproc_limit"]),) * 2),
        (resource.RLIMIT_NOFILE, (int(spec["max_open_files"]),) * 2),
        (resource.RLIMIT_CORE, (0, 0)),
        (resource.RLIMIT_MEMLOCK, (0, 0)),
    ]
    if hasattr(resource, "RLIMIT_MSGQUEUE"):
        limits.append((resource.RLIMIT_MSGQUEUE, (0, 0)))
    for which, value in limits:
        resource.setrlimit(which, value)
    # The stack may stay at its current soft value but cannot be raised.
    soft, _hard = resource.getrlimit(resource.RLIMIT_STACK)
    if soft != resource.RLIM_INFINITY and soft <= mem:
        resource.setrlimit(resource.RLIMIT_STACK, (soft, soft))


def _child_env(home: str) -> dict:
    return {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "HOME": home,
        "TMPDIR": home,
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
        "PYTHONHASHSEED": "0",
        "PYTHONIOENCODING": "utf-8",
        "PYTHONDONTWRITEBYTECODE": "1",
        "OMP_NUM_THREADS": "1",
        "OPENBLAS_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
    }


def _run_user_code(spec: dict, test_input, result_fd: int | None) -> int:
    """Execute the untrusted program in this (already confined) process; return exit code."""
    import atexit
    import threading
    import traceback

    # Bound before the program runs: monkeypatching json/os cannot reach the harness.
    dumps, write, close, run_exitfuncs = json.dumps, write_all, os.close, atexit._run_exitfuncs
    exit_code, finish = _system_exit_code, _finish_like_the_interpreter
    atexit._clear()
    _fresh_interpreter_state()
    functional = spec["mode"] == "functional"
    import types

    module_name = "solution" if functional else "__main__"
    module = types.ModuleType(module_name)
    module.__file__ = "solution.py"
    sys.modules[module_name] = module  # pickling/multiprocessing of user classes works
    g = module.__dict__
    code = 0
    try:
        exec(compile(LCB_IMPORT_HEADER, "<header>", "exec"), g)
        exec(compile(spec["code"], "solution.py", "exec"), g)
        if functional:
            name = spec["func_name"]
            sol_cls = g.get("Solution")
            if "class Solution" in spec["code"] and isinstance(sol_cls, type):
                fn = getattr(sol_cls(), name)
            else:
                fn = g[name]
            prediction = fn(*test_input)
            if isinstance(prediction, tuple):
                prediction = list(prediction)
            payload = dumps(prediction, allow_nan=True).encode("utf-8")
            assert result_fd is not None  # functional programs get a result pipe
            write(result_fd, payload)
            close(result_fd)
    except SystemExit as exc:
        code = exit_code(exc)
    except BaseException:
        try:
            traceback.print_exc()
        except BaseException:
            pass
        code = 1
    return finish(code, run_exitfuncs, threading)


def _fresh_interpreter_state() -> None:
    """What the program starts from: a seeded ``random``, the ``sys.path`` entries the sandbox
    shows, its own UTF-8 stdio on fds 0-2, ``sys.argv = ["solution.py"]``."""
    import io
    import random

    random.seed(0)  # deterministic "random" programs
    # Entries the sandbox does not show (e.g. the trainer's own source from an editable install)
    # name host folders and cannot be imported from anyway.
    sys.path[:] = [p for p in sys.path if p and os.path.exists(p)]
    sys.path_importer_cache.clear()
    sys.stdin = sys.__stdin__ = io.TextIOWrapper(  # type: ignore[misc]  # the program's own stdio
        io.BufferedReader(io.FileIO(0, "r", closefd=False)), encoding="utf-8", errors="strict"
    )
    sys.stdout = sys.__stdout__ = io.TextIOWrapper(  # type: ignore[misc]
        io.BufferedWriter(io.FileIO(1, "w", closefd=False)), encoding="utf-8", errors="strict"
    )
    sys.stderr = sys.__stderr__ = io.TextIOWrapper(  # type: ignore[misc]
        io.BufferedWriter(io.FileIO(2, "w", closefd=False)),
        encoding="utf-8",
        errors="backslashreplace",
        line_buffering=True,
    )
    sys.argv = ["solution.py"]


def _system_exit_code(exc: SystemExit) -> int:
    """The exit status of ``sys.exit(code)`` as the interpreter makes it (a message is printed, status 1)."""
    if exc.code is None or exc.code == 0:
        return 0
    if isinstance(exc.code, int):
        return exc.code if 0 < exc.code < 256 else 1
    try:
        print(exc.code, file=sys.stderr)
    except BaseException:
        pass
    return 1


def _finish_like_the_interpreter(code: int, run_exitfuncs, threading) -> int:
    """Mirror interpreter shutdown: join non-daemon threads, run atexit, flush; the exit status."""
    try:
        main = threading.main_thread()
        for t in threading.enumerate():
            if t is not main and not t.daemon:
                t.join()
        run_exitfuncs()
    except BaseException:
        code = code or 1
    for stream in (sys.stdout, sys.__stdout__, sys.stderr):
        try:
            if getattr(stream, "closed", False):
                continue  # like CPython: a stream the program closed is not an error
            stream.flush()  # type: ignore[union-attr]  # sys.__stdout__ is the TextIOWrapper set above
        except BaseException:
            code = code or 120
    return code


def test_child(spec: dict, test_input, fds: dict, use_ns: bool) -> None:
    """Body of a forked test process.  Never returns."""
    try:
        os.setpgid(0, 0)
        prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if use_ns:
            # a fresh mount namespace (private /tmp) and IPC namespace (SysV shm, semaphores and
            # message queues, POSIX mqueues) per test case: nothing one test makes reaches the next
            unshare(CLONE_NEWNS | CLONE_NEWIPC)
            opts = f"size={int(spec['tmpfs_bytes'])},nr_inodes=4096,mode=1777"
            per_test = spec.get("_per_test") or []
            _private_tmpfs("/tmp", opts, MS_NOSUID | MS_NODEV, per_test)
            _private_tmpfs(
                "/dev/shm",
                f"size={int(spec['tmpfs_bytes'])},nr_inodes=256,mode=1777",
                MS_NOSUID | MS_NODEV | MS_NOEXEC,
                per_test,
            )
            workdir = "/tmp"
        else:
            workdir = fds["workdir"]
        uid = spec.get("uid")
        if uid is not None and os.geteuid() == 0 and not spec.get("userns"):
            os.chown(workdir, uid, uid)
        os.chdir(workdir)
        os.dup2(fds["stdin"], 0)
        os.lseek(0, 0, os.SEEK_SET)
        os.dup2(fds["out_w"], 1)
        os.dup2(fds["err_w"], 2)
        keep = 3
        if fds.get("res_w") is not None:
            os.dup2(fds["res_w"], 3)
            keep = 4
        os.closerange(keep, 1 << 16)
        try:  # the kernel OOM killer must pick the program, never the trainer
            with open("/proc/self/oom_score_adj", "w") as f:
                f.write("1000")
        except OSError:
            pass
        _set_limits(spec)
        prctl(PR_SET_NO_NEW_PRIVS, 1)
        try:  # no user namespaces: they would hand the program a full capability set of its own
            forbid_user_namespaces()
        except OSError:
            if use_ns:
                os._exit(EXIT_HARNESS_ERROR)  # fail closed where isolation is promised
        if spec.get("userns"):
            drop_all_capabilities()
        elif uid is not None and os.geteuid() == 0:
            drop_bounding_set()
            os.setgroups([])
            os.setresgid(uid, uid, uid)
            os.setresuid(uid, uid, uid)
            if os.geteuid() == 0 or os.getuid() == 0:
                os._exit(EXIT_HARNESS_ERROR)
        os.environ.clear()
        os.environ.update(_child_env(workdir))
        os.umask(0o077)
        signal.signal(signal.SIGINT, signal.default_int_handler)  # normal Python semantics
    except BaseException:
        os._exit(EXIT_HARNESS_ERROR)
    try:
        rc = _run_user_code(spec, test_input, 3 if keep == 4 else None)
    except BaseException:
        rc = 1
    os._exit(rc)


# --------------------------------------------------------------------------- init / supervisor


def _children_of(pid: int) -> list[int]:
    """Child pids of ``pid`` (via /proc); used in no-namespace mode."""
    out: list[int] = []
    try:
        names = os.listdir("/proc")
    except OSError:
        return out
    for name in names:
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                data = f.read()
            ppid = int(data[data.rindex(b")") + 2 :].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if ppid == pid:
            out.append(int(name))
    return out


def _reap_nohang() -> None:
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def kill_everything(state: dict, child_pgid: int | None) -> None:
    """Kill every process the test left behind and reap them all."""
    if state["pidns"]:
        # We are pid 1 of a private pid namespace: kill(-1) reaches exactly the
        # processes of this namespace (never the host), except ourselves.
        assert os.getpid() == 1
        while True:
            try:
                os.kill(-1, signal.SIGKILL)
            except ProcessLookupError:
                pass
            try:
                os.waitpid(-1, 0)
            except ChildProcessError:
                return
    # Degraded mode (no pid namespace): process group, sandbox uid, subreaper children.
    uid = state.get("uid")
    for _ in range(50):
        if child_pgid is not None:
            try:
                os.killpg(child_pgid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        if uid is not None and os.geteuid() == 0 and uid not in (0, state["trainer_uid"]):
            helper = os.fork()
            if helper == 0:
                try:
                    os.setresgid(uid, uid, uid)
                    os.setresuid(uid, uid, uid)
                    if os.getuid() != 0:
                        os.kill(-1, signal.SIGKILL)
                except BaseException:
                    pass
                os._exit(0)
            os.waitpid(helper, 0)
        kids = _children_of(os.getpid())
        for k in kids:
            try:
                os.kill(k, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.002)
        _reap_nohang()
        if not kids and not _children_of(os.getpid()):
            return


def run_one(spec: dict, index: int, test_input, state: dict, deadline: float) -> dict:
    """Run test ``index`` in a fresh process; return its result frame."""
    functional = spec["mode"] == "functional"
    timeout = min(float(spec["timeout_s"]), max(0.0, deadline - time.monotonic()))
    max_out = int(spec["max_output_bytes"])
    pid, t0, out_r, err_r, res_r, fds = _fork_test(spec, index, test_input, state, functional)
    try:
        pidfd = os.pidfd_open(pid)
    except (AttributeError, OSError):
        pidfd = None
    pipes = _TestPipes(out_r, err_r, res_r, max_out, pidfd)
    status, exited = _wait_for_test(pid, pidfd, pipes, t0 + timeout)
    wall = time.monotonic() - t0

    if exited is None:
        exited = _kill_test(pid)
    kill_everything(state, pid)
    pipes.collect_rest()
    if pipes.over_limit and status is None:
        status = "output_limit"
    pipes.close()

    wst, ru = exited
    cpu = ru.ru_utime + ru.ru_stime
    exit_code = os.waitstatus_to_exitcode(wst)
    if status is None:
        # (a result pipe exists for functional programs)
        status = _exit_status(wst, exit_code, cpu, timeout, no_result=res_r is not None and not pipes.bufs[res_r])
    bufs = pipes.bufs
    frame = {
        "type": "result",
        "index": index,
        "status": status,
        "exit_code": exit_code,
        "cpu_s": round(cpu, 4),
        "wall_s": round(wall, 4),
        "stdout": (
            bytes(bufs[out_r][:max_out]).decode("utf-8", "replace") if status == "ok" and not functional else ""
        ),
        "stderr_tail": bytes(bufs[err_r][:4096]).decode("utf-8", "replace"),
    }
    if res_r is not None:  # functional
        frame["result"] = bytes(bufs[res_r]).decode("utf-8", "replace") if status == "ok" else None
    if not state["ns"]:
        _remove_tree(fds["workdir"])
    return frame


def _fork_test(
    spec: dict, index: int, test_input, state: dict, functional: bool
) -> tuple[int, float, int, int, int | None, dict]:
    """Fork the test's process (:func:`test_child`) with its stdin, output pipes and (without
    namespaces) work folder; the parent keeps the read ends.

    Returns ``(pid, start time, stdout read end, stderr read end, result read end or None, fds)``.
    """
    data = (test_input if isinstance(test_input, str) else "").encode("utf-8", "surrogateescape")
    stdin_fd = os.memfd_create("stdin", 0)
    write_all(stdin_fd, data)
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    res_r: int | None
    res_w: int | None
    res_r, res_w = os.pipe() if functional else (None, None)
    fds: dict = {"stdin": stdin_fd, "out_w": out_w, "err_w": err_w, "res_w": res_w}
    if not state["ns"]:
        wd = os.path.join(state["workdir"], f"t{index}")
        os.mkdir(wd, 0o700)
        fds["workdir"] = wd
    sys.stdout.flush()
    sys.stderr.flush()
    t0 = time.monotonic()
    pid = os.fork()
    if pid == 0:
        for fd in (out_r, err_r, res_r, state["out_fd"]):
            if fd is not None and fd > 2:
                try:
                    os.close(fd)
                except OSError:
                    pass
        test_child(spec, test_input if functional else None, fds, state["ns"])
        os._exit(EXIT_HARNESS_ERROR)  # not reached
    for fd in (out_w, err_w, res_w, stdin_fd):
        if fd is not None:
            os.close(fd)
    return pid, t0, out_r, err_r, res_r, fds


class _TestPipes:
    """The parent's ends of a test's stdout, stderr and result pipes (and its pidfd), polled and
    read without blocking into bounded buffers: stdout and the result up to ``max_out`` bytes (one
    more sets ``over_limit``), stderr its first 4096."""

    def __init__(self, out_r: int, err_r: int, res_r: int | None, max_out: int, pidfd: int | None) -> None:
        self.err_r, self.pidfd = err_r, pidfd
        self.bufs = {out_r: bytearray(), err_r: bytearray()}
        if res_r is not None:
            self.bufs[res_r] = bytearray()
        self.caps = {out_r: max_out, err_r: 4096, res_r: max_out}
        self.open_fds = set(self.bufs)
        self.poller = select.poll()
        for fd in self.open_fds:
            os.set_blocking(fd, False)
            self.poller.register(fd, select.POLLIN)
        if pidfd is not None:
            self.poller.register(pidfd, select.POLLIN)
        self.over_limit = False

    def drain(self, fd: int) -> None:
        while True:
            try:
                chunk = os.read(fd, 65536)
            except BlockingIOError:
                return
            except OSError:
                chunk = b""
            if not chunk:
                self.poller.unregister(fd)
                self.open_fds.discard(fd)
                return
            buf = self.bufs[fd]
            room = self.caps[fd] + 1 - len(buf)
            if room > 0:
                buf += chunk[:room]
            if fd != self.err_r and len(buf) > self.caps[fd]:
                self.over_limit = True
                return

    def collect_rest(self) -> None:
        """Every writer is dead now: collect what is left in the pipes (bounded)."""
        end = time.monotonic() + 1.0
        while self.open_fds and not self.over_limit and time.monotonic() < end:
            for fd, _ev in self.poller.poll(50):
                if fd in self.open_fds:
                    self.drain(fd)

    def close(self) -> None:
        for fd in list(self.bufs) + ([self.pidfd] if self.pidfd is not None else []):
            try:
                os.close(fd)
            except OSError:
                pass


def _wait_for_test(pid: int, pidfd: int | None, pipes: _TestPipes, limit_at: float) -> tuple[str | None, tuple | None]:
    """Read the test's output until it exits, ``limit_at`` (monotonic) passes (``timeout``) or it
    writes too much (``output_limit``); ``(status or None, (wait status, rusage) or None)``."""
    status = None
    exited = None  # (status, rusage)
    while exited is None:
        now = time.monotonic()
        if now >= limit_at:
            status = "timeout"
            break
        if pidfd is None:
            try:
                wpid, wst, ru = os.wait4(pid, os.WNOHANG)
            except ChildProcessError:
                wpid = 0
            if wpid == pid:
                exited = (wst, ru)
                break
            wait_ms = min(5.0, (limit_at - now) * 1000)
        else:
            wait_ms = (limit_at - now) * 1000
        for fd, _ev in pipes.poller.poll(max(1, int(wait_ms))):
            if fd == pidfd:
                _, wst, ru = os.wait4(pid, 0)
                exited = (wst, ru)
            elif fd in pipes.open_fds:
                pipes.drain(fd)
        if pipes.over_limit:
            status = "output_limit"
            break
    return status, exited


def _kill_test(pid: int) -> tuple:
    """SIGKILL the test's process (and its group) and reap it; ``(wait status, rusage)``."""
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    _, wst, ru = os.wait4(pid, 0)
    return (wst, ru)


def _exit_status(wst: int, exit_code: int, cpu: float, timeout: float, no_result: bool) -> str:
    """The status of a test that exited (neither timed out nor over the output limit while it was read)."""
    if os.WIFSIGNALED(wst):
        sig = os.WTERMSIG(wst)
        return "timeout" if sig in (signal.SIGXCPU, signal.SIGKILL) and cpu >= timeout else "signal"
    if exit_code == EXIT_HARNESS_ERROR:
        return "harness_error"
    if exit_code != 0:
        return "runtime_error"
    if cpu > timeout:
        return "timeout"
    if no_result:
        return "no_result"
    return "ok"


def _remove_tree(path: str) -> None:
    import shutil

    def onerror(func, p, _exc):
        try:
            os.chmod(os.path.dirname(p), 0o700)
            os.chmod(p, 0o700) if not os.path.islink(p) else None
            func(p)
        except OSError:
            pass

    shutil.rmtree(path, onerror=onerror)


def supervise(spec: dict, state: dict) -> None:
    """Run every test sequentially and stream the result frames."""
    out = state["out_fd"]
    deadline = state["start"] + float(spec["deadline_s"])
    for index, test_input in enumerate(spec["inputs"]):
        if time.monotonic() >= deadline:
            send(
                out,
                {
                    "type": "result",
                    "index": index,
                    "status": "deadline",
                    "exit_code": None,
                    "cpu_s": 0.0,
                    "wall_s": 0.0,
                    "stdout": "",
                    "stderr_tail": "",
                },
            )
            break
        frame = run_one(spec, index, test_input, state, deadline)
        send(out, frame)
        if frame["status"] != "ok" and spec.get("stop_on_error", True):
            break
    send(out, {"type": "done"})


def init_main(spec: dict, state: dict) -> None:
    """pid 1 of the sandbox namespace: build the file system, then supervise."""
    facts = {
        "type": "ready",
        "netns": True,
        "pidns": os.getpid() == 1,
        "mountns": True,
        "userns": bool(spec.get("userns")),
        "uid_drop": not spec.get("userns"),
        "mode": "namespaces",
        "cgroups": spec.get("_cgroups", []),
        "ipcns": "per test",
        "no_userns": "seccomp" if _SECCOMP_ARCH else "unsupported arch",
        "cgroupns": bool(spec.get("_cgroupns")),
    }
    prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    prctl(PR_SET_DUMPABLE, 0)
    # pid 1 only receives in-namespace signals it has a handler for: drop
    # Python's SIGINT handler so a program cannot interrupt its supervisor.
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    os.umask(0o022)
    state["pidns"] = os.getpid() == 1
    try:
        build_root(spec["workdir"], int(spec["tmpfs_bytes"]), facts, state, overlay=not spec.get("_test_no_overlay"))
        spec["_per_test"] = state.get("per_test", [])
    except OSError as exc:
        send(state["out_fd"], {"type": "ready", "error": f"file-system isolation failed: {exc}"})
        os._exit(3)
    _reexec(spec, state, facts)  # returns only where the interpreter cannot be started afresh
    _preload(PRELOAD)
    init_serve(spec, state, facts)


def _preload(names) -> None:
    """Import the modules every test process needs (LCB_IMPORT_HEADER), so that forks inherit them."""
    for name in names:
        try:
            __import__(name)
        except ImportError:
            pass


def _reexec(spec: dict, state: dict, facts: dict) -> None:
    """Replace this init by a fresh interpreter started from the sandbox's own view of Python.

    The interpreter in memory was loaded from its host path, which ``/proc/<pid>/exe``, ``maps`` and
    ``cmdline`` of every process forked from it would show.  Started again from the neutral mount
    (``/.oapl-python/<i>/bin/python``; its host path is a symlink in here, so a venv's
    ``pyvenv.cfg`` and the libraries' RPATHs still resolve) those show neutral paths only.  The
    launcher's source and the state travel on inherited descriptors.
    """
    exe_dir = os.path.dirname(os.path.abspath(sys.executable))
    target = os.path.join(os.path.realpath(exe_dir), os.path.basename(sys.executable))
    bootstrap = _bootstrap_code()
    src_fd = spec.get("_source_fd")
    if (
        not _under(target, NEUTRAL)
        or bootstrap is None
        or src_fd is None
        or not os.access(target, os.X_OK)
        or spec.get("no_reexec")
    ):
        facts["interpreter"] = "inherited"
        return
    opened: list[int] = []
    try:
        code = globals().get("_c")  # the code object runner.BOOTSTRAP ran: the new init skips compiling
        if isinstance(code, type(_reexec.__code__)):
            import marshal

            src_fd = os.memfd_create("oapl-sandbox-code", 0)
            opened.append(src_fd)
            write_all(src_fd, b"\0" + marshal.dumps(code))
        facts["interpreter"] = "re-executed"
        payload = json.dumps({"_phase": "init", "spec": spec, "state": state, "facts": facts}).encode("utf-8")
        fd = os.memfd_create("oapl-sandbox-init", 0)
        opened.append(fd)
        write_all(fd, payload)
        os.lseek(fd, 0, os.SEEK_SET)
        for keep in (fd, src_fd, state["out_fd"]):
            os.set_inheritable(keep, True)
        args = (
            [target] + (["-s"] if sys.flags.no_user_site else []) + ["-P", "-B", "-c", bootstrap, str(src_fd), str(fd)]
        )
        if spec.get("_test_break_reexec"):
            args[args.index("-c") + 1] = "raise SystemExit(5)"
        send(state["out_fd"], {"type": "reexec"})  # if the new init dies now, the trainer knows why
        sys.stdout.flush()
        sys.stderr.flush()
        os.execve(target, args, dict(os.environ))
    except (OSError, ValueError) as exc:  # carry on in this interpreter
        for fd in opened:
            os.close(fd)
        facts["interpreter"] = f"inherited ({exc})"


def _bootstrap_code() -> str | None:
    """The ``-c`` code this launcher was started with (see runner.BOOTSTRAP)."""
    argv = getattr(sys, "orig_argv", [])
    try:
        return argv[argv.index("-c") + 1]
    except (ValueError, IndexError):
        return None


def init_resume(payload: dict) -> None:
    """Entry of the re-executed init (see :func:`_reexec`): serve the tests, never return."""
    prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    prctl(PR_SET_DUMPABLE, 0)  # exec made this process dumpable again
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    spec, state, facts = payload["spec"], payload["state"], payload["facts"]
    state["per_test"] = [tuple(e) for e in state.get("per_test", [])]
    spec["_per_test"] = state["per_test"]
    _preload(PRELOAD)
    try:
        init_serve(spec, state, facts)
    except BaseException as exc:  # report, never hang the trainer
        try:
            send(state["out_fd"], {"type": "error", "error": repr(exc)})
        except OSError:
            pass
        os._exit(4)
    os._exit(0)


def init_serve(spec: dict, state: dict, facts: dict) -> None:
    send(state["out_fd"], facts)
    if spec.get("probe"):
        facts_net = {"interfaces": [n for _, n in socket_if_names()]}
        send(state["out_fd"], {"type": "probe", **facts_net})
    supervise(spec, state)


def socket_if_names() -> list:
    import socket

    try:
        return socket.if_nameindex()
    except OSError:
        return []


def _readable_by(uid: int | None, path: str) -> bool:
    """Whether ``uid`` (as root: the sandbox uid) can read ``path``."""
    if uid is None or os.geteuid() != 0:
        return os.access(path, os.R_OK | os.X_OK)
    pid = os.fork()
    if pid == 0:
        try:
            os.setgroups([])
            os.setresgid(uid, uid, uid)
            os.setresuid(uid, uid, uid)
            os._exit(0 if os.access(path, os.R_OK | os.X_OK) else 1)
        except BaseException:
            os._exit(1)
    _, wst = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(wst) == 0


def main() -> None:
    # The trainer passes the spec on an open file (see runner.launch): no path of the host shows in
    # this process's command line, which every process of the sandbox inherits (/proc/*/cmdline).
    with os.fdopen(int(sys.argv[-1]), "rb") as f:
        spec = json.loads(f.read())
    source_fd = int(sys.argv[-2]) if len(sys.argv) >= 3 else None
    sys.argv[:] = ["oapl-sandbox"]
    if spec.get("_phase") == "init":
        init_resume(spec)
    spec["_source_fd"] = source_fd
    out_fd = os.dup(1)
    nul = os.open(os.devnull, os.O_RDWR)
    os.dup2(nul, 1)  # stray prints from trusted code must not corrupt the frame stream
    os.close(nul)
    prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    joined = []
    for procs in spec.get("cgroup_procs") or ():
        try:
            with open(procs, "w") as f:
                f.write(str(os.getpid()))
            joined.append(os.path.basename(os.path.dirname(os.path.dirname(procs))) or "v2")
        except OSError:
            pass
    spec["_cgroups"] = joined
    if spec["isolation"] != "namespaces":  # (with namespaces, the sandbox's init preloads them)
        _preload(PRELOAD + PRELOAD_DEGRADED)
    state = {
        "out_fd": out_fd,
        "start": time.monotonic(),
        "uid": spec.get("uid"),
        "trainer_uid": int(spec.get("trainer_uid", os.getuid())),
        "workdir": spec["workdir"],
        "ns": spec["isolation"] == "namespaces",
        "pidns": False,
    }
    if state["ns"]:
        flags = CLONE_NEWNET | CLONE_NEWPID | CLONE_NEWNS | CLONE_NEWIPC | CLONE_NEWUTS
        userns = os.geteuid() != 0
        if userns:
            flags |= CLONE_NEWUSER
        spec["userns"] = userns
        try:
            if spec.get("_test_fail_unshare"):
                raise OSError(1, "unshare: Operation not permitted (simulated)")
            uid, gid = os.geteuid(), os.getegid()
            unshare(flags)
            if userns:
                with open("/proc/self/setgroups", "w") as f:
                    f.write("deny")
                with open("/proc/self/uid_map", "w") as f:
                    f.write(f"0 {uid} 1")
                with open("/proc/self/gid_map", "w") as f:
                    f.write(f"0 {gid} 1")
            try:  # /proc/self/cgroup then shows "/" instead of the trainer's cgroup names (and pid)
                unshare(CLONE_NEWCGROUP)
                spec["_cgroupns"] = True
            except OSError:  # kernels before 4.6
                spec["_cgroupns"] = False
        except OSError as exc:
            send(
                out_fd, {"type": "ready", "error": f"cannot create namespaces (user={userns}, net, pid, mount): {exc}"}
            )
            os._exit(3)
        try:
            import socket

            socket.sethostname("sandbox")
        except (OSError, AttributeError):
            pass
        pid = os.fork()
        if pid == 0:
            try:
                init_main(spec, state)
            except BaseException as exc:  # report, never hang the trainer
                try:
                    send(out_fd, {"type": "error", "error": repr(exc)})
                except OSError:
                    pass
                os._exit(4)
            os._exit(0)
        _, wst = os.waitpid(pid, 0)
        os._exit(os.waitstatus_to_exitcode(wst) & 0xFF)
    # Degraded mode: no namespaces (the user explicitly allowed it).
    prctl(PR_SET_CHILD_SUBREAPER, 1)
    if spec.get("uid") is not None and os.geteuid() == 0:
        os.chmod(spec["workdir"], 0o711)  # the sandbox uid may enter its own t<i> dir
    prctl(PR_SET_DUMPABLE, 0)
    uid = spec.get("uid")
    send(
        out_fd,
        {
            "type": "ready",
            "netns": False,
            "pidns": False,
            "mountns": False,
            "userns": False,
            "uid_drop": os.geteuid() == 0 and uid is not None,
            "mode": "none",
            "fs": "host",
            "cgroups": spec.get("_cgroups", []),
            "stdlib_readable": _readable_by(uid, os.path.dirname(os.__file__)),
        },
    )
    supervise(spec, state)
    os._exit(0)


if __name__ == "__main__":
    main()
