"""librelaycore.so from Python (cffi, ABI mode): where it is, its
declarations (read from relaycore.h, not copied), and loading it.

The library is the C engine's tunnel mechanics (relaycore/relaycore.h says
what is C and what stays in Python); pepsock/relay/engine.py drives it.
"""
from __future__ import annotations

import fcntl
import os
import subprocess
import threading

_HERE = os.path.dirname(os.path.abspath(__file__))
_PKG = os.path.dirname(_HERE)
_SOURCE = os.path.join(os.path.dirname(_PKG), "relaycore")
NAME = "librelaycore.so"
HEADER = "relaycore.h"

_lock = threading.Lock()
_loaded = None
_loaded_path = ""   # what load() loaded for the engine


def loaded_path() -> str:
    """The library load() loaded for the engine."""
    return _loaded_path


def _paths(name: str) -> tuple[str, str]:
    """(installed copy next to the package, the source tree's)."""
    return os.path.join(_PKG, name), os.path.join(_SOURCE, name)


def _stale(lib: str) -> bool:
    """A source-tree library older than its sources (or missing)."""
    if not os.path.isfile(lib):
        return True
    built = os.path.getmtime(lib)
    srcs = [os.path.join(_SOURCE, f) for f in os.listdir(_SOURCE) if f.endswith((".c", ".h"))]
    srcs += [os.path.join(_SOURCE, "..", "preload", f) for f in ("tlv.c", "tlv.h")]
    return any(os.path.getmtime(s) > built for s in srcs if os.path.exists(s))


def library_path(name: str = NAME) -> str:
    """The installed library, else the source tree's (built with make when
    missing or older than its sources).  FileNotFoundError if neither."""
    installed, source = _paths(name)
    if os.path.isfile(installed):
        return installed
    if os.path.isfile(os.path.join(_SOURCE, "Makefile")):
        if _stale(source):
            # One build at a time: the workers of a relay start together.
            with open(os.path.join(_SOURCE, ".build-lock"), "w") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                if _stale(source):
                    subprocess.run(["make", "-s", "-C", _SOURCE, name], check=False,
                                   capture_output=True)
        if os.path.isfile(source):
            return source
    raise FileNotFoundError(f"{name} not found: neither {installed} (pip install .) nor "
                            f"{source} (make -C relaycore)")


def cdef_text(lib: str) -> str:
    """The API declarations of relaycore.h (between CFFI-BEGIN and CFFI-END)."""
    with open(os.path.join(os.path.dirname(lib), HEADER)) as f:
        text = f.read()
    return text.split("/* CFFI-BEGIN */", 1)[1].split("/* CFFI-END */", 1)[0]


#: PEP_RELAYCORE=asan loads librelaycore-asan.so (AddressSanitizer + UBSan;
#: libasan must be in LD_PRELOAD): the relay tests run under it that way.
ASAN_NAME = "librelaycore-asan.so"


def load(name: str | None = None):
    """(ffi, lib) for librelaycore.so; `name` picks another build (the ASan
    one: ASAN_NAME).  Raises ImportError (no cffi) or OSError."""
    global _loaded, _loaded_path
    if name is None and os.environ.get("PEP_RELAYCORE") == "asan":
        name = ASAN_NAME
    with _lock:
        if _loaded is not None and name in (None, ASAN_NAME):
            return _loaded
        import cffi
        path = library_path(name or NAME)
        ffi = cffi.FFI()
        ffi.cdef(cdef_text(path))
        lib = ffi.dlopen(path)
        if name is None or name == ASAN_NAME:
            _loaded = (ffi, lib)
            _loaded_path = path
        return ffi, lib
