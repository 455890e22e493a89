"""Build hook: compile preload/ (libpep.so) into the package at install time.

Everything else lives in pyproject.toml. The C library is built with the
project's own Makefile so `make -C preload` and `pip install .` produce the
same binary.
"""
import os
import shutil
import subprocess

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = os.path.dirname(os.path.abspath(__file__))
PRELOAD = os.path.join(HERE, "preload")


class BuildWithPreload(build_py):
    def run(self):
        super().run()
        if not os.path.exists(os.path.join(PRELOAD, "Makefile")):
            return
        subprocess.check_call(["make", "-C", PRELOAD, "libpep.so"])
        target = os.path.join(self.build_lib, "pepsock")
        os.makedirs(target, exist_ok=True)
        shutil.copy2(os.path.join(PRELOAD, "libpep.so"), os.path.join(target, "libpep.so"))


setup(cmdclass={"build_py": BuildWithPreload})
