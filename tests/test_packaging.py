"""The project in a user's hands: README's first command from a clean clone with the
system interpreter, and one-line messages for a missing pip extra."""
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import require_root

ROOT = Path(__file__).resolve().parents[1]
SYSTEM_PYTHON = "/usr/bin/python3"
# A fresh machine's PATH: no pyenv, no venv, no ~/.local
PLAIN_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def clean_env(**extra) -> dict:
    """The environment of a new root shell: nothing from our venv or PYTHONPATH."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME", "PYENV_VERSION")
           and not k.startswith("PEP_")}
    env["PATH"] = PLAIN_PATH
    env.update(extra)
    return env


# what a checkout never has: build products, venvs, caches
NOT_IN_A_CLONE = shutil.ignore_patterns(".git", ".venv", "build", "dist", "*.egg-info", "*.so", "*.o",
                                        "__pycache__", ".pytest_cache", ".hypothesis", "report")


def clean_clone(dest: Path) -> Path:
    """The files a `git clone` of this tree would have (tracked and new, not ignored),
    from the working tree: no build/, no libpep.so, no venv. Outside a git checkout
    (a tarball), the tree without build products."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            cwd=ROOT, capture_output=True)
    if listed.returncode != 0:
        shutil.copytree(ROOT, dest, ignore=NOT_IN_A_CLONE)
        return dest
    files = listed.stdout.split(b"\0")
    for name in filter(None, files):
        src = ROOT / os.fsdecode(name)
        if not src.is_file():      # deleted but not yet committed
            continue
        target = dest / os.fsdecode(name)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, target)
    return dest


def require_system_python():
    if not os.access(SYSTEM_PYTHON, os.X_OK):
        pytest.skip(f"needs the system interpreter {SYSTEM_PYTHON}")
    out = subprocess.run([SYSTEM_PYTHON, "-c", "import ensurepip, venv"], capture_output=True)
    if out.returncode:
        pytest.skip("the system Python lacks venv/ensurepip (apt-get install python3-venv)")


# ---------------------------------------------------------------------------
# README's first command

@pytest.mark.skipif(not os.environ.get("CI"), reason="long (pip install + the demo, ~1 min): "
                    "runs where CI is set (.ci/run sets it)")
@pytest.mark.timeout(600)
def test_quickstart_from_a_clean_clone_with_the_system_python(tmp_path):
    require_root()
    require_system_python()
    clone = clean_clone(tmp_path / "pepsock")
    venv = tmp_path / "venv"
    t0 = time.monotonic()
    out = subprocess.run(["bash", "examples/quickstart.sh"], cwd=clone, capture_output=True,
                         text=True, timeout=540, env=clean_env(PEPSOCK_VENV=str(venv)))
    took = time.monotonic() - t0
    text = out.stdout + out.stderr
    assert out.returncode == 0, text[-4000:]
    # the venv is the system interpreter's, not the one running this test
    cfg = (venv / "pyvenv.cfg").read_text()
    assert "home = /usr/bin\n" in cfg, cfg
    import pepsock
    assert f"pep {pepsock.__version__}" in out.stdout
    # libpep.so was built into the install
    lib = subprocess.run([str(venv / "bin" / "pep"), "lib"], capture_output=True, text=True,
                         env=clean_env())
    assert lib.returncode == 0 and lib.stdout.strip().startswith(str(venv)), lib
    # the demo's table, with the formulas
    for want in ("time to first byte (ms)", "2R1+2R2 = ", "R1+2R2 = ", "MB transfer (s)",
                 "fluid bound", "through the PEP: first byte"):
        assert want in out.stdout, out.stdout[-3000:]
    assert "Traceback" not in text
    print(f"quickstart from a clean clone: {took:.0f} s")


# ---------------------------------------------------------------------------
# A missing extra is one line naming it

BLOCK = ("import sys\n"
         "for name in {names!r}:\n"
         "    sys.modules[name] = None   # what `import name` sees where it is not installed\n")


def env_without(tmp_path, *modules) -> dict:
    """PYTHONPATH with a sitecustomize that makes `modules` unimportable, as in an
    install without the extra (checked: it does make them unimportable)."""
    site = tmp_path / "site"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(BLOCK.format(names=list(modules)))
    env = dict(os.environ, PYTHONPATH=f"{site}{os.pathsep}{ROOT}")
    probe = subprocess.run([sys.executable, "-c", f"import {modules[0]}"], env=env,
                           capture_output=True, text=True)
    assert "ModuleNotFoundError" in probe.stderr, probe.stderr
    return env


@pytest.mark.parametrize("blocked,missing", [
    (("pyroute2", "matplotlib"), "pyroute2, matplotlib"),
    (("pyroute2",), "pyroute2"),
    (("matplotlib",), "matplotlib"),
])
def test_pep_eval_names_the_missing_extra(tmp_path, blocked, missing):
    out = subprocess.run([sys.executable, "-m", "pepsock.cli", "eval", "--quick",
                          "--out", str(tmp_path / "report")],
                         env=env_without(tmp_path, *blocked), capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 2
    assert out.stderr == (f"pep eval: needs {missing} (the 'eval' extra): "
                          f"pip install 'pepsock[eval]'\n")
    assert out.stdout == ""
    assert not (tmp_path / "report").exists()


def test_pep_eval_help_and_cleanup_need_no_extra(tmp_path):
    out = subprocess.run([sys.executable, "-m", "pepsock.cli", "eval", "--help"],
                         env=env_without(tmp_path, "pyroute2", "matplotlib"),
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "--quick" in out.stdout, out.stderr


def test_relay_with_stats_runs_without_any_extra(tmp_path):
    """`pep relay --stats` needs nothing beyond the standard library."""
    env = env_without(tmp_path, "pyroute2", "matplotlib", "cffi", "hypothesis")
    relay = subprocess.Popen([sys.executable, "-m", "pepsock.cli", "relay", "--listen", "127.0.0.1:0",
                              "--stats", "127.0.0.1:0"], env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        lines = [relay.stdout.readline(), relay.stdout.readline()]
        assert lines[0].startswith("listening on 127.0.0.1:"), lines
        assert lines[1].startswith("stats on 127.0.0.1:"), lines
        port = int(lines[1].rsplit(":", 1)[1])
        import urllib.request
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
            assert resp.status == 200
    finally:
        relay.send_signal(signal.SIGTERM)
        _, err = relay.communicate(timeout=40)
    assert "Traceback" not in err, err


# ---------------------------------------------------------------------------
# Wheels tell the truth: a platform tag, libpep.so for that platform, no compiler to install

def elf_machine(path) -> int:
    """e_machine of an ELF file (62 x86-64, 183 aarch64, ...)."""
    with open(path, "rb") as f:
        head = f.read(20)
    assert head[:4] == b"\x7fELF", path
    return int.from_bytes(head[18:20], "little" if head[5] == 1 else "big")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """An sdist of this tree, then a wheel built from that sdist (so from source)."""
    pytest.importorskip("build", reason="needs `build` (the test extra)")
    out = tmp_path_factory.mktemp("dist")
    clone = clean_clone(tmp_path_factory.mktemp("src") / "pepsock")
    r = subprocess.run([sys.executable, "-m", "build", "--sdist", "--outdir", str(out), str(clone)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    sdist, = out.glob("pepsock-*.tar.gz")
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(out),
                        str(sdist)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    wheel, = out.glob("pepsock-*.whl")
    return sdist, wheel


def test_sdist_carries_the_c_sources_and_no_binaries(built):
    import tarfile
    sdist, _ = built
    names = {n.split("/", 1)[1] for n in tarfile.open(sdist).getnames() if "/" in n}
    for src in ("preload/Makefile", "preload/hooks.c", "preload/tlv.c", "preload/tlv.h",
                "relaycore/Makefile", "relaycore/relaycore.h", "relaycore/loop.c",
                "relaycore/tunnel.c", "pepsock/testbed/delayline.c", "setup.py", "pyproject.toml"):
        assert src in names, src
    assert not [n for n in names if n.endswith((".so", ".o"))]


def test_wheel_is_tagged_for_the_platform_libpep_is_built_for(built, tmp_path):
    import platform
    import zipfile
    _, wheel = built
    name, version, py, abi, plat = wheel.name[:-len(".whl")].split("-")
    assert (py, abi) == ("py3", "none")
    arch = platform.machine()
    m = re.fullmatch(rf"manylinux_(\d+)_(\d+)_{arch}", plat)
    assert m, plat
    glibc = tuple(map(int, os.confstr("CS_GNU_LIBC_VERSION").split()[1].split(".")[:2]))
    assert (int(m[1]), int(m[2])) <= glibc      # installable here, i.e. not claimed too new
    with zipfile.ZipFile(wheel) as z:
        assert "Root-Is-Purelib: false" in z.read(f"pepsock-{version}.dist-info/WHEEL").decode()
        lib = tmp_path / "libpep.so"
        lib.write_bytes(z.read("pepsock/libpep.so"))
        core = tmp_path / "librelaycore.so"     # the relay's C engine, with its declarations
        core.write_bytes(z.read("pepsock/librelaycore.so"))
        assert b"rc_step" in z.read("pepsock/relaycore.h")
    assert elf_machine(lib) == elf_machine(os.path.realpath(sys.executable))
    assert elf_machine(core) == elf_machine(lib)
    print(f"wheel: {wheel.name}")


def test_wheel_installs_and_runs_without_a_compiler(built, tmp_path):
    require_system_python()
    _, wheel = built
    venv = tmp_path / "venv"
    subprocess.run([SYSTEM_PYTHON, "-m", "venv", str(venv)], check=True, timeout=120)
    bin_ = venv / "bin"
    env = clean_env(PATH=str(bin_))             # no cc, no make, no gcc on PATH
    for tool in ("cc", "gcc", "make"):
        assert shutil.which(tool, path=env["PATH"]) is None
    r = subprocess.run([str(bin_ / "pip"), "install", "-q", "--no-index", "--no-deps", str(wheel)],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    lib = subprocess.run([str(bin_ / "pep"), "lib"], capture_output=True, text=True, env=env)
    assert lib.returncode == 0, lib.stderr
    path = lib.stdout.strip()
    assert path.startswith(str(venv)) and os.path.isfile(path), path
    # the dissector ships as package data
    lua = subprocess.run([str(bin_ / "pep"), "dissector"], capture_output=True, text=True, env=env)
    assert lua.returncode == 0 and lua.stdout.strip().startswith(str(venv)), lua
    assert Path(lua.stdout.strip()).read_text().startswith("-- RFC 8803")
    # the dynamic loader takes it (right machine, libraries it needs are there)
    loaded = subprocess.run(["/bin/true"], env=dict(env, LD_PRELOAD=path, PEP_LOG="error"),
                            capture_output=True, text=True)
    assert loaded.returncode == 0 and "cannot be preloaded" not in loaded.stderr, loaded.stderr
    # an install without the eval extra: pep eval says so in one line
    ev = subprocess.run([str(bin_ / "pep"), "eval", "--quick"], capture_output=True, text=True,
                        env=env, timeout=60)
    assert ev.returncode == 2
    assert ev.stderr.strip().endswith("pip install 'pepsock[eval]'"), ev.stderr
    assert "Traceback" not in ev.stderr


# ---------------------------------------------------------------------------
# The hardened systemd unit for pep relay

UNIT = ROOT / "examples" / "pep-relay.service"


def unit_lines():
    return [l.strip() for l in UNIT.read_text().splitlines() if l.strip() and not l.startswith("#")]


def test_unit_runs_the_relay_with_options_it_accepts():
    import shlex
    from pepsock.relay.cli import parse_config
    exec_start, = [l.split("=", 1)[1] for l in unit_lines() if l.startswith("ExecStart=")]
    argv = shlex.split(exec_start)
    assert argv[0].endswith("/bin/pep") and argv[1] == "relay"
    cfg = parse_config(argv[2:])       # the relay's own parser: exits on an unknown option
    assert cfg.stats is not None and len(cfg.listen) == 2
    settings = dict(l.split("=", 1) for l in unit_lines() if "=" in l)
    assert settings["CapabilityBoundingSet"] == "CAP_NET_BIND_SERVICE"
    assert settings["AmbientCapabilities"] == "CAP_NET_BIND_SERVICE"
    for key in ("NoNewPrivileges", "PrivateTmp", "ProtectHome", "DynamicUser"):
        assert settings[key] == "yes", key
    assert settings["ProtectSystem"] == "strict"
    # the relay's route lookups (routes.py) speak netlink
    assert "AF_NETLINK" in settings["RestrictAddressFamilies"].split()


def test_unit_passes_systemd_analyze(tmp_path):
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("needs systemd-analyze (apt-get install systemd; .ci/run does)")
    # verify wants ExecStart's program to exist: point it at this environment's pep
    pep = shutil.which("pep", path=os.path.dirname(sys.executable)) or shutil.which("pep")
    if pep is None:
        pytest.skip("no `pep` command installed next to this Python (pip install .)")
    unit = tmp_path / "pep-relay.service"
    unit.write_text(UNIT.read_text().replace("/opt/pepsock/bin/pep", pep))
    out = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60)
    ours = [l for l in (out.stdout + out.stderr).splitlines() if "pep-relay" in l]
    assert out.returncode == 0 and not ours, out.stdout + out.stderr
    sec = subprocess.run([analyze, "security", "--offline=yes", str(unit)], capture_output=True,
                         text=True, timeout=60)
    m = re.search(r"Overall exposure level for pep-relay\.service: (\d+\.\d+)", sec.stdout)
    if m is None and "--offline" in sec.stderr:
        pytest.skip("this systemd-analyze has no --offline security check")
    assert m, sec.stdout[-2000:] + sec.stderr
    assert float(m[1]) <= 2.0, sec.stdout          # systemd calls < 2 "OK"; 1.7 here
