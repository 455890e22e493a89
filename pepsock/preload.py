"""libpep.so from Python: where it is, and running a command under it.

`pep lib` prints `library_path()`; `run(argv, pep)` runs a command under
the library and waits for it (`pep run` execs instead, and serves static and
Go programs too: pepsock/run.py, docs/run.md). See docs/preload.md.
"""
from __future__ import annotations

import os
import subprocess
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
_NAME = "libpep.so"


def library_path() -> str:
    """Absolute path of libpep.so: the installed copy next to this package,
    else the one built in a source tree (<repo>/preload/libpep.so).

    Raises FileNotFoundError (naming both places) if neither exists.
    """
    installed = os.path.join(_HERE, _NAME)
    if os.path.isfile(installed):
        return installed
    source = os.path.join(os.path.dirname(_HERE), "preload", _NAME)
    if os.path.isfile(source):
        return os.path.abspath(source)
    raise FileNotFoundError(
        f"{_NAME} not found: neither {installed} (pip install .) nor {source} "
        f"(make -C preload)")


def _pep_value(pep) -> str:
    """PEP_PROXY text for pep given as "host:port" or (host, port)."""
    if isinstance(pep, str):
        return pep
    host, port = pep[0], int(pep[1])
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def environment(pep=None, env=None) -> dict:
    """A copy of env (default os.environ) with libpep.so appended to
    LD_PRELOAD and, if pep is given, PEP_PROXY set."""
    env = dict(os.environ if env is None else env)
    lib = library_path()
    current = env.get("LD_PRELOAD", "")
    parts = [p for p in current.replace(":", " ").split() if p]
    if lib not in parts:
        parts.append(lib)
    env["LD_PRELOAD"] = " ".join(parts)
    if pep is not None:
        env["PEP_PROXY"] = _pep_value(pep)
    return env


def run(argv, pep=None) -> int:
    """Run argv under libpep.so and wait; returns its exit status the way a
    shell does (128 + signal number if it was killed)."""
    if not argv:
        raise ValueError("no command to run")
    env = environment(pep)
    try:
        proc = subprocess.Popen(list(argv), env=env)
    except FileNotFoundError:
        print(f"pep run: {argv[0]}: command not found", file=sys.stderr)
        return 127
    except PermissionError:
        print(f"pep run: {argv[0]}: permission denied", file=sys.stderr)
        return 126
    while True:
        try:
            rc = proc.wait()
            break
        except KeyboardInterrupt:
            continue  # the child got the SIGINT too; wait for it
    return 128 - rc if rc < 0 else rc
