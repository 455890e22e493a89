"""What one process learns about a PEP, for the user's other processes.

The format is shared with libpep.so (HELPERS conventions, docs/protocol.md
"Shared state"): one file per PEP, `pep-<ip>-<port>`, in

    $PEP_STATE_DIR, else $XDG_RUNTIME_DIR/pepsock, else /tmp/pepsock-<uid>

(mode 0700; a directory not owned by the user or group/world writable is not
used), holding one ASCII line of space-separated `key=value`:

    down_until=<unix s> reason=<refused|timeout|error64|error65>
    tfo=<nocookie|cookie> cookie=<hex> rtt_us=<int>

Unknown keys are kept when rewriting. A write is read-modify-write to
`<file>.<pid>.tmp` and rename() over the file; concurrent writers may lose
an update (each field is a hint). Readers ignore files over 4096 bytes or not
owned by the user, and skip a malformed word, keeping the rest (as state.c
does). Reads are cached on (inode, mtime, size), so a connection costs one
stat() per PEP.
"""
from __future__ import annotations

import logging
import os
import re
import stat
import time

from .policy import normalize_ip

log = logging.getLogger("pepsock")

MAX_FILE = 4096
#: Hold-down when a PEP refuses or times out, and for Error 64/65 without a delay.
DEFAULT_HOLD_DOWN = 30

_dir_checked: dict[str, str | None] = {}
#: path -> (when last stat()ed, (inode, mtime, size), fields)
_cache: dict[str, tuple[float, tuple, dict[str, str]]] = {}
#: A file stat()ed this recently is not stat()ed again: another process's news
#: reaches this one at most this late (ours at once: update() refreshes the cache).
RECHECK = 0.05


def state_dir(env=None) -> str | None:
    """The shared state directory, created if missing; None if unusable (said once)."""
    env = os.environ if env is None else env
    path = env.get("PEP_STATE_DIR") or (
        os.path.join(env["XDG_RUNTIME_DIR"], "pepsock") if env.get("XDG_RUNTIME_DIR")
        else f"/tmp/pepsock-{os.getuid()}")
    try:
        return _dir_checked[path]
    except KeyError:
        pass
    usable: str | None = path
    try:
        os.makedirs(path, mode=0o700, exist_ok=True)
        st = os.lstat(path)
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o022:
            log.warning("pepsock: not using the state directory %s (not a directory of ours, "
                        "or group/world writable); running without shared PEP state", path)
            usable = None
    except OSError as exc:
        log.warning("pepsock: cannot use the state directory %s (%s); running without shared "
                    "PEP state", path, exc.strerror)
        usable = None
    _dir_checked[path] = usable
    return usable


def file_name(ip: str, port: int) -> str:
    """`pep-<ip>-<port>`, the address in canonical text (IPv4-mapped as IPv4)."""
    return f"pep-{normalize_ip(ip)}-{port}"


#: The grammar of the known keys' values; a word breaking it is malformed.
_VALUES = {"down_until": re.compile(r"[0-9]{1,18}"), "rtt_us": re.compile(r"[0-9]{1,18}"),
           "tfo": re.compile(r"nocookie|cookie"),
           "cookie": re.compile(r"(?:[0-9a-fA-F]{2}){1,64}")}
_WORD_SEPARATORS = re.compile(r"[ \t]+")


def parse(text: str) -> dict[str, str]:
    """The first line's `key=value` words, split at blanks and tabs. A malformed
    word (no `=`, no key, a byte that is not ASCII, or a known key whose value
    breaks its grammar) is skipped and the rest kept, as preload/state.c does."""
    fields = {}
    line = text.split("\n", 1)[0].split("\0", 1)[0]
    for word in _WORD_SEPARATORS.split(line):
        key, sep, value = word.partition("=")
        if not sep or not key or not word.isascii():
            continue
        rule = _VALUES.get(key)
        if rule is not None and not rule.fullmatch(value):
            continue
        fields[key] = value
    return fields


def format_fields(fields: dict[str, str]) -> str:
    return " ".join(f"{k}={v}" for k, v in fields.items()) + "\n"


def load(directory: str | None, name: str) -> dict[str, str]:
    """The fields recorded for one PEP ({} when none, or the file is not to be trusted)."""
    if directory is None:
        return {}
    path = directory + "/" + name
    hit = _cache.get(path)
    now = time.monotonic()
    if hit is not None and now - hit[0] < RECHECK:
        return hit[2]
    try:
        st = os.stat(path)
    except OSError:
        _cache[path] = (now, (), {})
        return {}
    key = (st.st_ino, st.st_mtime_ns, st.st_size)
    if hit is not None and hit[1] == key:
        _cache[path] = (now, key, hit[2])
        return hit[2]
    fields: dict[str, str] = {}
    if st.st_size <= MAX_FILE and st.st_uid == os.getuid() and stat.S_ISREG(st.st_mode):
        try:
            with open(path, "rb") as f:
                fields = parse(f.read(MAX_FILE + 1).decode("latin-1"))
        except OSError:
            fields = {}
    _cache[path] = (now, key, fields)
    return fields


def update(directory: str | None, name: str, **changes) -> None:
    """Set (str/int) or remove (None) fields of one PEP's record, atomically."""
    if directory is None:
        return
    path = directory + "/" + name
    _cache.pop(path, None)          # read-modify-write from the file, not the cache
    fields = dict(load(directory, name))
    for key, value in changes.items():
        if value is None:
            fields.pop(key, None)
        else:
            fields[key] = str(value)
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        try:
            os.write(fd, format_fields(fields).encode("ascii"))
        finally:
            os.close(fd)
        os.rename(tmp, path)
        _cache.pop(path, None)      # our own news is read back at once
    except OSError as exc:
        log.debug("pepsock: cannot record PEP state in %s: %s", path, exc)
        try:
            os.unlink(tmp)
        except OSError:
            pass


def down_until(fields: dict[str, str], now: float | None = None) -> int | None:
    """The hold-down end (unix seconds) if it is still in the future."""
    text = fields.get("down_until")
    if not text:
        return None
    try:
        until = int(text)
    except ValueError:
        return None
    return until if until > (time.time() if now is None else now) else None
