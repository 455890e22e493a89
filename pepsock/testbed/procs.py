"""Start the agents (and third-party daemons) inside namespaces; collect their JSON."""
from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
from pathlib import Path

_ROOT = str(Path(__file__).resolve().parents[2])


def _env(**extra: str) -> dict:
    env = dict(os.environ, **extra)
    env["PYTHONPATH"] = _ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def agent(host, *args: str, env: dict | None = None) -> subprocess.Popen:
    """python -m pepsock.testbed.agents ARGS inside `host` (`env`: extra variables)."""
    return host.popen(sys.executable, "-m", "pepsock.testbed.agents", *map(str, args),
                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(**(env or {})))


def python(host, module: str, *args: str, **kw) -> subprocess.Popen:
    return host.popen(sys.executable, "-m", module, *map(str, args), env=_env(), **kw)


def wait_ready(proc: subprocess.Popen, timeout: float = 10.0, what: str = "agent") -> None:
    r, _, _ = select.select([proc.stdout], [], [], timeout)
    line = proc.stdout.readline() if r else ""
    if '"ready"' not in line:
        stop(proc)
        err = proc.stderr.read() if proc.stderr else ""
        raise RuntimeError(f"{what} did not start: {line!r} {err[-2000:]}")


def result(proc: subprocess.Popen, timeout: float) -> dict:
    """The last JSON line the agent printed (kills it on timeout)."""
    try:
        o, e = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        o, e = proc.communicate(timeout=5)
        raise RuntimeError(f"agent timed out after {timeout}s: {e[-2000:]}")
    for line in reversed((o or "").splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise RuntimeError(f"agent gave no result (rc {proc.returncode}): {(e or '')[-2000:]}")


def stop(proc: subprocess.Popen | None, timeout: float = 3.0) -> None:
    if proc is None or proc.poll() is not None:
        return
    try:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=timeout)
    except ProcessLookupError:
        pass
