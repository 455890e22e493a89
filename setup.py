"""Build hook: compile preload/ (libpep.so) and relaycore/ (librelaycore.so,
the relay's C engine) into the package, and tag the wheel
with the platform that binary is for.

Everything else lives in pyproject.toml. The C library is built with the
project's own Makefile so `make -C preload` and `pip install .` produce the
same binary. An sdist carries preload/'s sources (MANIFEST.in), so installing
from it compiles libpep.so on the target; a wheel carries the compiled
libpep.so and needs no compiler, and its tag says where that binary runs:
`py3-none-manylinux_2_<N>_<arch>`, N being the newest glibc symbol version the
library asks for (what auditwheel computes), or `linux_<arch>` when that
cannot be read or the library needs more than glibc.
"""
import os
import re
import shutil
import subprocess
import sysconfig

from setuptools import Distribution, setup
from setuptools.command.build_py import build_py

try:
    from setuptools.command.bdist_wheel import bdist_wheel   # setuptools >= 70.1
except ImportError:  # older setuptools: the wheel package's
    from wheel.bdist_wheel import bdist_wheel

HERE = os.path.dirname(os.path.abspath(__file__))
PRELOAD = os.path.join(HERE, "preload")
LIBRARY = os.path.join(PRELOAD, "libpep.so")
# The relay's C engine (relaycore/relaycore.h): the library and the header
# cffi reads its declarations from, installed side by side.
RELAYCORE = os.path.join(HERE, "relaycore")
RELAYCORE_FILES = ("librelaycore.so", "relaycore.h")
# What a manylinux library may link to besides itself: glibc's parts and its loader
GLIBC_LIBS = re.compile(r"^(libc|libdl|libpthread|librt|libm)\.so\.\d+$|^ld-linux[-\w.]*\.so\.\d+$")


class BuildWithPreload(build_py):
    def run(self):
        super().run()
        if not os.path.exists(os.path.join(PRELOAD, "Makefile")):
            return
        subprocess.check_call(["make", "-C", PRELOAD, "libpep.so"])
        target = os.path.join(self.build_lib, "pepsock")
        os.makedirs(target, exist_ok=True)
        shutil.copy2(LIBRARY, os.path.join(target, "libpep.so"))
        if os.path.exists(os.path.join(RELAYCORE, "Makefile")):
            subprocess.check_call(["make", "-C", RELAYCORE, "librelaycore.so"])
            for name in RELAYCORE_FILES:
                shutil.copy2(os.path.join(RELAYCORE, name), os.path.join(target, name))


def _readelf(*args):
    try:
        return subprocess.run(["readelf", "--wide", *args, LIBRARY], capture_output=True,
                              text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None


def platform_tag() -> str:
    """The wheel's platform tag for the libpep.so just built (see the module doc)."""
    arch = sysconfig.get_platform().split("-", 1)[-1].replace("-", "_").replace(".", "_")
    plain = f"linux_{arch}"
    versions, dynamic = _readelf("--version-info"), _readelf("--dynamic")
    if not versions or not dynamic:
        return plain
    needed = re.findall(r"\(NEEDED\)\s+Shared library: \[([^\]]+)\]", dynamic)
    if not needed or not all(GLIBC_LIBS.match(name) for name in needed):
        return plain
    glibc = [tuple(map(int, v)) for v in re.findall(r"GLIBC_(\d+)\.(\d+)", versions)]
    major, minor = max(glibc, default=(2, 17))
    if major != 2:
        return plain
    return f"manylinux_2_{max(minor, 17)}_{arch}"


class BinaryDistribution(Distribution):
    """libpep.so is machine code: install into platlib, never as a pure package."""

    def has_ext_modules(self):
        return True


class PlatformWheel(bdist_wheel):
    """A wheel for one platform but any Python 3 (no Python extension modules)."""

    def get_tag(self):
        if self.plat_name_supplied:      # --plat-name given: the builder knows better
            return "py3", "none", self.plat_name.replace("-", "_").replace(".", "_")
        return "py3", "none", platform_tag()


setup(cmdclass={"build_py": BuildWithPreload, "bdist_wheel": PlatformWheel},
      distclass=BinaryDistribution)
