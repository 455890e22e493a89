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
    # Count first: the stats request itself holds an fd in the relay until the
    # relay has answered it; a quiet relay's pipe count does not move meanwhile.
    for _ in range(20):
        before = fd_count(relay.proc.pid)
        m = relay_metrics(relay, host)
        time.sleep(0.02)
        if fd_count(relay.proc.pid) == before:
            return before - 2 * int(m.get("pep_relay_pipes", 0))
    return before - 2 * int(m.get("pep_relay_pipes", 0))


def settle_fds(relay, host, want: int, timeout: float = 8.0) -> int:
    """Wait until relay_fds_beyond_pool() == want (closers linger up to 2 s)."""
    last = [None]

    def ok():
        last[0] = relay_fds_beyond_pool(relay, host)
        return last[0] == want
    wait_until(ok, timeout, 0.1)
    return last[0]


# ---------------------------------------------------------------------------
# An asyncio echo server in its own process (so the load tests' destination
# runs on another core): `python tests/reliability_helpers.py echo HOST`
# prints "port N" once listening, then echoes every connection until EOF.


def _echo_main(host: str) -> None:
    import asyncio
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))

    async def handle(reader, writer):
        try:
            while True:
                data = await reader.read(1 << 16)
                if not data:
                    break
                writer.write(data)
                await writer.drain()
            writer.write_eof()
            await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()

    async def main():
        server = await asyncio.start_server(handle, host, 0, backlog=4096)
        print(f"port {server.sockets[0].getsockname()[1]}", flush=True)
        await server.serve_forever()

    asyncio.run(main())


class EchoProcess:
    """The asyncio echo server above as a subprocess (argv prefix: a namespace)."""

    def __init__(self, host: str = "127.0.0.1", prefix: list[str] | None = None):
        import sys
        self.proc = subprocess.Popen([*(prefix or []), sys.executable, __file__, "echo", host],
                                     stdout=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()
        if not line.startswith("port "):
            self.proc.kill()
            raise RuntimeError(f"echo server did not start: {line!r}")
        self.addr = (host, int(line.split()[1]))

    def close(self):
        self.proc.kill()
        self.proc.wait(timeout=10)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


if __name__ == "__main__":
    import sys
    if sys.argv[1:2] == ["echo"]:
        _echo_main(sys.argv[2])
