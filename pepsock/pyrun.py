"""Run a Python program with pepsock.patch() applied, without editing it.

    python -m pepsock.pyrun [--pep HOST:PORT] script.py ARGS...
    python -m pepsock.pyrun [--pep HOST:PORT] -m module ARGS...
    python -m pepsock.pyrun [--pep HOST:PORT] -c 'code' ARGS...
    pep python ...            (the same)

The program sees the argv and sys.path it would see under `python`; every
connection it makes follows PEP_PROXY / PEP_NO_PROXY (--pep sets PEP_PROXY).
"""
from __future__ import annotations

import os
import runpy
import sys

from .patching import patch
from .policy import ConfigError, parse_hostport

USAGE = "usage: pep python [--pep HOST:PORT] (SCRIPT | -m MODULE | -c CODE) [ARGS...]"


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    pep = None
    while argv and (argv[0] in ("--pep", "-h", "--help") or argv[0].startswith("--pep=")):
        if argv[0] in ("-h", "--help"):
            print(__doc__.strip())
            return 0
        if argv[0] == "--pep":
            if len(argv) < 2:
                print(USAGE, file=sys.stderr)
                return 2
            pep, argv = argv[1], argv[2:]
        else:
            pep, argv = argv[0].split("=", 1)[1], argv[1:]
    if argv[:1] == ["--"]:
        argv = argv[1:]
    if not argv or argv[0] in ("-m", "-c") and len(argv) < 2:
        print(USAGE, file=sys.stderr)
        return 2
    if pep is not None:
        try:
            parse_hostport(pep, "--pep")
        except ConfigError as exc:
            print(f"pep python: {exc}", file=sys.stderr)
            return 2
        os.environ["PEP_PROXY"] = pep
    patch()
    if argv[0] == "-m":
        sys.argv = [argv[1], *argv[2:]]
        runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
    elif argv[0] == "-c":
        sys.argv = ["-c", *argv[2:]]
        sys.path.insert(0, "")
        exec(compile(argv[1], "<string>", "exec"), {"__name__": "__main__"})
    else:
        script = argv[0]
        sys.argv = list(argv)
        sys.path[0] = os.path.dirname(os.path.abspath(script))
        runpy.run_path(script, run_name="__main__")
    return 0


if __name__ == "__main__":
    sys.exit(main())
