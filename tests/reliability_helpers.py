"""Shared pieces of the reliability suite (issue 6): fd/RSS probes, builds, waits."""
from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
FUZZ = ROOT / "fuzz"
PRELOAD = ROOT / "preload"


def fd_count(pid: int | str = "self") -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def rss_kib(pid: int | str = "self") -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def wait_until(pred, timeout: float, interval: float = 0.05):
    """Poll pred() until it returns a true value or timeout passes; returns its last value."""
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval)


def clang() -> str | None:
    return shutil.which("clang") or shutil.which("clang-14")


def build_fuzzer(out_dir: pathlib.Path) -> tuple[pathlib.Path | None, str]:
    """Build fuzz/fuzz_tlv.c + preload/tlv.c with libFuzzer, ASan and UBSan.

    Returns (binary, "") or (None, why it could not be built)."""
    cc = clang()
    if cc is None:
        return None, "needs clang (apt-get install clang libclang-rt-14-dev)"
    out = out_dir / "fuzz_tlv"
    proc = subprocess.run(
        [cc, "-g", "-O1", "-fno-omit-frame-pointer", "-fsanitize=fuzzer,address,undefined",
         "-fno-sanitize-recover=undefined", f"-I{PRELOAD}", str(FUZZ / "fuzz_tlv.c"),
         str(PRELOAD / "tlv.c"), "-o", str(out)],
        capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        if "fuzzer" in proc.stderr and ("cannot find" in proc.stderr or "No such file" in proc.stderr):
            return None, "clang found but no libFuzzer runtime (apt-get install libclang-rt-14-dev)"
        raise AssertionError(f"fuzz harness does not build:\n{proc.stderr}")
    return out, ""


def build_tlv_shared(out_dir: pathlib.Path) -> pathlib.Path | None:
    """preload/tlv.c as a plain shared library (for the Python/C differential)."""
    cc = clang() or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        return None
    out = out_dir / "libtlv.so"
    subprocess.run([cc, "-shared", "-fPIC", "-O1", "-o", str(out), str(PRELOAD / "tlv.c")],
                   check=True, capture_output=True, timeout=60)
    return out


def libfuzzer_stats(output: str) -> dict[str, int]:
    """The stat::name: value lines libFuzzer prints with -print_final_stats=1."""
    stats = {}
    for line in output.splitlines():
        if line.startswith("stat::"):
            name, _, value = line[6:].partition(":")
            try:
                stats[name.strip()] = int(value.strip())
            except ValueError:
                pass
    return stats


# ---------------------------------------------------------------------------
# Relay probes (the relay runs as `ip netns exec NS python -m pepsock.relay`,
# which execs in place: Relay.proc.pid is the relay itself)


def relay_metrics(relay, host) -> dict[str, float]:
    with host.enter():
        return relay.metrics()


def relay_fds_beyond_pool(relay, host) -> int:
    """The relay's open fds, less the pooled/in-use pipes (2 fds each) it reports:
    what must come back to its starting value once every tunnel is gone."""
    m = relay_metrics(relay, host)
    return fd_count(relay.proc.pid) - 2 * int(m.get("pep_relay_pipes", 0))


def settle_fds(relay, host, want: int, timeout: float = 8.0) -> int:
    """Wait until relay_fds_beyond_pool() == want (closers linger up to 2 s)."""
    last = [None]

    def ok():
        last[0] = relay_fds_beyond_pool(relay, host)
        return last[0] == want
    wait_until(ok, timeout, 0.1)
    return last[0]
