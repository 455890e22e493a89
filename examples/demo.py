"""The whole system in three namespaces, in one command (as root):

    client 192.0.2.2 ---- 192.0.2.1  PEP  198.51.100.1 ---- 198.51.100.2 server

The PEP runs `pep relay`; the server serves a 1 MiB file over HTTP; the
client fetches it with curl twice, directly and through the PEP with
libpep.so (`pep run`), and checks both copies are intact. The relay's log
line shows the tunnel; TCP Fast Open statistics show the header rode in the
SYN. Everything is removed at the end, Ctrl-C included.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time

from pepsock.testbed.netns import Topology, have_netns

PEP_PORT = 5124


def main() -> int:
    ok, why = have_netns()
    if not ok:
        print(f"demo: {why}", file=sys.stderr)
        return 2
    if shutil.which("curl") is None:
        print("demo: needs curl (apt-get install curl)", file=sys.stderr)
        return 2
    workdir = tempfile.mkdtemp(prefix="pepdemo-")
    payload = os.urandom(1 << 20)
    with open(os.path.join(workdir, "file.bin"), "wb") as f:
        f.write(payload)
    want = hashlib.sha256(payload).hexdigest()
    procs: list[subprocess.Popen] = []
    with Topology(prefix="demo") as topo:
        try:
            client, pep, server = topo.host("client"), topo.host("pep", forwarding=True), \
                topo.host("server")
            topo.link(client, ["192.0.2.2/24"], pep, ["192.0.2.1/24"])
            topo.link(pep, ["198.51.100.1/24"], server, ["198.51.100.2/24"])
            client.run("ip", "route", "add", "default", "via", "192.0.2.1")
            server.run("ip", "route", "add", "default", "via", "198.51.100.1")
            procs.append(server.popen(sys.executable, "-m", "http.server", "8080", "--bind",
                                      "198.51.100.2", "--directory", workdir,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            relay = pep.popen(sys.executable, "-m", "pepsock.cli", "relay", "--listen",
                              f"192.0.2.1:{PEP_PORT}", "--allow-client", "192.0.2.0/24",
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            procs.append(relay)
            for line in relay.stdout:  # log lines may come before it
                print("relay:", line.strip())
                if line.startswith("listening on"):
                    break
            time.sleep(0.5)  # let http.server bind
            url = "http://198.51.100.2:8080/file.bin"
            for label, prefix in (("direct     ", []),
                                  ("through PEP", [sys.executable, "-m", "pepsock.cli", "run",
                                                   "--pep", f"192.0.2.1:{PEP_PORT}", "--"])):
                out = client.run(*prefix, "curl", "-sS", "--max-time", "20", "-o",
                                 os.path.join(workdir, "got.bin"), "-w",
                                 "%{time_connect} %{time_starttransfer} %{time_total}", url,
                                 check=False)
                if out.returncode:
                    print(f"{label}: curl failed: {out.stderr.strip()}")
                    return 1
                with open(os.path.join(workdir, "got.bin"), "rb") as f:
                    intact = hashlib.sha256(f.read()).hexdigest() == want
                connect, ttfb, total = (float(x) * 1000 for x in out.stdout.split())
                print(f"{label}: 1 MiB {'intact' if intact else 'CORRUPTED'}, connect "
                      f"{connect:.1f} ms, first byte {ttfb:.1f} ms, total {total:.1f} ms")
                if not intact:
                    return 1
            stats = client.run("nstat", "-az", "TcpExtTCPFastOpenActive", check=False).stdout
            active = [line for line in stats.splitlines() if "FastOpenActive " in line]
            if active:
                print("client TCP Fast Open:", " ".join(active[0].split()[:2]),
                      "(SYNs that carried data)")
            relay.terminate()
            rest = relay.communicate(timeout=10)[0]
            for line in rest.splitlines():
                print("relay:", line)
            return 0
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
