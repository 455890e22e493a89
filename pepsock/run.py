"""`pep run`: the program becomes pep run's process, its TCP connections on the PEP.

Which path serves a program (docs/run.md):

* **preload**: a dynamically linked glibc program of this machine's
  architecture that is not Go: exec it with libpep.so in LD_PRELOAD.
* **seccomp**: anything else native (static, Go, musl): fork the supervisor
  (pepsock/supervisor.py), install the connect() filter here, hand the
  listener over, exec the program.  It keeps pep run's pid.
* **none**: nothing can (a foreign-architecture program, no seccomp user
  notification...): say so in one line and refuse, unless --allow-direct.

The choice looks at the program pep run starts, and at the words of its
command line: a wrapper naming a static or Go program (`timeout 60 rclone
...`, `sh -c 'rclone ...'`) gets both, the supervisor for the whole tree and
libpep.so for its dynamic members.  A script that starts one from inside
needs --mode both.

Either way pep run execs: the pid, signals and exit status are the program's.
"""
from __future__ import annotations

import errno
import os
import platform
import re
import signal
import sys
from dataclasses import dataclass

from . import elf, preload
from . import route as _route
from .policy import ConfigError, ProxyConfig

PRELOAD, SECCOMP, NONE = "preload", "seccomp", "none"
#: --mode both: the supervisor for the whole tree and libpep.so in LD_PRELOAD,
#: for a dynamic program (a shell script) that runs static or Go ones.
BOTH = "both"
MODES = ("auto", PRELOAD, SECCOMP, BOTH)
#: Exit status when pep run itself refuses or fails (as env(1) does).
REFUSED = 125
NATIVE_MACHINE = {"x86_64": "x86_64", "aarch64": "aarch64", "arm64": "aarch64"}.get(
    platform.machine(), platform.machine())


@dataclass(frozen=True)
class Plan:
    mode: str
    why: str = ""       # seccomp: why libpep.so cannot serve it; none: why nothing can


def _library() -> tuple[str | None, str]:
    try:
        return preload.library_path(), ""
    except FileNotFoundError as exc:
        return None, str(exc)


def preload_blocker(program: elf.Program, library: str | None, library_why: str) -> str:
    """Why libpep.so cannot serve this program; "" if it can."""
    info = program.info
    name = os.path.basename(program.binary)
    if info is None:
        return f"{name}: {program.why}"
    if info.machine != NATIVE_MACHINE:
        return f"{name} is an {info.machine} program on an {NATIVE_MACHINE} machine"
    if not info.dynamic:
        return f"{name} is statically linked"
    if info.go:
        return f"{name} is a Go program (Go makes its own syscalls)"
    if "musl" in os.path.basename(info.interp):
        return f"{name} is linked against musl (libpep.so is built for glibc)"
    if library is None:
        return library_why
    return ""


def plan(program: elf.Program, want: str = "auto", *, library=None, library_why: str = "",
         seccomp_why: str | None = None) -> Plan:
    """Choose the path; `library`/`seccomp_why` default to this machine's."""
    if library is None and not library_why:
        library, library_why = _library()
    if seccomp_why is None:
        from . import seccomp
        seccomp_why = seccomp.unavailable()
    setuid = _setuid_blocker(program)
    if setuid:
        return Plan(NONE, setuid)
    if want == PRELOAD:
        return Plan(PRELOAD) if library else Plan(NONE, library_why)
    if want in (SECCOMP, BOTH):
        return Plan(NONE, seccomp_why) if seccomp_why else Plan(SECCOMP, f"--mode {want}")
    blocker = preload_blocker(program, library, library_why)
    if not blocker:
        return Plan(PRELOAD)
    info = program.info
    if info is not None and info.machine != NATIVE_MACHINE:
        return Plan(NONE, blocker)
    if seccomp_why:
        return Plan(NONE, f"{blocker}, and {seccomp_why}")
    return Plan(SECCOMP, blocker)


#: Words of a command line looked up as programs, at most (see below).
MAX_NAMED = 32
_WORDS = re.compile(r"[\s;|&()<>`'\"]+")


def named_program_libpep_cannot_serve(args: list[str], path_env: str, library,
                                      library_why: str) -> str:
    """A wrapper (`timeout 60 rclone ...`, `sh -c 'rclone ...'`, `env X=1 kubectl`)
    is dynamic, but a word of its command line may name a program libpep.so
    cannot serve: "NAME (why)" for the first such word, else "".  A heuristic
    for the common case; a script that starts one from inside needs --mode both."""
    seen = set()
    for arg in args:
        for word in _WORDS.split(arg):
            if not word or word in seen or word.startswith("-") or "=" in word \
                    or len(word) > 255:
                continue
            seen.add(word)
            if len(seen) > MAX_NAMED:
                return ""
            inner = elf.examine(word, path_env)
            if inner is not None and inner.info is not None:
                blocker = preload_blocker(inner, library, library_why)
                if blocker:
                    return blocker
    return ""


def _setuid_blocker(program: elf.Program) -> str:
    """A set-id program run by a user: libpep.so is ignored by the loader and
    no_new_privs (which the filter needs without CAP_SYS_ADMIN) drops the set-id."""
    if os.geteuid() == 0:
        return ""
    try:
        mode = os.stat(program.path).st_mode
    except OSError:
        return ""
    if mode & 0o6000:
        return (f"{os.path.basename(program.path)} is set-user/group-ID (the loader ignores "
                f"LD_PRELOAD for it, and the seccomp filter would need no_new_privs, which "
                f"drops the set-ID)")
    return ""


def _say(text: str) -> None:
    if sys.stderr is not None:
        print(f"pep run: {text}", file=sys.stderr, flush=True)


def _fill_std_fds() -> list[int]:
    """Give closed standard fds /dev/null while pep run works (a socket must
    not land on fd 0-2); `_exec` closes them again: the program gets them as
    pep run did."""
    filled = []
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            filled.append(os.open(os.devnull, os.O_RDWR))   # the lowest free fd: this one
    return filled


_filled: list[int] = []


def _exec(program: elf.Program, argv: list[str], env: dict) -> int:
    """execve() the program; returns the shell's status only if that failed."""
    # Python ignores SIGPIPE and SIGXFSZ; an ignored disposition survives
    # exec, and the program must start with the defaults a shell gives it.
    for sig in (signal.SIGPIPE, signal.SIGXFSZ):
        signal.signal(sig, signal.SIG_DFL)
    for stream in (sys.stdout, sys.stderr):   # None when pep run started without them
        if stream is not None:
            stream.flush()
    while _filled:
        os.close(_filled.pop())
    try:
        os.execve(program.path, argv, env)
    except OSError as exc:
        if exc.errno == errno.ENOENT:
            _say(f"{argv[0]}: {exc.strerror} (a missing #! interpreter?)")
            return 127
        _say(f"{argv[0]}: {exc.strerror}")
        return 126
    return 126  # not reached


def main(argv: list[str], pep=None, mode: str = "auto", allow_direct: bool = False) -> int:
    """Exec argv (never returns on success); else the exit status to give."""
    env = dict(os.environ)
    if pep is not None:
        env["PEP_PROXY"] = preload._pep_value(pep)
    try:
        config = ProxyConfig.from_env(env)
        # Every value by the clients' grammar (docs/protocol.md "Environment
        # values"): pep run refuses a bad one up front rather than start a
        # program whose libpep would then run it unproxied.
        _route.parse_settings(env)
    except ConfigError as exc:
        _say(str(exc))
        return 2
    program = elf.examine(argv[0], env.get("PATH", os.defpath))
    if program is None:
        _say(f"{argv[0]}: command not found")
        return 127
    library, library_why = _library()
    if config.pep is None:
        _say(f"no PEP given (--pep or PEP_PROXY): running {argv[0]} unproxied")
        return _exec(program, argv, env)
    chosen = plan(program, mode, library=library, library_why=library_why)
    if chosen.mode == PRELOAD and mode == "auto":
        inner = named_program_libpep_cannot_serve(argv[1:], env.get("PATH", os.defpath),
                                                  library, library_why)
        if inner:
            both = plan(program, BOTH, library=library, library_why=library_why)
            if both.mode == SECCOMP:
                chosen, mode = Plan(SECCOMP, f"its command line names a program: {inner}"), BOTH
            else:                           # no supervisor here: libpep.so for what it can
                _say(f"warning: {argv[0]}'s command line names a program libpep.so cannot "
                     f"serve ({inner}), and {both.why}; it would run unproxied")
    if chosen.mode == PRELOAD:
        _info(env, f"running {argv[0]} under libpep.so")
        return _exec(program, argv, preload.environment(pep, env))
    if chosen.mode == SECCOMP:
        _info(env, f"running {argv[0]} under the seccomp supervisor: {chosen.why}")
        # Dynamic children of a static or Go program still get libpep.so, the
        # cheaper path (their connects to the PEP itself pass the filter
        # untouched); --mode seccomp means the supervisor for everything.
        # (--mode both: the same for a dynamic program.)
        child_env = preload.environment(pep, env) if library and mode != SECCOMP else env
        return _run_supervised(program, argv, env, child_env, allow_direct)
    return _refuse(program, argv, env, chosen.why, allow_direct)


def _info(env: dict, text: str) -> None:
    """One line at PEP_LOG=info or debug (to stderr, or the PEP_LOG file)."""
    level, _, path = env.get("PEP_LOG", "").partition(":")
    if level.strip().lower() not in ("info", "debug"):
        return
    line = f"pep run[{os.getpid()}] info: {text}\n"
    if path:
        try:
            with open(path, "a") as f:
                f.write(line)
        except OSError:
            pass
    else:
        sys.stderr.write(line)


def _refuse(program, argv, env, why: str, allow_direct: bool) -> int:
    if not allow_direct:
        _say(f"cannot put {argv[0]}'s connections on the PEP: {why}; refusing "
             f"(--allow-direct runs it unproxied)")
        return REFUSED
    _say(f"cannot put {argv[0]}'s connections on the PEP: {why}; running it unproxied "
         f"(--allow-direct)")
    return _exec(program, argv, env)


def _run_supervised(program, argv, env, child_env, allow_direct: bool) -> int:
    from . import seccomp, supervisor
    if seccomp.filtered():
        why = seccomp.trial_install()    # someone else's filter may forbid ours
        if why:
            return _refuse(program, argv, env, why, allow_direct)
    os.environ.clear()
    os.environ.update(env)              # the supervisor reads PEP_* from its environment
    _filled[:] = _fill_std_fds()
    try:
        channel, supervisor_pid = supervisor.spawn(os.getpid())
    except OSError as exc:
        return _refuse(program, argv, env, f"the seccomp supervisor did not start: "
                                           f"{exc.strerror}", allow_direct)
    seccomp.allow_ptrace_by(supervisor_pid)
    try:
        listener, killable = seccomp.install_connect_listener()
    except seccomp.Unsupported as exc:
        channel.close()                 # the supervisor sees no listener and leaves
        return _refuse(program, argv, env, exc.strerror or str(exc), allow_direct)
    supervisor.hand_over(channel, listener, killable)
    os.close(listener)
    channel.close()
    return _exec(program, argv, child_env)
