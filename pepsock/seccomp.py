"""Seccomp user notification for connect(): the kernel interface, through ctypes.

`install_connect_listener()` puts the calling thread (and everything it execs
or forks afterwards) under a filter that hands every native `connect(2)` (and
`getpeername(2)`, on 5.19+) to a supervisor and lets every other syscall
through; it returns the listener fd.  The supervisor (pepsock/supervisor.py)
drives the listener with `receive()`, `respond()`/`let_through()` and
`still_waiting()`, reads and writes the program's memory with
`read_memory()`/`write_memory()` and takes the program's socket with
`take_fd()` (pidfd_getfd: the same open file, not a copy).

Linux 5.6+ (pidfd_getfd; SECCOMP_USER_NOTIF_FLAG_CONTINUE is 5.5, the
listener 5.0).  x86_64 and aarch64.
"""
from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import platform
import struct
from dataclasses import dataclass

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long

# --- syscall numbers and architectures (include/uapi/linux/audit.h, asm/unistd.h)
ARCHES = {
    # machine: (AUDIT_ARCH_*, connect's number, seccomp's number, getpeername's number)
    "x86_64": (0xC000003E, 42, 317, 52),
    "aarch64": (0xC00000B7, 203, 277, 205),
}
SYS_PIDFD_GETFD = 438            # the same on every architecture (new syscall table)

# --- seccomp (include/uapi/linux/seccomp.h)
SECCOMP_SET_MODE_FILTER = 1
SECCOMP_FILTER_FLAG_NEW_LISTENER = 1 << 3
SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV = 1 << 5
SECCOMP_RET_ALLOW = 0x7FFF0000
SECCOMP_RET_USER_NOTIF = 0x7FC00000
SECCOMP_USER_NOTIF_FLAG_CONTINUE = 1

# classic BPF opcodes (include/uapi/linux/filter.h)
BPF_LD_W_ABS = 0x20              # BPF_LD | BPF_W | BPF_ABS
BPF_JEQ_K = 0x15                 # BPF_JMP | BPF_JEQ | BPF_K
BPF_RET_K = 0x06                 # BPF_RET | BPF_K
SECCOMP_DATA_NR = 0              # offsetof(struct seccomp_data, nr)
SECCOMP_DATA_ARCH = 4            # offsetof(struct seccomp_data, arch)


def _ioc(direction: int, nr: int, size: int) -> int:
    return (direction << 30) | (size << 16) | (ord("!") << 8) | nr


# struct seccomp_notif {u64 id; u32 pid; u32 flags; struct seccomp_data {int nr; u32 arch;
#                       u64 instruction_pointer; u64 args[6];}}
NOTIF = struct.Struct("=QIIiIQ6Q")
# struct seccomp_notif_resp {u64 id; s64 val; s32 error; u32 flags;}
RESP = struct.Struct("=QqiI")
IOCTL_NOTIF_RECV = _ioc(3, 0, NOTIF.size)        # _IOWR
IOCTL_NOTIF_SEND = _ioc(3, 1, RESP.size)         # _IOWR
IOCTL_NOTIF_ID_VALID = _ioc(1, 2, 8)             # _IOW

PR_SET_NAME = 15
PR_SET_NO_NEW_PRIVS = 38
PR_SET_PTRACER = 0x59616D61
CAP_SYS_PTRACE = 19


class Unsupported(OSError):
    """The filter cannot be installed here; str() says why in one line."""


def native_arch() -> tuple[int, int, int, int] | None:
    return ARCHES.get(platform.machine())


def _kernel_version() -> tuple[int, int]:
    release = os.uname().release
    parts = release.split(".")
    try:
        return int(parts[0]), int("".join(c for c in parts[1] if c.isdigit()) or 0)
    except (IndexError, ValueError):
        return (0, 0)


def _has_cap(cap: int) -> bool:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("CapEff:"):
                    return bool(int(line.split()[1], 16) >> cap & 1)
    except (OSError, ValueError):
        pass
    return False


def unavailable() -> str:
    """Why the supervisor cannot work on this machine; "" if it can (as far
    as can be told without installing a filter)."""
    if native_arch() is None:
        return f"the seccomp supervisor supports x86_64 and aarch64, not {platform.machine()}"
    if _kernel_version() < (5, 6):
        return (f"the seccomp supervisor needs Linux 5.6+ (pidfd_getfd), this is "
                f"{os.uname().release}")
    try:
        with open("/proc/sys/kernel/seccomp/actions_avail") as f:
            if "user_notif" not in f.read().split():
                return "this kernel has no seccomp user notification (SECCOMP_RET_USER_NOTIF)"
    except OSError:
        return "this kernel has no seccomp (/proc/sys/kernel/seccomp missing)"
    try:
        with open("/proc/sys/kernel/yama/ptrace_scope") as f:
            scope = int(f.read())
    except (OSError, ValueError):
        scope = 0
    if scope >= 2 and not _has_cap(CAP_SYS_PTRACE):
        return (f"kernel.yama.ptrace_scope={scope} keeps the supervisor from the program's "
                f"sockets (needs CAP_SYS_PTRACE)")
    return ""


def notify_filter(arch: int, numbers: tuple[int, ...]) -> bytes:
    """Classic BPF: these syscalls of this architecture -> USER_NOTIF; all else -> ALLOW.

    Other ABIs (x32, i386 compat) have other arch values or numbers and are
    let through: docs/run.md lists that as not covered.
    """
    ins = struct.Struct("=HBBI")
    k = len(numbers)
    prog = [
        (BPF_LD_W_ABS, 0, 0, SECCOMP_DATA_ARCH),
        (BPF_JEQ_K, 0, k + 1, arch),            # foreign arch -> ALLOW
        (BPF_LD_W_ABS, 0, 0, SECCOMP_DATA_NR),
    ]
    for i, nr in enumerate(numbers):
        prog.append((BPF_JEQ_K, k - i, 0, nr))  # one of ours -> USER_NOTIF
    prog.append((BPF_RET_K, 0, 0, SECCOMP_RET_ALLOW))
    prog.append((BPF_RET_K, 0, 0, SECCOMP_RET_USER_NOTIF))
    return b"".join(ins.pack(*i) for i in prog)


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def _prctl(option: int, arg2: int = 0) -> int:
    rc = _libc.prctl(option, ctypes.c_ulong(arg2), ctypes.c_ulong(0), ctypes.c_ulong(0),
                     ctypes.c_ulong(0))
    return 0 if rc == 0 else ctypes.get_errno()


def install_connect_listener(wait_killable: bool = True) -> tuple[int, bool]:
    """Install the connect() filter on the calling thread: (listener fd
    (O_CLOEXEC), killable) where killable means the kernel took
    SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV (5.19+): once the supervisor has
    received a notification, only a fatal signal takes the caller out of its
    connect, so an answered connect is never restarted.  wait_killable=False
    installs it as a kernel before 5.19 would (the tests use it).

    Tries without no_new_privs first (allowed with CAP_SYS_ADMIN: setuid
    programs then keep working under root); otherwise sets no_new_privs.
    Raises Unsupported with the reason.
    """
    arch = native_arch()
    if arch is None:
        raise Unsupported(errno.ENOSYS, f"no seccomp support for {platform.machine()}")
    audit_arch, nr_connect, nr_seccomp, nr_getpeername = arch

    def attempt(flags: int, numbers: tuple[int, ...]) -> int:
        code = notify_filter(audit_arch, numbers)
        buf = ctypes.create_string_buffer(code, len(code))
        prog = _SockFprog(len(code) // 8, ctypes.addressof(buf))
        fd = _libc.syscall(ctypes.c_long(nr_seccomp), ctypes.c_long(SECCOMP_SET_MODE_FILTER),
                           ctypes.c_long(flags), ctypes.byref(prog))
        return fd if fd >= 0 else -ctypes.get_errno()

    def attempt_both() -> tuple[int, bool]:
        if wait_killable:
            # getpeername() too: the supervisor answers it for steered sockets by
            # writing into the caller's memory, safe only while the caller
            # cannot leave the syscall before the answer (killable wait).
            fd = attempt(SECCOMP_FILTER_FLAG_NEW_LISTENER | SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV,
                         (nr_connect, nr_getpeername))
            if fd != -errno.EINVAL:
                return fd, True
        return attempt(SECCOMP_FILTER_FLAG_NEW_LISTENER, (nr_connect,)), False   # before 5.19

    fd, killable = attempt_both()
    if fd == -errno.EACCES:
        err = _prctl(PR_SET_NO_NEW_PRIVS, 1)
        if err:
            raise Unsupported(err, f"prctl(PR_SET_NO_NEW_PRIVS): {os.strerror(err)}")
        fd, killable = attempt_both()
    if fd >= 0:
        return fd, killable
    raise Unsupported(-fd, _why_not(-fd))


def _why_not(err: int) -> str:
    why = {
        errno.EBUSY: "a seccomp supervisor already watches this process (pep run inside pep run?)",
        errno.EINVAL: "the kernel refused the filter (no seccomp user notification?)",
        errno.ENOSYS: "the kernel has no seccomp()",
        errno.EPERM: "a seccomp policy around this process forbids new filters",
        errno.EACCES: "new seccomp filters are not allowed here",
        errno.ENOMEM: "the kernel refused the filter (too many filters?)",
    }.get(err, os.strerror(err))
    return f"cannot install the seccomp filter: {why}"


def filtered() -> bool:
    """Is this process already under a seccomp filter (a container's, a sandbox's, ours)?"""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Seccomp:"):
                    return line.split()[1] == "2"
    except OSError:
        pass
    return False


def trial_install() -> str:
    """Install the filter in a throwaway child: "" if it works, else why not.
    Worth its fork only under someone else's filter, which may forbid ours."""
    pid = os.fork()
    if pid == 0:
        try:
            install_connect_listener()
            os._exit(0)
        except Unsupported as exc:
            os._exit(min(exc.errno or 1, 255))
        except BaseException:  # noqa: BLE001
            os._exit(255)
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    if code == 0:
        return ""
    return _why_not(code) if code != 255 else "cannot install the seccomp filter"


def allow_ptrace_by(pid: int) -> None:
    """Yama ptrace_scope=1: let `pid` (the supervisor) read our memory and take
    our fds after exec.  A no-op where Yama is absent."""
    _prctl(PR_SET_PTRACER, pid)


def set_name(name: str) -> None:
    """The process name ps and top show (comm, 15 bytes)."""
    buf = ctypes.create_string_buffer(name.encode()[:15])
    _libc.prctl(PR_SET_NAME, buf, 0, 0, 0)


# ------------------------------------------------------------------ the listener

@dataclass(frozen=True)
class Notification:
    id: int
    pid: int            # the calling thread's id, in our pid namespace
    nr: int
    arch: int
    args: tuple

    @classmethod
    def parse(cls, raw: bytes) -> "Notification":
        nid, pid, _flags, nr, arch, _ip, *args = NOTIF.unpack(raw)
        return cls(nid, pid, nr, arch, tuple(args))


def receive(listener: int) -> Notification | None:
    """The next notification; None if it vanished between poll() and here
    (its caller was killed).  Call only when poll() says POLLIN: the ioctl blocks."""
    buf = bytearray(NOTIF.size)
    try:
        fcntl.ioctl(listener, IOCTL_NOTIF_RECV, buf, True)
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.EINTR):
            return None
        raise
    return Notification.parse(bytes(buf))


def respond(listener: int, nid: int, error: int = 0, val: int = 0, flags: int = 0) -> bool:
    """Answer a notification: the syscall returns -error if error, else val.
    False if the caller is gone or was interrupted (ENOENT)."""
    buf = bytearray(RESP.pack(nid, val, -error if error > 0 else error, flags))
    try:
        fcntl.ioctl(listener, IOCTL_NOTIF_SEND, buf, True)
    except OSError as exc:
        if exc.errno == errno.ENOENT:
            return False
        raise
    return True


def let_through(listener: int, nid: int) -> bool:
    """The kernel performs the syscall as if no filter were there."""
    return respond(listener, nid, flags=SECCOMP_USER_NOTIF_FLAG_CONTINUE)


def still_waiting(listener: int, nid: int) -> bool:
    """Is the notification's caller still in the syscall? (Re-check after
    reading its memory: its pid may otherwise have been reused.)"""
    try:
        fcntl.ioctl(listener, IOCTL_NOTIF_ID_VALID, struct.pack("=Q", nid))
        return True
    except OSError:
        return False


class _Iovec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


def read_memory(pid: int, address: int, size: int) -> bytes:
    """`size` bytes at `address` in thread `pid`'s memory (process_vm_readv)."""
    buf = ctypes.create_string_buffer(size)
    local = _Iovec(ctypes.addressof(buf), size)
    remote = _Iovec(address, size)
    got = _libc.process_vm_readv(pid, ctypes.byref(local), 1, ctypes.byref(remote), 1, 0)
    if got < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"process_vm_readv({pid}): {os.strerror(err)}")
    return buf.raw[:got]


def write_memory(pid: int, address: int, data: bytes) -> None:
    """Write `data` at `address` in thread `pid`'s memory (process_vm_writev)."""
    buf = ctypes.create_string_buffer(data, len(data))
    local = _Iovec(ctypes.addressof(buf), len(data))
    remote = _Iovec(address, len(data))
    got = _libc.process_vm_writev(pid, ctypes.byref(local), 1, ctypes.byref(remote), 1, 0)
    if got != len(data):
        err = ctypes.get_errno() if got < 0 else errno.EFAULT
        raise OSError(err, f"process_vm_writev({pid}): {os.strerror(err)}")


def take_fd(pidfd: int, fd: int) -> int:
    """pidfd_getfd(): our own descriptor for the same open file as `fd` in the process."""
    got = _libc.syscall(ctypes.c_long(SYS_PIDFD_GETFD), ctypes.c_long(pidfd), ctypes.c_long(fd),
                        ctypes.c_long(0))
    if got < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"pidfd_getfd: {os.strerror(err)}")
    return got


PIDFD_THREAD = os.O_EXCL      # Linux 6.9+: a pidfd for a thread, not only a process
_pidfd_thread = True


def pidfd_of_thread(tid: int) -> int:
    """A pidfd whose fd table is the thread's (its process's): for the thread
    itself where the kernel can (6.9+), else for its thread group.  The caller
    re-checks the notification afterwards, so the tid cannot have been reused."""
    global _pidfd_thread
    if _pidfd_thread:
        try:
            return os.pidfd_open(tid, PIDFD_THREAD)
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
            _pidfd_thread = False
    return os.pidfd_open(thread_group(tid))


def thread_group(tid: int) -> int:
    """The process (thread-group id) a thread belongs to."""
    with open(f"/proc/{tid}/status") as f:
        for line in f:
            if line.startswith("Tgid:"):
                return int(line.split()[1])
    raise ProcessLookupError(errno.ESRCH, f"no Tgid for {tid}")


def raw_connect(fd: int, sockaddr: bytes) -> int:
    """connect(2) on a descriptor, as the kernel answers it: 0 or an errno
    (EINPROGRESS for a non-blocking socket), with no retry or wait added."""
    buf = ctypes.create_string_buffer(sockaddr, len(sockaddr))
    return 0 if _libc.connect(fd, buf, len(sockaddr)) == 0 else ctypes.get_errno()
