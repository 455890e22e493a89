"""What an executable is, as far as `pep run` cares: can libpep.so enter it?

libpep.so enters a program through the dynamic loader, so it needs an ELF
file with a PT_INTERP program header (a dynamically linked program) that
calls libc for its sockets.  Go programs make their own syscalls even when
dynamically linked, so a Go build note (`.note.go.buildid`, or a PT_NOTE
whose owner is "Go") or a `.go.buildinfo` section marks a program libpep.so
cannot serve.  `#!` scripts are followed to their interpreter (and through
`/usr/bin/env NAME` to NAME), as the kernel and env would.

No I/O beyond reading the file's headers; `inspect(bytes)` is pure, so every
bound is a fast test (tests/test_run_elf.py, with hypothesis).
"""
from __future__ import annotations

import mmap
import os
import shutil
import struct
from dataclasses import dataclass

PT_INTERP = 3
PT_NOTE = 4
SHT_NOTE = 7
GO_NOTE_OWNER = b"Go"
GO_SECTIONS = (b".note.go.buildid", b".go.buildinfo")

EM_386 = 3
EM_X86_64 = 62
EM_AARCH64 = 183
MACHINES = {EM_386: "i386", EM_X86_64: "x86_64", EM_AARCH64: "aarch64"}

#: Headers and tables past this are not believed (a real program's are far smaller).
MAX_TABLE = 1 << 20
#: The kernel follows at most this many nested `#!` interpreters (BINPRM_MAX_RECURSION).
MAX_SCRIPT_DEPTH = 4
SHEBANG_MAX = 256


class NotElf(ValueError):
    """The bytes are not an ELF file this module can read (or are truncated/inconsistent)."""


@dataclass(frozen=True)
class ElfInfo:
    machine: str            # "x86_64", "aarch64", "i386", or "em<N>"
    interp: str | None      # PT_INTERP's path; None: statically linked
    go: bool                # a Go program (build note or .go.buildinfo)

    @property
    def dynamic(self) -> bool:
        return self.interp is not None


def inspect(data: bytes) -> ElfInfo:
    """Parse the ELF header, program headers and section names of `data`.

    `data` must hold the file (or at least every table it points at).
    Raises NotElf on anything that is not a well-formed 32/64-bit ELF.
    """
    if len(data) < 16 or data[:4] != b"\x7fELF":
        raise NotElf("no ELF magic")
    cls, enc = data[4], data[5]
    if cls not in (1, 2) or enc not in (1, 2):
        raise NotElf(f"unknown ELF class {cls} or data encoding {enc}")
    end = "<" if enc == 1 else ">"
    is64 = cls == 2
    if is64:
        fmt = end + "HHIQQQIHHHHHH"
    else:
        fmt = end + "HHIIIIIHHHHHH"
    need = 16 + struct.calcsize(fmt)
    if len(data) < need:
        raise NotElf("truncated ELF header")
    (_type, machine, _version, _entry, phoff, shoff, _flags, _ehsize, phentsize, phnum,
     shentsize, shnum, shstrndx) = struct.unpack_from(fmt, data, 16)
    interp, go = None, False
    ph_fmt = end + ("IIQQQQQQ" if is64 else "IIIIIIII")
    ph_size = struct.calcsize(ph_fmt)
    if phnum:
        _check_table(data, phoff, phentsize, phnum, ph_size, "program header")
    for i in range(phnum):
        fields = struct.unpack_from(ph_fmt, data, phoff + i * phentsize)
        if is64:
            p_type, _pflags, p_offset, _va, _pa, p_filesz = fields[:6]
        else:
            p_type, p_offset, _va, _pa, p_filesz = fields[:5]
        if p_type == PT_INTERP:
            interp = _slice(data, p_offset, p_filesz, "PT_INTERP").split(b"\0", 1)[0] \
                .decode("utf-8", "replace")
        elif p_type == PT_NOTE:
            go = go or _has_go_note(_slice(data, p_offset, p_filesz, "PT_NOTE"), end)
    if not go and shnum and shoff:
        go = _has_go_section(data, end, is64, shoff, shentsize, shnum, shstrndx)
    return ElfInfo(MACHINES.get(machine, f"em{machine}"), interp, go)


def _check_table(data: bytes, off: int, entsize: int, num: int, minsize: int, what: str) -> None:
    if entsize < minsize or num * entsize > MAX_TABLE or off + num * entsize > len(data):
        raise NotElf(f"{what} table out of bounds")


def _slice(data: bytes, off: int, size: int, what: str) -> bytes:
    if size > MAX_TABLE or off + size > len(data):
        raise NotElf(f"{what} out of bounds")
    return data[off:off + size]


def _has_go_note(notes: bytes, end: str) -> bool:
    """Walk a note segment (4-byte aligned namesz/descsz/type records)."""
    pos = 0
    while pos + 12 <= len(notes):
        namesz, descsz, _ntype = struct.unpack_from(end + "III", notes, pos)
        pos += 12
        name = notes[pos:pos + namesz].rstrip(b"\0")
        pos += (namesz + 3) & ~3
        pos += (descsz + 3) & ~3
        if name == GO_NOTE_OWNER:
            return True
    return False


def _has_go_section(data, end, is64, shoff, shentsize, shnum, shstrndx) -> bool:
    sh_fmt = end + ("IIQQQQIIQQ" if is64 else "IIIIIIIIII")
    sh_size = struct.calcsize(sh_fmt)
    _check_table(data, shoff, shentsize, shnum, sh_size, "section header")
    if shstrndx >= shnum:
        return False
    sections = [struct.unpack_from(sh_fmt, data, shoff + i * shentsize) for i in range(shnum)]
    strtab = sections[shstrndx]
    names = _slice(data, strtab[4], strtab[5], "section names")
    for sec in sections:
        name_off = sec[0]
        if name_off < len(names) and names[name_off:].split(b"\0", 1)[0] in GO_SECTIONS:
            return True
    return False


# ------------------------------------------------------------------------------ files

@dataclass(frozen=True)
class Program:
    """What `argv[0]` resolves to and runs as."""

    path: str               # the file execve() is given
    binary: str             # the ELF file that finally runs (the interpreter of a script)
    info: ElfInfo | None    # None: not an ELF file (or unreadable)
    why: str = ""           # why `info` is None


def resolve(name: str, path_env: str | None = None) -> str | None:
    """The file execvp() would run for `name` (a path if it has a '/')."""
    if "/" in name:
        return name if os.path.exists(name) else None
    return shutil.which(name, path=path_env if path_env is not None else os.environ.get("PATH"))


def shebang(head: bytes) -> list[str] | None:
    """`#!interp [arg]` -> [interp, arg?] as the kernel splits it, else None."""
    if not head.startswith(b"#!"):
        return None
    line = head[2:].split(b"\n", 1)[0].strip(b" \t\r")
    if not line:
        return None
    interp, _, arg = line.replace(b"\t", b" ").partition(b" ")
    words = [interp.decode("utf-8", "replace")]
    arg = arg.strip()
    if arg:
        words.append(arg.decode("utf-8", "replace"))
    return words


def _env_target(arg: str | None, path_env: str | None) -> str | None:
    """The program `#!/usr/bin/env [-S] NAME ...` runs."""
    if not arg:
        return None
    for word in arg.split():
        if word.startswith("-") or "=" in word:
            continue  # options (-S, -i) and NAME=VALUE assignments
        return resolve(word, path_env)
    return None


def examine(name: str, path_env: str | None = None) -> Program | None:
    """Resolve `name` like execvp and read what will run; None if not found."""
    path = resolve(name, path_env)
    if path is None:
        return None
    current = path
    for _ in range(MAX_SCRIPT_DEPTH + 1):
        try:
            with open(current, "rb") as f:
                head = f.read(SHEBANG_MAX)
                if head.startswith(b"\x7fELF"):
                    try:
                        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
                            return Program(path, current, inspect(data))
                    except (NotElf, ValueError) as exc:
                        return Program(path, current, None, f"unreadable ELF file: {exc}")
        except OSError as exc:
            return Program(path, current, None, f"cannot read {current}: {exc.strerror}")
        words = shebang(head)
        if words is None:
            return Program(path, current, None, "not an ELF executable or #! script")
        interp = words[0]
        if os.path.basename(interp) == "env":
            target = _env_target(words[1] if len(words) > 1 else None, path_env)
            if target is not None:
                interp = target
        current = interp
    return Program(path, current, None, "too many nested #! interpreters")
